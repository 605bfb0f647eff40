"""Mean ± std tables over seeds, from committed run records or from fresh runs.

    python scripts/make_tables.py digits --collect      # copy the digits runs' records from results/runs into
                                                        # results/records/digits/, then build its tables
    python scripts/make_tables.py digits                # results/records/digits/ -> results/tables/digits*.md,
                                                        # .csv, .tex, _cost.md (and figures with --plots)
    python scripts/make_tables.py                       # all runs under results/runs, all metrics -> stdout
    python scripts/make_tables.py --model digits --eval digits --out results/tables/digits.md   # + .csv, .tex

Rows are (model, bits, method, tag); cells are mean ± std over seeds; the best mean of each metric among
the quantized rows of the same (model, bits) is bold. Mixing eval protocols in one table is refused. An
experiment with a ``<name>.paper.csv`` also gets "paper:" columns beside ours, joined on (method, bits).
An experiment's tables are built from its records alone (``orbitquant/harness/records.py``), so a fresh clone rebuilds
every committed table byte for byte (``tests/test_records.py`` checks it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orbitquant.harness.records import RECORDS_DIR, collect
from orbitquant.harness.tables import (
    cost_table,
    headline_table,
    load_costs,
    load_results,
    mean_std_table,
    to_latex,
    with_paper,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", help="an experiment name (conf/experiment/<name>.yaml): its models, "
                    "eval and metrics, written to results/tables/<name>.md")
    ap.add_argument("--root", help="a runs tree or a records folder (default: results/records/<experiment> for an "
                    "experiment, else results/runs)")
    ap.add_argument("--collect", action="store_true", help="first copy the experiment's finished runs' records from "
                    "--runs into results/records/<experiment>/")
    ap.add_argument("--runs", default="results/runs", help="the runs tree --collect reads")
    ap.add_argument("--model", nargs="*", help="keep only these models")
    ap.add_argument("--eval", nargs="*", help="keep only these eval protocols")
    ap.add_argument("--metrics", nargs="*", help="metric columns (default: all)")
    ap.add_argument("--decimals", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write markdown here (and a .csv beside it)")
    ap.add_argument("--figures", type=Path, default=ROOT / "results/figures", help="where --plots writes")
    ap.add_argument("--plots", action="store_true", help="also plot each metric vs bits per method (mean ± std) "
                    "to results/figures/<name>_<metric>.png")
    args = ap.parse_args()
    paper, headline = None, None
    if args.experiment:
        from omegaconf import OmegaConf

        path = ROOT / "conf/experiment" / f"{args.experiment}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            sys.exit(f"no experiment {args.experiment!r}; available: {', '.join(names)}")
        t = OmegaConf.to_container(OmegaConf.load(path))["table"]
        args.model, args.eval = args.model or t["models"], args.eval or [t["eval"]]
        args.metrics = args.metrics or t.get("metrics")
        args.out = args.out or ROOT / "results/tables" / f"{args.experiment}.md"
        paper = ROOT / t["paper"] if t.get("paper") else None
        headline = t.get("headline")
        records = ROOT / RECORDS_DIR / args.experiment
        if args.collect:
            n = len(collect(args.runs, records, args.model, args.eval[0]))
            print(f"collected {n} run records into {records.relative_to(ROOT)}")
        args.root = args.root or records
    elif args.collect:
        sys.exit("--collect needs an experiment name")
    args.root = args.root or "results/runs"
    df = load_results(args.root)
    if not df.empty and args.model:
        df = df[df["model"].isin(args.model)]
    if not df.empty and args.eval:
        df = df[df["eval"].isin(args.eval)]
    if df.empty and paper is None:
        sys.exit(f"no runs under {args.root} match --model/--eval; run `python run.py` first (and --collect)")
    if df.empty:  # a paper table before any run: show the paper's numbers, say so
        print(f"no runs of {args.experiment} under {args.root} yet: paper numbers only")
        table = pd.read_csv(paper, dtype={"bits": str}).set_index(["bits", "method"])
    else:
        evals = sorted(df["eval"].unique())
        if len(evals) > 1:  # numbers from different protocols are not comparable in one table
            sys.exit(f"results mix eval protocols {evals}; pick one with --eval")
        table = mean_std_table(df, args.metrics, decimals=args.decimals)
        if paper is not None:
            table = with_paper(table, paper)
        arrows = {m: ("↑" if hib else "↓") for m, hib in df.groupby("metric")["higher_is_better"].first().items()}
        table = table.rename(columns={m: f"{m} {arrows[m]}" for m in table.columns if m in arrows})
    md = table.reset_index().to_markdown(index=False)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md + "\n")
        table.to_csv(args.out.with_suffix(".csv"))
        args.out.with_suffix(".tex").write_text(to_latex(table))
        print(f"wrote {args.out} (+ .csv, .tex); bold = best mean per (model, bits) by the metric's direction")
    if args.out and not df.empty and headline:  # the README's table (embedded verbatim, tests/test_docs.py)
        h = headline_table(df, headline["bits"], headline["metrics"], headline.get("exclude_tags", []))
        hpath = args.out.with_name(args.out.stem + "_headline.md")
        hpath.write_text(h.reset_index().drop(columns="model").to_markdown(index=False) + "\n")
        print(f"wrote {hpath}")
    if df.empty:
        return
    if args.plots:
        from orbitquant.harness.viz import plot_metric_vs_bits

        stem = args.experiment or (args.out.stem if args.out else "table")
        for model, dm in df.groupby("model"):
            for metric in args.metrics or sorted(dm["metric"].unique()):
                name = stem if df["model"].nunique() == 1 else f"{stem}_{model}"
                p = plot_metric_vs_bits(dm, metric, args.figures / f"{name}_{metric}.png",
                                        f"{model}, eval={dm['eval'].iloc[0]}: {metric} vs bits")
                if p:
                    print(f"wrote {p}")
    costs = load_costs(args.root)
    costs = costs[costs["model"].isin(df["model"].unique()) & costs["eval"].isin(df["eval"].unique())]
    cost_md = cost_table(costs).reset_index().to_markdown(index=False)
    print("\nquantization cost (wall seconds per run, mean over runs; device as in each results.json):\n" + cost_md)
    if args.out:
        cost_path = args.out.with_name(args.out.stem + "_cost.md")
        cost_path.write_text(cost_md + "\n")
        print(f"wrote {cost_path}")

if __name__ == "__main__":
    main()
