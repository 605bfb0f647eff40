"""Preflight: everything a run needs besides the model's code, checked before the model loads.

Each metric (``Metric.needs``) and each model adapter (``ModelAdapter.needs``) declares what it needs as
:class:`Need` items -- files (with their published sha256 where there is one), folders, evaluator environments and
the packages in them, CUDA where an evaluator asserts it, the keys of a reference ``.npz`` -- each saying whether it
is there and, when not, the command that gets it on a connected machine. ``run.py preflight=true`` prints the
checklist of a run (or of every job of a sweep) and exits non-zero when something is missing; a normal run checks
the same list first and stops with the missing items before loading the model.

Hashing a multi-GB checkpoint takes seconds, so verified digests are remembered (by path, size and modification
time) in ``~/.cache/orbitquant/sha256.json``: a second preflight of the same files hashes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

HASH_CACHE_ENV = "ORBITQUANT_HASH_CACHE"
PROBE_TIMEOUT = 300  # seconds for one probe of an evaluator environment (importing torch there can be slow)


@dataclass(frozen=True)
class Need:
    """One thing a run needs: ``what`` it is, ``where`` it is looked for, whether it is there (``ok``), why not
    (``problem``) and how to get it on a connected machine (``fix``: a command where one exists). ``by`` names the
    metrics / model that need it (filled in by :func:`collect`)."""

    what: str
    where: str
    ok: bool
    fix: str = ""
    problem: str = ""
    by: tuple[str, ...] = field(default=(), compare=False)

    def line(self) -> str:
        """One checklist line."""
        who = f" [{', '.join(self.by)}]" if self.by else ""
        if self.ok:
            return f"  ok       {self.what}: {self.where}{who}"
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"  MISSING  {self.what}: {self.where} ({self.problem or 'missing'}){fix}{who}"


# ---------------------------------------------------------------------------------------------- checks
def file_need(what: str, path: str | Path | None, fix: str, sha256: str | None = None,
              hash_prefix: str | None = None, unset: str = "") -> Need:
    """A file, its content checked against ``sha256`` (the full published digest) or ``hash_prefix`` (the digest
    prefix torch.hub puts in a file name, ``name-<prefix>.pth``) when given. ``path=None``: not configured
    (``unset`` names the option or variable to set)."""
    if path is None:
        return Need(what, unset or "not set", False, fix, "not set")
    p = Path(path).expanduser()
    if not p.is_file():
        return Need(what, str(p), False, fix, "not found" if not p.exists() else "not a file")
    want = sha256 or hash_prefix
    if want:
        got = file_sha256(p)
        if not got.startswith(want.lower()):
            return Need(what, str(p), False, fix, f"sha256 {got[:16]}... is not the published {want[:16]}...: a "
                                                  "different or truncated file")
    return Need(what, str(p), True, fix)


def hub_prefix(path: str | Path) -> str | None:
    """The sha256 prefix torch.hub file names carry (``alexnet-owt-7be5be79.pth`` -> ``7be5be79``), if any."""
    m = re.search(r"-([a-f0-9]{8,})\.", Path(path).name)
    return m.group(1) if m else None


def dir_need(what: str, path: str | Path | None, fix: str, contains: Sequence[str] = (), unset: str = "") -> Need:
    """A folder, with ``contains`` (relative paths) inside it."""
    if path is None:
        return Need(what, unset or "not set", False, fix, "not set")
    p = Path(path).expanduser()
    if not p.is_dir():
        return Need(what, str(p), False, fix, "not found" if not p.exists() else "not a folder")
    absent = [c for c in contains if not (p / c).exists()]
    if absent:
        return Need(what, str(p), False, fix, f"lacks {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
    return Need(what, str(p), True, fix)


def npz_need(what: str, path: str | Path, any_of: Sequence[Sequence[str]], fix: str) -> Need:
    """An ``.npz`` holding one of the key sets ``any_of`` (read from its index, no array is loaded)."""
    import zipfile

    p = Path(path).expanduser()
    if not p.is_file():
        return Need(what, str(p), False, fix, "not found")
    try:
        with zipfile.ZipFile(p) as z:
            keys = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        return Need(what, str(p), False, fix, f"unreadable ({e})")
    if any(set(ks) <= keys for ks in any_of):
        return Need(what, str(p), True, fix)
    want = " or ".join("+".join(ks) for ks in any_of)
    return Need(what, str(p), False, fix, f"has {', '.join(sorted(keys)) or 'no arrays'}, needs {want}")


def module_need(what: str, module: str, fix: str, python: str | Path | None = None) -> Need:
    """``module`` importable -- here (found without importing it), or by the interpreter ``python`` of an
    evaluator's own environment (a subprocess probe)."""
    if python is None:
        ok = importlib.util.find_spec(module) is not None
        return Need(what, f"python module {module}", ok, fix, "" if ok else "not installed")
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    ok, problem = _probe(python, code)
    return Need(what, f"{module} in {python}", ok, fix, problem or "not installed there")


def cuda_need(what: str, python: str | Path | None = None, fix: str = "run on a node with a CUDA GPU") -> Need:
    """A CUDA device visible to torch -- here, or in the environment of ``python``."""
    if python is None:
        import torch

        ok = torch.cuda.is_available()
        return Need(what, "torch.cuda here", ok, fix, "" if ok else "no CUDA device")
    ok, problem = _probe(python, "import sys, torch; sys.exit(not torch.cuda.is_available())")
    return Need(what, f"torch.cuda in {python}", ok, fix, problem or "no CUDA device there")


def _probe(python: str | Path, code: str) -> tuple[bool, str]:
    """Run ``code`` with another interpreter: (exit status 0, problem when it could not run at all)."""
    if not Path(python).expanduser().exists():
        return False, f"interpreter {python} not found"
    try:
        p = subprocess.run([str(Path(python).expanduser()), "-c", code], capture_output=True, timeout=PROBE_TIMEOUT,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"probe failed: {e}"
    return p.returncode == 0, ""


# ---------------------------------------------------------------------------------------------- hashing
def _hash_cache_path() -> Path:
    env = os.environ.get(HASH_CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orbitquant" / "sha256.json"


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """The file's sha256, remembered by (resolved path, size, mtime) so each file is hashed once."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(p))
    if isinstance(hit, list) and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    cache[str(p)] = [*stamp, digest]
    try:
        from orbitquant.quant.atomic import atomic_write_json

        atomic_write_json(cache_path, cache)
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


# ---------------------------------------------------------------------------------------------- a run's list
def collect(adapter=None, metrics: Iterable = ()) -> list[Need]:
    """The needs of a model adapter and metrics, each item once (``by`` lists everything that needs it). A
    ValueError from a metric (a bad option) propagates: it is a config error, not a missing piece."""
    out: dict[tuple[str, str], Need] = {}

    def add(needs: Iterable[Need], who: str) -> None:
        for n in needs:
            key = (n.what, n.where)
            prev = out.get(key)
            out[key] = replace(n, by=(*prev.by, who) if prev else (who,)) if not prev or who not in prev.by else prev

    if adapter is not None:
        add(adapter.needs(), f"model={adapter.name}")
    for m in metrics:
        add(m.needs(), m.name)
    return list(out.values())


def missing(needs: Iterable[Need]) -> list[Need]:
    return [n for n in needs if not n.ok]


def render(needs: Sequence[Need], title: str = "preflight") -> str:
    """The checklist: one line per item, then a verdict line."""
    absent = missing(needs)
    head = f"{title}: {len(needs) - len(absent)}/{len(needs)} present"
    verdict = (f"{len(absent)} missing: fix them, then run again (nothing was loaded or sampled)" if absent
               else "everything this run needs is present")
    return "\n".join([head, *(n.line() for n in needs), verdict])


def error_text(needs: Sequence[Need]) -> str:
    """What a run that cannot start prints: one line for a single missing item, else the list."""
    absent = missing(needs)
    if len(absent) == 1:
        n = absent[0]
        fix = f"; {n.fix}" if n.fix else ""
        return f"error: {n.what}: {n.where} ({n.problem or 'missing'}){fix}"
    return "error: " + render(absent, f"{len(absent)} things this run needs are missing")


def raise_missing(needs: Sequence[Need], who: str) -> None:
    """Raise FileNotFoundError naming every missing item (``Metric.check``)."""
    absent = missing(needs)
    if absent:
        raise FileNotFoundError(f"{who}: " + "; ".join(
            f"{n.what} {n.where} ({n.problem or 'missing'}){'; fix: ' + n.fix if n.fix else ''}" for n in absent))
