"""Seconds per denoiser forward: measured forward-timing records, or a FLOP projection at a fraction of a measured
GPU GEMM ceiling (``results/bench/gpu-*.json``); and the record a finished run's ``results.json`` gives.

Measured timings: any ``results/bench/*.json`` holding records of this schema (one object, a list, or
``{"timings": [...]}``) replaces the projection for a matching model and geometry::

    {"schema": "orbitquant.forward_timing/1",      # required, exactly this string
     "model": "wan21",                              # model config name (conf/model/<name>.yaml: model.name)
     "device": "NVIDIA H100 80GB HBM3",             # torch.cuda.get_device_name()
     "dtype": "bfloat16",
     "height": 480, "width": 832, "num_frames": 81,  # sample geometry; null/absent for images / class-cond
     "method": "fp",                                # quant method timed (absent: fp); fp timings serve every method
     "seconds_per_forward": 0.91,                   # GPU seconds per denoiser *row* forward (call time / rows)
     "rows_per_call": 2,                            # batch rows of the timed calls (information)
     "vae_decode_seconds_per_sample": 4.1,          # optional: then VAE decode is counted too
     "source": "python run.py model.init=random ... (how it was measured)"}
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from orbitquant.harness.plan.base import BENCH, DEFAULT_CEILING, REPO, PlanError
from orbitquant.harness.plan.denoiser import Flops, forwards_per_step, geometry, shipped_config

TIMING_SCHEMA = "orbitquant.forward_timing/1"


@dataclass(frozen=True)
class Ceiling:
    """A measured device ceiling (``results/bench/gpu-*.json`` meta.ceilings) and the measured overhead of
    OrbitQuant's fake-quant linears relative to bf16 F.linear on that device."""

    gpu: str
    bf16_tflops: float
    source: str
    quant_linear_ratio: tuple[float, float, float] | None  # (min, median, max) orbit-fast / bf16, largest tokens
    quant_ratio_detail: str


def load_ceiling(path: str | Path | None = DEFAULT_CEILING) -> Ceiling | None:
    """The bf16 GEMM ceiling of a GPU bench file (``meta.ceilings.bf16_matmul_TFLOPs``); None if absent."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    meta = data.get("meta", {})
    tflops = meta.get("ceilings", {}).get("bf16_matmul_TFLOPs")
    if not tflops:
        raise PlanError(f"{p} has no meta.ceilings.bf16_matmul_TFLOPs; pass a GPU bench file from scripts/bench_gpu.py")
    fast = [r for r in data.get("rows", []) if r.get("suite") == "layer"
            and str(r.get("impl", "")).startswith("orbit fast") and r.get("graph_x_bf16")]
    ratio, detail = None, "no orbit-fast layer rows in the bench file"
    if fast:
        top = max(r["tokens"] for r in fast)
        vals = sorted(float(r["graph_x_bf16"]) for r in fast if r["tokens"] == top)
        ratio = (vals[0], vals[len(vals) // 2], vals[-1])
        detail = (f"orbit fast / bf16 F.linear (CUDA graph), {len(vals)} layer shapes x bit pairs at {top} tokens: "
                  f"{ratio[0]:.2f}-{ratio[2]:.2f}x, median {ratio[1]:.2f}x")
    return Ceiling(str(meta.get("gpu", p.stem)), float(tflops), _rel(p), ratio, detail)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def load_timings(bench_dir: str | Path = BENCH) -> list[dict]:
    """Every forward-timing record (schema ``orbitquant.forward_timing/1``) in ``bench_dir/*.json``, each with
    ``_file``; files of other schemas are skipped. A record missing a required field is an error naming it."""
    out = []
    for f in sorted(glob.glob(str(Path(bench_dir) / "*.json"))):
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        recs = data if isinstance(data, list) else data.get("timings", [data]) if isinstance(data, dict) else []
        for r in recs:
            if not isinstance(r, dict) or r.get("schema") != TIMING_SCHEMA:
                continue
            missing = [k for k in ("model", "device", "seconds_per_forward") if k not in r]
            if missing or not float(r.get("seconds_per_forward", 0)) > 0:
                raise PlanError(f"{f}: forward-timing record needs {missing or ['seconds_per_forward > 0']} "
                                f"(schema in orbitquant/harness/plan/timing.py)")
            out.append({**r, "_file": _rel(Path(f))})
    return out


@dataclass(frozen=True)
class Timing:
    """Seconds per denoiser row forward, and what that number is."""

    seconds: float
    kind: str  # "measured" | "projection"
    label: str
    vae_decode_seconds: float | None = None


def timing_for(model_name: str, protocol: dict, geo_shape: tuple[int, ...] | None, flops: Flops | None,
               method: str, timings: list[dict], ceiling: Ceiling | None, mfu: float) -> Timing | None:
    """A measured record for (model, height, width, num_frames) -- the method's own, else fp's -- or the FLOP
    projection; None when neither is possible."""
    h, w = protocol.get("height"), protocol.get("width")
    if h is None and geo_shape is not None:
        h, w = geo_shape[-2], geo_shape[-1]
    want = (model_name, h, w, protocol.get("num_frames"))
    match = [r for r in timings if (r["model"], r.get("height"), r.get("width"), r.get("num_frames")) == want]
    for m in (method, "fp"):
        hit = [r for r in match if r.get("method", "fp") == m]
        if hit:
            r = hit[0]
            note = "" if m != "fp" else " (fp timing: quantized runs' fake-quant overhead not in it)"
            return Timing(float(r["seconds_per_forward"]), "measured",
                          f"measured {r['device']}, {r['_file']}{note}", r.get("vae_decode_seconds_per_sample"))
    if flops is None or ceiling is None:
        return None
    sec = flops.total / (mfu * ceiling.bf16_tflops * 1e12)
    return Timing(sec, "projection", f"projection (FLOPs at {mfu:.0%} of measured {ceiling.bf16_tflops:g} TFLOP/s "
                  f"bf16 GEMM ceiling, {ceiling.gpu}, {ceiling.source})")


def timing_from_results(path: str | Path) -> dict:
    """A forward-timing record (schema above) from a finished run's ``results.json`` -- e.g. a GPU dry run with
    ``model.init=random`` at the protocol's resolution: the sample stage's seconds x ranks / the denoiser rows it
    ran. That time also holds text encoding, VAE decode and the method's fake-quant overhead, so the record is an
    upper bound per forward and says so. Raises ValueError naming what the file lacks."""
    p = Path(path)
    try:
        r = json.loads(p.read_text())
        c, timing, sampling = r["config"], r["timing"], r["sampling"]
        proto, model = c["eval"]["protocol"], c["model"]
        seconds = float(timing["sample"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a finished run's results.json with config, timing.sample and sampling ({e!r}); "
                         "give results/runs/<model>/<method>/<tag>/<eval>/q<k>-s<k>/results.json") from None
    adapter, name = model["adapter"], model.get("name", model["adapter"])
    rows_per_step, _ = forwards_per_step(adapter, float(proto.get("guidance", 1.0)))
    n, ranks = int(sampling.get("n", 0)), int(sampling.get("ranks", 1))
    rows = n * int(proto["steps"]) * rows_per_step
    if rows <= 0 or seconds <= 0:
        raise ValueError(f"{p}: no sampling to time (n={n}, sample stage {seconds} s); was the sample stage resumed?")
    h, w = proto.get("height"), proto.get("width")
    if h is None:
        geo = geometry(adapter, name, proto, 0) if shipped_config(name) is not None else None
        h, w = (geo.sample_shape[-2], geo.sample_shape[-1]) if geo is not None else (None, None)
    return {"schema": TIMING_SCHEMA, "model": name, "device": r.get("provenance", {}).get("device_name", "?"),
            "dtype": c.get("dtype"), "height": h, "width": w, "num_frames": proto.get("num_frames"),
            "method": c["quant"]["method"], "seconds_per_forward": seconds * ranks / rows,
            "rows_per_call": int(proto.get("batch_size", 1)) * rows_per_step,
            "source": (f"{_rel(p)}: sample stage {seconds:.1f} s x {ranks} rank(s) / {rows:,} denoiser rows "
                       f"({n} samples x {proto['steps']} steps x {rows_per_step}); includes text encoding, VAE "
                       "decode and fake-quant overhead: an upper bound per forward")}
