"""What the cost planner (``orbitquant.harness.plan``) needs to know about a family, declared on its adapter class.

Every adapter inherits :class:`PlanFacts` through ``ModelAdapter`` and overrides what its pipeline does:

* ``cfg_rule``: when the sampler runs classifier-free guidance and how (a :class:`CfgRule`, with the evidence);
* ``pipeline_extras``: nominal parameters of the pipeline parts besides the denoiser (text encoders, VAE);
* ``plan_geometry``: tokens per denoiser row from the shipped transformer config and the protocol's resolution;
* ``plan_text_tokens``: text tokens per row;
* ``plan_linear_rows``: the rows (tokens) a block linear of a role sees per sample;
* ``plan_attention_flops``: the attention FLOPs of one row.

A family without a fact the planner needs makes the planner raise ``PlanError`` naming the attribute to add. This
module imports nothing heavy: the planner reads it without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: Nominal parameter counts of pipeline parts shared by several families (host memory while loading). Derived from
#: the public architectures, not read from files (no checkpoints here).
#: T5-XXL encoder = 24 x (4*4096^2 + 3*4096*10240) + 32128*4096 = 4.76e9.
T5_XXL_ENCODER: tuple[str, float] = ("T5-XXL encoder", 4.76e9)
#: The 8x KL VAE of FLUX / Z-Image (and SD's sd-vae-ft-ema of DiT): 8.4e7 from its checkpoint size.
KL_VAE_PARAMS = 8.4e7


@dataclass(frozen=True)
class CfgRule:
    """When a family's sampler runs classifier-free guidance and how: ``batch`` doubles the rows of one denoiser
    call, ``calls`` runs a second call; ``never``: guidance is distilled into the model (one row per step).
    ``evidence`` cites the code that does it (the adapter or the diffusers pipeline it drives)."""

    active: str  # "guidance > 1" | "guidance > 0" | "guidance != 1" | "never"
    mode: str  # "batch" | "calls" | "never"
    evidence: str

    def is_active(self, guidance: float) -> bool:
        """Whether the sampler runs the CFG pass at ``guidance``."""
        return {"guidance > 1": guidance > 1, "guidance > 0": guidance > 0, "guidance != 1": guidance != 1,
                "never": False}[self.active]


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


def attention_inner(cfg: dict) -> int:
    """Attention width (heads x head dim) of a diffusers transformer config."""
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


def self_attention_flops(cfg: dict, blocks: int, tokens: int) -> float:
    """``blocks`` self-attention layers over ``tokens`` tokens (DiT, digits; CogVideoX and FLUX over text+media)."""
    return 4.0 * blocks * tokens ** 2 * attention_inner(cfg)


def image_geometry(protocol: dict, patch: int, how: str, text_tokens: int, vae: int = 8) -> Geometry:
    """Tokens of a text-to-image row: ``height x width`` px through a ``vae``-x spatial VAE, then ``patch`` x
    ``patch`` latent patches (``how`` names the patching), plus the text tokens."""
    h, w = int(protocol["height"]), int(protocol["width"])
    lh, lw = h // vae // patch, w // vae // patch
    return Geometry(lh * lw, text_tokens, (3, h, w),
                    f"{h}x{w} px -> VAE x{vae} -> {how}: {lh} x {lw} = {lh * lw} image + {text_tokens} text")


def video_geometry(protocol: dict, patch: tuple[int, int, int], text_tokens: int, vae: int = 8,
                   temporal: int = 4) -> Geometry:
    """Tokens of a text-to-video row: latent frames ``(F - 1) // temporal + 1`` (a causal video VAE keeps the first
    frame), ``vae``-x spatial, then the (t, h, w) ``patch``, plus the text tokens."""
    h, w, f = int(protocol["height"]), int(protocol["width"]), int(protocol["num_frames"])
    lf = (f - 1) // temporal + 1
    pt, ph, pw = patch
    tf, th, tw = -(-lf // pt), h // vae // ph, w // vae // pw
    return Geometry(tf * th * tw, text_tokens, (f, 3, h, w),
                    f"{f} frames -> {lf} latent (x{temporal} temporal), {h}x{w} -> VAE x{vae} -> patch "
                    f"{pt}x{ph}x{pw}: {tf} x {th} x {tw} = {tf * th * tw} video + {text_tokens} text")


class PlanFacts:
    """The planner's facts of a family; ``ModelAdapter`` inherits them and each family's adapter overrides them.
    The defaults are what a family without the fact gets: ``None`` where the planner cannot guess (it then names
    the attribute to add), the common case elsewhere."""

    #: when the sampler runs classifier-free guidance and how; None: the planner asks for one
    cfg_rule: ClassVar[CfgRule | None] = None
    #: (part, nominal parameters) of the pipeline besides the denoiser: text encoders and VAE (host memory at load)
    pipeline_extras: ClassVar[tuple[tuple[str, float], ...]] = ()

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry | None:
        """Tokens per denoiser row from the shipped transformer config ``cfg`` and the protocol's resolution;
        None: no rule (the planner asks for one)."""
        return None

    def plan_text_tokens(self) -> tuple[int, str]:
        """(text tokens per row, how): by default the pipeline's ``max_sequence_length``, which it pads to."""
        n = int((getattr(self, "call_kwargs", {}) or {}).get("max_sequence_length", 0))
        return n, f"max_sequence_length {n} (the pipeline pads to it)"

    @classmethod
    def plan_linear_rows(cls, stack: str, role: str, media: int, text: int) -> int:
        """Rows per sample a block linear of ``role`` in block stack ``stack`` sees (``media`` / ``text``: the
        row's tokens); by default the media tokens (adaLN, embedders and the final layer are the planner's)."""
        return media

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float | None:
        """Attention FLOPs of one row, 4 x Lq x Lkv x inner (QK^T and PV) summed over the attention layers
        (``stacks``: blocks per stack); None: no rule (the planner asks for one)."""
        return None



class ClassConditionalFacts:
    """The planner facts every class-conditional DiT shares (digits, DiT-XL/2): no text tokens (the label enters
    through adaLN), self-attention over the image tokens of each ``transformer_blocks`` block. Listed before the
    adapter base so these override ``PlanFacts``' defaults."""

    def plan_text_tokens(self) -> tuple[int, str]:
        return 0, "class-conditional: no text tokens"

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float:
        return self_attention_flops(cfg, stacks["transformer_blocks"], media)


__all__ = ["KL_VAE_PARAMS", "T5_XXL_ENCODER", "CfgRule", "ClassConditionalFacts", "Geometry", "PlanFacts", "attention_inner",
           "image_geometry", "self_attention_flops", "video_geometry"]
