"""Timestep-dependent pieces of ViDiT-Q: where a denoiser call sits in sampling, and a ``QuantLinear`` that
holds one (weight store, input transform) per variant and picks one per call.

Position in sampling: a call at sampler step ``step`` of ``n_steps`` has ``p = step / n_steps`` (0 = the
noisiest step) and the equivalent timestep ``t = 1000 (1 - p)`` on ViDiT-Q's 0..1000 scale. Without a
published call (the harness's per-layer probe, which the digits adapter runs at t = 0.5) or without
``n_steps``, ``p = 0.5`` (t = 500): the middle of sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from orbitquant.calib import DenoiserCall, current_call
from orbitquant.nn import ActQuantizer, NonFiniteInput, QuantLinear, WeightStore
from orbitquant.primitives import qrange
from orbitquant.rotation import Rotation

#: p used when no denoiser call (or no ``n_steps``) is published
DEFAULT_POSITION = 0.5


def position(call: DenoiserCall | None) -> float:
    """``step / n_steps`` of a denoiser call (0 = first, noisiest step); ``DEFAULT_POSITION`` if unknown."""
    if call is None or not call.n_steps:
        return DEFAULT_POSITION
    return min(max(call.step / call.n_steps, 0.0), 1.0)


def check_timerange(timerange: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """ViDiT-Q's contiguous integer ranges covering 0..1000, e.g. ``[[0, 500], [501, 1000]]`` (as its code
    asserts: each range starts one after the previous end, the first at 0, the last ends at 1000)."""
    out = tuple((int(lo), int(hi)) for lo, hi in timerange)
    prev = -1
    for lo, hi in out:
        if lo != prev + 1 or hi < lo:
            raise ValueError(f"timerange must be contiguous integer ranges from 0 to 1000, got {timerange!r}")
        prev = hi
    if not out or prev != 1000:
        raise ValueError(f"timerange must end at 1000, got {timerange!r}")
    return out


@dataclass(frozen=True)
class StepSchedule:
    """Which weight variant a denoiser call uses.

    ``range_his``: upper ends of the timestep ranges (ascending, 0..1000 scale); a call with equivalent
    timestep ``t`` is in the first range with ``t <= hi``. ``group_bits``: weight bits per mixed-precision
    timestep group, groups being equal shares of the sampler steps (``floor(G * step / n_steps)``, 0 =
    noisiest); one entry = no mixed precision. ``keys``: the (range, bits) pair of each variant.
    """

    range_his: tuple[int, ...]
    group_bits: tuple[int, ...]
    keys: tuple[tuple[int, int], ...]

    def key_at(self, p: float) -> tuple[int, int]:
        t = 1000.0 * (1.0 - p)
        r = next((i for i, hi in enumerate(self.range_his) if t <= hi), len(self.range_his) - 1)
        g = min(int(p * len(self.group_bits)), len(self.group_bits) - 1)
        return r, self.group_bits[g]

    def variant(self, call: DenoiserCall | None) -> int:
        return self.keys.index(self.key_at(position(call)))

    @property
    def default(self) -> int:
        """The variant of a call at ``DEFAULT_POSITION`` (the probe batch)."""
        return self.keys.index(self.key_at(DEFAULT_POSITION))

    @staticmethod
    def reachable(range_his: Sequence[int], group_bits: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Every (range, bits) pair some position p in [0, 1) maps to, in order of first appearance."""
        keys: list[tuple[int, int]] = []
        n_g = len(group_bits)
        for g, bits in enumerate(group_bits):
            t_high, t_low = 1000.0 * (1 - g / n_g), 1000.0 * (1 - (g + 1) / n_g)  # group covers t in (t_low, t_high]
            for r, hi in enumerate(range_his):
                lo_excl = range_his[r - 1] if r else -float("inf")  # range r covers t in (lo_excl, hi]
                if hi > t_low and lo_excl < t_high and (r, bits) not in keys:
                    keys.append((r, bits))
        return tuple(sorted(keys, key=lambda k: (-k[0], -k[1])))  # noisiest range first


class TokenActQuant(ActQuantizer):
    """ViDiT-Q's dynamic activation quantizer: per token, asymmetric min/max recomputed every call, the range
    widened to hold 0 (its ``init_quant_params`` clamps ``min <= 0 <= max``), step ``(max - min) / (2^b - 1)``,
    zero point ``round(-min / step)``. An all-zero token stays zero."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        qrange(bits, False)  # validates
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        hi = (1 << self.bits) - 1
        mn, mx = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
        scale = (mx - mn) / hi
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-mn / scale)
        return (torch.clamp(torch.round(xf / scale) + zero, 0, hi) - zero) * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-token asymmetric, range holds 0"


class SmoothRotate(nn.Module):
    """``x -> rot(x * inv_scale)``: static per-channel scaling, then an online rotation (ViDiT-Q's ICLR
    static-dynamic channel balancing); the weight store holds ``rot(W * s)``."""

    def __init__(self, inv_scale: torch.Tensor, rotation: Rotation) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.float())
        self.rot = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rot(x.float() * self.inv_scale)


class ScheduledQuantLinear(QuantLinear):
    """A ``QuantLinear`` with several (weight store, input transform) variants, chosen per denoiser call by a
    :class:`StepSchedule` from :func:`orbitquant.calib.current_call`.

    The variants live in ``stores`` / ``transforms`` (each saved once in the state dict); ``store`` and
    ``rotation``, which ``QuantLinear`` uses, are unregistered aliases of the active variant's. Only the
    active variant's weight is dequantized (rebuilt when the variant changes, a few times per sampling run).
    ``nbytes`` counts every variant, since a deployment keeps them all; outside a call (the per-layer probe,
    the report's bit count) the default variant (t = 500) is active.
    """

    def __init__(self, stores: Sequence[WeightStore], transforms: Sequence[nn.Module | None], schedule: StepSchedule,
                 bias: torch.Tensor | None, act: ActQuantizer, compute_dtype: torch.dtype = torch.float32,
                 name: str = "", treatment: str = "") -> None:
        if not len(stores) == len(transforms) == len(schedule.keys):
            raise ValueError(f"{len(stores)} stores and {len(transforms)} transforms for {len(schedule.keys)} variants")
        if len({s.shape for s in stores}) != 1:
            raise ValueError("every variant's weight must have the same shape")
        d = schedule.default
        super().__init__(stores[d], bias, act, rotation=transforms[d], compute_dtype=compute_dtype, name=name,
                         treatment=treatment)
        for alias in ("store", "rotation"):  # registered by QuantLinear; kept as aliases only (below)
            self._modules.pop(alias, None)
        self.stores = nn.ModuleList(stores)
        self.transforms = nn.ModuleList([nn.Identity() if t is None else t for t in transforms])
        self.schedule = schedule
        self._use(d)

    def _use(self, idx: int) -> None:
        self.active = idx
        object.__setattr__(self, "store", self.stores[idx])  # plain attributes: not a second state-dict entry
        object.__setattr__(self, "rotation", self.transforms[idx])

    def select(self, call: DenoiserCall | None) -> int:
        """Make the variant of ``call`` active (rebuilding its dequantized weight if it changed); returns it."""
        idx = self.schedule.variant(call)
        if idx != self.active:
            self._use(idx)
            self.refresh()
        return idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.select(current_call())
        return super().forward(x)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(s.nbytes for s in self.stores) + bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variants={list(self.schedule.keys)}"
