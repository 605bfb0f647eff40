"""Activation quantizers: what ``QuantLinear`` applies to its (rotated) input before the matmul.

Dynamic round-to-nearest per token, tensor or channel group (``UniformActQuant``, ``GroupActQuant``), static
per-tensor (``StaticUniformActQuant``), SmoothQuant's online smoothing (``ChannelScale``) and OrbitQuant's
norm-and-codebook pass (``OrbitActQuant``), whose rotate-norm-quantize runs in one native pass per token when
a kernel is available (``orbitquant.kernels``). All raise :class:`NonFiniteInput` on NaN/Inf input.
"""

from __future__ import annotations

import torch
from torch import nn

from orbitquant.quant._native import cpu_kernel, gpu_kernels
from orbitquant.quant.codebook import Codebook
from orbitquant.quant.primitives import fake_quant_groups, fake_quant_uniform, qrange
from orbitquant.quant.rotation import RPBH


class NonFiniteInput(ValueError):
    """Raised by activation quantizers on NaN/Inf input; ``QuantLinear`` adds the layer name."""


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
        if (t := gpu_kernels(x)) is not None and t.supports(rotation.d, rotation.h):
            y, finite = t.rotate_quantize(x, rotation.perm, rotation.signs, rotation.h, self.codebook.thresholds,
                                          self.codebook.centroids, self.eps, out_dtype=out_dtype or torch.float32,
                                          flag=flag)
            if finite is not None and not finite.item():
                raise NonFiniteInput("activation contains NaN or Inf")
            return y
        k = cpu_kernel() if x.device.type == "cpu" else None
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


def uniform_act(bits: int, symmetric: bool, granularity: str = "token") -> ActQuantizer:
    """Dynamic uniform RTN activation quantizer, or pass-through when ``bits == 16``."""
    return NoActQuant() if bits == 16 else UniformActQuant(bits, symmetric, granularity)
