"""``QuantLinear``: input rotation -> activation quantizer -> matmul with a stored (packed) weight.

The weight's persistent state is what would be shipped (packed integer codes plus scales or norms);
``state_dict`` therefore holds real low-bit bytes. Two runtime modes (:attr:`QuantLinear.runtime`):
``fast`` keeps a dequantized copy of the weight in the compute dtype (a non-persistent buffer, rebuilt
whenever the packed state is loaded); ``compact`` keeps only the packed state and dequantizes it in
every forward. The matmul itself is a dense ``F.linear`` either way: speed measured through this path is
fake-quant speed, not low-bit GEMM speed. OrbitQuant's activation path (rotate, norm, quantize) runs in
one native pass per token when the CPU kernel is available (``orbitquant.kernels``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orbitquant.quant.calib import AFTER_CALL, current_call
from orbitquant.quant.codebook import Codebook
from orbitquant.quant.primitives import (
    dequantize_groups,
    fake_quant_groups,
    fake_quant_uniform,
    pack_codes,
    qrange,
    quantize_groups,
    unpack_codes,
)
from orbitquant.quant.rotation import RPBH, Rotation


def _kernel():
    from orbitquant.kernels import orbit_cpu

    return orbit_cpu()


def _gpu_kernels(x: torch.Tensor):
    """The Triton kernel module for CUDA tensors (None on CPU, without Triton, or with kernels disabled)."""
    if x.device.type != "cuda":
        return None
    from orbitquant.kernels import enabled, triton_orbit

    return triton_orbit if enabled() and triton_orbit.available() else None


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


class NonFiniteInput(ValueError):
    """Raised by activation quantizers on NaN/Inf input; ``QuantLinear`` adds the layer name."""


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# ------------------------------------------------------------------------------------ activation quantizers
class ActQuantizer(nn.Module):
    """Maps (rotated) activations to their quantized values; same shape, fp32 out."""

    bits: int = 16

    def bits_per_element(self, d: int) -> float:
        """Bits an activation element costs as quantized, side information included (per-token scales and zero
        points spread over the ``d`` elements of a token; per-tensor or static scales cost ~0 per element): the
        iso-bit accounting of ``QuantReport`` (fp16 scales and zero points, as a deployed kernel keeps them)."""
        return float(self.bits)


class NoActQuant(ActQuantizer):
    """Activations pass through; ``dtype`` optionally rounds them (e.g. bf16 activations of weight-only layers)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}" if self.dtype else ""


class UniformActQuant(ActQuantizer):
    """Dynamic round-to-nearest: one min/max (or absmax) scale per token, or per tensor."""

    def __init__(self, bits: int, symmetric: bool, granularity: str = "token") -> None:
        super().__init__()
        qrange(bits, symmetric)  # validates
        if granularity not in ("token", "tensor"):
            raise ValueError(f"activation granularity must be 'token' or 'tensor', got {granularity!r}")
        self.bits, self.symmetric, self.granularity = bits, symmetric, granularity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        return fake_quant_uniform(xf, self.bits, self.symmetric, (-1,) if self.granularity == "token" else None)

    def bits_per_element(self, d: int) -> float:
        side = 16 * (1 if self.symmetric else 2)  # fp16 scale (+ zero point) per token
        return self.bits + (side / d if self.granularity == "token" else 0.0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"


class GroupActQuant(ActQuantizer):
    """Dynamic round-to-nearest per token and contiguous channel group (``group <= 0``: per token).
    ``zero_clamp``: the asymmetric zero point clamped to the code range (``fake_quant_uniform``)."""

    def __init__(self, bits: int, group: int, symmetric: bool = False, zero_clamp: bool = False) -> None:
        super().__init__()
        qrange(bits, symmetric)  # validates
        self.bits, self.group, self.symmetric, self.zero_clamp = bits, group, symmetric, zero_clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        return fake_quant_groups(xf, self.bits, self.symmetric, self.group, self.zero_clamp)

    def bits_per_element(self, d: int) -> float:
        side = 16 * (1 if self.symmetric else 2)  # fp16 scale (+ zero point) per token and group
        return self.bits + side / (self.group if 0 < self.group < d else d)

    def extra_repr(self) -> str:
        clamp = ", zero_clamp=True" if self.zero_clamp else ""
        return f"bits={self.bits}, group={self.group}, symmetric={self.symmetric}{clamp}"


class StaticUniformActQuant(ActQuantizer):
    """Symmetric round-to-nearest with one fixed per-tensor scale from calibration (SmoothQuant's O3 level)."""

    def __init__(self, bits: int, absmax: float) -> None:
        super().__init__()
        _, self.qmax = qrange(bits, True)
        self.bits, self.scale = bits, max(float(absmax), 1e-8) / self.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        return torch.clamp(torch.round(xf / self.scale), -self.qmax - 1, self.qmax) * self.scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.4g}"


class ChannelScale(nn.Module):
    """An input transform ``x * inv_scale`` per channel (SmoothQuant's smoothing, applied online)."""

    def __init__(self, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.inv_scale


class OrbitActQuant(ActQuantizer):
    """OrbitQuant's runtime activation pass on already-rotated tokens.

    ``s = ||x'||`` (fp32, per token), ``u = x' / (s + eps)``, ``q = C[nearest(u)]``, output ``s * q``.
    No range estimation, no calibration: the only runtime statistic is the token norm.
    """

    def __init__(self, codebook: Codebook, eps: float = 1e-10) -> None:
        super().__init__()
        self.codebook = codebook
        self.bits = codebook.bits
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        s = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        if not torch.isfinite(s).all():
            raise NonFiniteInput("activation contains NaN or Inf")
        return s * self.codebook(xf / (s + self.eps))

    def bits_per_element(self, d: int) -> float:
        return self.bits + 32 / d  # the code, and the fp32 token norm spread over the token

    def fused(self, rotation: nn.Module | None, x: torch.Tensor, out_dtype: torch.dtype | None = None,
              flag: torch.Tensor | None = None) -> torch.Tensor | None:
        """``self(rotation(x))`` in one native pass per token (RPBH, inference only): the C++ kernel on CPU
        (bf16 output when ``out_dtype`` is bf16, else fp32), the Triton kernel on CUDA (output in ``out_dtype``,
        default fp32); None when no kernel applies, and the caller takes the torch path. CPU: rotated values are
        bit-identical to the torch path and the fp32 norm may differ in the last ulp, flipping a code only at an
        exact tie. CUDA: the WHT runs as two fp32 matrix products (different summation order), so codes can
        differ at near-ties (tested rate < 1e-4).
        ``flag`` (CUDA): record NaN/Inf in this device tensor instead of checking here (no host sync)."""
        if not isinstance(rotation, RPBH) or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if (t := _gpu_kernels(x)) is not None and t.supports(rotation.d, rotation.h):
            y, finite = t.rotate_quantize(x, rotation.perm, rotation.signs, rotation.h, self.codebook.thresholds,
                                          self.codebook.centroids, self.eps, out_dtype=out_dtype or torch.float32,
                                          flag=flag)
            if finite is not None and not finite.item():
                raise NonFiniteInput("activation contains NaN or Inf")
            return y
        k = _kernel() if x.device.type == "cpu" else None
        if k is None:
            return None
        shape = x.shape
        # bf16 in and out natively (no widened copies: bf16 GEMMs are the fast ones on AMX CPUs), else fp32
        xf = x.reshape(-1, shape[-1])
        xf = (xf if xf.dtype == torch.bfloat16 else xf.to(torch.float32)).contiguous()
        y, finite = k.rotate_quantize(xf, rotation.perm, rotation.signs, rotation.h, *self.codebook.kernel_args(),
                                      self.eps, False, 3 if out_dtype == torch.bfloat16 else 0)
        if not finite.item():
            raise NonFiniteInput("activation contains NaN or Inf")
        return y.view(shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eps={self.eps}"


# ----------------------------------------------------------------------------------------- weight stores
class _Workspace(threading.local):
    """Per-thread buffers (one per dtype, grown to the largest request) that compact layers on CPU decode their
    weight into for one forward: without it every forward allocates a fresh dense matrix, and the OS faults
    its pages in (for a 3072 x 3072 fp32 layer that costs ~10x the decode itself)."""

    def __init__(self) -> None:
        self.bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs.get(dtype)
        if buf is None or buf.numel() < numel:
            self.bufs[dtype] = buf = torch.empty(numel, dtype=dtype)
        return buf


_WORKSPACE = _Workspace()


def decode_workspace_bytes(dtype: torch.dtype | None = None) -> int:
    """Bytes held by this thread's compact-mode decode workspace (for ``dtype``, or all): at most one dense weight
    (the largest compact layer's) per compute dtype, shared by all layers; contents are scratch, overwritten by
    every decode."""
    return sum(b.numel() * b.element_size() for k, b in _WORKSPACE.bufs.items() if dtype in (None, k))


class WeightStore(nn.Module):
    """Persistent storage of one weight matrix; ``dequantize()`` gives the fp32 matrix the matmul uses."""

    bits: int = 16
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_to(self, dtype: torch.dtype, workspace: bool = False) -> torch.Tensor:
        """``dequantize().to(dtype)``; stores that can decode straight into ``dtype`` override it. ``workspace``:
        the caller uses the result at once and drops it, so it may live in the per-thread decode workspace
        (:func:`decode_workspace_bytes`), overwritten by the next decode."""
        return self.dequantize().to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the persistent (saved) state."""
        return _nbytes(self)


class DenseWeight(WeightStore):
    """The weight as is, in its source dtype (identity / unquantized layers)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weight.detach().clone())
        self.shape = tuple(weight.shape)
        self.bits = torch.finfo(weight.dtype).bits

    def dequantize(self) -> torch.Tensor:
        return self.w


class UniformWeight(WeightStore):
    """Round-to-nearest uniform weights, one scale (and zero point) per output row or per tensor."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "channel") -> None:
        super().__init__()
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"weight granularity must be 'channel' or 'tensor', got {granularity!r}")
        self.bits, self.symmetric, self.granularity, self.shape = bits, symmetric, granularity, tuple(weight.shape)
        w = weight.detach().float()
        lo_q, hi_q = qrange(bits, symmetric)
        red = dict(dim=-1, keepdim=True) if granularity == "channel" else {}
        tiny = torch.finfo(torch.float32).tiny
        if symmetric:
            absmax = w.abs().amax(**red) if red else w.abs().max().reshape(1, 1)
            scale, zero = (absmax / hi_q).clamp_min(tiny), torch.zeros(())
        else:
            mn = w.amin(**red) if red else w.min().reshape(1, 1)
            mx = w.amax(**red) if red else w.max().reshape(1, 1)
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)  # the range holds 0: zero rows and constant rows stay finite
            scale = ((mx - mn) / hi_q).clamp_min(tiny)
            zero = torch.round(-mn / scale)
        q = torch.clamp(torch.round(w / scale) + zero, lo_q, hi_q)
        self.register_buffer("codes", pack_codes((q - lo_q).to(torch.int32), bits))
        self.register_buffer("scale", scale.reshape(-1))
        self.register_buffer("zero", zero.reshape(-1) if not symmetric else torch.zeros(0))

    def dequantize(self) -> torch.Tensor:
        lo_q, _ = qrange(self.bits, self.symmetric)
        q = unpack_codes(self.codes, self.bits, self.shape[0] * self.shape[1]).view(self.shape).float() + lo_q
        scale = self.scale.view(-1, 1)
        zero = self.zero.view(-1, 1) if self.zero.numel() else 0.0
        return (q - zero) * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"


class GroupWeight(WeightStore):
    """Symmetric per-group integer weights (absmax / (2^(b-1)-1)) with bf16 scales: the adaLN INT4 g64 format."""

    def __init__(self, weight: torch.Tensor, bits: int = 4, group: int = 64, clip: float = 1.0) -> None:
        super().__init__()
        self.bits, self.group, self.shape = bits, group, tuple(weight.shape)
        codes, scales = quantize_groups(weight, bits, group, clip)
        lo_q, _ = qrange(bits, True)
        self.register_buffer("codes", pack_codes(codes.to(torch.int32) - lo_q, bits))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def dequantize(self) -> torch.Tensor:
        lo_q, _ = qrange(self.bits, True)
        q = unpack_codes(self.codes, self.bits, self.shape[0] * self.shape[1]).view(self.shape) + lo_q
        return dequantize_groups(q, self.scales, self.group)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={self.group}"


@dataclass
class GroupedCodes:
    """Integer codes of a weight with one (scale, zero) per output row and contiguous input group, as
    produced by a solver such as GPTQ. Codes are in [-2^(b-1), 2^(b-1)) (symmetric, ``zeros=None``) or
    [0, 2^b) with integer zero points; ``scales``/``zeros`` are (rows, n_groups)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        z = 0.0 if self.zeros is None else self.zeros
        return dequantize_groups(self.codes.double(), self.scales.double(), self.group, z).float()


class GroupUniformWeight(WeightStore):
    """Packed per-(row, input group) integer weights with fp16 scales and uint8 zero points (Q-DiT's format)."""

    def __init__(self, q: GroupedCodes) -> None:
        super().__init__()
        self.bits, self.group, self.symmetric, self.shape = q.bits, q.group, q.symmetric, tuple(q.codes.shape)
        lo_q, _ = qrange(q.bits, q.symmetric)
        self.register_buffer("codes", pack_codes((q.codes - lo_q).to(torch.int32).cpu(), q.bits).to(q.codes.device))
        self.register_buffer("scales", q.scales.to(torch.float16))
        self.register_buffer("zeros", torch.zeros(0, dtype=torch.uint8) if q.zeros is None else q.zeros.to(torch.uint8))

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], bits: int, group: int, symmetric: bool,
                     shape: tuple[int, int]) -> GroupUniformWeight:
        """Rebuild a store from its saved state (``codes``, ``scales``, ``zeros``), checking the sizes."""
        self = cls.__new__(cls)
        WeightStore.__init__(self)
        self.bits, self.group, self.symmetric, self.shape = bits, group, symmetric, tuple(shape)
        n_groups = -(-shape[1] // group)
        if (buffers["codes"].numel() != -(-shape[0] * shape[1] * bits // 8)
                or tuple(buffers["scales"].shape) != (shape[0], n_groups)):
            raise ValueError(f"saved group weights do not fit shape {shape} at {bits} bits, group {group}")
        for k in ("codes", "scales", "zeros"):
            self.register_buffer(k, buffers[k])
        return self

    def dequantize(self) -> torch.Tensor:
        lo_q, _ = qrange(self.bits, self.symmetric)
        n = self.shape[0] * self.shape[1]
        q = unpack_codes(self.codes.cpu(), self.bits, n).view(self.shape).to(self.scales.device) + lo_q
        z = self.zeros.float() if self.zeros.numel() else 0.0
        return dequantize_groups(q.float(), self.scales.float(), self.group, z)

    def extra_repr(self) -> str:
        clamp = ", zero_clamp=True" if self.zero_clamp else ""
        return f"bits={self.bits}, group={self.group}, symmetric={self.symmetric}{clamp}"


class OrbitWeight(WeightStore):
    """OrbitQuant weight rows: packed codebook indices of the unit rows plus bf16 row norms.

    Built from the *rotated* weight ``W' = rot(W)``; ``dequantize()`` returns ``n_i * C[idx_i]``.
    """

    def __init__(self, rotated_weight: torch.Tensor | None, codebook: Codebook, eps: float = 1e-10,
                 norm_dtype: torch.dtype = torch.bfloat16, *, weight: torch.Tensor | None = None,
                 rotation: nn.Module | None = None) -> None:
        """From the rotated weight, or from ``weight`` and its ``rotation`` (one native pass per row on CPU
        for RPBH: rotate, norm, encode; the same codes as rotating first, up to exact ties)."""
        super().__init__()
        self.codebook = codebook
        w = (rotated_weight if rotated_weight is not None else weight).detach()
        self.bits, self.shape = codebook.bits, tuple(w.shape)
        k = _kernel() if rotated_weight is None and w.device.type == "cpu" and isinstance(rotation, RPBH) else None
        t = _gpu_kernels(w) if rotated_weight is None and isinstance(rotation, RPBH) else None
        packed = None
        if k is not None:
            # mode 2 writes the packed stream directly when each row fills whole bytes (d * bits % 8 == 0)
            mode = 2 if (self.shape[1] * self.bits) % 8 == 0 else 1
            out, n = k.rotate_quantize(w.float().contiguous(), rotation.perm, rotation.signs, rotation.h,
                                       *codebook.kernel_args(), eps, True, mode)
            packed, idx = (out.reshape(-1), None) if mode == 2 else (None, out)
        elif t is not None and t.supports(rotation.d, rotation.h):
            idx, n, _ = t.rotate_quantize(w, rotation.perm, rotation.signs, rotation.h, codebook.thresholds,
                                               codebook.centroids, eps, codes=True)
        else:
            w = (w if rotated_weight is not None else rotation(w)).float()
            n = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
            idx = codebook.encode(w / n.clamp_min(eps))
        self.register_buffer("codes", packed if packed is not None else pack_codes(idx, self.bits))
        self.register_buffer("norms", n.reshape(-1).to(norm_dtype))

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_to(torch.float32)

    def dequantize_to(self, dtype: torch.dtype, workspace: bool = False) -> torch.Tensor:
        # CPU kernel: fp32 or bf16 decoded in one pass (bf16 = the fp32 decode rounded to nearest even, tested),
        # optionally into the reused workspace
        if dtype in (torch.float32, torch.bfloat16) and self.codes.device.type == "cpu" and (k := _kernel()):
            buf = _WORKSPACE.get(self.shape[0] * self.shape[1], dtype) if workspace else None
            return k.dequant_rows(self.codes, self.bits, *self.shape, self.codebook.centroids, self.norms,
                                  dtype == torch.bfloat16, buf)
        idx = unpack_codes(self.codes, self.bits, self.shape[0] * self.shape[1]).view(self.shape)
        return (self.codebook.decode(idx) * self.norms.float()[:, None]).to(dtype)

    def matmul(self, h: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``F.linear(h, dequantize(), bias)`` straight from the packed codes (Triton LUT-dequant GEMM on CUDA,
        bf16/fp16 compute, see ``triton_orbit.gemm_supports``); None when it does not apply."""
        t = _gpu_kernels(h)
        if t is None or dtype not in (torch.bfloat16, torch.float16) or not t.gemm_supports(self.shape[1], self.bits):
            return None
        lut = self._luts.get(dtype) if hasattr(self, "_luts") else None
        if lut is None or lut.device != h.device:  # the 2^b-entry table in the compute dtype, made once
            self._luts = {dtype: self.codebook.centroids.to(device=h.device, dtype=dtype)}
            lut = self._luts[dtype]
        return t.lut_gemm(h, self.codes, self.bits, self.shape[0], lut, self.norms, bias, out_dtype=dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, norm_dtype={self.norms.dtype}"


def uniform_store(weight: torch.Tensor, bits: int, symmetric: bool, granularity: str,
                  dtype: torch.dtype) -> WeightStore:
    """Uniform RTN weight store, or the weight as is (in ``dtype``) when ``bits == 16``."""
    return DenseWeight(weight.to(dtype)) if bits == 16 else UniformWeight(weight, bits, symmetric, granularity)


def uniform_act(bits: int, symmetric: bool, granularity: str = "token") -> ActQuantizer:
    """Dynamic uniform RTN activation quantizer, or pass-through when ``bits == 16``."""
    return NoActQuant() if bits == 16 else UniformActQuant(bits, symmetric, granularity)


# ------------------------------------------------------------------------------------------ QuantLinear
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
                 rotation: Rotation | nn.Module | None = None, compute_dtype: torch.dtype = torch.float32, name: str = "",
                 treatment: str = "") -> None:
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
