"""``QuantLinear``: input rotation -> activation quantizer -> matmul with a stored (packed) weight.

The layer composes a weight store (``orbitquant.quant.weights``: packed integer codes plus scales or norms, what
would be shipped, so ``state_dict`` holds real low-bit bytes) and an activation quantizer
(``orbitquant.quant.act``). Two runtime modes (:attr:`QuantLinear.runtime`): ``fast`` keeps a dequantized copy
of the weight in the compute dtype (a non-persistent buffer, rebuilt whenever the packed state is loaded);
``compact`` keeps only the packed state and dequantizes it in every forward. The matmul itself is a dense
``F.linear`` either way: speed measured through this path is fake-quant speed, not low-bit GEMM speed. NaN/Inf
in a layer's input is raised naming the layer and sampler step, or recorded (:data:`NONFINITE_EVENTS`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

# Re-exports: the activation quantizers and weight stores lived in this module before they moved to ``act`` and
# ``weights``; importing them here keeps ``from orbitquant.quant.nn import ...`` (and ``orbitquant.quant.nn.X``)
# working for code written against the old layout. New code imports them from their home modules.
from orbitquant.quant.act import (
    ActQuantizer,
    ChannelScale,
    GroupActQuant,
    NoActQuant,
    NonFiniteInput,
    OrbitActQuant,
    StaticUniformActQuant,
    UniformActQuant,
    uniform_act,
)
from orbitquant.quant.calib import AFTER_CALL, current_call
from orbitquant.quant.rotation import Rotation
from orbitquant.quant.weights import (
    DenseWeight,
    GroupedCodes,
    GroupUniformWeight,
    GroupWeight,
    OrbitWeight,
    UniformWeight,
    WeightStore,
    decode_workspace_bytes,
    uniform_store,
)

__all__ = [
    # this module's own
    "NONFINITE_EVENTS", "RUNTIMES", "LowRankQuantLinear", "QuantLinear", "check_deferred", "construction_runtime",
    # re-exported from orbitquant.quant.act
    "ActQuantizer", "ChannelScale", "GroupActQuant", "NoActQuant", "NonFiniteInput", "OrbitActQuant",
    "StaticUniformActQuant", "UniformActQuant", "uniform_act",
    # re-exported from orbitquant.quant.weights
    "DenseWeight", "GroupedCodes", "GroupUniformWeight", "GroupWeight", "OrbitWeight", "UniformWeight", "WeightStore",
    "decode_workspace_bytes", "uniform_store",
]

RUNTIMES = ("fast", "compact")
_RUNTIME: ContextVar[str] = ContextVar("orbitquant_runtime", default="fast")


@contextmanager
def construction_runtime(mode: str) -> Iterator[None]:
    """QuantLinears built inside start in runtime ``mode`` (``quantize_`` uses it so a compact layer never
    materializes its dense weight, not even once)."""
    if mode not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {mode!r}")
    token = _RUNTIME.set(mode)
    try:
        yield
    finally:
        _RUNTIME.reset(token)


#: with ``nonfinite="record"``: one entry per quantized-layer call that met NaN/Inf (layer, sampler step, count)
NONFINITE_EVENTS: list[dict] = []


#: CUDA layers with a device-side NaN/Inf flag not yet read (checked once per denoiser call, not per layer)
_DEFERRED: dict[int, QuantLinear] = {}


def check_deferred(call=None) -> None:
    """Raise :class:`NonFiniteInput` naming the first CUDA layer that met NaN/Inf since the last check.

    Inside a sampler (``orbitquant.quant.calib.denoiser_call`` / ``publish_calls``) CUDA layers do not synchronize
    to check their input; they set a device flag, and this runs after every denoiser forward: one host sync
    per forward instead of one per layer."""
    if not _DEFERRED:
        return
    layers = list(_DEFERRED.values())
    _DEFERRED.clear()
    bad = torch.nonzero(torch.cat([m._nf_flag.to(layers[0]._nf_flag.device) for m in layers])).flatten().tolist()
    if bad:
        for i in bad:
            layers[i]._nf_flag.zero_()
        raise _nonfinite_error(layers[bad[0]], call, "activation contains NaN or Inf (found after the denoiser "
                               f"call; {len(bad)} layer(s) affected)")


def _nonfinite_error(layer: QuantLinear, call, what: str) -> NonFiniteInput:
    """The error for NaN/Inf met by ``layer`` during sampler call ``call`` (None outside a sampler)."""
    where = f" at sampler step {call.step}" if call is not None else ""
    return NonFiniteInput(f"layer {layer.name!r} ({layer.treatment}){where}: {what}; the fp model or an earlier "
                          "layer produced it (run quant=fp to check the model alone, or quant.nonfinite=record to "
                          "record and continue)")


def _refresh_after_load(module: QuantLinear, _incompatible_keys) -> None:
    module.refresh()  # a module-level function (not a lambda) keeps quantized models picklable


class QuantLinear(nn.Module):
    """``y = F.linear(act(rot(x)), dequant(W_store), bias)``: a drop-in for ``nn.Linear``.

    ``rotation`` is the online input transform (a rotation, or a per-channel smoothing scale), applied to
    activations only; the weight store already holds the weight with the inverse folded in (``rot(W)``,
    ``W * s``), so no inverse transform runs at runtime.
    """

    def __init__(self, store: WeightStore, bias: torch.Tensor | None, act: ActQuantizer | None = None,
                 rotation: Rotation | nn.Module | None = None, compute_dtype: torch.dtype = torch.float32,
                 name: str = "", treatment: str = "") -> None:
        super().__init__()
        self.out_features, self.in_features = store.shape
        self.store = store
        self.act = act if act is not None else NoActQuant()
        self.rotation = rotation
        self.compute_dtype = compute_dtype
        self.name, self.treatment = name, treatment
        self.nonfinite = "raise"  # "raise" | "record" (set by quantize_ from QuantConfig.nonfinite)
        self.runtime = _RUNTIME.get()  # "fast" | "compact" (set_runtime)
        # the fused native activation path applies when nothing else needs the transformed input
        self._fusable = hasattr(self.act, "fused") and type(self).extra is QuantLinear.extra
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight", None, persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the dequantized weight from the stored (packed) state (``fast`` mode; none in ``compact``)."""
        if self.runtime == "compact":
            self.weight = None
            return
        self.weight = self.store.dequantize_to(self.compute_dtype)

    def set_runtime(self, mode: str) -> None:
        """``fast``: keep the dequantized weight resident; ``compact``: packed state only, dequantized per forward."""
        if mode not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {mode!r}")
        if mode == self.runtime and (mode == "compact") == (self.weight is None):
            return  # already in that state: do not dequantize again
        self.runtime = mode
        self.refresh()

    def _dense_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        # compact: decoded for this forward only, so into the shared workspace where the store supports it,
        # unless autograd has to keep this weight for the backward pass
        keep = torch.is_grad_enabled() and x.requires_grad
        return self.store.dequantize_to(self.compute_dtype, workspace=not keep)

    def _transform(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(transformed input or None, quantized input): the fused native pass when it applies."""
        if self._fusable and (h := self.act.fused(self.rotation, x, self.compute_dtype,
                                                   self._deferred_flag(x))) is not None:
            return None, h
        t = self.rotation(x) if self.rotation is not None else x  # the transformed, unquantized input
        return t, self.act(t)

    def _deferred_flag(self, x: torch.Tensor) -> torch.Tensor | None:
        """The device flag the CUDA kernel writes NaN/Inf into, inside a sampler call (see check_deferred)."""
        if x.device.type != "cuda" or self.nonfinite != "raise" or current_call() is None:
            return None
        flag = getattr(self, "_nf_flag", None)
        if flag is None or flag.device != x.device:
            self._nf_flag = flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        _DEFERRED[id(self)] = self
        return flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"layer {self.name!r} expects input dim {self.in_features}, got {tuple(x.shape)}")
        try:
            t, h = self._transform(x)
        except NonFiniteInput as e:
            call = current_call()
            if self.nonfinite == "raise":
                raise _nonfinite_error(self, call, str(e)) from None
            bad = ~torch.isfinite(x)  # count and zero them in the layer input (a rotation would smear them)
            NONFINITE_EVENTS.append({"layer": self.name, "step": None if call is None else call.step,
                                     "values": int(bad.sum())})
            x0 = torch.where(bad, torch.zeros((), dtype=x.dtype), x)
            t, h = self._transform(x0)
        y = None
        if self.weight is None and (mm := getattr(self.store, "matmul", None)) is not None:
            y = mm(h.to(self.compute_dtype), self.bias, self.compute_dtype)  # compact: straight from packed codes
        if y is None:
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            y = F.linear(h.to(self.compute_dtype), self._dense_weight(x), bias)
        extra = None if t is None else self.extra(t)
        return (y if extra is None else y + extra).to(x.dtype)

    def extra(self, t: torch.Tensor) -> torch.Tensor | None:
        """An unquantized side branch on the transformed input ``t``, added to the output (None here;
        SVDQuant's low-rank branch)."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the persistent state: packed weight, scales/norms, bias (rotation/codebook seeds excluded)."""
        return self.store.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @property
    def resident_bytes(self) -> int:
        """What the layer holds in memory between forwards: the persistent state, plus the dequantized weight
        in ``fast`` mode (never a hidden full-precision cache in ``compact`` mode; on CPU, compact layers decode
        into one per-thread scratch buffer shared by all of them, reported by :func:`decode_workspace_bytes`)."""
        cache = 0 if self.weight is None else self.weight.numel() * self.weight.element_size()
        return self.nbytes + cache

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"treatment={self.treatment!r}, bias={self.bias is not None}")


class LowRankQuantLinear(QuantLinear):
    """``QuantLinear`` plus a 16-bit low-rank branch on the transformed (unquantized) input:
    ``y = act(T x) Q^T + (T x) D^T U^T + b`` with ``U`` (out, r) and ``D`` (r, in) in bf16 (SVDQuant)."""

    def __init__(self, store: WeightStore, bias: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
                 **kwargs) -> None:
        super().__init__(store, bias, **kwargs)
        if up.shape[0] != self.out_features or down.shape[1] != self.in_features or up.shape[1] != down.shape[0]:
            raise ValueError(f"low-rank factors {tuple(up.shape)} x {tuple(down.shape)} do not fit "
                             f"({self.out_features}, {self.in_features})")
        self.register_buffer("lr_up", up.detach().to(torch.bfloat16))
        self.register_buffer("lr_down", down.detach().to(torch.bfloat16))

    def extra(self, t: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(t.float(), self.lr_down.float()), self.lr_up.float()).to(self.compute_dtype)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for t in (self.lr_up, self.lr_down))

    @property
    def rank(self) -> int:
        return self.lr_down.shape[0]


AFTER_CALL.append(check_deferred)
