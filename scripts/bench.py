"""OrbitQuant runtime benchmarks: error, time and bytes side by side, so speed is never bought with accuracy.

    python scripts/bench.py                      # all suites, CPU, 1 thread -> results/bench/<device>.{json,md}
    python scripts/bench.py layer --tokens 256   # one suite, smaller
    python scripts/bench.py layer --peer-python /path/to/peer-venv/bin/python   # + the PyPI `orbitquant` package

Suites:
  layer     one d x d linear (d = 3072 by default) at 256 and 4096 tokens: plain fp32 / bf16 nn.Linear, our
            OrbitQuant layer in fast and compact runtime mode with the native kernel, the same layer on the
            pure-torch path, and a dense-rotation reference (x @ R with a d x d matrix); relative output error
            vs fp64, the theoretical sqrt(D_w + D_a), resident bytes. Every row is fake-quant: a dense fp32
            matmul on dequantized weights (no low-bit GEMM runs on CPU here).
  quantize  weight quantization throughput (GB/s of fp32 weights) and the cold Lloyd-Max build per bit-width.
  model     a stack of d x d linears quantized layer by layer: peak extra RSS over the fp model, resident bytes
            per runtime mode, end-to-end GB/s.
  calib     (not in the default set) the digits DiT quantized by orbit and calibrated baselines in one process:
            wall-clock seconds including calibration, as a ratio to orbit.
Results: results/bench/<device>-<suites>.json and .md (one file per suite set, so partial runs do not clobber).
The .json is the record; the .md is rendered from it alone (``scripts/render_records.py``):
    python scripts/bench.py --render results/bench/<device>-<suites>.json   # rewrite the .md, measure nothing
The peer package is also named ``orbitquant``; it cannot share our interpreter, so it runs in its own venv
(``pip install orbitquant==0.15.0 torch==2.13.0`` there) and is timed by a snippet in that interpreter,
with its own fp32 baseline: compare ratios, not milliseconds, across processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from render_records import render_file, write_tables  # noqa: E402  (scripts/render_records.py)

import orbitquant as oq  # noqa: E402
from orbitquant.kernels import orbit_cpu  # noqa: E402
from orbitquant.quant.codebook import _lloyd_max_np, distortion  # noqa: E402


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # "Intel(R) Xeon(R) Processor" -> intel-xeon
    cpu = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", cpu, flags=re.IGNORECASE)
    return f"cpu-{torch.get_num_threads()}t-" + re.sub(r"[^0-9a-z]+", "-", cpu.lower()).strip("-")


def interleaved(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Median seconds per call; candidates run round-robin so load from other processes hits all alike."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _kernels(on: bool):
    os.environ["ORBITQUANT_KERNELS"] = "1" if on else "0"


def layer_suite(d: int, tokens_list: list[int], bit_pairs: list[tuple[int, int]], reps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    w64 = lin.weight.double()
    bf16 = nn.Linear(d, d).to(torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(lin.weight)
        bf16.bias.copy_(lin.bias)
    fp_bytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    for wb, ab in bit_pairs:
        _kernels(True)
        layer = _only_quant_layer(nn.Sequential(_clone(lin)), wb, ab)
        compact = _only_quant_layer(nn.Sequential(_clone(lin)), wb, ab, runtime="compact")
        # a bf16 model computes in bf16 (the kernel reads and writes bf16): the fast dtype on AMX CPUs
        layer16 = _only_quant_layer(nn.Sequential(_clone(lin).to(torch.bfloat16)), wb, ab)
        compact16 = _only_quant_layer(nn.Sequential(_clone(lin).to(torch.bfloat16)), wb, ab, runtime="compact")
        rot = layer.rotation
        dense_r = rot.matrix(torch.float32).T.contiguous()  # rot(x) = x @ R^T -> x @ dense_r
        theory = math.sqrt(d * (distortion(d, wb) + distortion(d, ab)))  # relative error of unit vectors
        for n in tokens_list:
            x = torch.randn(n, d, generator=g)
            x16 = x.bfloat16()
            y64 = x.double() @ w64.T + lin.bias.double()

            def err(y):
                return float((y.double() - y64).norm() / y64.norm())

            def dense_ref():  # the same math with a dense d x d rotation and the torch quantizer
                return nn.functional.linear(layer.act(x @ dense_r), layer.weight, layer.bias)

            def torch_path():
                _kernels(False)
                try:
                    return layer(x)
                finally:
                    _kernels(True)

            cands = {"fp32 nn.Linear": lambda: lin(x), "bf16 nn.Linear": lambda: bf16(x16),
                     "orbit fast (native kernel)": lambda: layer(x), "orbit compact (native kernel)": lambda: compact(x),
                     "orbit fast (torch path)": torch_path, "orbit dense-rotation reference": dense_ref,
                     "orbit fast, bf16 model (native kernel)": lambda: layer16(x16),
                     "orbit compact, bf16 model (native kernel)": lambda: compact16(x16)}
            with torch.no_grad():
                t = interleaved(cands, reps)
                errs = {k: err(f()) for k, f in cands.items()}
            resident = {"fp32 nn.Linear": fp_bytes, "bf16 nn.Linear": fp_bytes // 2,
                        "orbit fast (native kernel)": layer.resident_bytes,
                        "orbit compact (native kernel)": compact.resident_bytes,
                        "orbit fast (torch path)": layer.resident_bytes,
                        "orbit fast, bf16 model (native kernel)": layer16.resident_bytes,
                        "orbit compact, bf16 model (native kernel)": compact16.resident_bytes,
                        "orbit dense-rotation reference": layer.resident_bytes + dense_r.numel() * 4}
            for k in cands:
                rows.append({"suite": "layer", "d": d, "tokens": n, "bits": f"W{wb}A{ab}", "impl": k,
                             "ms": round(t[k] * 1e3, 2), "x_fp32": round(t[k] / t["fp32 nn.Linear"], 3),
                             # against nn.Linear in the layer's own dtype
                             "x_same_dtype": round(t[k] / t["bf16 nn.Linear" if "bf16" in k else "fp32 nn.Linear"], 3),
                             "rel_err": round(errs[k], 5), "theory": None if k.startswith(("fp32", "bf16")) else
                             round(theory, 5), "resident_MB": round(resident[k] / 1e6, 2),
                             "stored_bits_per_weight": None if k.startswith(("fp32", "bf16")) else
                             round(8 * layer.store.nbytes / (d * d), 4),
                             # compact on CPU: the per-thread buffer all compact layers decode into (scratch)
                             "workspace_MB": round(oq.quant.weights.decode_workspace_bytes(
                                 torch.bfloat16 if "bf16" in k else torch.float32) / 1e6, 2) if "compact" in k
                             else None})
    return rows


def _clone(lin: nn.Linear) -> nn.Linear:
    c = nn.Linear(lin.in_features, lin.out_features)
    c.load_state_dict(lin.state_dict())
    return c


def _only_quant_layer(model: nn.Sequential, wb: int, ab: int, runtime: str = "fast"):
    oq.quantize_(model, oq.OrbitConfig(w_bits=wb, a_bits=ab, probe_tokens=0), runtime=runtime)
    return model[0]


def quantize_suite(d: int, reps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    rot = oq.make_rotation("rpbh", d, 0)
    for bits in (2, 4, 8):
        cb = oq.quant.codebook.get_codebook(d, bits)
        for native in (True, False):
            _kernels(native)
            t = interleaved({"q": lambda: oq.quant.weights.OrbitWeight(None, cb, weight=w, rotation=rot)}, reps)["q"]
            rows.append({"suite": "quantize", "d": d, "bits": bits,
                         "impl": "native kernel" if native else "torch path",
                         "ms": round(t * 1e3, 2), "GB_per_s": round(w.numel() * 4 / t / 1e9, 3)})
    _kernels(True)
    for bits in range(1, 9):  # cold: no lru cache, the numpy solve itself
        t = time.perf_counter()
        _lloyd_max_np.__wrapped__(d, bits) if hasattr(_lloyd_max_np, "__wrapped__") else _lloyd_max_np(d, bits)
        rows.append({"suite": "codebook", "d": d, "bits": bits, "impl": "cold Lloyd-Max build",
                     "ms": round((time.perf_counter() - t) * 1e3, 1)})
    return rows


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_suite(d: int, n_layers: int, bit_pairs) -> list[dict]:
    """Quantize a stack of d x d fp32 linears layer by layer; report the peak extra RSS over the fp model
    (Linux VmHWM, reset first) and what stays resident in each runtime mode."""
    rows = []
    for wb, ab in bit_pairs[:1]:
        for runtime in ("compact", "fast"):
            model = nn.Sequential(*[nn.Linear(d, d) for _ in range(n_layers)])
            fp_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
            except OSError:
                pass
            start = _rss_mb("VmRSS")
            t = time.perf_counter()
            rep = oq.quantize_(model, oq.OrbitConfig(w_bits=wb, a_bits=ab, probe_tokens=0), runtime=runtime)
            sec = time.perf_counter() - t
            rows.append({"suite": "model", "d": d, "layers": n_layers, "bits": f"W{wb}A{ab}", "impl": f"quantize_ ({runtime})",
                         "fp32_model_MB": round(fp_mb, 1), "peak_extra_RSS_MB": round(_rss_mb("VmHWM") - start, 1),
                         "RSS_after_minus_start_MB": round(_rss_mb("VmRSS") - start, 1),
                         "resident_linear_MB": round(rep.resident_bytes / 1e6, 1), "seconds": round(sec, 2),
                         "GB_per_s": round(fp_mb / 1e3 / sec, 3)})
            del model, rep
    return rows


def calib_suite(methods: list[str], bits: tuple[int, int]) -> list[dict]:
    """Quantize the shipped digits DiT with each method, calibration included, in this one process: the
    data-free OrbitQuant against the calibrated baselines, as wall-clock ratios (conf/quant defaults,
    conf/calib/digits.yaml: 260 trajectories x 32 steps)."""
    import copy

    from omegaconf import OmegaConf

    from orbitquant.harness.adapters.digits import DigitsAdapter
    from orbitquant.harness.factory import build_quant_config

    adapter = DigitsAdapter()
    base = adapter.load()
    calib = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/calib/digits.yaml"), resolve=True)["protocol"]
    rows, times = [], {}
    for method in methods:
        q = OmegaConf.load(ROOT / f"conf/quant/{method}.yaml")
        q = OmegaConf.to_container(OmegaConf.merge({"w_bits": bits[0], "a_bits": bits[1], "quant_seed": 0}, {"q": q}),
                                   resolve=True)["q"]
        cfg = build_quant_config(q)
        pipe = copy.deepcopy(base)
        den = adapter.denoiser(pipe)
        t = time.perf_counter()
        rep = oq.quantize_(den, cfg, adapter.layers(den), probe=lambda p=pipe: adapter.probe(p),
                           calibrate=lambda p=pipe: adapter.generate(p, **calib, seed=10_000, progress=False))
        times[method] = time.perf_counter() - t
        rows.append({"suite": "calib", "model": "digits", "bits": f"W{bits[0]}A{bits[1]}", "impl": method,
                     "seconds": round(times[method], 2), "calibration_s": rep.calibration.get("seconds"),
                     "mean_rel_err": round(rep.summary()["mean_rel_err"], 4)})
    ref = times.get("orbit")
    for r in rows:
        r["x_orbit"] = None if not ref else round(times[r["impl"]] / ref, 1)
    return rows


PEER_SNIPPET = r"""
import json, math, statistics, sys, time, os
os.environ.setdefault("ORBITQUANT_KERNELS_AUTOFETCH", "0")
import torch
from torch import nn
from orbitquant import OrbitQuantConfig, OrbitQuantLinear
torch.set_num_threads(1)
d, tokens, pairs, reps = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
lin = nn.Linear(d, d)
with torch.no_grad():
    lin.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
rows = []
for wb, ab in pairs:
    layers = {}
    for mode in ("dequant_bf16", "auto_fused"):
        cfg = OrbitQuantConfig(weight_bits=wb, activation_bits=ab, target_policy="universal", runtime_mode=mode,
                               lowbit_boundary_protection=0)
        layers[mode] = OrbitQuantLinear.from_linear(lin, config=cfg, module_name="bench")
    for n in tokens:
        x = torch.randn(n, d, generator=g)
        y64 = x.double() @ lin.weight.double().T + lin.bias.double()
        fns = {"fp32 nn.Linear": lambda: lin(x)}
        fns.update({f"peer {m}": (lambda l=l: l(x)) for m, l in layers.items()})
        with torch.no_grad():
            for f in fns.values(): f()
            ts = {k: [] for k in fns}
            for _ in range(reps):
                for k, f in fns.items():
                    t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
            for k, f in fns.items():
                y = f()
                rows.append({"d": d, "tokens": n, "bits": f"W{wb}A{ab}", "impl": k,
                             "ms": statistics.median(ts[k]) * 1e3,
                             "rel_err": float((y.double() - y64).norm() / y64.norm())})
print(json.dumps(rows))
"""


def peer_suite(python: str, d: int, tokens_list: list[int], bit_pairs, reps: int) -> list[dict]:
    p = subprocess.run([python, "-c", PEER_SNIPPET, json.dumps([d, tokens_list, bit_pairs, reps])],
                       capture_output=True, text=True, check=False, cwd=tempfile.gettempdir(),  # not our package dir
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        raise SystemExit(f"peer run failed ({python}):\n{p.stderr[-2000:]}")
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    base = {(r["tokens"], r["bits"]): r["ms"] for r in rows if r["impl"] == "fp32 nn.Linear"}
    out = []
    for r in rows:
        if r["impl"] == "fp32 nn.Linear":
            continue
        out.append({"suite": "layer", "d": r["d"], "tokens": r["tokens"], "bits": r["bits"],
                    "impl": r["impl"] + " (orbitquant 0.15.0, own process)", "ms": round(r["ms"], 2),
                    "x_fp32": round(r["ms"] / base[(r["tokens"], r["bits"])], 3),
                    "x_same_dtype": round(r["ms"] / base[(r["tokens"], r["bits"])], 3),  # fp32 in, fp32 out
                    "rel_err": round(r["rel_err"], 5)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", default=["layer", "quantize", "model"],
                    help="layer, quantize and/or model (default all)")
    ap.add_argument("--model-layers", type=int, default=16, help="d x d linears in the model suite")
    # subset: the data-free method against the two cheapest calibrated baselines (the quantize-cost suite)
    ap.add_argument("--calib-methods", nargs="+", default=["orbit", "smoothquant", "qdit"])
    ap.add_argument("--d", type=int, default=3072)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w4a8", "w2a4"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-python", help="interpreter of a venv with the PyPI orbitquant package")
    ap.add_argument("--out", default=str(ROOT / "results/bench"))
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="rewrite the .md beside each of these records from the record alone (no measuring)")
    a = ap.parse_args()
    if a.render:
        return write_tables(a.render)
    if bad := set(a.suites) - {"layer", "quantize", "model", "calib"}:
        ap.error(f"unknown suite(s) {sorted(bad)}; valid: layer, quantize, model, calib")
    torch.set_num_threads(a.threads)
    pairs = [(int(b[1:b.index("a")]), int(b[b.index("a") + 1:])) for b in (s.lower() for s in a.bits)]
    meta = {"device": device_name(), "cpu": device_name().split("-", 2)[-1], "torch": torch.__version__,
            "threads": a.threads, "native_kernel": orbit_cpu() is not None, "reps": a.reps,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()}
    rows: list[dict] = []
    if "layer" in a.suites:
        rows += layer_suite(a.d, a.tokens, pairs, a.reps)
        if a.peer_python:
            rows += peer_suite(a.peer_python, a.d, a.tokens, pairs, a.reps)
    if "quantize" in a.suites:
        rows += quantize_suite(a.d, a.reps)
    if "model" in a.suites:
        rows += model_suite(a.d, a.model_layers, pairs)
    if "calib" in a.suites:
        rows += calib_suite(a.calib_methods, pairs[0])
    meta["load_avg_end"] = os.getloadavg()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['device']}-{'-'.join(a.suites)}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md_path, md = render_file(out / f"{stem}.json")  # the table from the record as written
    md_path.write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
