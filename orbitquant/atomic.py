"""Atomic files: a reader sees the old file or the whole new one, never a part; a full disk is one clear error."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path


class DiskFull(RuntimeError):
    """The disk filled up while writing; what was written before is kept."""


def atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(file_object)`` into a unique temp file in the same directory, fsync it and
    rename it into place: a reader sees the old file or the whole new one, never a part, and two writers never
    share a temp name. On any failure the temp file is removed; ENOSPC becomes :class:`DiskFull`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on the device writing {path}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, obj, indent: int = 1) -> None:
    """``obj`` as strict JSON (no NaN/Infinity: callers map them to strings first), written atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


