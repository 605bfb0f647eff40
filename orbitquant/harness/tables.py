"""Results on disk -> tidy tables. Reads ``results.json`` files, never a tracking server."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from orbitquant.harness.records import iter_results

ID_COLS = ["model", "method", "tag", "eval", "quant_seed", "seed"]


def _num(v) -> float:
    return float(v)  # accepts the "inf" strings written for non-finite values


def format_summary(results: dict, path: Path | None = None) -> str:
    """The short table a run prints: metric, direction, fp reference, quantized."""
    c = results["config"]
    q = results["quant_report"]["summary"]
    lines = [
        f"\n{c['model']['name']} | {c['quant']['method']} {c['quant']['tag']} | eval={c['eval']['name']} "
        f"seed={c['seed']} quant_seed={c['quant_seed']}",
        f"quantized {sum(v for k, v in q['treatments'].items() if k != 'skip')}/{q['n_linear']} linears "
        f"{q['treatments']}; linear bytes {q['linear_bytes_src'] / 1e6:.2f} MB -> {q['linear_bytes_quant'] / 1e6:.2f} MB; "
        f"mean per-layer rel. error {q['mean_rel_err'] if q['mean_rel_err'] is None else round(q['mean_rel_err'], 4)}"
        + (f"; measured bits W {q['eff_w_bits']:.3f} A {q['eff_a_bits']:.3f}" if q.get("eff_w_bits") is not None
           else ""),
        f"{'metric':<16} {'better':>6} {'fp reference':>13} {'quantized':>11} {'n':>6}",
    ]
    for name, m in results["metrics"].items():
        ref = results["reference_metrics"][name]["value"]
        lines.append(f"{name:<16} {'higher' if m['higher_is_better'] else 'lower':>6} {_num(ref):>13.4f} "
                     f"{_num(m['value']):>11.4f} {m['n']:>6}")
    if path is not None:
        lines.append(f"results: {path}")
    return "\n".join(lines)


def _bits_label(quant: dict) -> str:
    if quant["method"] == "fp":
        return "fp"
    return f"W{quant.get('w_bits', 16)}A{quant.get('a_bits', 16)}"


def load_results(root: str | Path = "results/runs") -> pd.DataFrame:
    """Runs under ``root`` (a runs tree or a records folder, see :func:`orbitquant.harness.records.iter_results`).
    One row per (run, metric): id columns, bits label (``W4A8``; ``fp``), metric, value, direction, n,
    the fp reference value and the file it came from."""
    rows = []
    for p, r in iter_results(root):
        c = r["config"]
        q = r.get("quant_report", {}).get("summary", {})
        ids = {"model": c["model"]["name"], "method": c["quant"]["method"], "tag": c["quant"]["tag"],
               "bits": _bits_label(c["quant"]), "eval": c["eval"]["name"], "quant_seed": c["quant_seed"],
               "seed": c["seed"],  # measured bits (None in runs older than the accounting)
               "eff_w_bits": q.get("eff_w_bits"), "eff_a_bits": q.get("eff_a_bits")}
        for name, m in r["metrics"].items():
            rows.append({**ids, "metric": name, "value": _num(m["value"]), "higher_is_better": m["higher_is_better"],
                         "n": m["n"], "reference": _num(r["reference_metrics"][name]["value"]), "path": str(p)})
    return pd.DataFrame(rows)


def _bits_order(label: str) -> tuple[int, int]:
    """fp first, then higher weight bits, then higher activation bits."""
    if label == "fp":
        return (-1, 0)
    w, a = label[1:].split("A")
    return (-int(w) + 100, -int(a))


def mean_std_table(df: pd.DataFrame, metrics: list[str] | None = None,
                   by: tuple[str, ...] = ("model", "bits", "method", "tag"), decimals: int = 3,
                   bold: bool = True) -> pd.DataFrame:
    """Mean ± std over seeds, one row per setting, one column per metric, plus the number of runs.

    With ``bold``, the best mean of each metric (by its direction) among the quantized rows of the same
    (model, bits) is wrapped in ``**`` (fp rows are the reference and never compete).
    """
    if metrics is not None:
        df = df[df["metric"].isin(metrics)]
    stats = df.groupby([*by, "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    hib = df.groupby("metric")["higher_is_better"].first()
    stats["cell"] = stats.apply(
        lambda r: f"{r['mean']:.{decimals}f} ± {0.0 if pd.isna(r['std']) else r['std']:.{decimals}f}", axis=1)
    if bold and "bits" in by:
        group = [k for k in by if k in ("model", "bits", "eval")] + ["metric"]
        quant = stats[stats["bits"] != "fp"]
        for _, g in quant.groupby(group):
            if len(g) < 2:
                continue
            m = g["mean"].round(decimals)
            best = m.max() if hib[g["metric"].iloc[0]] else m.min()
            for i in g.index[m == best]:
                stats.loc[i, "cell"] = f"**{stats.loc[i, 'cell']}**"
    table = stats.pivot(index=list(by), columns="metric", values="cell")
    table["runs"] = stats.groupby(list(by))["count"].max()
    if "bits" in by:
        table = table.sort_index(key=lambda idx: idx.map(_bits_order) if idx.name == "bits" else idx)
    cols = [m for m in (metrics or sorted(df["metric"].unique())) if m in table.columns]
    measured = [c for c in ("eff_w_bits", "eff_a_bits") if c in df.columns and df[c].notna().any()]
    if measured:  # iso-bit accounting: the bits each row really spends, beside its nominal label
        eff = df.groupby(list(by))[measured].mean().round(2)
        table = table.join(eff.rename(columns=MEASURED_BITS))
        cols += [MEASURED_BITS[c] for c in measured]
    return table[cols + ["runs"]]


def headline_table(df: pd.DataFrame, bits: list[str], metrics: list[str], exclude_tags: list[str] = (),
                   decimals: int = 2) -> pd.DataFrame:
    """The front-page comparison: :func:`mean_std_table` of ``metrics`` at the ``bits`` labels only (``W4A4``),
    without the extra variants whose tag ends in one of ``exclude_tags`` (``-searched``, ``-mp``...), with the
    measured bits beside each row so methods are read at the bits they really spend."""
    keep = df["bits"].isin(bits) & ~df["tag"].map(lambda t: any(t.endswith(f"-{x}") for x in exclude_tags))
    table = mean_std_table(df[keep], metrics, decimals=decimals)
    hib = df.groupby("metric")["higher_is_better"].first()
    return table.rename(columns={m: f"{m} {'↑' if hib[m] else '↓'}" for m in metrics if m in table.columns})


#: columns of the measured bits (``QuantReport.effective_bits``): codes plus scales, zero points, low-rank branches
#: and extra copies per weight; codes plus per-token / per-group side information per activation element
MEASURED_BITS = {"eff_w_bits": "W bits (measured)", "eff_a_bits": "A bits (measured)"}


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX table of :func:`mean_std_table` output (bold cells as ``\\textbf``)."""
    t = table.reset_index().astype(str)
    t = t.map(lambda v: re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", v.replace("±", "$\\pm$").replace("_", "\\_")))
    t.columns = [str(c).replace("_", "\\_").replace("↑", "$\\uparrow$").replace("↓", "$\\downarrow$")
                 for c in t.columns]
    return t.to_latex(index=False, escape=False)


def _calib_amount(cal: dict) -> str:
    if "inputs_recorded" in cal:
        return f"{cal['inputs_recorded']} denoiser inputs"
    if "tokens_per_layer" in cal:
        return f"{cal['tokens_per_layer']} tokens/layer"
    return "-"


def load_costs(root: str | Path = "results/runs") -> pd.DataFrame:
    """One row per run under ``root`` (a runs tree or a records folder): quantization wall time and what
    calibration cost (seconds when fitted, inputs used)."""
    rows = []
    for _, r in iter_results(root):
        c, q = r["config"], r["quant_report"]["summary"]
        cal = q.get("calibration") or {}
        rows.append({"model": c["model"]["name"], "method": c["quant"]["method"], "tag": c["quant"]["tag"],
                     "eval": c["eval"]["name"], "seed": c["seed"],
                     "quantize_s": q.get("seconds"),
                     "calibration_s": cal.get("seconds_when_fitted", cal.get("seconds", 0.0)) if cal else 0.0,
                     "calib_cached": "cached" in cal,
                     "calib_inputs": _calib_amount(cal),
                     "calib_protocol": c["calib"]["name"] if cal else "-"})
    return pd.DataFrame(rows)


def cost_table(df: pd.DataFrame, by: tuple[str, ...] = ("model", "method", "tag")) -> pd.DataFrame:
    """Mean quantization time (including calibration) and calibration time per setting, side by side."""
    g = df.groupby(list(by))
    out = pd.DataFrame({
        "quantize s (incl. calibration)": g["quantize_s"].mean().round(2),
        "calibration s": g["calibration_s"].mean().round(2),
        "calibration data": g["calib_inputs"].first(),
        "calib protocol": g["calib_protocol"].first(),
        "runs": g.size(),
    })
    return out


def with_paper(ours: pd.DataFrame, paper_csv: str | Path) -> pd.DataFrame:
    """Our :func:`mean_std_table` rows beside the paper's numbers (``method, paper_name, bits, <metrics>...``),
    joined on (method, bits). Paper-only rows (methods we lack) get empty "ours" cells and vice versa; the
    paper's columns are prefixed ``paper:`` so nobody mistakes them for ours."""
    paper = pd.read_csv(paper_csv, dtype={"bits": str})
    paper = paper.rename(columns={c: f"paper: {c}" for c in paper.columns if c not in ("method", "paper_name", "bits")})
    o = ours.reset_index()
    if "model" in o.columns and o["model"].nunique() > 1:
        raise ValueError("a paper table compares one model; filter with --model")
    o = o.drop(columns=[c for c in ("model",) if c in o.columns])
    merged = o.merge(paper, on=["method", "bits"], how="outer")
    merged = merged.sort_values("bits", key=lambda c: c.map(_bits_order), kind="stable")
    front = ["bits", "method", "paper_name"] + (["tag"] if "tag" in merged.columns else [])
    rest = [c for c in merged.columns if c not in front]
    return merged[front + rest].astype(object).fillna("—").set_index(["bits", "method"])
