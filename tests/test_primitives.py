"""Uniform quantization primitives: bit packing, fake-quant identities and bounds, SQNR theory, group quantization."""

from __future__ import annotations

import math

import pytest
import torch

from orbitquant.quant.primitives import (
    check_bits,
    dequantize_groups,
    fake_quant_uniform,
    pack_codes,
    qrange,
    quantize_groups,
    relative_error,
    sqnr_db,
    unpack_codes,
)

# ------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_pack_roundtrip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    out = unpack_codes(packed, bits, n)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", [3, 5])
def test_pack_roundtrip_across_chunks(bits):
    # the generic packer works in chunks of 2^20 codes: straddle a chunk boundary
    n = (1 << 20) + 13
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_bit_layout_little_endian():
    # code k occupies bits [k*b, (k+1)*b) of a little-endian stream
    assert pack_codes(torch.tensor([1, 2]), 3).tolist() == [0b00010001]
    assert pack_codes(torch.tensor([0xF, 0x1]), 4).tolist() == [0x1F]
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 1]
    assert pack_codes(torch.tensor([5, 6, 7]), 5).tolist() == [5 | (6 << 5) & 0xFF, (6 >> 3) | (7 << 2)]
    assert pack_codes(torch.tensor([255, 0, 17]), 8).tolist() == [255, 0, 17]


def test_pack_accepts_2d_and_all_extremes():
    for bits in range(1, 9):
        codes = torch.tensor([[0, (1 << bits) - 1, 0], [(1 << bits) - 1, 0, (1 << bits) - 1]])
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 6).view(2, 3), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_pack_out_of_range_raises(bits):
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([-1, 0]), bits)


def test_pack_bad_bits_and_length():
    for bits in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits must be an integer"):
            check_bits(bits)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        pack_codes(torch.tensor([0]), 9)
    packed = pack_codes(torch.arange(7), 3)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_codes(packed, 3, 9)


# ------------------------------------------------------------------------------------------- uniform fake-quant


def _row_scale(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The step size per row, recomputed from the definition (absmax/(2^(b-1)-1) or (max-min)/(2^b-1))."""
    if symmetric:
        return x.abs().amax(dim=-1, keepdim=True) / ((1 << (bits - 1)) - 1)
    return (x.amax(dim=-1, keepdim=True) - x.amin(dim=-1, keepdim=True)) / ((1 << bits) - 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_per_token_levels_and_error(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    # rows with different scales and offsets, so a shared scale would be visibly wrong
    x = torch.randn(64, 200, generator=g) * torch.logspace(-2, 2, 64)[:, None] + torch.randn(64, 1, generator=g)
    q = fake_quant_uniform(x, bits, symmetric, (-1,))
    assert q.shape == x.shape and q.dtype == x.dtype
    levels = (1 << bits) - 1 if symmetric else 1 << bits  # symmetric absmax never reaches -2^(b-1)
    for row in q:
        assert row.unique().numel() <= levels
    scale = _row_scale(x, bits, symmetric)
    err = (q - x).abs()
    # round-to-nearest: |x - Q(x)| <= step/2, plus fp32 rounding of x/scale and q*scale (a few ulp of |x|)
    assert bool((err <= scale / 2 * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * x.abs()).all())
    # and the bound is nearly attained (the grid is no finer than claimed): with 200 values per row the
    # largest error is close to step/2 on a typical row (coarse 2-3 bit symmetric grids on offset rows can
    # stay below it, hence the median)
    assert (err / scale).amax(dim=-1).median().item() > 0.45


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_per_tensor_uses_one_scale(bits):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, 16)[:, None]
    q = fake_quant_uniform(x, bits, True, None)
    step = x.abs().max() / ((1 << (bits - 1)) - 1)
    k = q / step
    # every output is an integer multiple of the single tensor-wide step
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert q.unique().numel() <= (1 << bits) - 1
    # per-token would have a smaller error on this tensor: rows have 100x different ranges
    assert relative_error(x, fake_quant_uniform(x, bits, True, (-1,))) < relative_error(x, q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_identity_on_grid(bits):
    s = 2.0 ** -3  # power-of-two step: absmax/hi_q and (max-min)/hi_q reproduce it exactly in fp32
    hi = (1 << (bits - 1)) - 1
    k = torch.arange(-hi, hi + 1, dtype=torch.float32)
    x = (k * s)[torch.randperm(k.numel(), generator=torch.Generator().manual_seed(0))].repeat(3, 1)
    assert torch.equal(fake_quant_uniform(x, bits, True, (-1,)), x)
    assert torch.equal(fake_quant_uniform(x, bits, True, None), x)
    # asymmetric grid: {(j - z) * s : j = 0..2^b-1} with an integer zero point z
    z = 1 << (bits - 1)
    ka = torch.arange(0, 1 << bits, dtype=torch.float32) - z
    xa = (ka * s).repeat(2, 1)
    assert torch.equal(fake_quant_uniform(xa, bits, False, (-1,)), xa)
    # bf16 input comes back bf16 and on-grid bf16 values are still reproduced exactly
    assert torch.equal(fake_quant_uniform(x.bfloat16(), bits, True, (-1,)), x.bfloat16())


def test_fake_quant_zero_row_is_safe():
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-1, 1, 8)
    for sym in (True, False):
        q = fake_quant_uniform(x, 4, sym, (-1,))
        assert torch.isfinite(q).all() and torch.equal(q[0], x[0]) and torch.equal(q[2], x[2])


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_sqnr_uniform_data(bits):
    # For X ~ U[-1, 1] and step D the quantization noise is ~U[-D/2, D/2]: SQNR = var(X)/(D^2/12) = 4/D^2.
    # Asymmetric min/max: D = 2/(2^b - 1) -> SQNR = 20 log10(2^b - 1) ~ 6.02 b dB (exact to 0.6 dB at b=4).
    x = torch.rand(1 << 18, generator=torch.Generator().manual_seed(bits)) * 2 - 1
    asym = sqnr_db(x, fake_quant_uniform(x, bits, False, None))
    theory = 20 * math.log10((1 << bits) - 1)
    # 262k samples: the noise-power estimate has ~0.3 % relative sd (0.01 dB); 0.1 dB covers that plus the
    # edge effects of the finite sample range
    assert asym == pytest.approx(theory, abs=0.1)
    assert asym == pytest.approx(6.02 * bits, abs=1.0)
    # symmetric absmax wastes one level: D = 2/(2^b - 2)
    sym = sqnr_db(x, fake_quant_uniform(x, bits, True, None))
    assert sym == pytest.approx(20 * math.log10((1 << bits) - 2), abs=0.1)


def test_qrange():
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, False) == (0, 15)
    assert qrange(1, False) == (0, 1)
    with pytest.raises(ValueError, match="at least 2 bits"):
        qrange(1, True)


# ------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_quant_ragged_last_group(bits):
    rows, cols, group = 5, 96, 64
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(rows, cols, generator=g)
    w[:, 64:] *= 0.01  # the short last group has a 100x smaller range: it must get its own scale
    codes, scales = quantize_groups(w, bits, group)
    assert codes.dtype == torch.int8 and codes.shape == (rows, cols)
    assert scales.shape == (rows, 2)
    hi = (1 << (bits - 1)) - 1
    # scales from the definition, on each group's own elements (the padding must not matter)
    ref = torch.stack([w[:, :64].abs().amax(-1), w[:, 64:].abs().amax(-1)], dim=1) / hi
    assert torch.allclose(scales, ref, rtol=1e-6, atol=0)
    assert int(codes.min()) >= -(1 << (bits - 1)) and int(codes.max()) <= hi
    deq = dequantize_groups(codes, scales, group)
    assert deq.shape == (rows, cols)
    per_elem_scale = torch.cat([scales[:, :1].expand(rows, 64), scales[:, 1:].expand(rows, 32)], dim=1)
    # round-to-nearest within each group: |err| <= scale/2 (+ fp32 rounding)
    assert bool(((deq - w).abs() <= per_elem_scale / 2 * (1 + 1e-5)).all())
    # the last group's error is on its own (small) scale
    assert (deq - w)[:, 64:].abs().max() < 0.01 * 4 / hi


def test_sqnr_and_relative_error_helpers():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0)  # noise = 0.1 * signal -> 20 dB
    assert relative_error(x, x + torch.tensor([0.0, 0.5])) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_asymmetric_fake_quant_keeps_constant_rows_exact():
    # a token whose channels are all equal has min == max: a floored scale would overflow the zero point (NaN)
    x = torch.tensor([[300.0] * 8, [0.0] * 8, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    y = fake_quant_uniform(x, 4, False, (-1,))
    assert torch.isfinite(y).all() and torch.equal(y[:2], x[:2])
    assert torch.equal(fake_quant_uniform(torch.full((3, 3), 2.5), 4, False, None), torch.full((3, 3), 2.5))
