"""GPU benchmark of OrbitQuant's Triton kernels on FLUX.1-sized linears (``scripts/bench.py`` covers the CPU).

    python scripts/bench_gpu.py                                # FLUX shapes, 256 and 4608 tokens, W4A4 + W4A8
    python scripts/bench_gpu.py --peer-path .peer              # + the PyPI `orbitquant` package's CUDA paths

Per (layer shape, tokens, bits) it times, with ``triton.testing.do_bench`` medians (CUDA events, L2-sized
inputs rotated), side by side:

* ``bf16 F.linear``: the unquantized layer, the reference for speed;
* ``act kernel``: the fused activation pass alone (rotate + norm + codebook + rescale, bf16 out);
* ``orbit fast``: ``QuantLinear`` fast mode = act kernel + bf16 GEMM on the resident dequantized weight;
* ``orbit compact``: ``QuantLinear`` compact mode = act kernel + LUT-dequant GEMM from the packed codes;
* ``LUT GEMM``: the packed-code GEMM alone;
* ``orbit torch path``: the same layer with kernels off (torch rotation and quantizer, fp32).

Both quantized modes are fake-quant in the arithmetic sense (bf16 tensor-core products of dequantized
values); ``compact`` really reads b-bit weights from memory, which is where a speedup can come from.
Every row carries its relative output error against an fp64 product and its resident bytes. The peer
package (same import name) runs in a subprocess with ``--peer-path`` on its PYTHONPATH.
Writes ``results/bench/gpu-<gpu>.{json,md}``: the .json is the record, the .md is rendered from it alone
(``scripts/render_records.py``; ``python scripts/bench_gpu.py --render results/bench/gpu-<gpu>.json`` rewrites it
without a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from render_records import render_file, write_tables  # noqa: E402  (scripts/render_records.py)

from orbitquant.kernels import triton_orbit as T  # noqa: E402
from orbitquant.quant.act import OrbitActQuant  # noqa: E402
from orbitquant.quant.calib import denoiser_call  # noqa: E402
from orbitquant.quant.codebook import distortion, get_codebook  # noqa: E402
from orbitquant.quant.nn import QuantLinear  # noqa: E402
from orbitquant.quant.rotation import RPBH  # noqa: E402
from orbitquant.quant.weights import OrbitWeight  # noqa: E402

#: FLUX.1 [dev] linears (hidden 3072, MLP 12288; single-stream blocks project 3072 + 12288 = 15360 back)
SHAPES = {"attn q/k/v/out 3072->3072": (3072, 3072), "mlp fc1 3072->12288": (3072, 12288),
          "mlp fc2 12288->3072": (12288, 3072), "single proj_out 15360->3072": (15360, 3072)}


def bench(fn, rep_ms: int = 200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")  # ms


def ceilings() -> dict:
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy_ms = bench(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: x @ y)
    del a, b, x, y
    return {"copy_TBps": round(2 * n * 2 / copy_ms / 1e9, 2), "bf16_matmul_TFLOPs": round(2 * 8192 ** 3 / mm_ms / 1e9, 1)}


def _layer(w: torch.Tensor, bias: torch.Tensor, wb: int, ab: int, seed: int) -> QuantLinear:
    k = w.shape[1]
    rot = RPBH(k, seed=seed, warn=False).cuda()
    st = OrbitWeight(None, get_codebook(k, wb, device="cuda"), weight=w, rotation=rot)
    return QuantLinear(st, bias, OrbitActQuant(get_codebook(k, ab, device="cuda")), rot, compute_dtype=torch.bfloat16)


def layer_rows(name: str, k: int, n: int, tokens: list[int], pairs, reps_ms: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    w = torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)
    bias = torch.randn(n, device="cuda", generator=g) * 0.1
    w_bf, b_bf = w.bfloat16(), bias.bfloat16()
    rows = []
    for wb, ab in pairs:
        fast = _layer(w, bias, wb, ab, seed=0)
        compact = _layer(w, bias, wb, ab, seed=0)
        compact.set_runtime("compact")
        theory = math.sqrt(k * (distortion(k, wb) + distortion(k, ab)))
        for m in tokens:
            n_buf = max(1, min(8, (200 << 20) // (m * k * 2)))  # rotate inputs past the 50 MB L2
            xs = [torch.randn(m, k, device="cuda", generator=g).bfloat16() for _ in range(n_buf)]
            it = iter(range(1 << 62))

            def nxt():
                return xs[next(it) % n_buf]

            x0 = xs[0]
            y64 = x0.double() @ w.double().T + bias.double()
            h0 = fast.act.fused(fast.rotation, x0, torch.bfloat16)
            lut = compact.store._luts[torch.bfloat16] if hasattr(compact.store, "_luts") else None
            if lut is None:
                compact(x0)
                lut = compact.store._luts[torch.bfloat16]
            def torch_path(x):
                os.environ["ORBITQUANT_KERNELS"] = "0"
                try:
                    return fast(x)
                finally:
                    os.environ["ORBITQUANT_KERNELS"] = "1"

            def lut_only(_x):
                return T.lut_gemm(h0, compact.store.codes, wb, n, lut, compact.store.norms, b_bf)

            cands = {  # label -> (function of the input, whether its output is the layer's)
                "bf16 F.linear": (lambda x: F.linear(x, w_bf, b_bf), True),
                "act kernel (rotate+norm+quantize)": (lambda x: fast.act.fused(fast.rotation, x, torch.bfloat16),
                                                      False),
                "orbit fast (act kernel + bf16 GEMM, resident dequantized W)": (fast, True),
                f"orbit compact (act kernel + LUT GEMM on {wb}-bit codes)": (compact, True),
                "LUT GEMM alone": (lut_only, True),
                "orbit torch path (kernels off)": (torch_path, True),
            }
            base = None
            # inside a sampler call, as in generation: CUDA layers defer their NaN/Inf check to its end
            with torch.no_grad(), denoiser_call(0):
                for label, (f, is_layer) in cands.items():
                    ms = bench(lambda f=f: f(nxt()), reps_ms)
                    try:
                        gms = graph_ms([lambda x=x, f=f: f(x) for x in xs], reps_ms)
                    except Exception:  # the torch path synchronizes (its NaN check): not capturable
                        gms = None
                    base = base if base is not None else ms
                    err = None
                    if is_layer:
                        y = f(x0).double()
                        err = float((y - y64).norm() / y64.norm())
                    resident = {"bf16 F.linear": w_bf.numel() * 2 + n * 2}.get(label)
                    if label.startswith("orbit fast") or label.startswith("orbit torch"):
                        resident = fast.resident_bytes
                    elif label.startswith(("orbit compact", "LUT")):
                        resident = compact.resident_bytes
                    if label == "bf16 F.linear":
                        gbase = gms
                    row = {"layer": name, "tokens": m, "bits": f"W{wb}A{ab}", "impl": label, "ms": round(ms, 4),
                           "x_bf16": round(ms / base, 3), "graph_ms": None if gms is None else round(gms, 4),
                           "graph_x_bf16": None if gms is None else round(gms / gbase, 3), "rel_err": None if err is None else round(err, 5),
                           "theory": round(theory, 5) if label.startswith("orbit") else None,
                           "resident_MB": None if resident is None else round(resident / 1e6, 2)}
                    if label.startswith("act kernel"):
                        row["GBps"] = round(m * k * 2 * 2 / (gms or ms) / 1e6, 1)  # bf16 in + bf16 out
                    if label in ("bf16 F.linear", "LUT GEMM alone"):
                        row["TFLOPs"] = round(2 * m * k * n / (gms or ms) / 1e9, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del xs
    return rows


def graph_ms(fns: list, reps_ms: int) -> float:
    """Median GPU ms per call of ``fns`` (cycled; each bound to its own input) from CUDA-graph replays: no
    Python launch overhead, which eager timings of small launches include."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    n = 4 * len(fns)
    with torch.cuda.graph(g):
        for i in range(n):
            fns[i % len(fns)]()
    return bench(g.replay, reps_ms) / n


def variant_rows(reps_ms: int, m: int = 4608) -> list[dict]:
    """The activation kernel's design choices and ablations, timed (CUDA graphs) and checked against the torch
    path (code mismatch rate)."""
    rows = []
    for k in (3072, 12288):
        rot = RPBH(k, seed=0, warn=False).cuda()
        cb = get_codebook(k, 4, device="cuda")
        xs = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(max(1, (200 << 20) // (m * k * 2)))]
        xr = rot(xs[0].float())
        ref = cb.encode(xr / torch.linalg.vector_norm(xr, dim=-1, keepdim=True))
        # (precision, gather, warps, ablate, rows); ablations of the one-token kernel were measured once
        # (results/bench/gpu-*.md): the two 32x32 products cost 2/3 of its time, hence the batched variant
        grid = [("ieee", True, 4, 0, 0), ("ieee", True, 4, 2, 0)]
        grid += [(p, True, w, 0, r) for p, w, r in (("ieee", 4, 4), ("ieee", 8, 8), ("ieee", 8, 16), ("tf32x3", 8, 8),
                                                    ("ieee", 4, 8))]
        for precision, gather, warps, ablate, rows_ in grid:
            def run(x, codes=False, precision=precision, gather=gather, warps=warps, ablate=ablate, rows_=rows_):
                return T.rotate_quantize(x, rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids,
                                         codes=codes, out_dtype=torch.bfloat16, precision=precision,
                                         gather=gather, num_warps=warps, rows=rows_, _ablate=ablate)
            try:
                ms = graph_ms([lambda x=x: run(x) for x in xs], reps_ms)
                eager = bench(lambda: run(xs[0]), reps_ms)
                mism = float((run(xs[0], codes=True)[0].long() != ref).float().mean()) if not ablate else None
            except Exception as e:  # a variant that does not compile is a result too
                rows.append({"d": k, "precision": precision, "gather": gather, "warps": warps, "ablate": ablate,
                             "rows": rows_, "error": repr(e)[:160]})
                continue
            rows.append({"d": k, "tokens": m, "precision": precision, "gather": gather, "warps": warps,
                         "rows": rows_, "ablate": ablate, "graph_ms": round(ms, 4), "eager_ms": round(eager, 4),
                         "GBps": round(m * k * 4 / ms / 1e6, 1),
                         "code_mismatch": None if ablate else mism})
            print(json.dumps(rows[-1]), flush=True)
        small = [torch.randn(256, k, device="cuda").bfloat16() for _ in range(4)]
        for f, label in ((lambda x: T.rotate_quantize(x, rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids,
                                                       out_dtype=torch.bfloat16), "act kernel"),
                         (lambda x: torch.empty_like(x).copy_(x), "plain copy")):
            rows.append({"d": k, "tokens": 256, "impl": label, "graph_ms": round(graph_ms([lambda x=x: f(x) for x in small], reps_ms), 4),
                         "eager_ms": round(bench(lambda: f(small[0]), reps_ms), 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quantize_rows(reps_ms: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)  # after CUDA-graph captures, use an explicit generator
    for k, n in ((3072, 12288), (12288, 3072)):
        w = torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)
        rot = RPBH(k, seed=0, warn=False).cuda()
        for bits in (2, 4, 8):
            cb = get_codebook(k, bits, device="cuda")
            ms = bench(lambda: OrbitWeight(None, cb, weight=w, rotation=rot), reps_ms)
            rows.append({"layer": f"{k}->{n} weight", "bits": f"W{bits}", "impl": "OrbitWeight on GPU (kernel + pack)",
                         "ms": round(ms, 3), "GBps_fp32_weights": round(w.numel() * 4 / ms / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


PEER_SNIPPET = r"""
import json, math, sys, torch
import torch.nn.functional as F
import triton.testing
from orbitquant import OrbitQuantConfig, OrbitQuantLinear
shapes, tokens, pairs, reps = json.loads(sys.argv[1])
rows = []
for name, (k, n) in shapes.items():
    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    lin = torch.nn.Linear(k, n, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k))
        lin.bias.copy_(torch.randn(n, device="cuda", generator=g) * 0.1)
    w64, b64 = lin.weight.double(), lin.bias.double()
    lin = lin.bfloat16()
    for wb, ab in pairs:
        for mode in ("auto_fused", "triton_packed_matmul", "dequant_bf16"):
            try:
                cfg = OrbitQuantConfig(weight_bits=wb, activation_bits=ab, target_policy="universal",
                                       runtime_mode=mode, lowbit_boundary_protection=0)
                layer = OrbitQuantLinear.from_linear(lin, config=cfg, module_name="bench")
            except Exception as e:
                rows.append({"layer": name, "bits": f"W{wb}A{ab}", "impl": f"peer {mode}", "error": repr(e)[:200]})
                continue
            for m in tokens:
                x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
                try:
                    with torch.no_grad():
                        y = layer(x).double()
                        ms = triton.testing.do_bench(lambda: layer(x), warmup=50, rep=reps, return_mode="median")
                        base = triton.testing.do_bench(lambda: lin(x), warmup=50, rep=reps, return_mode="median")
                    y64 = x.double() @ w64.T + b64
                    rows.append({"layer": name, "tokens": m, "bits": f"W{wb}A{ab}", "impl": f"peer {mode}",
                                 "ms": round(ms, 4), "x_bf16": round(ms / base, 3),
                                 "rel_err": round(float((y - y64).norm() / y64.norm()), 5)})
                except Exception as e:
                    rows.append({"layer": name, "tokens": m, "bits": f"W{wb}A{ab}", "impl": f"peer {mode}",
                                 "error": repr(e)[:200]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del layer
print(json.dumps(rows))
"""


def peer_rows(path: str, tokens, pairs, reps_ms: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve()), "ORBITQUANT_KERNELS_AUTOFETCH": "0",
           "XDG_CACHE_HOME": str(Path(path).resolve() / "cache")}
    p = subprocess.run([sys.executable, "-c", PEER_SNIPPET, json.dumps([SHAPES, tokens, pairs, reps_ms])],
                       capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, check=False)
    print(p.stderr[-3000:], flush=True)
    if p.returncode != 0:
        return [{"impl": "peer", "error": p.stderr[-500:]}]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    for r in rows:
        r["impl"] += " (orbitquant 0.15.0, own process)"
    return rows


def from_logs(logs: list[str], out: Path) -> None:
    """Rebuild the JSON + Markdown results from the JSON lines a run printed (a run cut short loses nothing)."""
    meta, rows = None, []
    for log in logs:
        for line in Path(log).read_text().splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if "ceilings" in r:
                meta = meta or r
            elif "suite" in r:
                rows.append(r)
            else:
                suite = ("act-kernel variants" if "d" in r else "peer" if str(r.get("impl", "")).startswith("peer")
                         else "quantize" if "GBps_fp32_weights" in r else "layer")
                rows.append({"suite": suite, **r})
    if meta is None:
        raise SystemExit(f"no run header (the line with 'ceilings') in {logs}")
    write(rows, meta, out)


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + "".join(ch if ch.isalnum() else "-" for ch in meta["gpu"]).strip("-").lower()
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md_path, md = render_file(out / f"{stem}.json")  # the table from the record as written
    md_path.write_text(md, encoding="utf-8")
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4608])
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w4a8"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="keys of SHAPES")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--peer-path", help="a folder holding the PyPI `orbitquant` package (imported in a subprocess)")
    ap.add_argument("--skip", nargs="*", default=[], help="layer | quantize")
    ap.add_argument("--variants", action="store_true",
                    help="time the activation kernel's variants first; the layer rows then use the fastest exact one")
    ap.add_argument("--out", default=str(ROOT / "results/bench"))
    ap.add_argument("--from-log", nargs="+", help="rebuild the results from the printed JSON lines of earlier runs")
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="rewrite the .md beside each of these records from the record alone (no GPU, no measuring)")
    a = ap.parse_args()
    if a.render:
        return write_tables(a.render)
    if a.from_log:
        return from_logs(a.from_log, Path(a.out))
    if not torch.cuda.is_available() or not T.available():
        raise SystemExit("bench_gpu.py needs a CUDA device and Triton (CPU numbers: scripts/bench.py)")
    import triton

    pairs = [(int(b[1:b.lower().index("a")]), int(b[b.lower().index("a") + 1:])) for b in (s.lower() for s in a.bits)]
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M"), "ceilings": ceilings()}
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    if a.variants:
        var = variant_rows(a.rep_ms)
        rows += [{"suite": "act-kernel variants", **r} for r in var]
        ok = [r for r in var if r.get("d") == 3072 and r.get("ablate") == 0 and r.get("code_mismatch") is not None
              and r["code_mismatch"] < 1e-5 and "graph_ms" in r]
        if ok:  # the layer rows below use the fastest exact variant
            best = min(ok, key=lambda r: r["graph_ms"])
            T.DEFAULT_PRECISION, T.DEFAULT_GATHER, T.DEFAULT_ROWS = best["precision"], best["gather"], best["rows"]
            meta["act_kernel"] = {k: best[k] for k in ("precision", "gather", "warps", "rows")}
            print("chosen activation kernel:", meta["act_kernel"], flush=True)
    if "layer" not in a.skip:
        for name in a.shapes:
            k, n = SHAPES[name]
            rows += [{"suite": "layer", **r} for r in layer_rows(name, k, n, a.tokens, pairs, a.rep_ms)]
    if a.peer_path:
        rows += [{"suite": "peer", **r} for r in peer_rows(a.peer_path, a.tokens, pairs, a.rep_ms)]
    if "quantize" not in a.skip:
        rows += [{"suite": "quantize", **r} for r in quantize_rows(a.rep_ms)]
    write(rows, meta, Path(a.out))


if __name__ == "__main__":
    main()
