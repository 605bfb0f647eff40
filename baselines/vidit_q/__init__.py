"""``vidit_q``: ViDiT-Q (Zhao et al., ICLR 2025; code ``thu-nics/ViDiT-Q``), BASELINES_SPEC sections 4 and 8.4.

Every plan quantizes weights per output channel, asymmetric min/max RTN, and activations per token,
asymmetric min/max, dynamic (recomputed every call, so each CFG half and each timestep gets its own
ranges). Plans (``plan``):

* ``dynamic``: nothing else (the code's ``w8a8_dynamic.yaml``, "ViDiT-Q W8A8"). No calibration.
* ``timestep_cb``: timestep-aware channel balancing (the code's ``w4a8_timestep_aware_cb.yaml``, "ViDiT-Q
  W4A8"). Calibration runs the FP model's sampler and keeps per target linear and timestep range r (of
  ``timerange``, on the 0..1000 scale) ``act_scale[r] = EMA_momentum(mean over batch of max over tokens
  |x|)``; then ``s_r = act_scale[r]^alpha_r / max_i |W_ij|^(1 - alpha_r)``, activations are divided by
  ``s_r`` online and ``W * s_r`` is quantized separately per range. Ranges are looked up by the
  **value** of the denoiser's timestep input (0..1000 scale, as upstream's ``find_interval(timerange, t)``;
  ``layers.TimestepHook``), at calibration and at sampling time, so shifted FlowMatch schedules (FLUX, Wan)
  put each step in the range its timestep is in, not the one its index would give.
* ``static_dynamic``: the ICLR-version reconstruction ([I], no released recipe): one static scale ``s``
  from the noisiest range's ``act_scale`` (exponent ``sd_alpha``), then an online Hadamard rotation
  (``rotation``), then per-token dynamic quantization: ``x -> H(x / s)``, ``W -> H(W * s)`` row-wise.
* ``auto`` (default): ``dynamic`` when both bit widths are >= 8, else ``timestep_cb`` (the code's plan table).

``mixed_precision: true`` adds the released W4A8-MP bit plan on top of any plan: the sampler steps are cut
into ``mp_groups`` equal timestep groups; groups in ``mp_high_groups`` (default: the first, noisiest)
and layers whose role is in ``mp_high_roles`` (default: the FFN roles) get ``mp_high_bits`` (8) weights;
the rest get ``w_bits``. Activations keep ``a_bits`` everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from orbitquant.quant.act import ChannelScale, NoActQuant
from orbitquant.quant.calib import current_call
from orbitquant.quant.config import QuantConfig, check_rotation
from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.rotation import make_rotation
from orbitquant.quant.types import ROLES, LayerRef
from orbitquant.quant.weights import uniform_store

from .layers import (
    ScheduledQuantLinear,
    SmoothRotate,
    StepSchedule,
    TimestepHook,
    TokenActQuant,
    check_timerange,
    current_timestep,
    equivalent_t,
    range_index,
)

log = logging.getLogger(__name__)

PLANS = ("auto", "dynamic", "timestep_cb", "static_dynamic")
FFN_ROLES = ("ff.up", "ff.gate", "ff.down", "ctx.ff.up", "ctx.ff.down", "fused.out")
EPS = 1e-5  # floor of act_scale (the code's zero replacement), of max|W| and of s


@dataclass(frozen=True)
class ViDiTQConfig(QuantConfig):
    method: ClassVar[str] = "vidit_q"
    plan: str = "auto"                           # auto | dynamic | timestep_cb | static_dynamic
    timerange: tuple[tuple[int, int], ...] = ((0, 500), (501, 1000))  # timestep_cb ranges, 0..1000 scale
    alpha: tuple[float, ...] = (0.11, 0.11)      # timestep_cb: one alpha per range
    momentum: float = 0.95                       # EMA of the per-call activation scale
    sd_alpha: float = 0.5                        # static_dynamic: exponent of the static scale ([I])
    rotation: str = "hadamard_kron"              # static_dynamic: online rotation (QuaRot-style full Hadamard)
    mixed_precision: bool = False                # the released W4A8-MP bit plan on top of the plan
    mp_groups: int = 4                           # equal timestep groups of the sampler steps
    mp_high_groups: tuple[int, ...] = (0,)       # groups (0 = noisiest) where every layer gets mp_high_bits
    mp_high_roles: tuple[str, ...] = FFN_ROLES   # roles with mp_high_bits weights at every step
    mp_high_bits: int = 8
    seed: int = 0                                # rotation seed (static_dynamic)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "mp_high_groups", "mp_high_roles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "timerange", check_timerange(self.timerange))
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        if len(self.alpha) != len(self.timerange):
            raise ValueError(f"alpha needs one value per timerange ({len(self.timerange)}), got {self.alpha}")
        if not all(0.0 <= a <= 1.0 for a in (*self.alpha, self.sd_alpha)):
            raise ValueError("alpha and sd_alpha must be in [0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        check_rotation(self.rotation)
        if self.mp_groups < 1 or any(not 0 <= g < self.mp_groups for g in self.mp_high_groups):
            raise ValueError(f"mp_groups >= 1 and mp_high_groups in 0..mp_groups-1, got {self.mp_high_groups}")
        bad = [r for r in self.mp_high_roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles in mp_high_roles: {bad}; valid roles: {', '.join(ROLES)}")
        if not 1 <= self.mp_high_bits <= 8:
            raise ValueError("mp_high_bits must be in 1..8")
        if self.mixed_precision and self.w_bits > self.mp_high_bits:
            raise ValueError(f"mixed_precision needs w_bits <= mp_high_bits ({self.mp_high_bits}), got {self.w_bits}")

    @property
    def resolved_plan(self) -> str:
        """``auto`` resolved: ``dynamic`` at >= 8 bits for both operands, else ``timestep_cb``."""
        if self.plan != "auto":
            return self.plan
        return "dynamic" if min(self.w_bits, self.a_bits) >= 8 else "timestep_cb"


class ActScaleEMA:
    """Forward hooks keeping, per linear and timestep range, ViDiT-Q's ``act_scale``: an EMA over calls
    (``scale <- m * scale + (1 - m) * cur``, the first call initialising it) of ``cur = mean over samples of
    max over tokens |x|``. An input of 3+ dims is (samples, tokens..., channels); a 2-D input has one token
    per row. The range comes from the call's timestep value (``layers.equivalent_t``: the denoiser's timestep
    input, else the published step index)."""

    def __init__(self, timerange: tuple[tuple[int, int], ...], momentum: float) -> None:
        self.range_his = tuple(hi for _, hi in timerange)
        self.momentum = momentum
        self.scale: dict[str, list[torch.Tensor | None]] = {}
        self.updates: dict[str, list[int]] = {}
        self.unpublished = 0
        self._hooks: list = []

    def range_of(self, t: float) -> int:
        """The range of timestep value ``t`` (0..1000)."""
        return range_index(self.range_his, t)

    def observe(self, fqn: str, x: torch.Tensor) -> None:
        call = current_call()
        if current_timestep() is None and (call is None or not call.n_steps):
            self.unpublished += 1
        r = self.range_of(equivalent_t(call))
        x = x.detach()
        if x.dim() >= 3:  # max over tokens of |x| as max(max x, -min x): no full-size copy of a large input
            xs = x.reshape(x.shape[0], -1, x.shape[-1])
            per_sample = torch.maximum(xs.amax(dim=1), -xs.amin(dim=1)).float()
        else:
            per_sample = x.reshape(-1, x.shape[-1]).float().abs()
        cur = per_sample.mean(dim=0)  # stays on the input's device (no sync per call); moved to CPU at the end
        scales = self.scale.setdefault(fqn, [None] * len(self.range_his))
        counts = self.updates.setdefault(fqn, [0] * len(self.range_his))
        old = scales[r]
        scales[r] = cur if old is None else old * self.momentum + cur * (1.0 - self.momentum)
        counts[r] += 1

    def attach(self, layers: list[LayerRef]) -> ActScaleEMA:
        for ref in layers:
            self._hooks.append(ref.module.register_forward_hook(
                lambda _m, args, _out, fqn=ref.fqn: self.observe(fqn, args[0])))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@register_method
class ViDiTQQuantizer(Quantizer):
    config_cls = ViDiTQConfig

    def __init__(self, config: ViDiTQConfig) -> None:
        super().__init__(config)
        self.plan = config.resolved_plan
        self.act_scale: dict[str, torch.Tensor] = {}  # fqn -> (n_ranges, in_features)
        self.collector: ActScaleEMA | None = None
        self.timesteps = TimestepHook()
        self._rotations: dict[int, nn.Module] = {}

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.plan in ("timestep_cb", "static_dynamic")

    # ---------------------------------------------------------------------------------------- calibration
    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        self.layers = layers
        if self.plan == "timestep_cb" or self.needs_calibration:  # stays attached: the layers pick ranges by it
            self.timesteps.attach(model)
        if self.needs_calibration:
            self.collector = ActScaleEMA(self.config.timerange, self.config.momentum).attach(layers)

    def finish_calibration(self) -> dict:
        col = self.collector
        col.detach()
        missing = [r.fqn for r in self.layers if r.fqn not in col.scale]
        if missing:
            raise RuntimeError(f"calibration never reached {len(missing)} layers, e.g. {missing[:3]}")
        filled = {}
        for fqn, per_range in col.scale.items():
            have = [i for i, s in enumerate(per_range) if s is not None]
            for i, s in enumerate(per_range):  # a range no calibration step fell in: the nearest range's scale
                if s is None:
                    per_range[i] = per_range[min(have, key=lambda j, i=i: abs(j - i))]
                    filled[i] = filled.get(i, 0) + 1
            self.act_scale[fqn] = torch.stack(per_range).cpu()
        if filled:
            log.warning("vidit_q: no calibration call fell in timestep range(s) %s; using the nearest range's "
                        "scale there", sorted(filled))
        if col.unpublished:
            log.warning("vidit_q: %d calibration calls had no timestep value or sampler step; counted as t=500",
                        col.unpublished)
        first = next(iter(col.updates.values()))
        return {"plan": self.plan, "updates_per_range": first, "ranges_filled_from_neighbour": sorted(filled),
                "unpublished_calls": col.unpublished, "timestep_valued_calls": self.timesteps.published}

    def calibration_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self.act_scale:
            return None
        return {f"act_scale.{fqn}": a for fqn, a in self.act_scale.items()}, {"plan": self.plan}

    def load_calibration_state(self, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        if self.collector is not None:
            self.collector.detach()
        self.act_scale = {k.removeprefix("act_scale."): v for k, v in tensors.items()}
        n_ranges = len(self.config.timerange)
        bad = [r.fqn for r in self.layers if r.fqn not in self.act_scale
               or tuple(self.act_scale[r.fqn].shape) != (n_ranges, r.module.in_features)]
        if bad:
            raise ValueError(f"calibration artifact lacks or mis-sizes {len(bad)} layers, e.g. {bad[:3]}; delete it")
        return info

    # ---------------------------------------------------------------------------------------------- layers
    def group_bits(self, ref: LayerRef) -> tuple[int, ...]:
        """Weight bits per mixed-precision timestep group (one entry without mixed precision)."""
        c: ViDiTQConfig = self.config
        if not c.mixed_precision:
            return (c.w_bits,)
        if ref.role in c.mp_high_roles:
            return (c.mp_high_bits,) * c.mp_groups
        return tuple(c.mp_high_bits if g in c.mp_high_groups else c.w_bits for g in range(c.mp_groups))

    def smoothing(self, ref: LayerRef, w: torch.Tensor, r: int) -> torch.Tensor:
        """Per-input-channel ``s`` of timestep range ``r``: ``act_scale^alpha / max|W|^(1 - alpha)``."""
        c: ViDiTQConfig = self.config
        alpha = c.sd_alpha if self.plan == "static_dynamic" else c.alpha[r]
        a = self.act_scale[ref.fqn][r].to(w.device).float().clamp_min(EPS)
        return (a ** alpha / w.abs().amax(dim=0).clamp_min(EPS) ** (1.0 - alpha)).clamp_min(EPS)

    def _rotation(self, d: int) -> nn.Module:
        if d not in self._rotations:
            self._rotations[d] = make_rotation(self.config.rotation, d, self.config.seed)
        return self._rotations[d]

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        c: ViDiTQConfig = self.config
        m = ref.module
        w = m.weight.detach().float()
        bits = self.group_bits(ref)
        n_ranges = len(c.timerange) if self.plan == "timestep_cb" else 1
        range_his = tuple(hi for _, hi in c.timerange) if n_ranges > 1 else (1000,)
        schedule = StepSchedule(range_his, bits, StepSchedule.reachable(range_his, bits))
        weights, transforms = {}, {}
        for r in sorted({r for r, _ in schedule.keys}):
            if self.plan == "dynamic":
                weights[r], transforms[r] = w, None
            elif self.plan == "timestep_cb":
                s = self.smoothing(ref, w, r)
                weights[r], transforms[r] = w * s, ChannelScale(1.0 / s)
            else:  # static_dynamic: the noisiest range's statistics (ViDiT-Q: static imbalance dominates early)
                s = self.smoothing(ref, w, len(c.timerange) - 1)
                rot = self._rotation(m.in_features).to(w.device)
                weights[r], transforms[r] = rot(w * s), SmoothRotate(1.0 / s, rot)
        stores = [uniform_store(weights[r], b, False, "channel", m.weight.dtype) for r, b in schedule.keys]
        act = NoActQuant() if c.a_bits == 16 else TokenActQuant(c.a_bits)
        wb = "/".join(str(b) for b in sorted(set(bits)))
        treatment = f"vidit_q {self.plan}{'+mp' if c.mixed_precision else ''} w{wb}a{c.a_bits}"
        if len(schedule.keys) == 1:
            return QuantLinear(stores[0], m.bias, act, rotation=transforms[schedule.keys[0][0]],
                               compute_dtype=m.weight.dtype, name=ref.fqn, treatment=treatment)
        return ScheduledQuantLinear(stores, [transforms[r] for r, _ in schedule.keys], schedule, m.bias, act,
                                    compute_dtype=m.weight.dtype, name=ref.fqn, treatment=treatment)
