"""Run directories: self-describing results on disk, written atomically, skipped when done.

Layout: ``<results_dir>/<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>/`` holding ``.hydra/``,
``samples/`` (``samples.npz``, ``grid.png``), ``results.json`` (written last, atomically), and a
``.RUNNING`` or ``.ERROR`` marker while a run is in flight or after it failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import tempfile
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
_VERSIONED = ("torch", "diffusers", "transformers", "torchmetrics", "hydra-core", "numpy", "scipy")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" / "nan": strict JSON has no Infinity
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write JSON via a temp file + rename so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def provenance(device: str = "cpu") -> dict:
    """Git SHA and dirtiness, library versions, host facts."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    versions = {}
    for pkg in _VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    import torch

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": versions,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


@dataclass
class RunDir:
    path: Path

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    def done(self) -> bool:
        return self.results_path.exists()

    @contextlib.contextmanager
    def guard(self):
        """Mark the run in flight; on failure leave ``.ERROR`` with the traceback (and re-raise)."""
        self.path.mkdir(parents=True, exist_ok=True)
        running, error = self.path / ".RUNNING", self.path / ".ERROR"
        error.unlink(missing_ok=True)
        running.write_text(f"pid {os.getpid()}\n")
        try:
            yield self
        except BaseException:
            error.write_text(traceback.format_exc())
            raise
        finally:
            running.unlink(missing_ok=True)

    def write_results(self, payload: dict) -> Path:
        atomic_write_json(self.results_path, {"schema_version": SCHEMA_VERSION, "status": "ok", **payload})
        return self.results_path
