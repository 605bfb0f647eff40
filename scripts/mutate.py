"""Mutation matrix: apply each mutation of tests/test_mutations.py in-process (monkeypatch, no file is edited) and run
every default-run quality check against it; prints which checks catch which mutation, and the seconds each took.

    python scripts/mutate.py                          # every mutation x every check
    python scripts/mutate.py no_rotation ordering.W4A4   # a subset (mutation and / or check names)

The unmutated code runs first (column "none"): every check must pass there. tests/test_mutations.py asserts the
cells marked in its CAUGHT_BY in the default test run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import conftest  # noqa: F401  (the test session's settings: one thread, Triton interpreter off-GPU)
    import pytest
    import test_mutations as tm
    import torch

    torch.set_num_threads(1)
    checks = tm._checks()
    mutations = [m for m in tm.MUTATIONS if m in argv] or list(tm.MUTATIONS)
    names = [c for c in checks if c in argv] or list(checks)
    bad = [a for a in argv if a not in tm.MUTATIONS and a not in checks]
    if bad:
        print(f"unknown mutation or check: {', '.join(bad)}\nmutations: {', '.join(tm.MUTATIONS)}\n"
              f"checks: {', '.join(checks)}", file=sys.stderr)
        return 2
    problems = 0
    for mutation in ["none", *mutations]:
        for name in names:
            with pytest.MonkeyPatch.context() as mp:
                if mutation != "none":
                    tm.MUTATIONS[mutation](mp)
                t0 = time.perf_counter()
                try:
                    msg = tm.failure(checks[name])
                    verdict = "passes" if msg is None else "CAUGHT"
                except Exception as e:  # noqa: BLE001  (a crash is reported, not a detection)
                    msg, verdict = f"{type(e).__name__}: {e}"[:200], "ERROR"
                dt = time.perf_counter() - t0
            expected = name in tm.CAUGHT_BY.get(mutation, [])
            flag = ""
            if mutation == "none" and verdict != "passes" or expected and verdict != "CAUGHT":
                flag, problems = "  <-- unexpected", problems + 1
            print(f"{mutation:<20} {name:<50} {verdict:<7} {dt:6.1f}s{flag}" + (f"  {msg}" if msg else ""),
                  flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
