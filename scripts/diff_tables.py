"""Old vs new: two versions of a results table (``make_tables.py`` CSVs) side by side, per (bits, method, tag).

    python scripts/diff_tables.py <(git show c1581ba:results/tables/digits.csv) results/tables/digits.csv \
        --metrics psnr_vs_fp fid_vs_fp [--method qdit]

Each cell of the CSVs is "mean ± std" (bold marks dropped); the output has old, new and new - old of each metric's
mean, rows matched on (model, bits, method, tag) -- a row present in one version only shows "—" on the other side.
"""

from __future__ import annotations

import argparse
import re

import pandas as pd

KEYS = ["model", "bits", "method", "tag"]


def _means(path: str, metrics: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str)
    out = df[KEYS].copy()
    for m in metrics:
        col = next((c for c in df.columns if c.split(" ")[0] == m), None)
        if col is None:
            raise SystemExit(f"{path}: no column {m!r}; columns: {', '.join(df.columns)}")
        out[m] = df[col].map(lambda v: float(re.sub(r"\*", "", str(v)).split("±")[0]) if isinstance(v, str) else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--metrics", nargs="+", default=["psnr_vs_fp", "fid_vs_fp"])
    ap.add_argument("--method", nargs="*", help="keep only these methods")
    ap.add_argument("--decimals", type=int, default=2)
    a = ap.parse_args()
    old, new = _means(a.old, a.metrics), _means(a.new, a.metrics)
    both = old.merge(new, on=KEYS, how="outer", suffixes=(" old", " new"))
    if a.method:
        both = both[both["method"].isin(a.method)]
    for m in a.metrics:
        both[f"{m} Δ"] = both[f"{m} new"] - both[f"{m} old"]
    cols = KEYS + [f"{m} {s}" for m in a.metrics for s in ("old", "new", "Δ")]
    print(both[cols].round(a.decimals).astype(object).fillna("—").to_markdown(index=False))


if __name__ == "__main__":
    main()
