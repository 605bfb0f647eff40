"""Run directories: self-describing results on disk, written atomically, skipped when done.

Layout: ``<results_dir>/<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>/`` holding ``.hydra/``,
``samples/`` (the sample store: checksummed shards, ``grid.png``), ``quant_report.json``, ``results.json`` (written
last, atomically), and a ``.RUNNING`` or ``.ERROR`` marker while a run is in flight or after it failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import time
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
    """Write JSON (non-finite floats as strings) via a temp file + fsync + rename: a reader never sees half a file."""
    from orbitquant.quant.atomic import atomic_write_json as write

    write(path, _jsonable(obj), indent=2)


def provenance(device: str = "cpu") -> dict:
    """Git SHA and dirtiness, library versions, host facts."""
    from orbitquant.harness.paths import REPO as root

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


#: config keys left out of a run's identity (skip check, config hash): they never change its numbers, or
#: (w_bits, a_bits) only feed the quant section, which records the values a method actually uses (quant=fp
#: ignores them, so one fp run serves every bit pair of a sweep); ``table`` describes an experiment's table
NON_SEMANTIC = ("overwrite", "progress", "threads", "results_dir", "cache_dir", "logger", "w_bits", "a_bits", "table",
                "runtime", "quant_checkpoint")  # a checkpoint must match quant= exactly (checked), so results do too


def run_identity(cfg: dict, uses_calibration: bool = True) -> dict:
    """The part of a resolved config that determines a run's results (``calib`` only for calibrated methods)."""
    drop = set(NON_SEMANTIC) | (set() if uses_calibration else {"calib"})
    return {k: v for k, v in cfg.items() if k not in drop}


def config_diff(old, new, prefix: str = "") -> list[str]:
    """Human-readable differences between two config trees, e.g. ``["quant.rotation: 'rpbh' -> 'haar'"]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out += config_diff(old[k], new[k], key)
        return out
    return [] if _jsonable(old) == _jsonable(new) else [f"{prefix}: {old!r} -> {new!r}"]


def config_hash(identity: dict) -> str:
    blob = json.dumps(_jsonable(identity), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunLocked(RuntimeError):
    """Another live process holds this run directory."""


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

    def stored_config_diff(self, identity: dict) -> list[str] | None:
        """None when no results exist; else how the stored run's identity differs from ``identity``
        ([] = the same run)."""
        if not self.done():
            return None
        stored = json.loads(self.results_path.read_text())["config"]
        drop = set(NON_SEMANTIC) | ({"calib"} if "calib" not in identity else set())
        return config_diff({k: v for k, v in stored.items() if k not in drop}, identity)

    def write_status(self, **fields) -> None:
        """``status.json``: the job's own record (running / ok / failed, config hash, times, traceback), which
        no launcher keeps reliably (submitit's logs say "completed successfully" for a failed job)."""
        atomic_write_json(self.path / "status.json", {"host": platform.node(), "pid": os.getpid(), **fields})

    def unwritable(self) -> str | None:
        """Why files cannot be written here (read-only mount, full disk, a file in the way), or None. A real
        write probe: permission bits alone say nothing when running as root."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path) as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return f"{type(e).__name__}: {e.strerror or e}"
        return None

    def acquire(self) -> bool:
        """Take an exclusive, non-blocking ``flock`` on ``.lock``; False if another live process holds it (a
        duplicated sweep, a re-queued Slurm task), so two processes never interleave one run's files. The
        OS drops the lock when its holder dies: a killed run never leaves a stale lock. ``guard`` releases it."""
        import fcntl

        if getattr(self, "_lock_file", None) is not None:
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until guard exits
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._lock_file = f
        return True

    def release(self) -> None:
        f = getattr(self, "_lock_file", None)
        if f is not None:
            f.close()
            self._lock_file = None

    @contextlib.contextmanager
    def guard(self, config_hash: str = ""):
        """Mark the run in flight (``.RUNNING``, ``status.json``); on failure leave ``.ERROR`` with the traceback
        and a ``failed`` status (and re-raise)."""
        if not self.acquire():
            raise RunLocked(f"{self.path} is being run by another process")
        running, error = self.path / ".RUNNING", self.path / ".ERROR"
        error.unlink(missing_ok=True)
        running.write_text(f"pid {os.getpid()}\n")
        started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
        self.write_status(status="running", config_hash=config_hash, started=started)
        try:
            yield self
        except BaseException as e:
            tb = traceback.format_exc()
            error.write_text(tb)
            status = "exited" if isinstance(e, SystemExit) else "failed"
            self.write_status(status=status, config_hash=config_hash, started=started,
                              seconds=round(time.perf_counter() - t0, 3), error=tb[-4000:])
            raise
        else:
            self.write_status(status="ok", config_hash=config_hash, started=started,
                              seconds=round(time.perf_counter() - t0, 3))
        finally:
            running.unlink(missing_ok=True)
            self.release()

    def write_results(self, payload: dict) -> Path:
        atomic_write_json(self.results_path, {"schema_version": SCHEMA_VERSION, "status": "ok", **payload})
        return self.results_path
