"""One denoiser forward: rows per sampling step (classifier-free guidance per family), tokens per row and FLOPs per
row, from the shipped transformer configs (``orbitquant/assets/configs/<name>.json``) and the protocol's resolution.
Counted, never timed: a forward's seconds are ``timing.py``'s."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from orbitquant.harness.plan.base import CONFIGS, DIGITS_CONFIG, PlanError


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
        raise PlanError(f"no CFG rule for model adapter {adapter!r}; add one to orbitquant.harness.plan.CFG_RULES "
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
    raise PlanError(f"no token rule for model adapter {adapter!r}; add one to orbitquant.harness.plan.geometry")


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

    from orbitquant.harness.adapters.dit_roles import DIT_ROLES
    from orbitquant.harness.inventory import build_meta, role_tables

    if model_name in ("digits", "digits_outliers"):
        from diffusers import DiTTransformer2DModel

        cfg = {k: v for k, v in shipped_config(model_name).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = DiTTransformer2DModel.from_config(cfg)
        table = DIT_ROLES
    else:
        model, table = build_meta(model_name), role_tables()[model_name]
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
    """Attention FLOPs of one row: 4 x Lq x Lkv x inner (QK^T and PV) summed over the attention layers."""
    if adapter == "zimage":  # refiners attend within their own stream, the main layers over both
        inner = cfg["dim"]
        return 4.0 * inner * (stacks["noise_refiner"] * m * m + stacks["context_refiner"] * t * t
                              + stacks["layers"] * (m + t) ** 2)
    if adapter not in ("dit", "digits", "flux", "wan", "cogvideox"):
        raise PlanError(f"no attention rule for model adapter {adapter!r}; add one to "
                        "orbitquant.harness.plan.denoiser._attention")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if adapter == "flux":
        return 4.0 * sum(stacks.values()) * (m + t) ** 2 * inner
    if adapter == "wan":
        return 4.0 * stacks["blocks"] * (m * m + m * t) * inner  # self-attention + cross-attention to the text
    if adapter == "cogvideox":
        return 4.0 * stacks["transformer_blocks"] * (m + t) ** 2 * inner
    return 4.0 * stacks["transformer_blocks"] * m * m * inner  # dit, digits


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


def denoiser_params(model_name: str) -> int:
    """All parameters of the true-size denoiser of ``model_name`` (0 without a shipped config: tiny test pipelines)."""
    return _layer_table(model_name)[2] if shipped_config(model_name) is not None else 0
