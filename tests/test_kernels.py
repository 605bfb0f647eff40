"""The native CPU kernel (orbitquant/kernels) against the pure-torch path it replaces: rotations
bit-identical, codes identical up to exact ties, packing and decoding bit-identical; the two runtime modes
give identical outputs and report what they keep resident."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orbitquant as oq
from orbitquant.kernels import orbit_cpu
from orbitquant.quant.act import OrbitActQuant
from orbitquant.quant.codebook import get_codebook
from orbitquant.quant.primitives import pack_codes, unpack_codes
from orbitquant.quant.rotation import make_rotation
from orbitquant.quant.weights import OrbitWeight


@pytest.fixture(scope="module")
def kernel():
    k = orbit_cpu()
    # a machine like CI's has g++ and ninja (a dependency): a missing kernel is a failure here, not a skip
    assert k is not None, "the native CPU kernel did not build (see the warning in the log)"
    return k


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("ORBITQUANT_KERNELS", "0")


@pytest.mark.parametrize("d", [96, 384, 1536, 3072])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_activation_path_matches_the_torch_path(kernel, d, bits):
    g = torch.Generator().manual_seed(d + bits)
    x = torch.randn(257, d, generator=g) * torch.rand(257, 1, generator=g) * 10
    rot, act = make_rotation("rpbh", d, 3), OrbitActQuant(get_codebook(d, bits))
    ref = act(rot(x))
    got = act.fused(rot, x)
    # the rotation is bit-identical; only the fp32 token norm may round differently (so values differ in the
    # last ulp), which can also move a coordinate sitting exactly on a threshold to the neighbouring code
    s = x.norm(dim=-1, keepdim=True)
    cb = act.codebook
    codes_got, codes_ref = cb.encode(got / s), cb.encode(ref / s)  # a centroid encodes to itself
    assert (codes_got != codes_ref).float().mean() < 1e-4
    same_code = codes_got == codes_ref
    assert torch.allclose(got[same_code], ref[same_code], rtol=1e-6, atol=0)


def test_fused_path_keeps_shape_dtype_and_refuses_grad(kernel):
    d = 256
    rot, act = make_rotation("rpbh", d, 0), OrbitActQuant(get_codebook(d, 4))
    x = torch.randn(2, 5, d, dtype=torch.bfloat16)
    assert act.fused(rot, x).shape == (2, 5, d)
    xg = torch.randn(3, d, requires_grad=True)
    assert act.fused(rot, xg) is None  # autograd needs the torch path
    assert act.fused(make_rotation("haar", d, 0), x) is None  # only RPBH is fused


def test_fused_path_reports_non_finite_tokens(kernel):
    d = 128
    rot, act = make_rotation("rpbh", d, 0), OrbitActQuant(get_codebook(d, 4))
    x = torch.randn(4, d)
    x[2, 7] = float("nan")
    with pytest.raises(oq.quant.act.NonFiniteInput):
        act.fused(rot, x)


@pytest.mark.parametrize("bits", range(1, 9))
def test_native_packing_is_the_torch_bitstream(kernel, monkeypatch, bits):
    codes = torch.randint(0, 1 << bits, (10_007,), generator=torch.Generator().manual_seed(bits))
    native = pack_codes(codes, bits)
    monkeypatch.setenv("ORBITQUANT_KERNELS", "0")
    assert torch.equal(native, pack_codes(codes, bits))
    assert torch.equal(unpack_codes(native, bits, codes.numel()), codes)


@pytest.mark.parametrize("d, bits", [(96, 4), (1536, 3), (512, 8), (384, 2)])
def test_weight_codes_and_decode_match_the_torch_path(kernel, monkeypatch, d, bits):
    w = torch.randn(64, d, generator=torch.Generator().manual_seed(d))
    rot, cb = make_rotation("rpbh", d, 1), get_codebook(d, bits)
    fused = OrbitWeight(None, cb, weight=w, rotation=rot)
    native_dq = fused.dequantize()
    monkeypatch.setenv("ORBITQUANT_KERNELS", "0")
    ref = OrbitWeight(rot(w), cb)
    n_fused = unpack_codes(fused.codes, bits, w.numel())
    n_ref = unpack_codes(ref.codes, bits, w.numel())
    assert (n_fused != n_ref).sum() <= 1  # ties only
    assert torch.equal(fused.norms, ref.norms)
    assert torch.equal(native_dq, fused.dequantize())  # native decode == torch decode, bit for bit


def test_whole_model_with_and_without_kernel_agrees(kernel, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 768), nn.GELU(), nn.Linear(768, 384))
    x = torch.randn(64, 384)
    ref = model(x)
    fast = oq.quantize_(model_copy := _copy(model), oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0))
    y_native = model_copy(x)
    monkeypatch.setenv("ORBITQUANT_KERNELS", "0")
    slow_model = _copy(model)
    oq.quantize_(slow_model, oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0))
    y_torch = slow_model(x)
    assert fast.summary()["treatments"] == {"orbit w4a8": 2}
    err_native = (y_native - ref).norm() / ref.norm()
    err_torch = (y_torch - ref).norm() / ref.norm()
    assert abs(err_native - err_torch) < 1e-3 * err_torch
    assert (y_native - y_torch).norm() / ref.norm() < 1e-3


def _copy(m: nn.Module) -> nn.Module:
    c = type(m)(*[type(l)(l.in_features, l.out_features) if isinstance(l, nn.Linear) else type(l)() for l in m])
    c.load_state_dict(m.state_dict())
    return c


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_compact_runtime_is_bit_identical_and_holds_no_dense_weight(monkeypatch, kernels):
    monkeypatch.setenv("ORBITQUANT_KERNELS", kernels)
    torch.manual_seed(1)
    d = 512
    model = nn.Sequential(nn.Linear(d, d))
    oq.quantize_(model, oq.OrbitConfig(w_bits=4, a_bits=4, probe_tokens=0))
    q = model[0]
    x = torch.randn(33, d)
    y_fast = q(x)
    fast_resident = q.resident_bytes
    q.set_runtime("compact")
    assert q.weight is None and q.resident_bytes == q.nbytes
    assert torch.equal(q(x), y_fast)
    # fast mode keeps the fp32 dequantized weight: d*d*4 bytes on top of the packed state
    assert fast_resident == q.nbytes + d * d * 4
    bits_per_weight = 8 * q.store.nbytes / (d * d)
    assert math.isclose(bits_per_weight, 4 + 16 / d, rel_tol=1e-9)
    with pytest.raises(ValueError, match="runtime must be one of"):
        q.set_runtime("turbo")


def test_report_counts_resident_bytes_per_runtime_mode():
    torch.manual_seed(2)
    d = 256
    mk = lambda: nn.Sequential(nn.Linear(d, d), nn.Linear(d, d))  # noqa: E731
    fast = oq.quantize_(mk(), oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0)).summary()
    compact = oq.quantize_(mk(), oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0), runtime="compact").summary()
    assert compact["runtime"] == "compact" and compact["linear_bytes_resident"] == compact["linear_bytes_quant"]
    assert fast["linear_bytes_resident"] == fast["linear_bytes_quant"] + 2 * d * d * 4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_bf16_in_and_out_is_the_fp32_path_rounded(kernel, bits):
    # bf16 input is widened exactly, and the bf16 output is the fp32 output rounded to nearest even
    d = 384
    x = (torch.randn(37, d, generator=torch.Generator().manual_seed(bits)) * 3).bfloat16()
    rot, act = make_rotation("rpbh", d, 2), OrbitActQuant(get_codebook(d, bits))
    y16 = act.fused(rot, x, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape
    assert torch.equal(y16, act.fused(rot, x.float(), torch.float32).to(torch.bfloat16))
    assert act.fused(rot, x).dtype == torch.float32  # the default output stays fp32


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [64, 100])  # 100: rows that do not start on a byte, and a scalar tail
def test_native_decode_fp32_and_bf16_match_the_torch_decode(kernel, monkeypatch, bits, d):
    w = torch.randn(24, d, generator=torch.Generator().manual_seed(bits)) * 2
    store = OrbitWeight(w, get_codebook(d, bits))  # (treated as already rotated)
    native32, native16 = store.dequantize(), store.dequantize_to(torch.bfloat16)
    monkeypatch.setenv("ORBITQUANT_KERNELS", "0")
    ref = store.dequantize()
    assert torch.equal(native32, ref)
    assert native16.dtype == torch.bfloat16 and torch.equal(native16, ref.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_layers_share_the_decode_workspace_but_not_under_autograd(kernel, dtype):
    # two compact layers of one shape decode into the same per-thread buffer; each forward must still use its
    # own weight. A weight autograd may keep for backward (input requiring grad) is decoded into its own tensor.
    torch.manual_seed(3)
    d = 256
    fast = [nn.Sequential(nn.Linear(d, d).to(dtype)) for _ in range(2)]
    compact = [nn.Sequential(nn.Linear(d, d).to(dtype)) for _ in range(2)]
    for f, c in zip(fast, compact):
        c.load_state_dict(f.state_dict())
        oq.quantize_(f, oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0))
        oq.quantize_(c, oq.OrbitConfig(w_bits=4, a_bits=8, probe_tokens=0), runtime="compact")
    x = torch.randn(9, d, dtype=dtype)
    with torch.no_grad():
        ys = [c(x) for c in compact]
        assert all(torch.equal(y, f(x)) for y, f in zip(ys, fast))
    assert oq.quant.weights.decode_workspace_bytes() >= d * d * torch.finfo(dtype).bits // 8
    layer, ws = compact[0][0], oq.quant.weights._WORKSPACE.bufs[dtype]
    with torch.no_grad():
        assert layer._dense_weight(x).data_ptr() == ws.data_ptr()
    kept = layer._dense_weight(x.clone().requires_grad_(True))
    assert kept.data_ptr() != ws.data_ptr() and torch.equal(kept, fast[0][0].weight)
