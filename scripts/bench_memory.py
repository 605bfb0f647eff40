"""Peak memory of a run against its sample count: streaming to disk keeps it flat.

    python scripts/bench_memory.py                      # tiny_flux at 256x256, 8 vs 128 samples, fp and orbit
    python scripts/bench_memory.py --counts 8 32 128 --out results/bench/cpu-memory-streaming

Each case is a fresh ``run.py`` process (model=tiny_flux, eval=t2i_smoke at 256x256, one prompt repeated), timed,
with the peak RSS run.py records after each stage in results.json (``memory``: the kernel's ``ru_maxrss`` of the
run process). The target of issue 18: growth from 8 to 128 samples <= 150 MB.
The .json is the record; the .md is rendered from it alone (``scripts/render_records.py``). A remark added later
goes into the record as ``"note"`` (printed under the table), then
``python scripts/bench_memory.py --render results/bench/cpu-memory-streaming.json`` rewrites the .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from render_records import render_file, write_tables  # scripts/render_records.py

ROOT = Path(__file__).resolve().parent.parent


def run_case(n: int, quant: str, size: int, work: Path, root: Path = ROOT) -> dict:
    """One run.py process (of the checkout at ``root``) sampling ``n`` images; returns its wall time, its peak RSS
    (GNU time's ``%M``: the kernel's maximum resident set of the process) and the stage peaks run.py recorded."""
    args = ["model=tiny_flux", "eval=t2i_smoke", f"quant={quant}", f"eval.protocol.height={size}",
            f"eval.protocol.width={size}", "eval.protocol.prompts=[a photo of a cat]", f"eval.protocol.n_per_prompt={n}",
            "eval.protocol.batch_size=4", f"results_dir={work}/runs", f"cache_dir={work}/cache", "progress=false"]
    if quant != "fp":
        args += ["w_bits=4", "a_bits=8"]
    env = _env(root)
    t = time.perf_counter()
    rss_file = work / "maxrss"
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, str(root / "run.py"), *args],
                       cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"run failed ({n} samples, {quant}):\n{p.stderr[-3000:]}")
    res = json.loads(next((work / "runs").glob(f"**/{quant}/**/results.json")).read_text())
    disk = sum(f.stat().st_size for f in (work / "runs").glob(f"**/{quant}/**/samples/*.npz"))
    return {"samples": n, "quant": quant, "checkout": str(root), "wall_s": round(wall, 2),
            "peak_rss_mb": round(int(rss_file.read_text().split()[-1]) / 1024, 1),
            "stage_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in res.get("memory", {}).items()},
            "timing_s": res["timing"], "sample_disk_mb": round(disk / 2**20, 2)}


def _env(root: Path) -> dict:
    """The run's environment: offline, one thread, and a native-kernel build directory of this checkout's own.
    torch rebuilds a JIT extension whose source path changed, and GNU time's peak would then be the C++ compiler's
    (~1.5 GB), not the run's; :func:`warm_up` builds it once before anything is measured."""
    ext = Path(tempfile.gettempdir()) / "orbitquant-bench-ext" / hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext)}


def warm_up(root: Path) -> None:
    """Build (or find) the checkout's native CPU kernel outside the measured runs."""
    subprocess.run([sys.executable, "-c", "from orbitquant.kernels import orbit_cpu; orbit_cpu()"], cwd=root,
                   env=_env(root), capture_output=True, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[8, 128])
    ap.add_argument("--quant", nargs="+", default=["orbit"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout (e.g. `git worktree add /tmp/old <commit>`) measured side by side")
    ap.add_argument("--out", default=str(ROOT / "results/bench/cpu-memory-streaming"))
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="rewrite the .md beside each of these records from the record alone (no runs)")
    a = ap.parse_args()
    if a.render:
        return write_tables(a.render)
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()  # at the start: what was measured
    rows = []
    for root in [ROOT] + ([a.baseline.resolve()] if a.baseline else []):
        warm_up(root)
        for quant in a.quant:
            for n in sorted(a.counts):
                with tempfile.TemporaryDirectory() as d:
                    rows.append(run_case(n, quant, a.size, Path(d), root))
                    print(json.dumps(rows[-1]), flush=True)
    peaks = {(r["checkout"], r["quant"], r["samples"]): r["peak_rss_mb"] for r in rows}
    growth = {f"{Path(r).name or r}:{q}": round(peaks[(r, q, max(a.counts))] - peaks[(r, q, min(a.counts))], 1)
              for r, q, _ in peaks}
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    out = {"what": f"run.py model=tiny_flux eval=t2i_smoke at {a.size}x{a.size}, batch 4, one fresh process per case",
           "machine": {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "torch": torch.__version__},
           "git": git,
           "rows": rows, "growth_mb": growth, "target_growth_mb": 150}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    md_path, md = render_file(Path(a.out + ".json"))  # the table from the record as written
    md_path.write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
