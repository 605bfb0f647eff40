"""Cost plan of a sweep before it runs: runs, samples, denoiser forwards, tokens, disk, host memory, GPU-hours.

``python scripts/plan.py experiment=wan21_vbench`` (the CLI) composes the experiment exactly as
``python run.py -m experiment=wan21_vbench`` would, expands its sweep (``hydra.sweeper.params`` plus command-line
overrides, later ones winning, as Hydra's basic sweeper does) and prices every job. Every number says where it comes
from: *counted* from the configs (runs, samples, forwards, tokens, bytes), *measured* (a timing file under
``results/bench/``), or a *projection* (a formula with its assumptions, e.g. FLOPs at a fraction of a measured GEMM
ceiling). Nothing here loads weights or touches the network.

What a sweep does (``run.py``, ``orbitquant/stages.py``):

* one run per unique run directory ``<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>``; ``quant=fp`` ignores the
  bit widths, so an fp job of every bit pair shares one directory and only its first job runs (the others find the
  results and skip);
* the fp reference samples: generated once per (model, eval protocol, dtype, device, seed) by the first job that
  needs them, cached (``results/cache/reference``), read by every other job of that seed; the ``quant=fp`` run itself
  still samples its own set (``stages.sample`` runs for every method: fp vs reference is the bit-exactness check);
* calibrated methods (``quantizer_for(cfg).needs_calibration``) run the calibration protocol once per calibration key
  (model, method config incl. bits, calib protocol, quant_seed, dtype, device), cached; calibration samples are
  discarded (``DiscardSink``), only activations are kept.

Denoiser forwards are counted in *rows*: one sample through the denoiser once. Classifier-free guidance costs a
second row per step, either by doubling the batch inside one call or by a second call (see ``CFG_RULES``, read from
each adapter and the diffusers 0.42 pipeline it drives). ``results.json``'s ``denoiser_forwards`` counts calls.

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

import dataclasses
import functools
import glob
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
BENCH = REPO / "results" / "bench"
CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"
DIGITS_CONFIG = Path(__file__).resolve().parent / "assets" / "digits_dit" / "config.json"
DEFAULT_CEILING = BENCH / "gpu-nvidia-h100-80gb-hbm3.json"
TIMING_SCHEMA = "orbitquant.forward_timing/1"

#: Assumed fraction of the measured bf16 GEMM ceiling a whole denoiser forward sustains (an assumption, not a
#: measurement: attention kernels run below GEMM peak and norms, RoPE, modulation and launches add time).
DEFAULT_MFU = 0.4

#: Prompt counts the conf/eval YAML comments document, used only when the prompt file is not on this machine.
NOMINAL_PROMPTS: dict[str, tuple[int, str]] = {
    "geneval": (553, "GenEval prompts/generation_prompts.txt (conf/eval/geneval.yaml)"),
    "vbench": (946, "VBench standard suite all_dimension.txt (conf/eval/vbench.yaml)"),
    "vbench_quick": (32, "<= 4 prompts x 8 dimensions, quick.txt (conf/eval/vbench_quick.yaml)"),
    "coco_fid_clip": (5000, "first 5000 COCO 2014 val captions (conf/eval/coco_fid_clip.yaml)"),
    "mjhq": (5000, "5000 MJHQ-30K prompts (conf/eval/mjhq.yaml)"),
}
#: Reference-set sizes for Inception metrics when the reference is not on this machine (the metric's ``limit`` wins).
NOMINAL_REAL_SET: dict[str, tuple[int, int, str]] = {  # eval name -> (images, side in px, source)
    "imagenet": (10_000, 256, "ADM VIRTUAL_imagenet256_labeled.npz arr_0: 10,000 256^2 images"),
    "coco_fid_clip": (5_000, 512, "COCO 2014 val, limit 5000, resized to 512"),
    "mjhq": (30_000, 512, "MJHQ-30K: 30,000 images, resized to 512"),
}
#: Inception features kept per image by the FID/sFID/IS/precision/recall context: pool3 2048 + logits 1008 +
#: spatial 2023 float32 (orbitquant/metrics/features.py InceptionV3.outputs).
INCEPTION_FEATURE_BYTES = (2048 + 1008 + 2023) * 4

#: Parameters of the pipeline parts besides the denoiser (host memory while loading). Nominal: derived from the
#: public architectures, not read from files (no checkpoints here). T5-XXL encoder = 24 x (4*4096^2 + 3*4096*10240)
#: + 32128*4096 = 4.76e9; UMT5-XXL the same with a 256384-token vocabulary = 5.68e9; Qwen3-4B = 36 x (2*2560*4096 +
#: 2*2560*1024 + 3*2560*9728) + 151936*2560 = 4.02e9; CLIP ViT-L/14 text 1.23e8; VAEs from their checkpoint sizes.
PIPELINE_EXTRAS: dict[str, tuple[tuple[str, float], ...]] = {
    "flux": (("T5-XXL encoder", 4.76e9), ("CLIP-L text encoder", 1.23e8), ("VAE", 8.4e7)),
    "wan": (("UMT5-XXL encoder", 5.68e9), ("Wan VAE", 1.27e8)),
    "cogvideox": (("T5-XXL encoder", 4.76e9), ("CogVideoX VAE", 2.16e8)),
    "zimage": (("Qwen3-4B text encoder", 4.02e9), ("VAE", 8.4e7)),
    "dit": (("VAE (sd-vae-ft-ema)", 8.4e7),),
    "digits": (),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """Bad input to the planner (unknown option, a config that does not compose); the message names the fix."""


# ---------------------------------------------------------------------------------------------- CFG per family
@dataclass(frozen=True)
class CfgRule:
    """When a family's sampler runs classifier-free guidance and how: ``batch`` doubles the rows of one denoiser
    call, ``calls`` runs a second call; ``never``: guidance is distilled into the model (one row per step)."""

    active: str  # "guidance > 1" | "guidance > 0" | "guidance != 1" | "never"
    mode: str  # "batch" | "calls" | "never"
    evidence: str

    def is_active(self, guidance: float) -> bool:
        return {"guidance > 1": guidance > 1, "guidance > 0": guidance > 0, "guidance != 1": guidance != 1,
                "never": False}[self.active]


CFG_RULES: dict[str, CfgRule] = {
    "digits": CfgRule("guidance != 1", "batch", "adapters/digits.py DigitsPipeline.velocity: guidance == 1.0 runs "
                      "one pass, else torch.cat([x, x]) = [cond; uncond] in one call"),
    "dit": CfgRule("guidance > 1", "batch", "diffusers pipeline_dit.py: torch.cat([latents] * 2) if "
                   "guidance_scale > 1 (one call, doubled batch)"),
    "flux": CfgRule("never", "never", "FLUX.1-dev is guidance-distilled (guidance_embeds: guidance enters as an "
                    "embedding), schnell has no guidance input; pipeline_flux.py runs a second call only for true "
                    "CFG (true_cfg_scale > 1 and a negative prompt), which the adapter never passes"),
    "wan": CfgRule("guidance > 1", "calls", "diffusers pipeline_wan.py: do_classifier_free_guidance = "
                   "guidance_scale > 1, a second transformer call with the negative prompt (adapter "
                   "cfg_layout='calls')"),
    "cogvideox": CfgRule("guidance > 1", "batch", "diffusers pipeline_cogvideox.py: torch.cat([latents] * 2) if "
                         "guidance_scale > 1 (adapter cfg_layout='uncond_first')"),
    "zimage": CfgRule("guidance > 0", "batch", "diffusers pipeline_z_image.py: do_classifier_free_guidance = "
                      "guidance_scale > 0, latents.repeat(2, ...) in one call; Turbo's guidance 0 = one row"),
}


def cfg_rule(adapter: str) -> CfgRule:
    if adapter not in CFG_RULES:
        raise PlanError(f"no CFG rule for model adapter {adapter!r}; add one to orbitquant.plan.CFG_RULES "
                        f"(known: {', '.join(CFG_RULES)})")
    return CFG_RULES[adapter]


def forwards_per_step(adapter: str, guidance: float) -> tuple[int, int]:
    """(denoiser rows per sample per step, denoiser calls per batch per step) for a family at ``guidance``."""
    rule = cfg_rule(adapter)
    if not rule.is_active(guidance):
        return 1, 1
    return 2, (2 if rule.mode == "calls" else 1)


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """What one denoiser row sees: media (image/video latent) tokens and text tokens, and the sample's shape."""

    media_tokens: int
    text_tokens: int
    sample_shape: tuple[int, ...]  # (C, H, W) images, (F, C, H, W) videos: what the sampler returns per sample
    detail: str  # how the tokens were derived

    @property
    def tokens(self) -> int:
        return self.media_tokens + self.text_tokens


@functools.cache
def shipped_config(model_name: str) -> dict | None:
    """The transformer config of a model config name (``orbitquant/assets/configs/<name>.json``; the digits models
    read ``assets/digits_dit/config.json``); None for models without one (tiny / random test pipelines)."""
    if model_name in ("digits", "digits_outliers"):
        return json.loads(DIGITS_CONFIG.read_text())
    path = CONFIGS / f"{model_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def geometry(adapter: str, model_name: str, protocol: dict, text_tokens: int) -> Geometry | None:
    """Tokens per denoiser row from the shipped transformer config and the protocol's resolution.

    Images: VAE x8 spatial, then the patch size (FLUX packs 2x2 latent patches: in_channels 64 = 16 x 2 x 2).
    Videos: latent frames = (F - 1) // 4 + 1 (Wan and CogVideoX VAEs: x4 temporal), then the spatial patch.
    None when the model has no shipped config (tiny test pipelines)."""
    cfg = shipped_config(model_name)
    if cfg is None:
        return None
    if adapter == "digits":  # pixel space, no VAE
        side, p = cfg["sample_size"], cfg["patch_size"]
        return Geometry((side // p) ** 2, 0, (cfg["in_channels"], side, side),
                        f"{side}x{side} px, no VAE, patch {p}: ({side}/{p})^2")
    if adapter == "dit":  # class-conditional: the label enters through adaLN, not as tokens
        lat, p = cfg["sample_size"], cfg["patch_size"]
        return Geometry((lat // p) ** 2, 0, (3, lat * 8, lat * 8),
                        f"{lat * 8}^2 px -> {lat}^2 latent (VAE x8) -> patch {p}: {lat // p}^2")
    h, w = int(protocol["height"]), int(protocol["width"])
    if adapter in ("flux", "zimage"):
        p = 2 if adapter == "flux" else cfg["all_patch_size"][0]
        lh, lw = h // 8 // p, w // 8 // p
        how = "2x2 packing" if adapter == "flux" else f"patch {p}"
        return Geometry(lh * lw, text_tokens, (3, h, w),
                        f"{h}x{w} px -> VAE x8 -> {how}: {lh} x {lw} = {lh * lw} image + {text_tokens} text")
    if adapter in ("wan", "cogvideox"):
        f = int(protocol["num_frames"])
        lf = (f - 1) // 4 + 1
        if adapter == "wan":
            pt, ph, pw = cfg["patch_size"]
        else:
            pt, ph, pw = (cfg.get("patch_size_t") or 1), cfg["patch_size"], cfg["patch_size"]
        tf, th, tw = -(-lf // pt), h // 8 // ph, w // 8 // pw
        return Geometry(tf * th * tw, text_tokens, (f, 3, h, w),
                        f"{f} frames -> {lf} latent (x4 temporal), {h}x{w} -> VAE x8 -> patch {pt}x{ph}x{pw}: "
                        f"{tf} x {th} x {tw} = {tf * th * tw} video + {text_tokens} text")
    raise PlanError(f"no token rule for model adapter {adapter!r}; add one to orbitquant.plan.geometry")


def text_tokens(adapter_obj: Any, adapter: str) -> tuple[int, str]:
    """Text tokens per row: the pipeline's ``max_sequence_length`` (FLUX, Wan, CogVideoX pad to it; Z-Image keeps
    the prompt's real tokens, so its number is an upper bound); 0 for class-conditional models."""
    if adapter in ("digits", "dit"):
        return 0, "class-conditional: no text tokens"
    kwargs = getattr(adapter_obj, "call_kwargs", {}) or {}
    n = int(kwargs.get("max_sequence_length", 0))
    if adapter == "zimage":
        return n, f"<= {n} (Z-Image keeps the prompt's real tokens; max_sequence_length as an upper bound)"
    return n, f"max_sequence_length {n} (the pipeline pads to it)"


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Flops:
    """FLOPs of one denoiser row forward: 2 x in x out x rows for every block linear (rows: the tokens of its
    stream; adaLN/modulation linears see one vector per sample), and 4 x Lq x Lkv x inner per attention layer
    (QK^T and PV). Embedders and the final layer (outside the blocks, < 1% of linear FLOPs) are not counted."""

    linear: float
    attention: float
    block_linear_params: int
    denoiser_params: int
    detail: str

    @property
    def total(self) -> float:
        return self.linear + self.attention


@functools.cache
def _layer_table(model_name: str) -> tuple[tuple[tuple[str, str, int, int], ...], dict[str, int], int]:
    """((fqn, role, in, out) of every linear, block count per stack, all denoiser params) of the true-size denoiser,
    built on the meta device from its shipped config (no weights)."""
    import torch

    from .adapters.dit_roles import DIT_ROLES
    from .inventory import ROLE_TABLES, build_meta

    if model_name in ("digits", "digits_outliers"):
        from diffusers import DiTTransformer2DModel

        cfg = {k: v for k, v in shipped_config(model_name).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = DiTTransformer2DModel.from_config(cfg)
        table = DIT_ROLES
    else:
        model, table = build_meta(model_name), ROLE_TABLES[model_name]
    refs = table.refs(model)
    stacks = {s: len(getattr(model, s)) for s in table.stacks}
    rows = tuple((r.fqn, r.role, r.module.in_features, r.module.out_features) for r in refs)
    return rows, stacks, sum(p.numel() for p in model.parameters())


def _linear_rows(adapter: str, fqn: str, role: str, m: int, t: int) -> int | None:
    """Rows a block linear sees per sample (None: outside the blocks, not counted)."""
    if role in ("embed", "final"):
        return None
    if role == "adaln":
        return 1
    stack = fqn.split(".", 1)[0]
    if adapter == "flux":  # dual blocks: image stream and text stream (ctx.*); single blocks: the concatenation
        return m + t if stack == "single_transformer_blocks" else (t if role.startswith("ctx.") else m)
    if adapter == "wan":  # cross-attention: queries/out on video tokens, keys/values on the text
        return t if role in ("ctx.k", "ctx.v") else m
    if adapter == "cogvideox":  # text and video concatenated through attention and FFN
        return m + t
    if adapter == "zimage":
        return {"noise_refiner": m, "context_refiner": t}.get(stack, m + t)
    return m  # dit, digits


def _attention(adapter: str, cfg: dict, stacks: dict[str, int], m: int, t: int) -> float:
    if adapter in ("dit", "digits"):
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return 4.0 * stacks["transformer_blocks"] * m * m * inner
    if adapter == "flux":
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return 4.0 * sum(stacks.values()) * (m + t) ** 2 * inner
    if adapter == "wan":
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return 4.0 * stacks["blocks"] * (m * m + m * t) * inner  # self-attention + cross-attention to the text
    if adapter == "cogvideox":
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return 4.0 * stacks["transformer_blocks"] * (m + t) ** 2 * inner
    if adapter == "zimage":
        inner = cfg["dim"]
        return 4.0 * inner * (stacks["noise_refiner"] * m * m + stacks["context_refiner"] * t * t
                              + stacks["layers"] * (m + t) ** 2)
    raise PlanError(f"no attention rule for model adapter {adapter!r}; add one to orbitquant.plan._attention")


def forward_flops(adapter: str, model_name: str, geo: Geometry) -> Flops | None:
    """FLOPs of one denoiser row forward at ``geo`` (None without a shipped config)."""
    cfg = shipped_config(model_name)
    if cfg is None:
        return None
    rows, stacks, total_params = _layer_table(model_name)
    m, t = geo.media_tokens, geo.text_tokens
    linear, params = 0.0, 0
    for fqn, role, fin, fout in rows:
        n = _linear_rows(adapter, fqn, role, m, t)
        if n is not None:
            linear += 2.0 * fin * fout * n
            params += fin * fout
    attn = _attention(adapter, cfg, stacks, m, t)
    return Flops(linear, attn, params, total_params,
                 f"{params / 1e9:.3g} B block-linear weights over their streams; attention in "
                 f"{' + '.join(f'{v} {k}' for k, v in stacks.items())}")


# ---------------------------------------------------------------------------------------------- timing sources
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
                                f"(schema in orbitquant/plan.py)")
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


# ---------------------------------------------------------------------------------------------- protocols
@dataclass
class ProtocolCost:
    """One sampling protocol (an eval or calibration protocol) on one model, priced per sample and in total."""

    kind: str  # "eval" | "calib"
    name: str
    model: str
    adapter: str
    n_samples: int
    n_source: str
    steps: int
    guidance: float
    batch_size: int
    rows_per_step: int
    calls_per_step: int
    cfg_note: str
    geometry: Geometry | None
    text_note: str
    flops: Flops | None
    timing: Timing | None
    store: str
    bytes_per_sample: int | None  # raw image/video bytes + 8 B label

    @property
    def forwards_per_sample(self) -> int:
        return self.steps * self.rows_per_step

    @property
    def forwards(self) -> int:
        return self.n_samples * self.forwards_per_sample

    @property
    def calls(self) -> int:
        """Denoiser calls (what results.json's ``denoiser_forwards`` counts)."""
        return -(-self.n_samples // self.batch_size) * self.steps * self.calls_per_step

    @property
    def gpu_seconds(self) -> float | None:
        if self.timing is None:
            return None
        vae = self.timing.vae_decode_seconds or 0.0
        return self.forwards * self.timing.seconds + (self.n_samples * vae if self.kind == "eval" else 0.0)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.bytes_per_sample is None else self.n_samples * self.bytes_per_sample


def count_samples(adapter_obj: Any, adapter: str, protocol: dict, eval_name: str) -> tuple[int, str]:
    """Samples a protocol makes: the adapter's ``n_items`` (what sizes its sample stores) when it can count them,
    with the breakdown; for a prompt file that is not on this machine, the protocol's documented nominal prompt
    count (labelled)."""
    from .data import load_prompts

    if "prompts" in protocol:
        per = int(protocol.get("n_per_prompt", 1))
        try:
            n = len(load_prompts(protocol["prompts"]))
        except ValueError:
            if eval_name not in NOMINAL_PROMPTS:
                raise PlanError(f"eval={eval_name}: prompt file {protocol['prompts']!r} not found and no nominal count "
                                "known; create it or add the count to orbitquant.plan.NOMINAL_PROMPTS") from None
            n, where = NOMINAL_PROMPTS[eval_name]
            return n * per, f"{n} prompts x {per} (nominal: {where}; file {protocol['prompts']} not found here)"
        src = "inline list" if not isinstance(protocol["prompts"], str) else f"prompt file {protocol['prompts']}"
        own, how = n * per, f"{n} prompts x {per} ({src})"
    elif adapter == "digits":
        per = int(protocol["n_per_class"])
        own, how = 10 * per, f"10 classes x {per}"
    else:
        classes, per = list(protocol["classes"]), int(protocol.get("n_per_class", 1))
        own, how = len(classes) * per, f"{len(classes)} classes x {per}"
    n_items = getattr(adapter_obj, "n_items", None)
    if n_items is None:
        return own, how
    n = int(n_items(protocol))
    return n, how if n == own else f"{n} (adapter.n_items; the protocol reads {how})"


def protocol_cost(kind: str, name: str, protocol: dict, model_cfg: dict, store: str, method: str,
                  timings: list[dict], ceiling: Ceiling | None, mfu: float) -> ProtocolCost:
    """Price ``protocol`` on the model of ``model_cfg`` (a resolved ``model:`` config)."""
    from .factory import build_adapter

    adapter = model_cfg["adapter"]
    obj = build_adapter(model_cfg)
    model_name = model_cfg.get("name", adapter)
    n, n_src = count_samples(obj, adapter, protocol, name)
    guidance = float(protocol.get("guidance", 1.0))
    rows, calls = forwards_per_step(adapter, guidance)
    rule = cfg_rule(adapter)
    if rule.active == "never":
        cfg_note = f"1 row per step: no CFG pass ({adapter}: guidance-distilled, guidance enters as an input)"
    elif rows == 2:
        cfg_note = f"CFG at guidance {guidance:g} ({rule.active}): 2 rows per step, " + (
            "one call with the batch doubled" if rule.mode == "batch" else "a second call")
    else:
        cfg_note = f"1 row per step: no CFG at guidance {guidance:g} (CFG when {rule.active})"
    cfg_note += f" [{rule.evidence}]" if kind == "eval" else ""
    real = not (model_cfg.get("tiny") and not model_cfg.get("path"))
    tt, tnote = text_tokens(obj, adapter)
    geo = geometry(adapter, model_name, protocol, tt) if real else None
    fl = forward_flops(adapter, model_name, geo) if geo is not None else None
    shape = geo.sample_shape if geo is not None else _shape_from_protocol(protocol)
    tm = timing_for(model_name, protocol, shape, fl, method, timings, ceiling, mfu) if real else None
    bps = None
    if shape is not None:
        bps = math.prod(shape) * (1 if store == "uint8" else 4) + 8
    return ProtocolCost(kind, name, model_name, adapter, n, n_src, int(protocol["steps"]), guidance,
                        int(protocol.get("batch_size", 1)), rows, calls, cfg_note, geo, tnote, fl, tm, store, bps)


def _shape_from_protocol(protocol: dict) -> tuple[int, ...] | None:
    if "height" not in protocol:
        return None
    hw = (3, int(protocol["height"]), int(protocol["width"]))
    return (int(protocol["num_frames"]), *hw) if protocol.get("num_frames") else hw


# ---------------------------------------------------------------------------------------------- host memory
@dataclass
class MemoryOutline:
    """Peak host memory by stage of one run (flat in the sample count except the metric state), in bytes."""

    load: int  # the pipeline's weights in the run's dtype (from_pretrained materialises them on the host first)
    load_detail: str
    batch: int  # one batch of sampler output: float32 on the CPU (+ its uint8 copy for a uint8 store)
    batch_detail: str
    metrics: int  # metric state at scoring
    metrics_detail: str
    first_run_extra: int  # decoding a real reference image set once (features cached afterwards)
    first_run_detail: str

    @property
    def peak(self) -> int:
        return max(self.load, self.batch + self.metrics + self.first_run_extra)


def memory_outline(cost: ProtocolCost, metrics: list, dtype: str, eval_name: str) -> MemoryOutline:
    """Host memory outline of one run of ``cost`` scored by ``metrics`` (built metric objects)."""
    from .metrics.inception import InceptionMetric

    nb = DTYPE_BYTES.get(dtype, 4)
    denoiser = _layer_table(cost.model)[2] if shipped_config(cost.model) is not None else 0
    extras = PIPELINE_EXTRAS.get(cost.adapter, ())
    load = (denoiser + sum(p for _, p in extras)) * nb
    load_detail = (f"denoiser {denoiser / 1e9:.3g} B params (shipped config)" if denoiser else "denoiser: no shipped "
                   "config (tiny test pipeline, negligible)") + "".join(f" + {n} {p / 1e9:.3g} B (nominal)"
                                                                       for n, p in extras) + f", x {nb} B ({dtype})"
    elems = (cost.bytes_per_sample - 8) // (1 if cost.store == "uint8" else 4) if cost.bytes_per_sample else 0
    batch = cost.batch_size * elems * (4 + (1 if cost.store == "uint8" else 0))
    batch_detail = f"{cost.batch_size} x {elems:,} values x (4 B float32 output" + (
        " + 1 B uint8 shard)" if cost.store == "uint8" else ")")
    n = cost.n_samples
    inc = [m for m in metrics if isinstance(m, InceptionMetric)]
    others = [m for m in metrics if not isinstance(m, InceptionMetric)]
    state, parts, extra, extra_detail = 0, [], 0, "none"
    if inc:
        real_n, side, real_src = _real_set(inc, eval_name)
        sets = 2 * n + real_n
        state += sets * INCEPTION_FEATURE_BYTES
        parts.append(f"Inception features (2048+1008+2023 float32 = {INCEPTION_FEATURE_BYTES:,} B/image) of samples, "
                     f"fp reference and real set: (2 x {n:,} + {real_n:,}) images [{real_src}]")
        if real_n and side:
            extra, extra_detail = _reference_decode(inc, real_n, side)
    if others:
        state += 2 * n * 8 * len(others)
        parts.append(f"{len(others)} per-sample metrics: 2 x {n:,} x 8 B each"
                     + (" (GenEval/VBench evaluate in their own environment: not counted)"
                        if any(type(m).__module__.endswith(("geneval", "vbench")) for m in others) else ""))
    return MemoryOutline(load, load_detail, batch, batch_detail, state, "; ".join(parts) or "none", extra,
                         extra_detail)


def _reference_decode(metrics: list, n: int, side: int) -> tuple[int, str]:
    """Host bytes the first feature extraction of a real reference set holds as decoded images: an ``.npz`` batch's
    ``arr_0`` is one array (``np.load`` reads it whole); a folder is decoded one batch at a time where
    ``metrics.features`` streams folders (``iter_image_folder``), else whole. Later runs read cached features."""
    from .metrics import features

    whole = n * 3 * side * side
    if any(str(m.reference).endswith(".npz") for m in metrics):
        return whole, (f"first scoring against this reference loads its {n:,} x 3 x {side}^2 uint8 images (npz arr_0 "
                       "is read whole); later runs read the cached features")
    if hasattr(features, "iter_image_folder"):
        bs = max(int(getattr(m, "batch_size", 50) or 50) for m in metrics)
        return bs * 3 * side * side, (f"first scoring decodes the reference folder {bs} images at a time "
                                      f"({bs} x 3 x {side}^2 uint8); later runs read the cached features")
    return whole, (f"first scoring against this reference decodes its {n:,} x 3 x {side}^2 uint8 images at once; "
                   "later runs read the cached features")


def _real_set(metrics: list, eval_name: str) -> tuple[int, int, str]:
    """(images, side, source) of the Inception metrics' real reference set ((0, 0, ...) when it is the fp set)."""
    refs = {(str(m.reference), m.limit, m.resolution) for m in metrics if getattr(m, "uses_real", True)
            and m.reference not in (None, "fp")}
    if not refs:
        return 0, 0, "no real set"
    ref, limit, res = min(refs, key=str)
    n, side, src = _count_real(Path(ref))
    if n is None:
        n, side, src = NOMINAL_REAL_SET.get(eval_name, (0, 0, f"{ref} not found, size unknown"))
        src = f"nominal: {src}; {ref} not found here"
    if limit:
        n = min(n, int(limit)) if n else int(limit)
    return n, int(res or side or 0), src


def _count_real(path: Path) -> tuple[int | None, int, str]:
    """Image count and side of a real reference on disk (npz header or folder listing), without loading it."""
    import zipfile

    import numpy as np

    if path.suffix == ".npz" and path.is_file():
        with zipfile.ZipFile(path) as z:
            for key in ("arr_0.npy", "images.npy"):
                if key in z.namelist():
                    with z.open(key) as f:
                        version = np.lib.format.read_magic(f)
                        shape = np.lib.format._read_array_header(f, version)[0]
                    return int(shape[0]), int(shape[1] if key == "arr_0.npy" else shape[-1]), f"{path} header"
        return 0, 0, f"{path}: statistics only"
    if path.is_dir():
        n = sum(1 for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        return n, 0, f"{n} files in {path}"
    return None, 0, ""


# ---------------------------------------------------------------------------------------------- sweep expansion
@dataclass
class Job:
    """One job of the sweep, resolved."""

    overrides: list[str]
    model: str
    method: str
    tag: str
    eval: str
    seed: int
    quant_seed: int
    subdir: str
    needs_calibration: bool
    duplicate_of: str | None = None  # another job's subdir: run.py skips this one (results exist)
    calibration: str | None = None  # "new" | "cached" | None (no calibration)
    eval_cost: str = ""  # key into Plan.protocols
    calib_cost: str | None = None


def _squash(e: BaseException) -> str:
    """An exception's message on one line (Hydra puts the fix on its second line)."""
    return " ".join(str(e).split())


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors come in several types
        raise PlanError(f"config error: cannot parse overrides {overrides}: {_squash(e)}") from None


def expand_sweep(params: dict[str, str], argv: list[str]) -> list[list[str]]:
    """Every job's overrides: ``hydra.sweeper.params`` then ``argv`` (later wins per key), comma lists expanded into
    their cartesian product in key order -- Hydra's BasicSweeper.split_arguments."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = _parse([f"{k}={v}" for k, v in params.items()] + list(argv))
    try:
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception as e:  # noqa: BLE001 - HydraException for unsupported sweep kinds
        raise PlanError(f"config error: cannot expand the sweep: {_squash(e)}") from None


_INTERP = re.compile(r"\$\{([A-Za-z_]\w*)")


class _Composer:
    """Each job's config as Hydra composes it, cheaply.

    * Plain-key sweep values (``seed=0,1,2``) are set on a composed config in place (what Hydra's override does);
      only the top-level entries that interpolate a swept key (transitively: ``quant.seed -> quant_seed -> seed``)
      are re-resolved per job.
    * Config-group axes (``quant=a,b,c bits=x,y``): Hydra composes the first job's choices (the base) and every
      single-axis change of it (a star: 1 + sum(options - 1) compositions instead of their product); a job that
      changes several axes is the base plus each axis's difference from the base -- when those differences touch
      disjoint config paths (a group option writes its own package: ``quant.*``, ``w_bits``/``a_bits``), which is
      what Hydra's merge gives. Overlapping differences, ``hydra.*`` or add/delete overrides are composed by Hydra.
    """

    def __init__(self, conf_dir: Path) -> None:
        self.conf_dir = conf_dir
        self._hydra: dict[tuple[str, ...], Any] = {}  # fixed overrides -> Hydra's composed config (with hydra)
        self._flats: dict[tuple[str, ...], dict[tuple, Any]] = {}
        self._ready: dict[tuple[str, ...], tuple[Any, dict, set[str], Any]] = {}
        self._base: tuple[str, ...] | None = None
        self._template: str | None = None  # hydra.sweep.subdir, unresolved
        self.composed = self.assembled = 0

    def _is_plain(self, override) -> bool:
        key = override.get_key_element()
        return (not override.is_force_add() and not override.is_add() and not override.is_delete()
                and not key.startswith("hydra") and not (self.conf_dir / key.split("@")[0]).is_dir())

    def _compose(self, fixed: tuple[str, ...]):
        from hydra import compose

        if fixed not in self._hydra:
            try:
                self._hydra[fixed] = compose(config_name="config", overrides=list(fixed), return_hydra_config=True)
            except Exception as e:  # noqa: BLE001 - Hydra raises several exception types for bad input
                raise PlanError(f"config error ({' '.join(fixed)}): {_squash(e)}") from None
            self.composed += 1
        return self._hydra[fixed]

    def _flat(self, fixed: tuple[str, ...]) -> dict[tuple, Any]:
        """The composed config's leaf paths, unresolved, without ``hydra`` (cached)."""
        from omegaconf import OmegaConf

        if fixed not in self._flats:
            raw = OmegaConf.to_container(self._compose(fixed), resolve=False)
            raw.pop("hydra")
            self._flats[fixed] = _flatten(raw)
        return self._flats[fixed]

    def _assemble(self, fixed: tuple[str, ...], axes: list[int]):
        """The base plus each changed axis's difference (unresolved), or None when they overlap or do not resolve."""
        from omegaconf import OmegaConf

        base = self._base
        writes = [_axis_writes(self.conf_dir, fixed[i], base[i]) for i in axes]
        if any(w is None for w in writes) or any(a & b for a, b in itertools.combinations(writes, 2)):
            return None  # two axes may write the same key: their merge order matters, let Hydra compose it
        base_flat = self._flat(base)
        flat = dict(base_flat)
        touched: list[set[tuple]] = []
        for i in axes:
            star = self._flat(base[:i] + (fixed[i],) + base[i + 1:])
            diff = {k for k in set(base_flat) | set(star) if base_flat.get(k, _GONE) != star.get(k, _GONE)}
            if any(_overlap(diff, t) for t in touched):
                return None
            touched.append(diff)
            for k in diff:
                flat.pop(k, None)
            flat.update({k: star[k] for k in diff if k in star})
        cfg = OmegaConf.create({**_unflatten(flat), "_plan_subdir_": self._template})
        try:
            OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. a ${hydra:...} interpolation: let Hydra compose it
            return None
        self.assembled += 1
        return cfg

    def compose(self, job: list[str], swept: set[str]) -> tuple[dict, str]:
        """(the job's resolved config without ``hydra``, its sweep subdir)."""
        from omegaconf import OmegaConf

        parsed = _parse(job)
        late = [o for o in parsed if o.get_key_element() in swept and self._is_plain(o)]
        rest = [(s, o) for s, o in zip(job, parsed) if not any(o is x for x in late)]
        fixed = tuple(s for s, _ in rest)
        if fixed not in self._ready:
            if self._base is None or len(self._base) != len(fixed):
                self._base = fixed
                self._template = OmegaConf.to_container(self._compose(fixed).hydra.sweep, resolve=False)["subdir"]
            axes = [i for i, (s, o) in enumerate(rest) if o.get_key_element() in swept and s != self._base[i]]
            risky = any(o.get_key_element().startswith("hydra") or o.is_add() or o.is_force_add() or o.is_delete()
                        for _, o in rest if o.get_key_element() in swept)
            cfg = self._assemble(fixed, axes) if len(axes) > 1 and not risky else None
            if cfg is None:
                cfg = self._compose(fixed)
            raw = OmegaConf.to_container(cfg, resolve=False)
            refs = {k: set(_INTERP.findall(json.dumps(v, default=str))) for k, v in raw.items()}
            dynamic = {o.get_key_element().split(".")[0] for o in late}
            grew = True
            while grew:
                more = {k for k, r in refs.items() if r & dynamic} - dynamic
                dynamic |= more
                grew = bool(more)
            hidden = {"hydra", "_plan_subdir_"}
            static = {k: _plain_node(cfg, k) for k in cfg if k not in hidden and k not in dynamic}
            subdir = (lambda c: str(c.hydra.sweep.subdir)) if "hydra" in cfg else (lambda c: str(c._plan_subdir_))
            self._ready[fixed] = (cfg, static, dynamic, subdir)
        cfg, static, dynamic, subdir = self._ready[fixed]  # updated in place: every job of it sets the same keys
        for o in late:
            OmegaConf.update(cfg, o.get_key_element(), o.value(), merge=True)
        c = {k: static[k] if k in static else _plain_node(cfg, k) for k in cfg if k not in ("hydra", "_plan_subdir_")}
        return c, subdir(cfg)


_GONE = object()
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


def _axis_writes(conf_dir: Path, *overrides: str) -> set[str] | None:
    """Top-level config keys the group options of ``overrides`` (``quant=orbit``) write: their package's root, or
    for ``_global_`` options their own top-level keys, plus the packages of the groups their defaults list
    overrides. None when an option cannot be read (then nothing is assembled from it)."""
    import yaml

    out: set[str] = set()
    for ov in overrides:
        group, option = ov.split("=", 1)
        path = conf_dir / group / f"{option}.yaml"
        try:
            text = path.read_text()
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError):
            return None
        m = _PACKAGE.search(text)
        pkg = m.group(1) if m else group.replace("/", ".")
        own = {str(k) for k in data if k != "defaults"}
        out |= own if pkg == "_global_" else {pkg.split(".")[0]}
        for entry in data.get("defaults", []) or []:
            if isinstance(entry, dict):
                name = str(next(iter(entry))).replace("override", "").replace("optional", "").strip()
                out.add(name.lstrip("/").split("/")[0] if name.startswith("/") else pkg.split(".")[0])
            elif entry != "_self_":
                out.add(pkg.split(".")[0] if pkg != "_global_" else "*")  # another option of the group
    return out


def _flatten(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Leaf paths of a nested dict (lists and empty dicts are leaves)."""
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _overlap(a: set[tuple], b: set[tuple]) -> bool:
    """Whether two sets of config paths touch the same node (one path a prefix of the other)."""
    return any(x[:len(y)] == y or y[:len(x)] == x for x in a for y in b)


def _plain_node(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    v = cfg[key]
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Check:
    """One checklist line: what a sweep needs, whether it is there, and the one-line reason (the fix when not)."""

    ok: bool
    what: str
    reason: str


@dataclass
class Plan:
    """A priced sweep: its jobs, the protocols they sample (keyed), the fp references and calibrations it builds
    once, host-memory outlines, the ceiling used for projections, notes on what is and is not counted, and the
    checklist."""

    argv: list[str]
    experiment: str | None
    device: str
    dtype: str
    jobs: list[Job]
    protocols: dict[str, ProtocolCost]
    references: dict[str, str]  # reference key -> eval cost key
    calibrations: dict[str, str]  # calibration key -> calib cost key
    memory: dict[str, MemoryOutline]  # eval cost key -> outline
    ceiling: Ceiling | None
    mfu: float
    checklist: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[Job]:
        return [j for j in self.jobs if j.duplicate_of is None]

    def totals(self) -> dict[str, Any]:
        """Forwards, GPU seconds (None if any part has no estimate) and raw disk bytes of the whole sweep."""
        parts = ([self.protocols[k] for k in self.references.values()]
                 + [self.protocols[j.eval_cost] for j in self.runs]
                 + [self.protocols[k] for k in self.calibrations.values()])
        secs = [p.gpu_seconds for p in parts]
        disk = [self.protocols[k].disk_bytes for k in self.references.values()] + [
            self.protocols[j.eval_cost].disk_bytes for j in self.runs]
        return {"jobs": len(self.jobs), "runs": len(self.runs), "references": len(self.references),
                "calibrations": len(self.calibrations), "forwards": sum(p.forwards for p in parts),
                "gpu_seconds": None if any(s is None for s in secs) else sum(secs),
                "disk_bytes": None if any(d is None for d in disk) else sum(disk)}

    def quantized_upper(self) -> float | None:
        """GPU seconds if every quantized run's block linears take the measured orbit-fast / bf16 ratio (max)."""
        if self.ceiling is None or self.ceiling.quant_linear_ratio is None or self.totals()["gpu_seconds"] is None:
            return None
        k = self.ceiling.quant_linear_ratio[2]
        extra = 0.0
        for j in self.runs:
            p = self.protocols[j.eval_cost]
            if j.method != "fp" and p.flops is not None and p.timing is not None and p.timing.kind == "projection":
                extra += p.gpu_seconds * (p.flops.linear / p.flops.total) * (k - 1)
        return self.totals()["gpu_seconds"] + extra


def plain_config(cfg) -> dict:
    """A composed config as plain resolved data, without the ``hydra`` node (whose runtime fields only exist inside
    a real Hydra run)."""
    return {k: _plain_node(cfg, k) for k in cfg if k != "hydra"}


def _cost_key(kind: str, name: str, model_cfg: dict, protocol: dict, store: str, method: str) -> str:
    return json.dumps([kind, name, model_cfg, protocol, store, method], sort_keys=True, default=str)


def make_plan(argv: list[str], *, conf_dir: Path = CONF, bench_dir: Path = BENCH,
              ceiling_file: Path | None = DEFAULT_CEILING, mfu: float = DEFAULT_MFU, check: bool = True) -> Plan:
    """The plan of ``python run.py -m <argv>`` (``argv``: Hydra overrides, e.g. ``["experiment=digits"]``)."""
    from .cli import check_group_overrides

    if not 0 < mfu <= 1:
        raise PlanError(f"mfu={mfu} must be in (0, 1]: the fraction of the measured GEMM ceiling a forward sustains")
    argv = [a for a in argv if a.strip()]
    if err := check_group_overrides(argv, conf_dir):  # before any heavy import: a typo costs a second
        raise PlanError(err)
    exp = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == "experiment"]
    if exp and "," in exp[-1]:
        raise PlanError(f"config error: experiment={exp[-1]}: plan one experiment at a time")

    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from .api import quantizer_for
    from .artifacts import cache_key
    from .factory import build_quant_config

    ceiling = load_ceiling(ceiling_file)
    timings = load_timings(bench_dir)
    parsed = _parse(argv)
    base_args = [a for a, o in zip(argv, parsed) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        comp = _Composer(Path(conf_dir))
        try:
            from hydra import compose

            base = compose(config_name="config", overrides=base_args, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"config error: {_squash(e)}") from None
        sweeper_params = base.hydra.sweeper.get("params")
        params = OmegaConf.to_container(sweeper_params, resolve=True) if sweeper_params is not None else {}
        job_lists = expand_sweep({k: str(v) for k, v in params.items()}, argv)
        swept = {o.get_key_element() for o in _parse([f"{k}={v}" for k, v in params.items()] + argv)
                 if o.is_sweep_override()}
        cfgs = [(job, *comp.compose(job, swept)) for job in job_lists]

    protocols: dict[str, ProtocolCost] = {}
    references: dict[str, str] = {}
    calibrations: dict[str, str] = {}
    memory: dict[str, MemoryOutline] = {}
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    metric_sets: dict[str, list] = {}
    from .factory import build_metrics

    for job, c, subdir in cfgs:
        try:
            qcfg = build_quant_config(c["quant"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlanError(f"config error ({' '.join(job)}): {e}") from None
        needs = quantizer_for(qcfg).needs_calibration
        store = c["eval"].get("store", "float32")
        method = c["quant"]["method"]
        j = Job(job, c["model"]["name"], method, str(c["quant"].get("tag", method)), c["eval"]["name"],
                int(c["seed"]), int(c["quant_seed"]), subdir, needs)
        timed = method if any(r.get("method", "fp") == method and r["model"] == j.model for r in timings) else "fp"
        ek = _cost_key("eval", c["eval"]["name"], c["model"], c["eval"]["protocol"], store, timed)
        if ek not in protocols:
            protocols[ek] = protocol_cost("eval", c["eval"]["name"], c["eval"]["protocol"], c["model"], store, timed,
                                          timings, ceiling, mfu)
        j.eval_cost = ek
        if subdir in seen:
            j.duplicate_of = seen[subdir]
            jobs.append(j)
            continue
        seen[subdir] = subdir
        fpk = _cost_key("eval", c["eval"]["name"], c["model"], c["eval"]["protocol"], store, "fp")
        if fpk not in protocols:
            protocols[fpk] = protocol_cost("eval", c["eval"]["name"], c["eval"]["protocol"], c["model"], store, "fp",
                                           timings, ceiling, mfu)
        references.setdefault(cache_key(model=c["model"], protocol=c["eval"]["protocol"], dtype=c["dtype"],
                                        device=c["device"], seed=c["seed"], store=store), fpk)
        if needs:
            ck = _cost_key("calib", c["calib"]["name"], c["model"], c["calib"]["protocol"], "discard", "fp")
            if ck not in protocols:  # the calibration sampler runs the fp model (observers only)
                protocols[ck] = protocol_cost("calib", c["calib"]["name"], c["calib"]["protocol"], c["model"],
                                              "float32", "fp", timings, ceiling, mfu)
                protocols[ck].bytes_per_sample = 0  # calibration samples are discarded
            akey = cache_key(model=c["model"], quant=c["quant"], calib=c["calib"], quant_seed=c["quant_seed"],
                             dtype=c["dtype"], device=c["device"])
            j.calibration = "cached" if akey in calibrations else "new"
            calibrations.setdefault(akey, ck)
            j.calib_cost = ck
        if fpk not in memory:
            ms = metric_sets.setdefault(c["eval"]["name"], build_metrics(c["eval"]["metrics"]))
            memory[fpk] = memory_outline(protocols[fpk], ms, c["dtype"], c["eval"]["name"])
        jobs.append(j)

    first = cfgs[0][1]
    plan = Plan(argv, exp[-1] if exp else None, str(first["device"]), str(first["dtype"]), jobs, protocols,
                references, calibrations, memory, ceiling, mfu)
    plan.notes = _notes(plan)
    if check:
        plan.checklist = checklist([c for _, c, _ in cfgs])
    return plan


def _notes(plan: Plan) -> list[str]:
    notes = [
        "counted: runs, samples, forwards, tokens, bytes (from the composed configs and shipped transformer configs)",
        "forwards are denoiser rows (one sample through the denoiser once); CFG per family: orbitquant.plan.CFG_RULES",
        ("fp reference: sampled once per (model, eval protocol, dtype, device, seed), cached; the quant=fp run also "
        "samples its own set (orbitquant/stages.py sample() runs for every method)"),
        ("disk: raw bytes of every sample store (uint8 = F x H x W x 3 per video / H x W x 3 per image, float32 = 4 B "
        "per value, + 8 B label); npz compression of uint8 shards is not counted, so these are upper bounds; not "
        "counted: previews, feature caches, calibration artifacts, quantized checkpoints, GenEval/VBench exports"),
        ("not counted in GPU time: VAE decode and text encoding (unless a timing file gives VAE decode), quantizer "
        "fitting (GPTQ, smoothing / clip searches, SVD), metric evaluators (Inception, CLIP, GenEval, VBench)"),
    ]
    c = plan.ceiling
    if c is not None:
        notes.append(f"projection: seconds per forward = FLOPs / ({plan.mfu:.0%} x {c.bf16_tflops:g} TFLOP/s measured "
                     f"bf16 GEMM ceiling of {c.gpu}, {c.source}); FLOPs = 2 x in x out x rows per block linear + "
                     "4 x Lq x Lkv x inner per attention layer; the fraction is an assumption, not a measurement")
        if c.quant_linear_ratio is not None:
            up = plan.quantized_upper()
            tail = f"; with every quantized run's linears at the max ratio: {fmt_hours(up)} GPU-h in all" if up else ""
            notes.append("quantized runs simulate quantization (fake-quant) and are slower than bf16: measured "
                         f"{c.quant_ratio_detail} ({c.source}); the GPU-h above price them as bf16, a lower bound"
                         + tail)
    else:
        notes.append("no measured GPU ceiling file: GPU-hours not projected (pass --ceiling results/bench/gpu-*.json)")
    return notes


def checklist(cfgs: list[dict]) -> list[Check]:
    """What a sweep needs before it starts: the model weights, every metric's ``check()`` (metrics failing for the
    same reason share a line), and the protocols fitting the model (prompt files). Never raises: a missing piece is
    a failed check with its one-line reason."""
    from .api import quantizer_for
    from .factory import build_adapter, build_metrics, build_quant_config

    out: list[Check] = []
    seen: set[tuple] = set()
    for c in cfgs:
        model = c["model"]
        key = ("model", json.dumps(model, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(_check_weights(model))
        groups: dict[tuple[bool, str], list[str]] = {}
        for name, opts in _metric_specs(c["eval"]["metrics"]):
            key = ("metric", name, json.dumps(opts, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            chk = _guard(f"metric {name}", lambda s=name, o=opts: build_metrics([{s: o}])[0].check())
            reason = chk.reason.removeprefix(f"metric {name}: ")
            groups.setdefault((chk.ok, reason), []).append(name)
        for (ok, reason), names in groups.items():
            out.append(Check(ok, f"metric{'s' if len(names) > 1 else ''} {', '.join(names)} (eval={c['eval']['name']})",
                             reason))
        for kind in ("eval", "calib"):
            if kind == "calib":
                try:
                    calibrated = quantizer_for(build_quant_config(c["quant"])).needs_calibration
                except Exception:  # noqa: BLE001 - make_plan has already reported a bad quant config
                    calibrated = False
                if not calibrated:
                    continue
            key = (kind, c[kind]["name"], json.dumps(model, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            label = f"{kind}={c[kind]['name']} fits model={model.get('name')} (prompts present)"
            out.append(_guard(label, lambda k=kind, m=model, cc=c: build_adapter(m).check_protocol(
                cc[k]["protocol"], ("calib=" if k == "calib" else "") + cc[k]["name"])))
    return out


def _metric_specs(spec) -> list[tuple[str, dict]]:
    from .factory import metric_specs

    return metric_specs(spec)


def _guard(what: str, fn) -> Check:
    try:
        fn()
        return Check(True, what, "ok")
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return Check(False, what, _one_line(e))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if isinstance(e, (FileNotFoundError, ValueError)) else f"{type(e).__name__}: {msg}"


def _check_weights(model: dict) -> Check:
    """Whether the model's weights are on this machine (HF cache or model.path; never downloads)."""
    name = model.get("name", model.get("adapter"))
    what = f"weights of model={name}"
    if model.get("init") == "random":
        return Check(True, what, "model.init=random: true-size denoiser with random weights, no checkpoint needed "
                                 "(timings real, quality numbers meaningless)")
    if model.get("tiny") and not model.get("path"):
        return Check(True, what, "random-init tiny test pipeline (no checkpoint)")
    if model.get("adapter") == "digits":
        path = Path(model.get("path") or DIGITS_CONFIG.parent)
        ok = (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file()
        return Check(ok, what, f"{path}" if ok else f"digits weights not in {path}; `python scripts/train_digits.py` "
                                                    "recreates them")

    def resolve():
        from .adapters.hf import resolve_checkpoint
        from .factory import build_adapter

        a = build_adapter(model)
        return resolve_checkpoint(a.name, a.repo_id, a.path, allow_download=False)

    try:
        return Check(True, what, resolve())
    except Exception as e:  # noqa: BLE001 - WeightsNotFound and anything else: a line, not a crash
        return Check(False, what, _one_line(e).removeprefix(f"model={name}: "))


# ---------------------------------------------------------------------------------------------- rendering
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.3g} {unit}"
        n /= 1000
    return ""


def fmt_hours(sec: float | None) -> str:
    if sec is None:
        return "n/a"
    h = sec / 3600
    return f"{h:,.3g}" if h < 1000 else f"{h:,.0f}"


def fmt_sig(x: float | None) -> str:
    """Three significant figures, thousands separated (``1,680``, ``0.274``); ``n/a`` for None."""
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def run_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per (model, eval, method, tag): seeds, runs, per-run and total cost; then the fp reference cache."""
    groups: dict[tuple, list[Job]] = {}
    for j in plan.runs:
        groups.setdefault((j.model, j.eval, j.method, j.tag), []).append(j)
    rows = []
    for (model, ev, method, tag), js in groups.items():
        p = plan.protocols[js[0].eval_cost]
        new_cal = [j for j in js if j.calibration == "new"]
        cal = plan.protocols[js[0].calib_cost] if js[0].calib_cost else None
        per_fw = p.forwards + (cal.forwards if cal is not None else 0)
        secs = [p.gpu_seconds] + ([cal.gpu_seconds] if cal is not None else [])
        per_s = None if any(s is None for s in secs) else sum(secs)
        total_s = None if per_s is None else (p.gpu_seconds * len(js)
                                              + (cal.gpu_seconds * len(new_cal) if cal is not None else 0))
        dups = sum(1 for j in plan.jobs if j.duplicate_of is not None and j.duplicate_of in {x.subdir for x in js})
        rows.append({
            "model": model, "eval": ev, "method": method, "tag": tag,
            "seeds": ",".join(str(j.seed) for j in js), "runs": len(js),
            "skipped_jobs": dups,
            "calibration": (f"{cal.name}: {cal.n_samples:,} samples, {cal.forwards:,} fw" if cal is not None else "-"),
            "samples_per_run": p.n_samples, "forwards_per_run": per_fw,
            "gpu_h_per_run": per_s, "gpu_h_total": total_s, "disk_per_run": p.disk_bytes,
        })
    refs: dict[str, int] = {}
    for k in plan.references.values():
        refs[k] = refs.get(k, 0) + 1
    for k, count in refs.items():
        p = plan.protocols[k]
        rows.append({"model": p.model, "eval": p.name, "method": "fp reference", "tag": "(cache)",
                     "seeds": "", "runs": count, "skipped_jobs": 0, "calibration": "-",
                     "samples_per_run": p.n_samples, "forwards_per_run": p.forwards, "gpu_h_per_run": p.gpu_seconds,
                     "gpu_h_total": None if p.gpu_seconds is None else p.gpu_seconds * count,
                     "disk_per_run": p.disk_bytes})
    return rows


def render(plan: Plan, markdown: bool = False) -> str:
    """The plan as text (or GitHub markdown): header, per-protocol costs, the run table, memory, notes, checklist."""
    from tabulate import tabulate

    fmt = "github" if markdown else "simple"
    t = plan.totals()
    out = []
    title = f"experiment={plan.experiment}" if plan.experiment else "runs"
    extra = " ".join(a for a in plan.argv if not a.startswith("experiment="))
    out.append(("# " if markdown else "") + f"Plan: {title}" + (f" {extra}" if extra else "")
               + f"  (device {plan.device}, dtype {plan.dtype})")
    out.append("")
    out.append(f"{t['jobs']} sweep jobs -> {t['runs']} runs ({t['jobs'] - t['runs']} of the jobs share a run "
               f"directory with an earlier one and skip), {t['references']} fp reference sets (cached), "
               f"{t['calibrations']} calibrations (cached)")
    out.append("")
    for p in plan.protocols.values():
        out.append(("## " if markdown else "") + f"{p.kind}={p.name} on model={p.model}")
        rows = [
            ["samples", f"{p.n_samples:,}", p.n_source],
            ["steps / guidance", f"{p.steps} / {p.guidance:g}", p.cfg_note],
            ["denoiser forwards / sample", f"{p.forwards_per_sample:,}",
             (f"{p.steps} steps x {p.rows_per_step} row{'s' if p.rows_per_step > 1 else ''}; {p.calls:,} denoiser "
             f"calls at batch {p.batch_size}")],
            ["denoiser forwards (protocol)", f"{p.forwards:,}", "samples x forwards / sample"],
        ]
        if p.geometry is not None:
            rows.append(["tokens / forward", f"{p.geometry.tokens:,}", p.geometry.detail])
            rows.append(["text tokens", f"{p.geometry.text_tokens:,}", p.text_note])
        if p.flops is not None:
            rows.append(["TFLOPs / forward", f"{p.flops.total / 1e12:,.4g}",
                         (f"linear {p.flops.linear / 1e12:,.4g} + attention {p.flops.attention / 1e12:,.4g} "
                         f"({p.flops.detail})")])
        if p.timing is not None:
            rows.append(["seconds / forward", f"{p.timing.seconds:.4g}", p.timing.label])
            rows.append(["GPU-h (protocol)", fmt_hours(p.gpu_seconds),
                         "forwards x seconds / forward" + (" + VAE decode" if p.timing.vae_decode_seconds else "")])
        else:
            rows.append(["seconds / forward", "n/a", "no shipped config / timing file / ceiling for this model"])
        if p.kind == "eval":
            rows.append(["disk / sample set", fmt_bytes(p.disk_bytes),
                         f"{p.n_samples:,} x {p.bytes_per_sample or 0:,} B raw {p.store} (compression not counted)"])
        out.append(tabulate(rows, headers=["", "value", "from"], tablefmt=fmt))
        out.append("")
    rows = run_rows(plan)
    table = [[r["model"], r["eval"], r["method"], r["tag"], r["seeds"], r["runs"], r["calibration"],
              f"{r['samples_per_run']:,}", f"{r['forwards_per_run']:,}", fmt_hours(r["gpu_h_per_run"]),
              fmt_hours(r["gpu_h_total"]), fmt_bytes(r["disk_per_run"])] for r in rows]
    table.append(["total", "", "", "", "", f"{t['runs']} + {t['references']} ref", f"{t['calibrations']} new", "",
                  f"{t['forwards']:,}", "", fmt_hours(t["gpu_seconds"]), fmt_bytes(t["disk_bytes"])])
    out.append(("## " if markdown else "") + "Runs")
    out.append(tabulate(table, headers=["model", "eval", "method", "tag", "seeds", "runs", "calibration", "samples/run",
                                        "forwards/run", "GPU-h/run", "GPU-h", "disk/run"], tablefmt=fmt,
                        disable_numparse=True))
    out.append("")
    for key, mem in plan.memory.items():
        p = plan.protocols[key]
        out.append(("## " if markdown else "") + f"Host memory per run: {p.name} on {p.model} (outline)")
        out.append(tabulate([
            ["load", fmt_bytes(mem.load), mem.load_detail],
            ["one batch", fmt_bytes(mem.batch), mem.batch_detail],
            ["metric state", fmt_bytes(mem.metrics), mem.metrics_detail],
            ["first run only", fmt_bytes(mem.first_run_extra), mem.first_run_detail],
            ["peak", fmt_bytes(mem.peak), ("max(load, batch + metric state + first-run decode); flat in the sample "
             "count apart from the metric state")],
        ], headers=["stage", "bytes", "from"], tablefmt=fmt))
        out.append("")
    out.append(("## " if markdown else "") + "Notes")
    out += [f"- {n}" for n in plan.notes]
    if plan.checklist:
        out.append("")
        out.append(("## " if markdown else "") + "Checklist")
        out += [f"{'- ' if markdown else ''}{'✓' if c.ok else '✗'} {c.what}: {c.reason}" for c in plan.checklist]
    return "\n".join(out)


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (``--json``)."""

    def prot(p: ProtocolCost) -> dict:
        d = dataclasses.asdict(p)
        d.update(forwards_per_sample=p.forwards_per_sample, forwards=p.forwards, calls=p.calls,
                 gpu_seconds=p.gpu_seconds, disk_bytes=p.disk_bytes)
        if p.flops is not None:
            d["flops"]["total"] = p.flops.total
        if p.geometry is not None:
            d["geometry"]["tokens"] = p.geometry.tokens
        return d

    keys = {k: f"{p.kind}:{p.name}:{p.model}:{i}" for i, (k, p) in enumerate(plan.protocols.items())}
    return {
        "argv": plan.argv, "experiment": plan.experiment, "device": plan.device, "dtype": plan.dtype,
        "totals": plan.totals(), "quantized_upper_gpu_seconds": plan.quantized_upper(),
        "mfu": plan.mfu, "ceiling": dataclasses.asdict(plan.ceiling) if plan.ceiling else None,
        "protocols": {keys[k]: prot(p) for k, p in plan.protocols.items()},
        "jobs": [{**dataclasses.asdict(j), "eval_cost": keys[j.eval_cost],
                  "calib_cost": keys[j.calib_cost] if j.calib_cost else None} for j in plan.jobs],
        "references": [keys[k] for k in plan.references.values()],
        "calibrations": [keys[k] for k in plan.calibrations.values()],
        "runs_table": run_rows(plan),
        "memory": {keys[k]: {**dataclasses.asdict(m), "peak": m.peak} for k, m in plan.memory.items()},
        "notes": plan.notes,
        "checklist": [dataclasses.asdict(c) for c in plan.checklist],
    }


# ---------------------------------------------------------------------------------------------- docs/scale.md
#: (eval protocol, model, extra overrides) of docs/scale.md: each paper protocol on the paper's models.
SCALE_ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("coco_fid_clip", "flux1_dev", ()),
    ("coco_fid_clip", "flux1_schnell", ("eval.protocol.steps=4", "eval.protocol.guidance=0")),
    ("geneval", "flux1_dev", ()),
    ("mjhq", "flux1_dev", ()),
    ("imagenet", "dit_xl_2", ()),
    ("vbench", "wan21", ()),
    ("vbench_quick", "wan21", ()),
    ("cogvideox_fidelity", "cogvideox_2b", ()),
    ("cogvideox_fidelity", "cogvideox_5b", ()),
    ("dit_fidelity", "dit_xl_2", ()),
    ("flux_dev_fidelity", "flux1_dev", ()),
    ("flux_schnell_fidelity", "flux1_schnell", ()),
    ("wan21_fidelity", "wan21", ()),
    ("wan21_fidelity", "wan21_14b", ()),
    ("zimage_turbo_fidelity", "zimage_turbo", ()),
)
SCALE_EXPERIMENTS = ("dit_imagenet", "flux1_dev_geneval", "wan21_vbench")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table without alignment padding (stable, greppable rows: ``| a | b |``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def scale_table(mfu: float = DEFAULT_MFU, ceiling_file: Path | None = DEFAULT_CEILING,
                bench_dir: Path = BENCH) -> list[dict[str, Any]]:
    """One row per (paper protocol, model): samples, forwards, tokens, disk, host memory and GPU-hours of one
    quantized run (eval sampling only) and of its fp reference."""
    out = []
    for ev, model, extra in SCALE_ROWS:
        plan = make_plan([f"model={model}", f"eval={ev}", "quant=orbit", *extra], bench_dir=bench_dir,
                         ceiling_file=ceiling_file, mfu=mfu, check=False)
        key = plan.runs[0].eval_cost
        p, mem = plan.protocols[key], next(iter(plan.memory.values()))
        out.append({"eval": ev, "model": model, "overrides": " ".join(extra), "samples": p.n_samples,
                    "steps": p.steps, "guidance": p.guidance, "forwards_per_sample": p.forwards_per_sample,
                    "forwards": p.forwards, "tokens": p.geometry.tokens if p.geometry else None,
                    "tflops_per_forward": p.flops.total / 1e12 if p.flops else None,
                    "seconds_per_forward": p.timing.seconds if p.timing else None,
                    "timing": p.timing.kind if p.timing else None,
                    "gpu_hours": None if p.gpu_seconds is None else p.gpu_seconds / 3600,
                    "disk_bytes": p.disk_bytes, "store": p.store,
                    "mem_load": mem.load, "mem_batch": mem.batch, "mem_metrics": mem.metrics,
                    "mem_first_run": mem.first_run_extra, "mem_peak": mem.peak,
                    "metrics_detail": mem.metrics_detail})
    return out


def scale_doc(mfu: float = DEFAULT_MFU, ceiling_file: Path | None = DEFAULT_CEILING, bench_dir: Path = BENCH) -> str:
    """docs/scale.md, generated: ``python scripts/plan.py --scale-doc > docs/scale.md``."""
    ceiling = load_ceiling(ceiling_file)
    rows = scale_table(mfu, ceiling_file, bench_dir)
    lines = [
        "# Scale: what one run of each paper protocol costs",
        "",
        ("Generated by `python scripts/plan.py --scale-doc > docs/scale.md` (`orbitquant.plan.scale_doc`); rerun it "
        "after changing a protocol, a model config or the bench files. **These are projections and counts, not "
        "measurements**: no denoiser forward below was timed. The only measured inputs are the H100 bf16 GEMM "
        "ceiling and the fake-quant / bf16 linear-layer ratios of the GPU bench file named below; everything else "
        "is counted from the configs or projected with the formulas at the end. Per experiment sweep: "
        "`python scripts/plan.py experiment=<name>` (also `--json`, `--markdown`)."),
        "",
        "## Per run",
        "",
        ("One quantized run's evaluation sampling, priced as bf16 (fake-quant overhead not included; the fp "
        "reference of a seed costs the same once more, cached; calibration is extra for calibrated methods). "
        "`forwards` are denoiser rows (one sample through the "
        "denoiser once; CFG doubles them where the family runs it). Disk is the raw sample store (uint8; "
        "compression not counted). Host memory is the outline of `orbitquant.plan.memory_outline`: flat in the "
        "sample count except the metric state."),
        "",
    ]
    table = [[r["eval"], r["model"] + (f" ({r['overrides']})" if r["overrides"] else ""), f"{r['samples']:,}",
              f"{r['steps']} / {r['guidance']:g}", f"{r['forwards_per_sample']:,}", f"{r['forwards']:,}",
              f"{r['tokens']:,}" if r["tokens"] else "n/a", fmt_sig(r["tflops_per_forward"]),
              fmt_sig(r["seconds_per_forward"]), fmt_sig(r["gpu_hours"]),
              fmt_bytes(r["disk_bytes"]), fmt_bytes(r["mem_load"]), fmt_bytes(r["mem_batch"]),
              fmt_bytes(r["mem_metrics"]), fmt_bytes(r["mem_first_run"]), fmt_bytes(r["mem_peak"])] for r in rows]
    lines.append(md_table(["eval", "model", "samples", "steps / guidance", "forwards / sample", "forwards / run",
                           "tokens / forward", "TFLOPs / forward", "s / forward (projection)",
                           "GPU-h / run (projection)", "disk / run (raw)", "host: load", "host: batch",
                           "host: metric state", "host: first-run reference decode", "host: peak"], table))
    lines += ["", "## Per paper experiment (whole sweep)", ""]
    exp_rows = []
    for name in SCALE_EXPERIMENTS:
        plan = make_plan([f"experiment={name}"], bench_dir=bench_dir, ceiling_file=ceiling_file, mfu=mfu, check=False)
        t = plan.totals()
        up = plan.quantized_upper()
        exp_rows.append([name, t["jobs"], t["runs"], t["references"], t["calibrations"], f"{t['forwards']:,}",
                         fmt_hours(t["gpu_seconds"]), fmt_hours(up), fmt_bytes(t["disk_bytes"])])
    lines.append(md_table(["experiment", "jobs", "runs", "fp references", "calibrations", "forwards",
                           "GPU-h (bf16 projection)", "GPU-h (quantized linears at max measured ratio)", "disk (raw)"],
                          exp_rows))
    lines += ["", "## Formulas and assumptions", ""]
    ceil = (f"{ceiling.bf16_tflops:g} TFLOP/s, the bf16 8192^3 matmul ceiling measured on {ceiling.gpu} "
            f"(`{ceiling.source}`)" if ceiling else "(no ceiling file: GPU-hours not projected)")
    lines += [
        (f"- **GPU-hours (projection)** = forwards x FLOPs per forward / ({mfu:.0%} x {ceil}). The {mfu:.0%} is an "
        "assumption (attention kernels below GEMM peak, norms, RoPE, modulation, launches), not a measurement. A "
        "timing file (`results/bench/*.json`, schema `orbitquant.forward_timing/1`, see `orbitquant/plan.py`) "
        "replaces the projection for its model and resolution."),
        ("- **FLOPs per forward** = sum over block linears of 2 x in x out x rows (rows = the tokens of the linear's "
        "stream: FLUX dual blocks image or text, single blocks both; Wan cross-attention k/v on the text; CogVideoX "
        "text+video; Z-Image refiners on their stream, main layers on both; adaLN / modulation linears one row) + "
        "4 x Lq x Lkv x inner per attention layer. Linear shapes come from the true-size denoiser built on the meta "
        "device from `orbitquant/assets/configs/<name>.json`; embedders and the final layer are not counted."),
        ("- **Tokens**: VAE x8 spatial, then the patch (FLUX packs 2x2); Wan / CogVideoX latent frames = "
        "(F - 1) // 4 + 1; text tokens = the pipeline's max_sequence_length (FLUX, Wan, CogVideoX pad to it; "
        "Z-Image uses the prompt's real length, so its number is an upper bound). E.g. Wan 2.1 at 832x480x81: "
        "21 x 30 x 52 = 32,760 video tokens + 512 text."),
        "- **Forwards per sample** = steps x (2 where the family runs CFG at that guidance, else 1): "
        + "; ".join(f"{k}: " + ("never (guidance-distilled)" if v.mode == "never" else
                                 f"{v.active} ({'batch doubled' if v.mode == 'batch' else 'second call'})")
                    for k, v in CFG_RULES.items()) + ". Read from each adapter and the diffusers 0.42 pipeline it "
        "drives (`orbitquant.plan.CFG_RULES` cites the lines) and checked on the tiny pipelines by "
        "`tests/test_plan.py`.",
        ("- **Disk** = samples x (H x W x 3 or F x H x W x 3 bytes for uint8 stores, x 4 for float32) + 8 B label, per "
        "sample store (the fp reference of a seed once, every run once). Compression, previews, feature caches, "
        "calibration artifacts and the GenEval / VBench exports are not counted."),
        (f"- **Host memory**: load = the pipeline's parameters x dtype bytes (denoiser from its shipped config; text "
        "encoders and VAE nominal, `orbitquant.plan.PIPELINE_EXTRAS`); batch = batch_size x sample values x "
        f"(4 B float32 output + 1 B uint8 shard); metric state = Inception features ({INCEPTION_FEATURE_BYTES:,} B "
        "per image: pool3 2048 + logits 1008 + spatial 2023 float32) of the samples, the fp reference and the real "
        "set, plus 8 B per sample per scalar metric. A first run against a real image set also decodes it once "
        "(`host: peak` includes that)."),
        ("- **Not counted anywhere**: VAE decode, text encoding, quantizer fitting (GPTQ, searches, SVD), the metric "
        "evaluators (Inception, CLIP, GenEval, VBench), and fake-quant overhead (priced separately in the sweep table "
        "from the measured orbit-fast / bf16 linear ratio; other methods' overheads are not measured)."),
    ]
    if ceiling and ceiling.quant_linear_ratio:
        lines.append(f"- **Quantized runs**: {ceiling.quant_ratio_detail} (`{ceiling.source}`).")
    lines += ["", "Metric state per protocol:", ""]
    lines += [f"- {r['eval']} / {r['model']}: {r['metrics_detail']}" for r in rows]
    found = load_timings(bench_dir)
    example = {"schema": TIMING_SCHEMA, "model": "wan21", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
               "height": 480, "width": 832, "num_frames": 81, "method": "fp", "seconds_per_forward": 1.0,
               "rows_per_call": 2, "vae_decode_seconds_per_sample": None,
               "source": "an example of the fields, not a measurement: say how it was measured"}
    lines += [
        "", "## Replacing a projection with a measurement", "",
        ("Any `results/bench/*.json` holding records of this schema (one object, a list, or `{\"timings\": [...]}`) "
        "replaces the FLOP projection for its model and geometry (height, width, num_frames; `method` absent or `fp` "
        "serves every method, a method's own record wins for that method). `seconds_per_forward` is GPU seconds per "
        "denoiser row (call time / rows); `vae_decode_seconds_per_sample` is optional and then counted:"),
        "", "```json", json.dumps(example, indent=1), "```", "",
        ("One way to get a record on a GPU machine without the checkpoint: a dry run of the true-size denoiser with "
        "random weights (`model.init=random`, `orbitquant/adapters/random_init.py`) at a protocol's resolution, then "
        "convert its results.json (sample-stage seconds / denoiser rows: an upper bound, it includes text encoding "
        "and VAE decode):"),
        "", "```",
        "python run.py model=wan21 ++model.init=random eval=wan21_fidelity quant=fp device=cuda",
        ("python scripts/plan.py --timing-from results/runs/wan21/fp/fp/wan21_fidelity/q0-s0/results.json "
        "> results/bench/wan21-dryrun.json"),
        "```", "",
        "Timing files found when this page was generated: "
        + (", ".join(sorted({f"`{r['_file']}` ({r['model']})" for r in found})) if found else "none (every GPU-hour "
           "number above is a projection)") + ".",
    ]
    return "\n".join(lines) + "\n"
