"""Triton kernels for OrbitQuant on GPU: the fused activation pass and a LUT-dequant GEMM.

``rotate_quantize``: one program per token does the whole activation path of the paper in one pass over
the token: gather by the RPBH permutation, Rademacher signs, block Walsh-Hadamard transform, 1/sqrt(h),
token norm, nearest Lloyd-Max centroid, rescale. The block WHT runs on the matrix units: with
h = A * B (both powers of two, >= 16) the Sylvester Hadamard matrix factors as ``H_h = H_A kron H_B``, so a
block viewed row-major as an (A, B) matrix X transforms as ``H_A @ X @ H_B`` (two small ``tl.dot`` s).
The token norm is taken on the input (the rotation is orthogonal, so it is the rotated norm up to fp32
rounding); the codebook search is a b-step binary search over the midpoint thresholds, which returns
``#{t < u}`` exactly as ``torch.bucketize`` and :meth:`orbitquant.quant.codebook.Codebook.encode` do.

``lut_gemm``: ``y = a @ (n * C[codes]).T + bias`` straight from the packed codes (2, 4 or 8 bits, our
little-endian stream, which for byte-aligned widths is a row-major (N, K * bits / 8) uint8 matrix): each
K-tile of codes is unpacked and its centroids gathered from the 2^b-entry table in the GEMM's prologue,
the row norms applied once in the epilogue. Resident weight bytes are the packed codes (b bits per weight)
plus bf16 norms; no dequantized copy of the weight exists at any time.

Both kernels also run under Triton's interpreter on CPU tensors (``interpret=True``), which is how the
CPU test suite checks them against the torch reference; GPU timings are in ``results/bench/``.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # Triton is optional: a CPU-only install has no use for it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

#: the smallest Hadamard block the matrix-unit WHT handles (tl.dot needs dims >= 16)
MIN_BLOCK = 256


def available() -> bool:
    """Whether Triton is importable (a GPU is needed to run compiled; the interpreter runs on CPU)."""
    return triton is not None


def supports(d: int, h: int) -> bool:
    """Whether :func:`rotate_quantize` handles a rotation of dim ``d`` with Hadamard block ``h``."""
    return triton is not None and h >= MIN_BLOCK and d % h == 0 and h & (h - 1) == 0


def split_block(h: int) -> tuple[int, int]:
    """(A, B) with A * B = h, both powers of two, A <= B, as square as possible."""
    a = 1 << (int(math.log2(h)) // 2)
    return a, h // a


@functools.cache
def _sylvester(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


# --------------------------------------------------------------------------------------------- kernels
def _rotate_quantize_kernel(x_ptr, pidx_ptr, ha_ptr, hb_ptr, thr_ptr, cent_ptr,
                            y_ptr, codes_ptr, norms_ptr, bad_ptr,
                            stride_x, stride_y, eps, inv_sqrt_h, D: tl.constexpr, N_BLOCKS: tl.constexpr,
                            A: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
                            D_PAD: tl.constexpr, PRECISION: tl.constexpr, GATHER: tl.constexpr,
                            ABLATE: tl.constexpr = 0):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_x
    offs = tl.arange(0, D_PAD)
    # one coalesced read of the token; its norm is the rotated norm (the rotation is orthogonal)
    xr = tl.load(xrow + offs, mask=offs < D, other=0.0).to(tl.float32)
    s = tl.sqrt(tl.sum(xr * xr, axis=0))
    # NaN fails s == s; Inf exceeds any finite float: flag the batch, the caller raises
    tl.store(bad_ptr, 1, mask=(s != s) | (s > 3.0e38))
    scale = inv_sqrt_h / (s + eps)
    ia = tl.arange(0, A)
    ib = tl.arange(0, B)
    ha = tl.load(ha_ptr + ia[:, None] * A + ia[None, :])
    hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
    loc = ia[:, None] * B + ib[None, :]  # position inside a block, row-major (A, B)
    for blk in range(0, N_BLOCKS):
        base = blk * (A * B)
        # pidx = source channel with the Rademacher sign in bit 30 (one int32 per coordinate)
        pi = tl.load(pidx_ptr + base + loc)
        src = pi & 0x3FFFFFFF
        sg = tl.where((pi >> 30) != 0, -1.0, 1.0)
        # ABLATE (benchmarks only): bit 1 skips the search, 2 the dots, 4 the permutation
        if ABLATE & 4:
            xv = tl.load(xrow + base + loc).to(tl.float32) * sg
        elif GATHER:  # permute the token held in registers (shared memory), not through global loads
            xv = tl.reshape(tl.gather(xr, tl.reshape(src, [A * B]), 0), [A, B]) * sg
        else:
            xv = tl.load(xrow + src).to(tl.float32) * sg
        if ABLATE & 2:
            u = xv * scale
        else:
            z = tl.dot(xv, hb, input_precision=PRECISION)  # X @ H_B
            u = tl.dot(ha, z, input_precision=PRECISION) * scale  # H_A @ X @ H_B / sqrt(h) / ||x||
        idx = tl.zeros([A, B], dtype=tl.int32)
        if ABLATE & 1:
            idx = (u > 0).to(tl.int32)
        else:
            for k in tl.static_range(BITS):  # binary search: idx = #{thresholds < u}
                step = 1 << (BITS - 1 - k)
                t = tl.load(thr_ptr + idx + (step - 1))
                idx = tl.where(u > t, idx + step, idx)
        if MODE == 0:
            q = tl.load(cent_ptr + idx) * s
            tl.store(y_ptr + row * stride_y + base + loc, q.to(y_ptr.dtype.element_ty))
        else:
            tl.store(codes_ptr + row * stride_y + base + loc, idx.to(tl.uint8))
    if MODE != 0:
        tl.store(norms_ptr + row, s)


def _rotate_quantize_rows_kernel(x_ptr, pidx_ptr, ha_ptr, hb_ptr, thr_ptr, cent_ptr,
                                 y_ptr, codes_ptr, norms_ptr, bad_ptr,
                                 n_rows, stride_x, stride_y, eps, inv_sqrt_h, D: tl.constexpr, N_BLOCKS: tl.constexpr,
                                 A: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
                                 BM: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """BM tokens per program: the WHT's two products run on (BM*A, B) and (BM*B, A) tiles, not 32 x 32 ones."""
    H: tl.constexpr = A * B
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < n_rows
    xrows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros([BM], dtype=tl.float32)
    for c in tl.static_range(0, D, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        v = tl.load(xrows + offs[None, :], mask=rmask[:, None] & (offs < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    s = tl.sqrt(acc)
    tl.store(bad_ptr + rows * 0, rows * 0 + 1, mask=rmask & ((s != s) | (s > 3.0e38)))
    scale = inv_sqrt_h / (s + eps)
    ia = tl.arange(0, A)
    ib = tl.arange(0, B)
    ha = tl.load(ha_ptr + ia[:, None] * A + ia[None, :])
    hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
    j = tl.arange(0, H)
    for blk in tl.static_range(N_BLOCKS):
        pi = tl.load(pidx_ptr + blk * H + j)
        sg = tl.where((pi >> 30) != 0, -1.0, 1.0)
        xv = tl.load(xrows + (pi & 0x3FFFFFFF)[None, :], mask=rmask[:, None], other=0.0).to(tl.float32) * sg[None, :]
        z = tl.dot(tl.reshape(xv, [BM * A, B]), hb, input_precision=PRECISION)  # X @ H_B, all BM tokens at once
        zt = tl.reshape(tl.permute(tl.reshape(z, [BM, A, B]), (0, 2, 1)), [BM * B, A])
        yt = tl.dot(zt, ha, input_precision=PRECISION)  # (Z^T H_A)[b, a] = (H_A Z)[a, b]: H_A is symmetric
        u = tl.reshape(tl.permute(tl.reshape(yt, [BM, B, A]), (0, 2, 1)), [BM, H]) * scale[:, None]
        idx = tl.zeros([BM, H], dtype=tl.int32)
        for k in tl.static_range(BITS):  # binary search: idx = #{thresholds < u}
            step = 1 << (BITS - 1 - k)
            t = tl.load(thr_ptr + idx + (step - 1))
            idx = tl.where(u > t, idx + step, idx)
        offs_out = rows.to(tl.int64)[:, None] * stride_y + blk * H + j[None, :]
        if MODE == 0:
            q = tl.load(cent_ptr + idx) * s[:, None]
            tl.store(y_ptr + offs_out, q.to(y_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            tl.store(codes_ptr + offs_out, idx.to(tl.uint8), mask=rmask[:, None])
    if MODE != 0:
        tl.store(norms_ptr + rows, s, mask=rmask)


def _lut_gemm_kernel(a_ptr, codes_ptr, lut_ptr, norms_ptr, bias_ptr, c_ptr, M, N, stride_am, stride_cm,
                     K: tl.constexpr,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    CPB: tl.constexpr = 8 // BITS  # codes per byte
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)  # grouped launch order: programs sharing weight tiles run together (L2)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // CPB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    kb = K // CPB  # bytes per weight row
    w_ptrs = codes_ptr + offs_n[:, None].to(tl.int64) * kb + offs_b[None, :]
    shifts = tl.arange(0, CPB) * BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        packed = tl.load(w_ptrs, mask=mask_n[:, None], other=0).to(tl.int32)
        codes = (packed[:, :, None] >> shifts[None, None, :]) & MASK  # (BN, BK/CPB, CPB): stream order
        w = tl.load(lut_ptr + tl.reshape(codes, [BLOCK_N, BLOCK_K]))  # centroid gather, compute dtype
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // CPB
    acc = acc * tl.load(norms_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_GEMM_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); autotuned per (M, N, K) on the GPU
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 128, 4, 3), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3),
]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before triton was
    imported: Triton's own library functions are decorated at import time)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


#: the largest K-tile the autotuner may pick: K must be a multiple of it
MAX_BLOCK_K = max(c[2] for c in _GEMM_CONFIGS)


def gemm_supports(k: int, bits: int) -> bool:
    """Whether :func:`lut_gemm` takes a weight with ``k`` input features packed at ``bits`` (autotuned tiles)."""
    return triton is not None and bits in (2, 4, 8) and k % MAX_BLOCK_K == 0


@functools.cache
def _compiled(interpret: bool):
    """The two kernels, compiled for the GPU or (``interpret``) as the interpreter's functions."""
    if triton is None:
        raise RuntimeError("Triton is not installed: `pip install triton` (it comes with CUDA builds of torch)")
    if interpret:  # triton.jit gives interpreted functions under TRITON_INTERPRET; no autotuning there
        return triton.jit(_rotate_quantize_kernel), triton.jit(_lut_gemm_kernel), \
            triton.jit(_rotate_quantize_rows_kernel)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
               for m, n, k, w, s in _GEMM_CONFIGS]
    gemm = triton.autotune(configs, key=["M", "N", "K"])(triton.jit(_lut_gemm_kernel))
    return triton.jit(_rotate_quantize_kernel), gemm, triton.jit(_rotate_quantize_rows_kernel)


def _interpret(*tensors: torch.Tensor) -> bool:
    devs = {t.device.type for t in tensors}
    if devs == {"cuda"}:
        return False
    if devs == {"cpu"}:
        if not interpreting():
            raise ValueError("Triton kernels run on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                             "triton is first imported (the test suite does)")
        return True
    raise ValueError(f"Triton kernels need all tensors on one CUDA device (or all on CPU for the interpreter), "
                     f"got {sorted(devs)}")


# ----------------------------------------------------------------------------------------- entry points
def perm_index(perm: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The kernel's per-coordinate table: source channel ``perm[i]`` with bit 30 set where ``signs[i] < 0``."""
    return (perm.to(torch.int32) | ((signs < 0).to(torch.int32) << 30)).contiguous()


def _pidx(perm: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    # cached on the perm tensor itself (a cache keyed by address could serve a freed rotation's table to a new
    # one at the same address); it holds the signs tensor it was built from
    cached = getattr(perm, "_orbitquant_pidx", None)
    if cached is None or cached[0] is not signs:
        cached = (signs, perm_index(perm, signs))
        perm._orbitquant_pidx = cached
    return cached[1]


#: activation-kernel defaults, chosen on an H100 (scripts/bench_gpu.py --variants, results/bench/gpu-*.md): one
#: token per program, fp32-FMA products, the token permuted in registers (0.151 ms for 4608 x 3072, the
#: fastest exact variant; 0.90 ms for 4608 x 12288 with 8 warps). The batched variant (``rows=8``, tf32x3:
#: 0.200 / 0.877 ms) is no clear gain, so it is opt-in. ``None`` = these defaults.
DEFAULT_PRECISION: str | None = None
DEFAULT_GATHER = True
DEFAULT_ROWS: int | None = None


def _defaults(h: int) -> tuple[str, int]:
    return DEFAULT_PRECISION or "ieee", DEFAULT_ROWS if DEFAULT_ROWS is not None else 0


def rotate_quantize(x: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, h: int, thresholds: torch.Tensor,
                    centroids: torch.Tensor, eps: float = 1e-10, codes: bool = False,
                    out_dtype: torch.dtype | None = None, precision: str | None = None,
                    gather: bool | None = None, num_warps: int | None = None, rows: int | None = None,
                    flag: torch.Tensor | None = None, _ablate: int = 0):
    """OrbitQuant's activation pass on rows of ``x`` (..., d).

    ``codes=False``: the fake-quantized rotated rows ``||x|| * C[idx]`` in ``out_dtype`` (default x's dtype),
    plus a 0-dim bool tensor that is False when a row was NaN/Inf. ``codes=True``: (uint8 codes (..., d),
    fp32 norms (...), finite flag). ``precision`` is the dots' ``input_precision`` ("ieee": fp32 FMA; "tf32x3":
    fp32-accurate on tensor cores; "tf32": faster, ~1e-3 relative error in the rotated values); ``gather``
    permutes the token in registers (True) or by gathered global loads (False); ``rows`` > 0 batches that many
    tokens per program. ``flag`` (an int32 device tensor): NaN/Inf is recorded there (set to 1) instead, and
    the returned finite flag is None, so the caller need not synchronize.
    """
    d = x.shape[-1]
    if not supports(d, h):
        raise ValueError(f"the Triton activation kernel needs a power-of-two Hadamard block >= {MIN_BLOCK} "
                         f"dividing d; got d={d}, h={h} (use the torch path)")
    interpret = _interpret(x, perm)
    rq, _, rq_rows = _compiled(interpret)
    xf = x.reshape(-1, d)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    n = xf.shape[0]
    a, b = split_block(h)
    dev = str(x.device)
    ha, hb = _sylvester(a, dev), _sylvester(b, dev)
    bad = flag if flag is not None else torch.zeros(1, dtype=torch.int32, device=x.device)
    if codes:
        out = torch.empty(n, d, dtype=torch.uint8, device=x.device)
        norms = torch.empty(n, dtype=torch.float32, device=x.device)
        y = out
    else:
        y = torch.empty(n, d, dtype=out_dtype or x.dtype, device=x.device)
        out, norms = y, bad  # unused pointers in mode 0
    if n:
        default_precision, default_rows = _defaults(h)
        precision = precision or default_precision
        rows = default_rows if rows is None else rows
        if rows:
            bm = max(1, min(rows, 8192 // h))
            rq_rows[(triton.cdiv(n, bm),)](xf, _pidx(perm, signs), ha, hb, thresholds, centroids, y, out, norms, bad,
                                           n, xf.stride(0), d, eps, 1.0 / math.sqrt(h), D=d, N_BLOCKS=d // h, A=a,
                                           B=b, BITS=int(math.log2(centroids.numel())), MODE=1 if codes else 0,
                                           BM=bm, CHUNK=min(1024, triton.next_power_of_2(d)),
                                           PRECISION=precision, num_warps=num_warps or 8)
            n = 0  # done
    if n:
        d_pad = triton.next_power_of_2(d)
        rq[(n,)](xf, _pidx(perm, signs), ha, hb, thresholds, centroids, y, out, norms, bad,
                 xf.stride(0), d, eps, 1.0 / math.sqrt(h), D=d, N_BLOCKS=d // h, A=a, B=b,
                 BITS=int(math.log2(centroids.numel())), MODE=1 if codes else 0, D_PAD=d_pad,
                 PRECISION=precision, GATHER=DEFAULT_GATHER if gather is None else gather,
                 num_warps=num_warps or (4 if d_pad <= 4096 else 8), ABLATE=_ablate)
    finite = None if flag is not None else bad[0] == 0
    if codes:
        return out.view(*x.shape[:-1], d), norms.view(x.shape[:-1]), finite
    return y.view(*x.shape[:-1], d), finite


def lut_gemm(a: torch.Tensor, packed: torch.Tensor, bits: int, n_out: int, centroids: torch.Tensor,
             norms: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
             block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``a @ (norms[:, None] * centroids[codes]).T + bias`` with ``codes`` the (n_out, K) weight indices in
    the packed stream (``bits`` in 2, 4, 8; K a multiple of the K-tile). ``a`` (..., K) is cast to the
    centroid table's dtype (bf16/fp16 for tensor cores); the output is ``out_dtype`` (default a's dtype).
    ``block`` fixes (BLOCK_M, BLOCK_N, BLOCK_K) (the interpreter uses a small one; the GPU autotunes)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"lut_gemm reads byte-aligned streams: bits must be 2, 4 or 8, got {bits}")
    k = a.shape[-1]
    if packed.numel() != n_out * k * bits // 8:
        raise ValueError(f"{packed.numel()} packed bytes do not hold a ({n_out}, {k}) matrix of {bits}-bit codes")
    interpret = _interpret(a, packed)
    _, gemm, _ = _compiled(interpret)
    a2 = a.reshape(-1, k).to(centroids.dtype)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m = a2.shape[0]
    out = torch.empty(m, n_out, dtype=out_dtype or a.dtype, device=a.device)
    if interpret and block is None:
        block = (16, 32, 32)
    kw = {}
    if block is not None:
        bm, bn, bk = block
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4}
    min_k = block[2] if block is not None else MAX_BLOCK_K
    if k % min_k:
        raise ValueError(f"lut_gemm needs K divisible by its K-tile ({min_k}); got K={k}")

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    if m:
        fn = gemm.fn if (block is not None and not interpret) else gemm  # a fixed tile skips the autotuner
        fn[grid](a2, packed, centroids, norms, bias if bias is not None else norms, out, m, n_out,
                 a2.stride(0), out.stride(0), K=k, BITS=bits, HAS_BIAS=bias is not None, **kw)
    return out.view(*a.shape[:-1], n_out)
