"""Fault injection for the resume tests: SIGKILL this process at a named point of a run.

    ORBITQUANT_KILL_AT=samples:npz:3 python run.py ...   # killed after writing shard 3's .npz, before its record
    ORBITQUANT_KILL_AT='atomic:rename:results.json:2' python run.py -m ...   # the 2nd results.json, before its rename

Points: ``<store>:shard`` (after a shard of a store is committed), ``<store>:npz`` (between a shard's .npz and its
record: the commit point), with ``<store>`` = ``reference`` or ``samples``; ``metric:<name>`` (before that metric is
computed); and ``atomic:<stage>:<file name>`` at every atomic write (``orbitquant.quant.atomic``: stage ``write`` -- the
temp file is filled, not yet fsynced; ``rename`` -- fsynced, not yet renamed into place; ``done`` -- in place).

The target is ``<pattern>[:<k>]``: the k-th point (counting from 1, per process) whose name matches the shell-style
``<pattern>`` (``atomic:write:*.safetensors:1``), or the first one without ``:<k>``. Without the variable every call
is a dictionary lookup and nothing else. A real SIGKILL (no handler, no cleanup) is what an OOM kill or a preempted
node does, so the tests exercise exactly what users hit.
"""

from __future__ import annotations

import fnmatch
import os
import signal
from collections import Counter

ENV = "ORBITQUANT_KILL_AT"
_counts: Counter = Counter()


def _target(spec: str) -> tuple[str, int]:
    pattern, sep, k = spec.rpartition(":")
    return (pattern, int(k)) if sep and k.isdigit() else (spec, 1)


def point(name: str) -> None:
    """Count an occurrence of ``name``; SIGKILL the process if ``$ORBITQUANT_KILL_AT`` targets this one."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    pattern, k = _target(spec)
    if fnmatch.fnmatchcase(name, pattern):
        _counts[pattern] += 1
        if _counts[pattern] == k:
            os.kill(os.getpid(), signal.SIGKILL)
