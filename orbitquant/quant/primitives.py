"""Quantization primitives: uniform (round-to-nearest) fake-quant, b-bit code packing, SQNR."""

from __future__ import annotations

import math

import torch

_PACK_CHUNK = 1 << 20  # codes per chunk in the generic bit-stream packer (a multiple of 8)


def check_bits(bits: int, what: str = "bits", lo: int = 1, hi: int = 8) -> int:
    """Validate a bit width with an error that says what was wrong and what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


# ----------------------------------------------------------------------------------------------- packing
def _kernel():
    from orbitquant.kernels import orbit_cpu

    return orbit_cpu()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a little-endian bit stream of uint8 (ceil(n * bits / 8) bytes).

    The stream runs over the flattened tensor; code k occupies bits [k*bits, (k+1)*bits).
    """
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and ((flat.dtype != torch.uint8 and int(flat.min()) < 0) or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if flat.device.type == "cpu" and (k := _kernel()) is not None:
        return k.pack_bits(flat.to(torch.uint8), bits)  # the same stream (tested), one pass instead of bit planes
    flat = flat.to(torch.int32)
    if 8 % bits == 0:  # byte-aligned: 8/bits codes per byte
        k = 8 // bits
        pad = (-flat.numel()) % k
        f = torch.nn.functional.pad(flat, (0, pad)).view(-1, k)
        shifts = torch.arange(k, dtype=torch.int32, device=flat.device) * bits
        return (f << shifts).sum(dim=1).to(torch.uint8)
    out = []
    weights = 1 << torch.arange(8, dtype=torch.int32, device=flat.device)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    for start in range(0, flat.numel(), _PACK_CHUNK):
        c = flat[start:start + _PACK_CHUNK]
        stream = ((c[:, None] >> shifts) & 1).reshape(-1)
        stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
        out.append((stream * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8, device=flat.device)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as int64."""
    check_bits(bits)
    if packed.numel() != math.ceil(n * bits / 8):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        k = 8 // bits
        shifts = torch.arange(k, dtype=torch.int32, device=p.device) * bits
        return ((p[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].long()
    out = []
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=p.device)
    bit = torch.arange(8, dtype=torch.int32, device=p.device)
    bytes_per_chunk = _PACK_CHUNK * bits // 8
    for start in range(0, p.numel(), bytes_per_chunk):
        stream = ((p[start:start + bytes_per_chunk, None] >> bit) & 1).reshape(-1)
        stream = stream[: (stream.numel() // bits) * bits].view(-1, bits)
        out.append((stream * weights).sum(dim=1))
    return torch.cat(out)[:n].long() if out else torch.zeros(0, dtype=torch.long, device=p.device)


# ------------------------------------------------------------------------------------- uniform fake-quant
def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric [-2^(b-1), 2^(b-1)-1] (scale from absmax / (2^(b-1)-1)), else [0, 2^b-1]."""
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric uniform quantization needs at least 2 bits; use asymmetric for 1 bit")
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fake_quant_uniform(x: torch.Tensor, bits: int, symmetric: bool, dims: tuple[int, ...] | None,
                       zero_clamp: bool = False) -> torch.Tensor:
    """Round-to-nearest uniform fake quantization with min/max (absmax) scales.

    ``dims`` are the dimensions a scale is shared over: ``(-1,)`` gives one scale per row / token,
    ``None`` one scale for the whole tensor. Computed in fp32, returned in ``x.dtype``. ``zero_clamp``
    (asymmetric only): clamp the zero point to the code range, as AWQ's and Q-DiT's ``quantize_tensor`` do,
    so a range of one sign is clipped (all-positive ``[min, max]`` becomes ``[0, max - min]``).
    """
    xf = x.float()
    lo_q, hi_q = qrange(bits, symmetric)
    red = dict(dim=dims, keepdim=True) if dims is not None else {}
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        absmax = xf.abs().amax(**red) if dims is not None else xf.abs().max()
        scale = (absmax / hi_q).clamp_min(tiny)
        q = torch.clamp(torch.round(xf / scale), lo_q, hi_q)
        return (q * scale).to(x.dtype)
    mn = xf.amin(**red) if dims is not None else xf.min()
    mx = xf.amax(**red) if dims is not None else xf.max()
    flat = mx == mn  # a constant row (e.g. a token of equal channels): exact as is; a tiny scale would overflow
    scale = torch.where(flat, torch.ones_like(mx), (mx - mn) / hi_q).clamp_min(tiny)
    zero = torch.round(-mn / scale)
    if zero_clamp:
        zero = zero.clamp(lo_q, hi_q)
    q = torch.clamp(torch.round(xf / scale) + zero, lo_q, hi_q)
    return torch.where(flat, xf, (q - zero) * scale).to(x.dtype)


def fake_quant_groups(x: torch.Tensor, bits: int, symmetric: bool, group: int,
                      zero_clamp: bool = False) -> torch.Tensor:
    """Dynamic round-to-nearest with one scale per row and contiguous group of ``group`` channels of the
    last dim (Q-DiT's per-token x channel-group activations). ``group <= 0`` or ``>= d`` is per row; a last
    dim that ``group`` does not divide gets a shorter final group (its own range, no padding). ``zero_clamp``:
    see ``fake_quant_uniform``."""
    d = x.shape[-1]
    if group <= 0 or group >= d:
        return fake_quant_uniform(x, bits, symmetric, (-1,), zero_clamp)
    main = d - d % group
    head = fake_quant_uniform(x[..., :main].unflatten(-1, (main // group, group)), bits, symmetric, (-1,), zero_clamp)
    if main == d:
        return head.flatten(-2)
    tail = fake_quant_uniform(x[..., main:], bits, symmetric, (-1,), zero_clamp)
    return torch.cat([head.flatten(-2), tail], dim=-1)


def quantize_groups(w: torch.Tensor, bits: int, group: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group weight quantization along the last dim (absmax / (2^(b-1)-1), codes in [-2^(b-1), 2^(b-1)-1]).

    A last dim that ``group`` does not divide gets a shorter final group. Returns ``(codes int8, scales fp32)``
    with codes shaped like ``w`` and scales ``(rows, n_groups)``.
    """
    rows, cols = w.shape
    pad = (-cols) % group
    wp = torch.nn.functional.pad(w.float(), (0, pad)).view(rows, -1, group)
    lo_q, hi_q = qrange(bits, symmetric=True)
    scales = (wp.abs().amax(dim=-1) * clip / hi_q).clamp_min(torch.finfo(torch.float32).tiny)  # clip < 1 shrinks
    codes = torch.clamp(torch.round(wp / scales[..., None]), lo_q, hi_q).view(rows, -1)[:, :cols]
    return codes.to(torch.int8), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group: int,
                      zeros: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``(codes - zero) * scale`` with one scale (and zero point) per row and group of ``group`` columns;
    float32 unless ``codes`` is float64."""
    rows, cols = codes.shape
    pad = (-cols) % group
    dt = torch.float64 if codes.dtype == torch.float64 else torch.float32
    c = torch.nn.functional.pad(codes.to(dt), (0, pad)).view(rows, -1, group)
    z = zeros.to(dt)[..., None] if isinstance(zeros, torch.Tensor) else zeros
    return ((c - z) * scales.to(dt)[..., None]).view(rows, -1)[:, :cols]


# ----------------------------------------------------------------------------------------------- metrics
def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||ref||^2 / ||ref - approx||^2) in dB (inf if exact)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx|| / ||ref|| (0 if both are zero)."""
    ref, approx = ref.double(), approx.double()
    den = ref.norm().item()
    return (ref - approx).norm().item() / den if den > 0 else float((ref - approx).norm().item() > 0)
