"""Memory and time of diffusers quantize-at-load (``orbitquant.hf.quantizer``) vs a plain fp load and quantize_.

    python scripts/bench_hf_quantizer.py [--dir /tmp/oq_flux_mid] [--dtype bfloat16] [--out results/bench/hf_quantizer.json]

Builds a FLUX-like ``FluxTransformer2DModel`` from config with random weights (hidden 1024 = 8 heads x 128, 2 dual +
4 single blocks, 146 M parameters: 279 MiB in bf16), saves it, then measures each case in a fresh process:

* ``fp``: ``from_pretrained(dir, torch_dtype=...)``;
* ``posthoc-<runtime>``: that, then ``quantize_`` with the same layers (``diffusers_layers``);
* ``load-<runtime>``: ``from_pretrained(dir, torch_dtype=..., quantization_config=OrbitQuantDiffusersConfig(...))``;
* ``reload-<runtime>``: ``from_pretrained`` of the quantized model saved with ``save_pretrained``.

Memory is read from /proc/self/status: ``VmHWM`` (peak resident set, includes the page cache of the mmap'd
safetensors file the loader reads) and ``RssAnon`` sampled every 2 ms (anonymous memory: what the process itself
allocated). Each is reported above the process's baseline after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

FLUX_MID = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}


class _AnonPeak(threading.Thread):
    """Samples RssAnon every 2 ms (the kernel keeps no high-water mark for anonymous memory alone)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(0.002)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def case(name: str, src: str, dtype_name: str, method: str, w_bits: int, a_bits: int, save: str | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from diffusers import FluxTransformer2DModel

    import orbitquant as oq
    from orbitquant.hf.quantizer import OrbitQuantDiffusersConfig, diffusers_layers, release_freed_memory
    from orbitquant.kernels import orbit_cpu

    orbit_cpu()  # load the native kernel before the baseline
    dtype = getattr(torch, dtype_name)
    kind, _, runtime = name.partition("-")
    # probe_tokens=0: quantize_ would otherwise time a Gaussian probe of every layer, which load time has no input for
    cfg = OrbitQuantDiffusersConfig(method=method, w_bits=w_bits, a_bits=a_bits, runtime=runtime or "fast",
                                    probe_tokens=0)
    base = _status()
    sampler = _AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    if kind == "fp":
        model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=dtype)
    elif kind == "posthoc":
        model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=dtype)
        oq.quantize_(model, cfg.quant_config(), diffusers_layers(model, cfg), runtime=cfg.runtime)
        release_freed_memory()  # so its final figure counts live memory only, as the loader's does
    elif kind == "load":
        model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=dtype, quantization_config=cfg)
    elif kind == "reload":
        model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=dtype)
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    end = _status()
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    out = {"case": name, "seconds": round(seconds, 2), "baseline_rss": base["VmRSS"],
           "peak_rss_extra": end["VmHWM"] - base["VmRSS"], "peak_anon_extra": max(sampler.peak, end["RssAnon"])
           - base["RssAnon"], "final_anon_extra": end["RssAnon"] - base["RssAnon"], "model_tensor_bytes": resident}
    if hasattr(model, "hf_quantizer"):
        out["quantizer_peak_pending_bytes"] = getattr(model.hf_quantizer, "peak_pending_bytes", None)
    if save:
        model.save_pretrained(save)
        out["saved_bytes"] = _dir_bytes(Path(save))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/oq_flux_mid")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--method", default="orbit")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per case; the table shows the median")
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.src, args.dtype, args.method, args.w_bits, args.a_bits, args.save)))
        return

    import torch
    from diffusers import FluxTransformer2DModel

    fp_dir, q_dir = Path(args.dir) / "fp", Path(args.dir) / "quantized"
    if not (fp_dir / "config.json").exists():
        torch.manual_seed(0)
        FluxTransformer2DModel(**FLUX_MID).to(getattr(torch, args.dtype)).save_pretrained(fp_dir)
    rows, runs = [], []
    for name, src, save in (("fp", fp_dir, None), ("posthoc-fast", fp_dir, None), ("posthoc-compact", fp_dir, None),
                            ("load-fast", fp_dir, None), ("load-compact", fp_dir, q_dir),
                            ("reload-compact", q_dir, None)):
        reps = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--case", name, "--src", str(src), "--dtype", args.dtype, "--method",
                   args.method, "--w-bits", str(args.w_bits), "--a-bits", str(args.a_bits)]
            if save:
                cmd += ["--save", str(save)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                sys.exit(res.stderr)
            reps.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(reps[-1]))
        runs += reps
        # the median run of each figure (sampled peaks vary by a few tens of MiB between processes)
        rows.append({k: sorted(r[k] for r in reps)[len(reps) // 2] if isinstance(v, (int, float)) else v
                     for k, v in reps[0].items()})
        rows[-1]["peak_anon_extra_max"] = max(r["peak_anon_extra"] for r in reps)
    mib = 2 ** 20
    print(f"\nmodel: FluxTransformer2DModel {FLUX_MID}; fp file {_dir_bytes(fp_dir) / mib:.1f} MiB ({args.dtype}); "
          f"{args.method} w{args.w_bits}a{args.a_bits}; median of {args.repeat} fresh processes")
    print(f"{'case':<16} {'s':>6} {'peak RSS +MiB':>14} {'peak anon +MiB':>15} {'(max)':>7} {'final anon +MiB':>16}")
    for r in rows:
        print(f"{r['case']:<16} {r['seconds']:>6.1f} {r['peak_rss_extra'] / mib:>14.1f} "
              f"{r['peak_anon_extra'] / mib:>15.1f} {r['peak_anon_extra_max'] / mib:>7.1f} "
              f"{r['final_anon_extra'] / mib:>16.1f}")
    saved = next(r["saved_bytes"] for r in rows if "saved_bytes" in r)
    print(f"on disk: fp {_dir_bytes(fp_dir) / mib:.1f} MiB -> quantized {saved / mib:.1f} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": FLUX_MID, "dtype": args.dtype, "method": args.method,
                                              "w_bits": args.w_bits, "a_bits": args.a_bits,
                                              "fp_bytes": _dir_bytes(fp_dir), "median": rows, "runs": runs},
                                             indent=1))


if __name__ == "__main__":
    main()
