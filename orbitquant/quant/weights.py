"""Weight stores: the persistent (shipped) state of one weight matrix, and its decode.

A store's buffers are what ``state_dict`` saves: packed integer codes plus scales, zero points or row norms
(``DenseWeight`` keeps the weight as is). ``dequantize()`` gives the fp32 matrix the matmul uses;
``dequantize_to(dtype, workspace=True)`` may decode into the per-thread decode workspace that compact
``QuantLinear`` layers on CPU share (:func:`decode_workspace_bytes`). ``OrbitWeight`` encodes and decodes in
one native pass per row when a kernel is available (``orbitquant.kernels``), and on CUDA can multiply
straight from its packed codes (``OrbitWeight.matmul``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from orbitquant.quant._native import cpu_kernel, gpu_kernels
from orbitquant.quant.codebook import Codebook
from orbitquant.quant.primitives import dequantize_groups, pack_codes, qrange, quantize_groups, unpack_codes
from orbitquant.quant.rotation import RPBH


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


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
        k = cpu_kernel() if rotated_weight is None and w.device.type == "cpu" and isinstance(rotation, RPBH) else None
        t = gpu_kernels(w) if rotated_weight is None and isinstance(rotation, RPBH) else None
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
        if dtype in (torch.float32, torch.bfloat16) and self.codes.device.type == "cpu" and (k := cpu_kernel()):
            buf = _WORKSPACE.get(self.shape[0] * self.shape[1], dtype) if workspace else None
            return k.dequant_rows(self.codes, self.bits, *self.shape, self.codebook.centroids, self.norms,
                                  dtype == torch.bfloat16, buf)
        idx = unpack_codes(self.codes, self.bits, self.shape[0] * self.shape[1]).view(self.shape)
        return (self.codebook.decode(idx) * self.norms.float()[:, None]).to(dtype)

    def matmul(self, h: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``F.linear(h, dequantize(), bias)`` straight from the packed codes (Triton LUT-dequant GEMM on CUDA,
        bf16/fp16 compute, see ``triton_orbit.gemm_supports``); None when it does not apply."""
        t = gpu_kernels(h)
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
