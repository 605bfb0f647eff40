"""Print a model's linear-layer inventory by the paper's policy, from a meta-device build (no weights).

    python scripts/inventory.py model=flux1_schnell --json
    python scripts/inventory.py --all            # a markdown table of every shipped config
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orbitquant.harness.inventory import meta_inventory, role_tables  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model=<name>; one of: " + ", ".join(sorted(role_tables())))
    ap.add_argument("--json", action="store_true", help="print {total, by_treatment, dims} as JSON")
    ap.add_argument("--all", action="store_true", help="markdown table of every shipped config")
    args = ap.parse_args()
    if args.all:
        print("| model | params | linears | orbit | adaln INT4 | untouched | input dims -> RPBH block h |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name in sorted(role_tables()):
            r = meta_inventory(name)
            t = r["by_treatment"]
            dims = ", ".join(f"{d}->{h}" for d, h in r["dims"].items())
            print(f"| {name} | {r['params'] / 1e9:.2f} B | {r['total']} | {t['orbit']} | {t['adaln_int4']} | "
                  f"{t['untouched']} | {dims} |")
        return
    if not args.model:
        ap.error("give model=<name> or --all")
    name = args.model.split("=", 1)[1] if args.model.startswith("model=") else args.model
    if name not in role_tables():
        sys.exit(f"unknown model {name!r}; shipped configs: {', '.join(sorted(role_tables()))}")
    r = meta_inventory(name)
    if args.json:
        print(json.dumps({k: r[k] for k in ("total", "by_treatment", "dims")}))
    else:
        print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
