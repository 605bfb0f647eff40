"""Atomic files: a reader sees the old file or the whole new one, never a part; a full disk is one clear error.

Every file the harness keeps is written here, one way: the new contents go to a unique temp file in the target's
directory (``.<name>.<random><suffix>``: two writers of one path never share a temp name), which is fsynced, renamed
over the target (``os.replace``, atomic on POSIX and Windows), and then the directory is fsynced so the rename itself
survives a power cut (POSIX; skipped where the OS cannot open a directory, e.g. Windows). On any failure the temp file
is removed and the old file is untouched; ENOSPC becomes :class:`DiskFull`.

* :func:`atomic_path` -- for writers that take a file *name* (``safetensors.save_file``, ``np.savez``): yields the
  temp path to write, commits it when the block ends;
* :func:`atomic_write` -- bytes through a file object (built on :func:`atomic_path`);
* :func:`atomic_write_json` -- strict JSON.

A process killed outright (SIGKILL, OOM killer, preemption) runs no cleanup: it can leave its temp file behind, never
a partial target. :func:`remove_stale_temps` clears such leftovers where a lock rules out live writers.

Fault injection: every write passes the hook ``_fault(stage, path, tmp)`` at three stages -- ``"write"`` (the writer
has filled the temp file, which is not yet fsynced), ``"rename"`` (fsynced, not yet renamed into place) and ``"done"``
(renamed, directory fsynced). Tests monkeypatch it to raise at a chosen stage of a chosen file. By default it is
``faults.point("atomic:<stage>:<file name>")``: ``ORBITQUANT_KILL_AT='atomic:rename:results.json'`` SIGKILLs a real
run right before its results.json is renamed into place (see :mod:`orbitquant.quant.faults`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from orbitquant.quant import faults


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask can only swap, racing with other threads' file creation)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


#: mode of a new file under this process's umask (mkstemp's temp files are 0600; a renamed file gets the usual mode)
_FILE_MODE = 0o666 & ~_umask()


class DiskFull(RuntimeError):
    """The disk filled up while writing; what was written before is kept."""


def _fault(stage: str, path: Path, tmp: str) -> None:
    """The fault-injection point of every atomic write (``stage``: ``write``, ``rename`` or ``done``; ``path``: the
    target; ``tmp``: its temp file). A no-op unless ``$ORBITQUANT_KILL_AT`` names it; tests monkeypatch it."""
    faults.point(f"atomic:{stage}:{path.name}")


def _no_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    # writers with their own error types (safetensors: "IoError(Os { code: 28, ... "No space left on device" })")
    return isinstance(e, Exception) and "No space left on device" in str(e)


def _fsync_file(name: str) -> None:
    fd = os.open(name, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """fsync ``directory`` so that renames and new entries in it are durable. Silently skipped where the OS cannot
    open a directory (Windows) or the file system cannot sync one."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on file systems without directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a unique temp path in ``path``'s directory for a writer that takes a file name; when the block ends
    without error, fsync the temp file, rename it over ``path`` and fsync the directory. On any error the temp file
    is removed (``path`` keeps its old contents) and the error re-raised, ENOSPC as :class:`DiskFull`.

    ``suffix`` ends the temp name: writers that append an extension unless it is there (``np.savez`` and ``.npz``)
    need it::

        with atomic_path(out / "feats.npz", suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        _fault("write", path, tmp)
        _fsync_file(tmp)
        _fault("rename", path, tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if _no_space(e):
            raise DiskFull(f"no space left on the device writing {path}") from None
        raise
    _fault("done", path, tmp)


def atomic_write(path: str | Path, write, suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(file_object)`` (a binary file open for writing) atomically, as
    :func:`atomic_path` does: a reader sees the old file or the whole new one, never a part."""
    with atomic_path(path, suffix) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_json(path: str | Path, obj, indent: int = 1) -> None:
    """``obj`` as strict JSON (no NaN/Infinity: callers map them to strings first), written atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temps(directory: str | Path, *names: str) -> list[Path]:
    """Remove the temp files that killed writers of ``directory/<name>`` left behind; returns them. Only call it
    while holding a lock that excludes every other writer of those files (a live writer's temp would go too)."""
    gone = []
    for name in names:
        for p in glob.glob(os.path.join(glob.escape(str(directory)), f".{glob.escape(name)}.*")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                gone.append(Path(p))
    return gone
