"""True-size dry runs on this machine: ``run.py model=<m> model.init=random quant=orbit eval=<smoke>``, one at a time.

    python scripts/bench_dryrun.py [--models wan21 cogvideox_2b dit_xl_2] [--dtype float32] [--rss-limit-gb 20]
                                   [--out results/bench/cpu-dryrun-true-size]

Each run is a fresh ``run.py`` subprocess (real family denoiser at its checkpoint's config with random weights and
small text/VAE stand-ins, see ``orbitquant/harness/adapters/random_init.py``). Recorded per model: wall seconds per stage
(results.json ``timing``), peak RSS of the process (``/usr/bin/time -v`` when present, else
``getrusage(RUSAGE_CHILDREN)``; also the per-stage high-water marks of results.json ``memory``, and a 0.5 s psutil
poll summed over the process tree, which counts a forked child's shared pages twice), the quantized
linears by treatment (results.json ``quant_report``), and the denoiser's parameter count (``inventory``, meta).
A psutil poll kills a run whose resident set passes ``--rss-limit-gb`` (the machine must not swap or thrash) and
retries it once in bfloat16; both attempts are recorded. The machine (CPU model, cores, RAM, load average, torch
version, git commit) is written next to the numbers: the machine may be shared, so timings are what it gave then.
The .json is the record; the .md is rendered from it alone (``scripts/render_records.py``):
``python scripts/bench_dryrun.py --render results/bench/cpu-dryrun-true-size.json`` rewrites it, running nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from render_records import render_file, write_tables  # scripts/render_records.py

ROOT = Path(__file__).resolve().parent.parent
EVALS = {"wan21": "t2v_smoke", "wan21_14b": "t2v_smoke", "cogvideox_2b": "t2v_smoke", "cogvideox_5b": "t2v_smoke",
         "dit_xl_2": "c2i_smoke", "flux1_schnell": "t2i_smoke", "flux1_dev": "t2i_smoke", "zimage_turbo": "t2i_smoke"}


def machine(repo: Path) -> dict:
    """What the numbers were measured on (and the commit of the checkout that ran)."""
    import torch

    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], check=False, cwd=repo, capture_output=True, text=True).stdout.strip()

    return {"cpu": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "ram_gb": round(mem_kb / 2**20, 1), "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "loadavg_start": os.getloadavg()}


def _rss_tree(proc) -> int:
    import psutil

    try:
        p = psutil.Process(proc.pid)
        return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def run_one(model: str, dtype: str, args) -> dict:
    """One ``run.py`` subprocess; its record (never invented: missing numbers stay missing)."""
    cmd = [sys.executable, str(args.repo / "run.py"), f"model={model}", "model.init=random", "quant=orbit",
           f"eval={EVALS[model]}", f"dtype={dtype}", f"results_dir={args.results_dir}", f"cache_dir={args.cache_dir}",
           "progress=false", "overwrite=true"]
    timed = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-v"] if timed else []) + cmd
    log_path = Path(args.results_dir) / f"{model}-{dtype}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    t0, peak_poll, killed = time.perf_counter(), 0, False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(full, cwd=args.repo, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            peak_poll = max(peak_poll, _rss_tree(proc))
            if peak_poll > args.rss_limit_gb * 2**30:
                os.killpg(proc.pid, 9)  # our own child's session only
                killed = True
                proc.wait()
                break
            time.sleep(0.5)
    wall = round(time.perf_counter() - t0, 1)
    text = log_path.read_text()
    rec = {"model": model, "dtype": dtype, "command": " ".join(cmd[1:]), "returncode": proc.returncode,
           "wall_s": wall, "peak_tree_rss_poll_gb": round(peak_poll / 2**30, 2), "log": str(log_path)}
    if timed and (m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)):
        rec["peak_rss_gb"] = round(int(m.group(1)) / 2**20, 2)
    else:  # the largest child so far (run.py is the only child that does real work)
        rec["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    if killed:
        rec["error"] = f"killed: resident set passed {args.rss_limit_gb} GB"
        return rec
    if proc.returncode != 0:
        rec["error"] = "\n".join(line for line in text.splitlines()[-15:] if "Command being timed" not in line)
        return rec
    results = sorted((Path(args.results_dir) / model).glob("orbit/*/*/*/results.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        rec["error"] = "run.py exited 0 but wrote no results.json"
        return rec
    r = json.loads(results[-1].read_text())
    s = r["quant_report"]["summary"]
    rec.update(results=str(results[-1]), timing=r["timing"], memory=r.get("memory"),
               quantized=s["treatments"], n_linear=s["n_linear"], quantize_seconds=s.get("seconds"),
               linear_mb_src=round(s["linear_bytes_src"] / 2**20, 1),
               linear_mb_quant=round(s["linear_bytes_quant"] / 2**20, 1),
               denoiser_forwards_per_sampling=r["sampling"].get("denoiser_forwards"),
               psnr_vs_fp=r["metrics"].get("psnr_vs_fp", {}).get("value"))
    return rec


def _by_policy(treatments: dict[str, int]) -> dict[str, int]:
    """quant_report treatment labels ('orbit w4a8', 'int4_g64 wo', 'skip') -> inventory names."""
    out = {"orbit": 0, "adaln_int4": 0, "untouched": 0}
    for label, n in treatments.items():
        out["orbit" if label.startswith("orbit") else "adaln_int4" if label.startswith("int4") else "untouched"] += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["wan21", "cogvideox_2b", "dit_xl_2"], choices=sorted(EVALS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rss-limit-gb", type=float, default=20.0)
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose run.py runs (e.g. a clean git worktree)")
    ap.add_argument("--results-dir", default="/tmp/dry/runs")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh /tmp/dry/cache-<time> (no cached references)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "cpu-dryrun-true-size"))
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="rewrite the .md beside each of these records from the record alone (no runs)")
    args = ap.parse_args()
    if args.render:
        return write_tables(args.render)
    args.cache_dir = args.cache_dir or f"/tmp/dry/cache-{int(time.time())}"
    from orbitquant.harness.inventory import meta_inventory

    out = {"machine": machine(args.repo), "rss_limit_gb": args.rss_limit_gb, "runs": []}
    for model in args.models:
        inv = meta_inventory(model)
        rec = run_one(model, args.dtype, args)
        if "killed" in rec.get("error", "") and args.dtype == "float32":
            out["runs"].append({**rec, "params": inv["params"]})
            rec = run_one(model, "bfloat16", args)  # reduce rather than thrash
        rec.update(params=inv["params"], expected=inv["by_treatment"], linears=inv["total"])
        if "quantized" in rec:  # the run quantized exactly the layers the meta inventory predicts
            rec["matches_inventory"] = _by_policy(rec["quantized"]) == inv["by_treatment"]
        out["runs"].append(rec)
        print(json.dumps({k: rec.get(k) for k in ("model", "dtype", "wall_s", "peak_rss_gb", "timing", "quantized",
                                                  "error")}), flush=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    md_path, md = render_file(Path(args.out + ".json"))  # the table from the record as written
    md_path.write_text(md, encoding="utf-8")
    shutil.rmtree(args.cache_dir, ignore_errors=True)  # our fresh cache only
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
