"""``smoothquant``: SmoothQuant (Xiao et al., ICML 2023) adapted to DiTs (BASELINES_SPEC section 8.2).

Calibration runs the model's own sampler (all timesteps, both CFG halves) and records each target
linear's per-input-channel absmax ``a_j``. The smoothing scale is
``s_j = clamp(a_j^alpha / max_i |W_ij|^(1 - alpha), 1e-5)``; activations are divided by ``s`` online
and the weight columns multiplied by ``s`` offline, then weights are RTN symmetric per output
channel (or per tensor) and activations RTN symmetric per token, dynamic (or per tensor, dynamic or
static: the paper's O1-O3 levels). ``alpha=null`` grid-searches one alpha per model on the
calibration tokens (mean relative output error over the smoothed layers).

**Which layers are smoothed.** As upstream (``smooth_lm``: q/k/v after the attention norm, fc1 / gate+up
after the FFN norm), only the layers that read a normalised block input: roles ``attn.q/k/v``,
``ctx.q/k/v``, ``ff.up``, ``ff.gate``, ``ctx.ff.up`` (and ``linear``, a layer without an adapter role).
The attention out-projections (``attn.out``, ``ctx.out``, ``fused.out``) and the FFN down-projections
(``ff.down``, ``ctx.ff.down``) are quantized the same way (symmetric RTN) but not smoothed, as upstream's
``quantize_opt`` / ``quantize_llama_like`` do; ``smooth_out`` / ``smooth_down`` smooth them online too
(a deviation, off by default; measured effect in UPSTREAM.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from orbitquant.quant.act import ChannelScale, StaticUniformActQuant, uniform_act
from orbitquant.quant.config import QuantConfig
from orbitquant.quant.methods.base import CollectingQuantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.primitives import relative_error
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import uniform_store

ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: roles upstream smooths (a norm in front: qkv, fc1 / gate+up); ``linear`` = no adapter role
SMOOTHED_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "ctx.q", "ctx.k", "ctx.v",
                            "ff.up", "ff.gate", "ctx.ff.up", "linear"})
OUT_ROLES = frozenset({"attn.out", "ctx.out", "fused.out"})  # smoothed only with smooth_out
DOWN_ROLES = frozenset({"ff.down", "ctx.ff.down"})           # smoothed only with smooth_down


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    method: ClassVar[str] = "smoothquant"
    alpha: float | None = None  # None: grid search over alpha_grid on the calibration tokens
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    w_granularity: str = "channel"  # channel | tensor
    a_granularity: str = "token"    # token | tensor
    a_static: bool = False          # O3: one static per-tensor activation scale from calibration
    reservoir: int = 256            # calibration tokens kept per layer for the alpha search
    seed: int = 0                   # calibration / reservoir seed
    smooth_out: bool = False        # also smooth the attention out-projections online (upstream does not)
    smooth_down: bool = False       # also smooth the FFN down-projections online (upstream does not)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha_grid", tuple(self.alpha_grid))
        for a in ((self.alpha,) if self.alpha is not None else self.alpha_grid):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {a}")
        if self.w_granularity not in ("channel", "tensor") or self.a_granularity not in ("token", "tensor"):
            raise ValueError("w_granularity must be channel|tensor and a_granularity token|tensor")
        if self.a_static and self.a_granularity != "tensor":
            raise ValueError("a_static=true is the per-tensor O3 level: set a_granularity=tensor")
        if min(self.w_bits, self.a_bits) < 2:
            raise ValueError("smoothquant uses symmetric RTN: w_bits and a_bits must be >= 2")


@register_method
class SmoothQuantQuantizer(CollectingQuantizer):
    config_cls = SmoothQuantConfig

    def smoothed(self, ref: LayerRef) -> bool:
        """Whether ``ref`` gets the smoothing scale (else plain symmetric RTN on its raw input)."""
        c: SmoothQuantConfig = self.config
        return (ref.role in SMOOTHED_ROLES or (c.smooth_out and ref.role in OUT_ROLES)
                or (c.smooth_down and ref.role in DOWN_ROLES))

    def finish_calibration(self) -> dict:
        stats = self.collected()
        self.absmax = {fqn: st.absmax for fqn, st in stats.items()}
        c: SmoothQuantConfig = self.config
        if c.alpha is not None:
            self.alpha, errors = c.alpha, {}
        else:
            errors = {a: self._calibration_error(a) for a in c.alpha_grid}
            self.alpha = min(errors, key=errors.get)
        return {"alpha": self.alpha, "alpha_errors": {str(a): round(e, 5) for a, e in errors.items()},
                "tokens_per_layer": min(st.tokens for st in stats.values()),
                "smoothed_layers": sum(self.smoothed(r) for r in self.layers), "layers": len(self.layers)}

    def _calibration_error(self, alpha: float) -> float:
        """Mean relative output error of the smoothed layers (the others do not depend on alpha)."""
        errs = []
        for ref in [r for r in self.layers if self.smoothed(r)] or self.layers:
            x = self.collector.stats[ref.fqn].reservoir.to(ref.module.weight.dtype)
            errs.append(relative_error(ref.module(x), self._build(ref, alpha)(x)))
        return sum(errs) / len(errs)

    def _build(self, ref: LayerRef, alpha: float) -> QuantLinear:
        c: SmoothQuantConfig = self.config
        m = ref.module
        a = self.absmax[ref.fqn].to(m.weight.device)
        w = m.weight.detach().float()
        smooth = self.smoothed(ref)
        if smooth:
            s = (a.clamp_min(1e-5) ** alpha / w.abs().amax(dim=0).clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
        else:
            s = torch.ones_like(a)
        w_s = w * s  # column j scaled up by s_j; the input channel j is divided by s_j online
        store = uniform_store(w_s, c.w_bits, True, c.w_granularity, m.weight.dtype)
        act = (StaticUniformActQuant(c.a_bits, float((a / s).max())) if c.a_static and c.a_bits != 16
               else uniform_act(c.a_bits, True, c.a_granularity))
        return QuantLinear(store, m.bias, act, rotation=ChannelScale(1.0 / s) if smooth else None,
                           compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment=f"smoothquant w{c.w_bits}a{c.a_bits}" + ("" if smooth else " (not smoothed)"))

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        return self._build(ref, self.alpha)

    def calibration_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {f"absmax.{fqn}": a for fqn, a in self.absmax.items()}, {"alpha": self.alpha}

    def load_calibration_state(self, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        self.collector.__exit__()
        self.absmax = {k.removeprefix("absmax."): v for k, v in tensors.items()}
        missing = [r.fqn for r in self.layers if r.fqn not in self.absmax]
        if missing:
            raise ValueError(f"calibration artifact lacks {len(missing)} layers, e.g. {missing[:3]}; delete it")
        self.alpha = info["alpha"]
        return info
