"""The Triton kernels (fused activation pass, LUT-dequant GEMM) against the torch reference.

Without a GPU they run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the same
kernel code, numpy semantics. The ``gpu`` tests repeat the checks compiled on CUDA and through
``QuantLinear`` (fast and compact), with bf16 tensor-core operands.
"""

import math

import pytest
import torch

from orbitquant.quant.act import OrbitActQuant
from orbitquant.quant.codebook import get_codebook
from orbitquant.quant.rotation import RPBH
from orbitquant.quant.weights import OrbitWeight

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' brings it)")
from orbitquant.kernels import triton_orbit as T  # noqa: E402

CUDA = torch.cuda.is_available()
interp = pytest.mark.skipif(not T.interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")


def _case(d: int, bits: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[0, int(torch.randint(0, d, (1,), generator=g))] = 300.0  # an outlier channel
    return x, RPBH(d, seed=seed, warn=False), get_codebook(d, bits)


@interp
@pytest.mark.parametrize("d,bits,gather", [(256, 4, True), (768, 2, True), (1536, 3, False), (512, 8, True),
                                           (4096, 4, True), (3072, 4, False)])
def test_rotate_quantize_matches_torch(d, bits, gather):
    x, rot, cb = _case(d, bits, rows=4, seed=d + bits)
    y, finite = T.rotate_quantize(x, rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids, gather=gather)
    xr = rot(x)
    s = torch.linalg.vector_norm(xr, dim=-1, keepdim=True)
    assert bool(finite)
    torch.testing.assert_close(y, OrbitActQuant(cb)(xr), rtol=1e-5, atol=1e-5)
    codes, norms, _ = T.rotate_quantize(x, rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids, codes=True)
    assert codes.dtype == torch.uint8 and norms.shape == (4,)
    assert int((codes.long() != cb.encode(xr / s)).sum()) == 0
    torch.testing.assert_close(norms, s[:, 0], rtol=1e-6, atol=0)


@interp
@pytest.mark.parametrize("d,rows", [(768, 2), (1024, 8), (4096, 0)])
def test_batched_and_single_token_kernels_agree(d, rows):
    x, rot, cb = _case(d, 4, rows=5, seed=d)  # 5 tokens: the last program of a batched launch is partial
    args = (rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids)
    c1, n1, _ = T.rotate_quantize(x, *args, codes=True, rows=rows)
    c0, n0, _ = T.rotate_quantize(x, *args, codes=True, rows=0 if rows else 8)
    assert torch.equal(c1, c0)
    torch.testing.assert_close(n1, n0, rtol=1e-6, atol=0)


@interp
def test_rotate_quantize_shapes_dtype_and_nonfinite():
    x, rot, cb = _case(512, 4, rows=6, seed=3)
    y, finite = T.rotate_quantize(x.view(2, 3, 512), rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids,
                                  out_dtype=torch.float16)
    assert y.shape == (2, 3, 512) and y.dtype == torch.float16 and bool(finite)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[4, 7] = bad
        assert not bool(T.rotate_quantize(xb, rot.perm, rot.signs, rot.h, cb.thresholds, cb.centroids)[1])
    with pytest.raises(ValueError, match="Hadamard block"):
        r = RPBH(96, warn=False)
        T.rotate_quantize(torch.randn(2, 96), r.perm, r.signs, r.h, cb.thresholds, cb.centroids)


def _orbit_weight(n: int, k: int, bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    return OrbitWeight(None, get_codebook(k, bits), weight=w, rotation=RPBH(k, seed=seed, warn=False))


@interp
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lut_gemm_equals_dense_product(bits):
    st = _orbit_weight(40, 256, bits, seed=bits)
    g = torch.Generator().manual_seed(1)
    a, bias = torch.randn(3, 7, 256, generator=g), torch.randn(40, generator=g)
    ref = a.double() @ st.dequantize().double().T + bias.double()
    # fp16 table and operands in the interpreter (its bf16 dot is not supported); bf16 is checked on the GPU
    out = T.lut_gemm(a, st.codes, bits, 40, st.codebook.centroids.half(), st.norms, bias, out_dtype=torch.float32)
    assert out.shape == (3, 7, 40)
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 2e-3  # fp16 operands: ~2^-11 relative rounding per factor
    out32 = T.lut_gemm(a, st.codes, bits, 40, st.codebook.centroids, st.norms, None, out_dtype=torch.float32)
    torch.testing.assert_close(out32.double(), ref - bias.double(), rtol=1e-5, atol=1e-5)


@interp
def test_lut_gemm_rejects_bad_input():
    st = _orbit_weight(8, 256, 4, seed=0)
    with pytest.raises(ValueError, match="byte-aligned"):
        T.lut_gemm(torch.randn(2, 256), st.codes, 3, 8, st.codebook.centroids, st.norms)
    with pytest.raises(ValueError, match="packed bytes"):
        T.lut_gemm(torch.randn(2, 256), st.codes, 4, 9, st.codebook.centroids, st.norms)


def test_gemm_supports_byte_aligned_widths_and_whole_k_tiles():
    assert T.gemm_supports(3072, 4) and T.gemm_supports(12288, 2) and T.gemm_supports(5120, 8)
    assert not T.gemm_supports(3072, 3)  # 3-bit codes straddle bytes
    assert not T.gemm_supports(96, 4) and not T.gemm_supports(3072 + 128, 4)  # no whole K-tile


def test_split_block_is_a_kronecker_factorisation():
    for h in (256, 512, 1024, 2048, 4096):
        a, b = T.split_block(h)
        assert a * b == h and a >= 16 and b >= a
        ha, hb = T._sylvester(a, "cpu"), T._sylvester(b, "cpu")
        x = torch.randn(3, h, dtype=torch.float64)
        from orbitquant.quant.rotation import fwht
        # H_h = H_A kron H_B: row-major (A, B) blocks transform as H_A X H_B
        got = (ha.double() @ x.view(3, a, b) @ hb.double()).reshape(3, h)
        torch.testing.assert_close(got, fwht(x, h))


# ----------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d,bits", [(3072, 4), (12288, 4), (5120, 8), (3072, 2)])
def test_gpu_kernels_and_layer(d, bits):
    import copy

    from orbitquant.quant.nn import QuantLinear

    x, rot, cb = _case(d, bits, rows=64, seed=d)
    rotc, cbc = copy.deepcopy(rot).cuda(), get_codebook(d, bits, device="cuda")
    xr = rot(x)
    s = torch.linalg.vector_norm(xr, dim=-1, keepdim=True)
    for gather in (True, False):
        y, finite = T.rotate_quantize(x.cuda(), rotc.perm, rotc.signs, rotc.h, cbc.thresholds, cbc.centroids,
                                      gather=gather)
        c, n, _ = T.rotate_quantize(x.cuda(), rotc.perm, rotc.signs, rotc.h, cbc.thresholds, cbc.centroids,
                                    codes=True, gather=gather)
        assert bool(finite)
        assert float((c.cpu().long() != cb.encode(xr / s)).float().mean()) < 1e-4  # near-ties only (WHT order)
        torch.testing.assert_close(n.cpu(), s[:, 0], rtol=1e-5, atol=0)
        assert float((~torch.isclose(y.cpu(), OrbitActQuant(cb)(xr), rtol=1e-4, atol=1e-4)).float().mean()) < 1e-4
    g = torch.Generator().manual_seed(d)
    w = torch.randn(256, d, generator=g) / math.sqrt(d)
    st = OrbitWeight(None, cb, weight=w, rotation=rot)
    st_gpu = OrbitWeight(None, cbc, weight=w.cuda(), rotation=rotc)  # quantized on the GPU
    idx = lambda s: __import__("orbitquant.quant.primitives", fromlist=["x"]).unpack_codes(s.codes.cpu(), bits, w.numel())
    assert float((idx(st) != idx(st_gpu)).float().mean()) < 1e-3
    ref_layer = QuantLinear(st, torch.randn(256, generator=g), OrbitActQuant(cb), rot, compute_dtype=torch.float32)
    y_ref = ref_layer(x).double()
    layer = copy.deepcopy(ref_layer)
    layer.compute_dtype = torch.bfloat16
    layer.cuda().refresh()
    for mode in ("fast", "compact"):
        layer.set_runtime(mode)
        out = layer(x.cuda().bfloat16()).double().cpu()
        rel = float((out - y_ref).norm() / y_ref.norm())
        assert rel < 1.5e-2, (mode, rel)  # bf16 operands (and code flips at near-ties)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_nonfinite_is_checked_once_per_denoiser_call():
    from orbitquant.quant.act import NonFiniteInput
    from orbitquant.quant.calib import denoiser_call
    from orbitquant.quant.nn import _DEFERRED, QuantLinear

    d = 1024
    rot, cb = RPBH(d, warn=False), get_codebook(d, 4)
    st = OrbitWeight(None, cb, weight=torch.randn(64, d), rotation=rot)
    layer = QuantLinear(st, None, OrbitActQuant(cb), rot, compute_dtype=torch.bfloat16, name="blk.0.fc1").cuda()
    x = torch.randn(8, d, device="cuda")
    with denoiser_call(3):
        layer(x)
        assert _DEFERRED  # flagged on the device, not checked yet
    assert not _DEFERRED
    x[2, 5] = float("nan")
    with pytest.raises(NonFiniteInput, match=r"blk\.0\.fc1.*sampler step 4"), denoiser_call(4):
        layer(x)  # no host sync here: the check runs when the call ends
    with pytest.raises(NonFiniteInput, match="blk.0.fc1"):
        layer(x)  # outside a sampler: checked at once
    with denoiser_call(5):
        layer(x.nan_to_num())  # the flag was reset
