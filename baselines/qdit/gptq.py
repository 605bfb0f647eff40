"""GPTQ (Frantar et al., ICLR 2023) with contiguous input-channel groups, as Q-DiT uses it.

Columns are quantized left to right; each column's rounding error is propagated to the columns not
yet quantized through the inverse Hessian ``H = 2 X^T X / n`` (Cholesky form, dampened), in blocks
of ``blocksize`` columns (lazy batch updates), no act-order. Scales are rounded to fp16 while
quantizing, so the stored (fp16-scale) weight is exactly the one GPTQ compensated for.

Group scales (``scales_from="block_start"``, the default): as in the official code (``Q-DiT``'s
``qdit/gptq.py``, inherited from IST-DASLab's GPTQ), a group's scale/zero are computed when the group
starts from ``W[:, col:col + group]`` of the full weight matrix, which the lazy batch update refreshes
only at block boundaries: columns of the current block are read *before* the error feedback of the
block's earlier columns, columns beyond it after every completed block's. With ``group`` a multiple of
``blocksize`` (g = 128, block 128) every group starts a block and the two readings coincide; a group
starting inside a block (g = 32, 64, 192, 288) differs. ``scales_from="updated"`` reads the weights
with every update so far applied (not the reference; kept for the ablation in UPSTREAM.md).
"""

from __future__ import annotations

import torch

from orbitquant.quant.weights import GroupedCodes


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` for calibration inputs ``x`` of shape (n, d), in float64 for a stable Cholesky."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * x.T @ x / len(x)


def rtn_groups(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> GroupedCodes:
    """Round-to-nearest on the same grid as :func:`gptq_quantize` (one scale per row and input group),
    without error propagation: the baseline GPTQ must beat."""
    w = w.detach().double()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.int64, device=w.device)
    n_groups = -(-cols // group)
    scales = torch.empty(rows, n_groups, dtype=torch.float64, device=w.device)
    zeros = torch.zeros_like(scales)
    for k, g0 in enumerate(range(0, cols, group)):
        grp = w[:, g0:g0 + group]
        scales[:, k], zeros[:, k] = _group_params(grp, bits, symmetric)
        codes[:, g0:g0 + group] = _encode(grp, scales[:, k:k + 1], zeros[:, k:k + 1], bits, symmetric)
    return GroupedCodes(codes, scales, None if symmetric else zeros, bits, group, symmetric)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool = False,
                  blocksize: int = 128, percdamp: float = 0.01, scales_from: str = "block_start") -> GroupedCodes:
    """GPTQ codes and group scales for ``w`` (out, in) given the input Hessian ``h`` (in, in)."""
    if scales_from not in ("block_start", "updated"):
        raise ValueError(f"scales_from must be 'block_start' or 'updated', got {scales_from!r}")
    w = w.detach().double().clone()
    h = h.to(w.device).double().clone()
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight input dim {cols}")
    dead = torch.diagonal(h) == 0  # channels never active in calibration: no information, quantize as zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=w.device)
    n_groups = -(-cols // group)
    scales = torch.zeros(rows, n_groups, dtype=torch.float64, device=w.device)
    zeros = torch.zeros_like(scales)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1, err1, hinv1 = w[:, b0:b1].clone(), torch.zeros_like(w[:, b0:b1]), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            k = col // group
            if col % group == 0:  # group scales from w as of this block's start (see the module docstring)
                src = torch.cat([w1[:, i:], w[:, b1:]], dim=1) if scales_from == "updated" else w[:, col:]
                scales[:, k], zeros[:, k] = _group_params(src[:, :group], bits, symmetric)
            s, z = scales[:, k:k + 1], zeros[:, k:k + 1]
            c = _encode(w1[:, i:i + 1], s, z, bits, symmetric)
            codes[:, col] = c[:, 0]
            wq = ((c - z) * s)[:, 0]
            e = (w1[:, i] - wq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return GroupedCodes(codes, scales, None if symmetric else zeros, bits, group, symmetric)


def _group_params(group_cols: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of one group: absmax / (2^(b-1)-1), or min/max (range including 0) with an
    integer zero point. Scales are rounded to fp16, the precision they are stored in."""
    tiny = 1e-5  # Q-DiT's scale floor
    if symmetric:
        scale = (group_cols.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).clamp_min(tiny)
        return scale.half().double(), torch.zeros_like(scale)
    lo, hi = group_cols.amin(dim=1).clamp(max=0), group_cols.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(tiny).half().double()
    return scale, torch.round(-lo / scale).clamp(0, 2 ** bits - 1)


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if symmetric:
        q = 2 ** (bits - 1)
        return torch.clamp(torch.round(x / scale), -q, q - 1).long()
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1).long()
