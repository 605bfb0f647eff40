"""Timestep-dependent pieces of ViDiT-Q: where a denoiser call sits in sampling, and a ``QuantLinear`` that
holds one (weight store, input transform) per variant and picks one per call.

Timestep of a call: as upstream (``QuantModel.forward`` sets ``cur_timestep_id = t[0]``, the model's own
timestep input, and ``find_interval`` looks it up in ``timerange``), the **value** of the denoiser's timestep
argument on the 0..1000 scale (1000 = noise), read by :class:`TimestepHook` on the denoiser. On a shifted
schedule (FLUX, Wan, Z-Image: FlowMatch with shift) it differs from the step index: Wan's shift 7 keeps
t > 500 for most steps. Families whose input is not on that scale are converted (``TIMESTEP_CONVENTIONS``).
Without a published value (a bare module called under ``denoiser_call``) the step index stands in:
``p = step / n_steps`` (0 = the noisiest step), ``t = 1000 (1 - p)``; without ``n_steps`` either,
``p = 0.5`` (t = 500). The mixed-precision bit groups stay shares of the sampler steps (by index).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from orbitquant.quant.act import ActQuantizer, NonFiniteInput
from orbitquant.quant.calib import DenoiserCall, current_call
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.primitives import qrange
from orbitquant.quant.rotation import Rotation
from orbitquant.quant.weights import WeightStore

#: p used when no denoiser call (or no ``n_steps``) is published
DEFAULT_POSITION = 0.5


def position(call: DenoiserCall | None) -> float:
    """``step / n_steps`` of a denoiser call (0 = first, noisiest step); ``DEFAULT_POSITION`` if unknown."""
    if call is None or not call.n_steps:
        return DEFAULT_POSITION
    return min(max(call.step / call.n_steps, 0.0), 1.0)


#: denoiser classes whose timestep input is not ViDiT-Q's 0..1000 scale (1000 = noise): (scale, reversed).
#: FLUX pipelines pass ``t / 1000``; Z-Image passes ``(1000 - t) / 1000`` (0 = noise). DiT, CogVideoX, Wan and
#: the digits model pass the scheduler's timestep itself.
TIMESTEP_CONVENTIONS: dict[str, tuple[float, bool]] = {
    "FluxTransformer2DModel": (1000.0, False),
    "ZImageTransformer2DModel": (1000.0, True),
}

_TIMESTEP: ContextVar[float | None] = ContextVar("vidit_q_timestep", default=None)


def timestep_value(model: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The timestep of a denoiser forward on the 0..1000 scale: the ``timestep`` keyword or the second
    positional argument (first element; upstream asserts one timestep per batch), converted by class."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        if not t.numel():
            return None
        t = float(t.flatten()[0])
    if not isinstance(t, (int, float)):
        return None
    scale, reverse = TIMESTEP_CONVENTIONS.get(type(model).__name__, (1.0, False))
    t = float(t) * scale
    return 1000.0 - t if reverse else t


class TimestepHook:
    """Publishes the denoiser's timestep value (:func:`timestep_value`) for the duration of each forward, for
    calibration and for the quantized layers' variant choice at sampling time (stays attached)."""

    def __init__(self) -> None:
        self.published = 0
        self._handles: list = []

    def attach(self, model: nn.Module | None) -> TimestepHook:
        if model is None:
            return self
        tokens: list = []

        def pre(mod, args, kwargs):
            t = timestep_value(mod, args, kwargs)
            self.published += t is not None
            tokens.append(_TIMESTEP.set(t))

        def post(_mod, _args, _kwargs, _out):
            if tokens:
                _TIMESTEP.reset(tokens.pop())

        self._handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                         model.register_forward_hook(post, with_kwargs=True, always_call=True)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def current_timestep() -> float | None:
    """The timestep value published by :class:`TimestepHook` for the running denoiser forward (None outside)."""
    return _TIMESTEP.get()


def equivalent_t(call: DenoiserCall | None, t: float | None = None) -> float:
    """ViDiT-Q's timestep of a call: the published value ``t`` (default :func:`current_timestep`) when there is
    one, else ``1000 (1 - position(call))``."""
    t = current_timestep() if t is None else t
    return float(t) if t is not None else 1000.0 * (1.0 - position(call))


def range_index(range_his: Sequence[int], t: float) -> int:
    """The range of timestep ``t``: the first with ``t <= hi`` (ranges are contiguous integer intervals;
    upstream's ``find_interval`` on an integer t is the same)."""
    return next((i for i, hi in enumerate(range_his) if t <= hi), len(range_his) - 1)


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

    ``range_his``: upper ends of the timestep ranges (ascending, 0..1000 scale); a call with timestep value
    ``t`` (:func:`equivalent_t`) is in the first range with ``t <= hi``. ``group_bits``: weight bits per
    mixed-precision timestep group, groups being equal shares of the sampler steps (``floor(G * step /
    n_steps)``, 0 = noisiest); one entry = no mixed precision. ``keys``: the (range, bits) pair of each
    variant (``reachable``: the pairs of an unshifted schedule). A pair without a variant (on a schedule
    shifted below t = 1000 (1 - p), e.g. an 8-bit early step already in a low range) uses the variant of the
    same bits in the nearest range.
    """

    range_his: tuple[int, ...]
    group_bits: tuple[int, ...]
    keys: tuple[tuple[int, int], ...]

    def key_at(self, p: float, t: float | None = None) -> tuple[int, int]:
        """(range, bits) at sampling position ``p`` with timestep value ``t`` (default ``1000 (1 - p)``)."""
        r = range_index(self.range_his, 1000.0 * (1.0 - p) if t is None else t)
        g = min(int(p * len(self.group_bits)), len(self.group_bits) - 1)
        return r, self.group_bits[g]

    def index_of(self, key: tuple[int, int]) -> int:
        if key in self.keys:
            return self.keys.index(key)
        r, bits = key
        same = [i for i, k in enumerate(self.keys) if k[1] == bits] or list(range(len(self.keys)))
        return min(same, key=lambda i: (abs(self.keys[i][0] - r), -self.keys[i][0]))

    def variant(self, call: DenoiserCall | None, t: float | None = None) -> int:
        p = position(call)
        return self.index_of(self.key_at(p, equivalent_t(call, t)))

    @property
    def default(self) -> int:
        """The variant of a call at ``DEFAULT_POSITION`` (the probe batch)."""
        return self.index_of(self.key_at(DEFAULT_POSITION))

    @staticmethod
    def reachable(range_his: Sequence[int], group_bits: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Every (range, bits) pair some position p in [0, 1) maps to when ``t = 1000 (1 - p)`` (an unshifted
        schedule), noisiest range first."""
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

    def bits_per_element(self, d: int) -> float:
        return self.bits + 32 / d  # fp16 scale and zero point per token, spread over its d elements

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
    :class:`StepSchedule` from :func:`orbitquant.quant.calib.current_call`.

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
