"""Fault injection for the resume tests: SIGKILL this process at a named point of a run.

    ORBITQUANT_KILL_AT=samples:npz:3 python run.py ...   # killed after writing shard 3's .npz, before its record

Points: ``<store>:shard:<k>`` (after the k-th shard of a store is committed), ``<store>:npz:<k>`` (between the k-th
shard's .npz and its record: the commit point), with ``<store>`` = ``reference`` or ``samples``; and
``metric:<name>`` (before that metric is computed). Counts start at 1 and are per process. Without the variable
every call is a dictionary lookup and nothing else. A real SIGKILL (no handler, no cleanup) is what an OOM kill or
a preempted node does, so the tests exercise exactly what users hit.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "ORBITQUANT_KILL_AT"
_counts: Counter = Counter()


def point(name: str) -> None:
    """Count an occurrence of ``name``; SIGKILL the process if ``$ORBITQUANT_KILL_AT`` targets this one."""
    target = os.environ.get(ENV)
    if not target:
        return
    _counts[name] += 1
    if target == f"{name}:{_counts[name]}" or target == name:
        os.kill(os.getpid(), signal.SIGKILL)
