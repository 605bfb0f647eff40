"""Where a sweep stands, from each run's status.json (launchers report only the first failure, if any).

    python scripts/sweep_status.py                 # results/runs
    python scripts/sweep_status.py --root results/runs/digits --failed
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def collect(root: Path) -> list[dict]:
    rows = []
    for p in sorted(root.glob("**/status.json")):
        st = json.loads(p.read_text())
        done = (p.parent / "results.json").exists()
        state = st.get("status", "?")
        if state == "running" and done:
            state = "ok"
        rows.append({"run": str(p.parent.relative_to(root)), "status": state, "seconds": st.get("seconds"),
                     "host": st.get("host"), "pid": st.get("pid"),
                     "error": (st.get("error") or "").strip().splitlines()[-1:] or [""]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("results/runs"))
    ap.add_argument("--failed", action="store_true", help="list only runs that did not finish")
    args = ap.parse_args()
    rows = collect(args.root)
    if not rows:
        sys.exit(f"no status.json under {args.root}")
    counts = Counter(r["status"] for r in rows)
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)} runs)")
    for r in rows:
        if args.failed and r["status"] == "ok":
            continue
        extra = f"  {r['error'][0]}" if r["status"] in ("failed", "exited") else ""
        if r["status"] == "running":
            extra = f"  (pid {r['pid']} on {r['host']}; stale if that process is gone)"
        print(f"{r['status']:>8}  {r['run']}{extra}")
    sys.exit(1 if counts.get("failed") or counts.get("exited") else 0)


if __name__ == "__main__":
    main()
