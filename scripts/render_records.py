"""Rebuild every benchmark table (``results/bench/*.md``) and the rotation study (``results/rotation_study.md``)
from their committed records, measuring nothing.

    python scripts/render_records.py            # rewrite each .md from its record
    python scripts/render_records.py --check    # exit 1 if a committed .md differs from what its record renders
    python scripts/render_records.py results/bench/cpu-1t-intel-xeon-layer-quantize.json   # just these

Each table is a pure function of its record: ``results/bench/<name>.json`` -> ``<name>.md`` (the renderer is
chosen by the record's shape; a record that renders no table, e.g. ``scripts/bench_hf_quantizer.py``'s, is left
alone), and ``results/rotation_study.csv`` + ``rotation_study_real.csv`` + ``rotation_study.meta.json`` ->
``rotation_study.md``. The measuring scripts (``bench.py``, ``bench_gpu.py``, ``bench_dryrun.py``,
``bench_memory.py``, ``bench_rotations.py``) write their record first and render the .md with the functions
here, so a fresh measurement and a re-render give the same bytes. A note added to a table later belongs in its
record (``"note"`` in the memory benchmark's json), never in the .md: ``tests/test_bench_records.py`` fails on a
table that its record does not reproduce byte for byte. Needs pandas and tabulate only (no torch, no measuring).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "results" / "bench"
ROTATION_MD = ROOT / "results" / "rotation_study.md"


def _suite_tables(rows: list[dict]) -> list[str]:
    """One ``## <suite>`` section per suite, in first-appearance order; columns all-empty in a suite dropped."""
    import pandas as pd

    out = []
    for suite, part in pd.DataFrame(rows).groupby("suite", sort=False):
        part = part.dropna(axis=1, how="all").drop(columns="suite")
        out += [f"## {suite}", "", part.to_markdown(index=False), ""]
    return out


def bench_markdown(rows: list[dict], meta: dict) -> str:
    """``scripts/bench.py`` (CPU suites); the ``x_same_dtype`` sentence only where the rows have that column
    (records from before the bf16-model rows, and suites without layer rows, do not)."""
    ratios = "`x_fp32` is the ratio to a plain fp32 `nn.Linear` timed in the same loop"
    if any("x_same_dtype" in r for r in rows):
        ratios += ", `x_same_dtype` the ratio to `nn.Linear` in the layer's own dtype (bf16 rows: bf16 `nn.Linear`)"
    ratios += ". All OrbitQuant rows are fake-quant (a dense matmul in the compute dtype on dequantized weights)."
    out = [f"# OrbitQuant benchmarks on `{meta['device']}`", "",
           f"{meta['cpu']}; torch {meta['torch']}, {meta['threads']} thread(s); native kernel: "
           f"{meta['native_kernel']}; {meta['date']}. Times are medians of {meta['reps']} interleaved repetitions; "
           + ratios, ""]
    return "\n".join(out + _suite_tables(rows))


def gpu_markdown(rows: list[dict], meta: dict) -> str:
    """``scripts/bench_gpu.py``."""
    out = [f"# OrbitQuant GPU benchmarks on `{meta['gpu']}`", "",
           f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; {meta['date']}. Measured ceilings: "
           f"device copy {meta['ceilings']['copy_TBps']} TB/s (read + write), bf16 8192^3 matmul "
           f"{meta['ceilings']['bf16_matmul_TFLOPs']} TFLOP/s. Times are `triton.testing.do_bench` medians (CUDA "
           "events, inputs rotated past L2); `x_bf16` is the ratio to `bf16 F.linear` on the same shape. Quantized "
           "rows compute bf16 tensor-core products of dequantized values (fake-quant arithmetic); `compact` reads "
           "the packed b-bit codes. `rel_err` is against an fp64 product; `theory` = sqrt(d (D_w + D_a)). "
           "`graph_ms`: CUDA-graph replays (GPU time without Python launch overhead); `ms`: eager calls. Variants: "
           "`ablate` is a timing-only ablation of the one-token kernel (1: no codebook search, 2: no WHT products, "
           "4: no permutation; sums combine), `code_mismatch` the fraction of codes that differ from the torch path.",
           ""]
    if "act_kernel_for_layer_rows" in meta:
        out += [f"Activation kernel used by the layer rows: `{json.dumps(meta['act_kernel_for_layer_rows'])}`", ""]
    return "\n".join(out + _suite_tables(rows))


def dryrun_markdown(out: dict) -> str:
    """``scripts/bench_dryrun.py``."""
    m = out["machine"]
    head = (f"torch {m['torch']}, Python {m['python']}, git {m['git_commit'][:10]}"
            f"{' (tree with uncommitted edits)' if m['git_dirty'] else ''}; load average at start "
            f"{m['loadavg_start'][0]:.1f}, at end {m.get('loadavg_end', [0])[0]:.1f} (a shared machine: seconds are "
            "what it gave then).")
    how = ("`python run.py model=<m> model.init=random quant=orbit eval=<smoke> dtype=<dtype> progress=false`: the "
           "real denoiser's config with random weights; text encoders and VAE are small stand-ins "
           "(docs/dry_runs.md). Quality numbers mean nothing.")
    lines = [f"# CPU dry runs at true size ({m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM)", "", head, "",
             how, "", "| model | dtype | denoiser params | quantized linears | peak RSS GB | seconds per stage | "
             "total s | status |", "|---|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        q = ", ".join(f"{k}: {v}" for k, v in (r.get("quantized") or {}).items()) or "-"
        q += (" (= meta inventory)" if r.get("matches_inventory") else
              " (NOT the meta inventory)" if "quantized" in r else "")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("timing") or {}).items())
        status = "ok" if "error" not in r else r["error"].splitlines()[-1][:120]
        lines.append(f"| {r['model']} | {r['dtype']} | {r.get('params', 0) / 1e9:.3f} B | {q} | "
                     f"{r.get('peak_rss_gb', '-')} | {stages or '-'} | {r['wall_s']} | {status} |")
    return "\n".join(lines) + "\n"


def memory_markdown(out: dict) -> str:
    """``scripts/bench_memory.py``; ``out["note"]``, when the record has one, is printed under the table."""
    rows = out["rows"]
    counts = [r["samples"] for r in rows]
    lines = [f"# Peak RSS vs sample count ({out['what']})", "",
             (f"Machine: {out['machine']}; commit {out['git']}. Peak RSS: GNU time's maximum resident set of the "
              "run process; the stage columns are the peak so far after each stage (results.json `memory`)."), "",
             ("| checkout | quant | samples | peak RSS MB | load | reference | quantize | sample | metrics | wall s "
              "| sample disk MB |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stage_peak_rss_mb"]
        lines.append(f"| {r['checkout']} | {r['quant']} | {r['samples']} | {r['peak_rss_mb']} | " + " | ".join(
            str(st.get(k, st.get(k + '_cached', '-'))) for k in ("load", "reference", "quantize", "sample", "metrics"))
            + f" | {r['wall_s']} | {r['sample_disk_mb']} |")
    lines += ["", f"Growth of peak RSS {min(counts)} -> {max(counts)} samples: {out['growth_mb']} MB "
              f"(target <= {out['target_growth_mb']} MB)."]
    if out.get("note"):
        lines += ["", f"Note (added by hand): {out['note']}"]
    return "\n".join(lines) + "\n"


def render_record(record: dict) -> str | None:
    """The Markdown table of one ``results/bench`` record, by the record's shape; None for a record that has no
    table (``bench_hf_quantizer.py``'s: docs/diffusers.md quotes it)."""
    if "meta" in record and "rows" in record:
        return gpu_markdown(record["rows"], record["meta"]) if "gpu" in record["meta"] else \
            bench_markdown(record["rows"], record["meta"])
    if {"machine", "rss_limit_gb", "runs"} <= record.keys():
        return dryrun_markdown(record)
    if {"what", "machine", "rows", "growth_mb"} <= record.keys():
        return memory_markdown(record)
    if {"model", "median", "runs"} <= record.keys():
        return None
    raise ValueError(f"unknown benchmark record (keys {sorted(record)}): add its renderer to {Path(__file__).name}")


# -- rotation study ---------------------------------------------------------------------------------------------

def rotation_paths(md: Path = ROTATION_MD) -> dict[str, Path]:
    """The records of a rotation study ``<stem>.md``: ``<stem>.csv`` (synthetic stress, one row per d, rotation,
    seed), ``<stem>_real.csv`` (real activations, one row per layer too) and ``<stem>.meta.json`` (what the CSVs do
    not hold: torch version, seeds, dims, date, the rotations' order)."""
    md = Path(md)
    return {"synthetic": md.with_suffix(".csv"), "real": md.with_name(md.stem + "_real.csv"),
            "meta": md.with_name(md.stem + ".meta.json")}


def rotation_markdown(syn, real, meta: dict) -> str:
    """``scripts/bench_rotations.py``'s table from its two CSV records (DataFrames as read back) and its meta."""
    order = {n: i for i, n in enumerate(meta["rotations"])}
    agg = syn.groupby(["d", "rotation"]).agg(w4a4_err=("w4a4_err", "mean"), w4a4_std=("w4a4_err", "std"),
                                             w4a8_err=("w4a8_err", "mean"), ks=("ks", "mean"),
                                             seconds=("seconds", "median"),
                                             time_vs_rpbh=("time_vs_rpbh", "median")).reset_index()
    hr = agg[agg.rotation == "haar"].set_index("d")
    agg["err_vs_haar"] = agg.apply(lambda r: r.w4a4_err / hr.loc[r.d, "w4a4_err"], axis=1)
    agg = agg.sort_values(["d", "rotation"], key=lambda c: c.map(order) if c.name == "rotation" else c)
    per_seed = real.groupby(["source", "d", "rotation", "seed"]).agg(w4a4_err=("w4a4_err", "mean"), ks=("ks", "mean"),
                                                                    layers=("layer", "count")).reset_index()
    ragg = per_seed.groupby(["source", "d", "rotation"]).agg(
        w4a4_err=("w4a4_err", "mean"), w4a4_std=("w4a4_err", "std"), ks=("ks", "mean"),
        layers=("layers", "first")).reset_index()
    ragg = ragg.sort_values(["source", "d", "rotation"], key=lambda c: c.map(order) if c.name == "rotation" else c)
    fmt = {"w4a4_err": "{:.4f}", "w4a4_std": "{:.4f}", "w4a8_err": "{:.4f}", "ks": "{:.4f}", "seconds": "{:.2e}",
           "time_vs_rpbh": "{:.2f}", "err_vs_haar": "{:.3f}"}
    show = agg.copy()
    for k, f in fmt.items():
        show[k] = show[k].map(f.format)
    rshow = ragg.copy()
    for k in ("w4a4_err", "w4a4_std", "ks"):
        rshow[k] = rshow[k].map("{:.4f}".format)
    return ("# Rotation study (generated by scripts/bench_rotations.py)\n\n"
            f"CPU, 1 thread, fp32; {meta['torch']}. Synthetic stress: 512 tokens, N(0,1)+0.5 with 8 outlier "
            "channels x40, Student-t(4) weights (512 rows); mean over rotation seeds "
            f"{meta['seeds']}. Error = relative output error of one OrbitQuant layer; KS = distance of sqrt(d) "
            "x'/||x'|| to N(0,1); time = the rotation alone on the 512 tokens (median of 25), and its ratio to RPBH "
            "timed back to back in each round (median).\n\n"
            "## Synthetic stress\n\n" + show.to_markdown(index=False) +
            "\n\n## Real activations: every quantized linear's probe inputs (digits models; mean over layers, "
            "then mean ± std over rotation seeds)\n\n"
            + rshow.to_markdown(index=False) + "\n")


def render_rotation_study(md: Path = ROTATION_MD) -> str:
    """The rotation study's Markdown from its committed records (see :func:`rotation_paths`)."""
    import pandas as pd

    p = rotation_paths(md)
    meta = json.loads(p["meta"].read_text())
    return rotation_markdown(pd.read_csv(p["synthetic"]), pd.read_csv(p["real"]), meta)


# -- the command ----------------------------------------------------------------------------------------------

def render_file(path: Path) -> tuple[Path, str] | None:
    """(the .md path, its text) of one record: a ``results/bench/*.json``, or the rotation study's
    ``<stem>.meta.json`` (or its ``<stem>.md``); None for a record without a table."""
    path = Path(path)
    if path.name.endswith(".meta.json") or path.suffix == ".md":
        md = path.with_name(path.name.removesuffix(".meta.json").removesuffix(".md") + ".md")
        return md, render_rotation_study(md)
    text = render_record(json.loads(path.read_text()))
    return None if text is None else (path.with_suffix(".md"), text)


def targets(bench_dir: Path = BENCH_DIR, rotation_md: Path = ROTATION_MD) -> list[Path]:
    """Every record that renders a table: the bench JSONs and the rotation study's meta."""
    return sorted(Path(bench_dir).glob("*.json")) + [rotation_paths(rotation_md)["meta"]]


def stale(paths: list[Path]) -> list[str]:
    """Problems of the committed tables: a .md its record does not reproduce byte for byte, a record that renders
    a table with no .md beside it, a ``results/bench`` .md with no record."""
    problems = []
    for p in paths:
        res = render_file(p)
        if res is None:
            continue
        md, text = res
        if not md.exists():
            problems.append(f"{md}: missing (its record {p.name} renders one)")
        elif md.read_bytes() != text.encode("utf-8"):
            problems.append(f"{md}: differs from what {p.name} renders")
    for folder in sorted({Path(p).parent for p in paths if Path(p).name.endswith(".json")
                          and not Path(p).name.endswith(".meta.json")}):
        problems += [f"{m}: no record {m.with_suffix('.json').name}" for m in sorted(folder.glob("*.md"))
                     if not m.with_suffix(".json").exists()]
    return problems


def write_tables(paths: list[Path]) -> None:
    """Rewrite the table of each record (the ``--render`` of the measuring scripts)."""
    for p in paths:
        res = render_file(p)
        if res is None:
            print(f"{p}: record only (no table)")
            continue
        md, text = res
        md.write_text(text, encoding="utf-8")
        print(f"{p} -> {md}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="*", type=Path,
                    help="records to render (default: every results/bench/*.json and the rotation study)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed .md is stale")
    a = ap.parse_args(argv)
    paths = a.records or targets()
    if a.check:
        problems = stale(paths)
        print("\n".join(problems) or f"{len(paths)} records checked: every table is its record's rendering")
        return 1 if problems else 0
    write_tables(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
