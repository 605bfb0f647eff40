"""GPTQ (Frantar et al., ICLR 2023) with contiguous input-channel groups, as Q-DiT uses it.

Columns are quantized left to right; each column's rounding error is propagated to the columns not
yet quantized through the inverse Hessian ``H = 2 X^T X / n`` (Cholesky form, dampened), in blocks
of ``blocksize`` columns (lazy batch updates). Group scales are taken from the *updated* weights when
a group starts, as in the reference implementation (no act-order).
"""

from __future__ import annotations

import torch


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` for calibration inputs ``x`` of shape (n, d), in float64 for a stable Cholesky."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * x.T @ x / len(x)


def rtn_groups(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest on the same grid as :func:`gptq_quantize` (one scale per row and input group),
    without error propagation: the baseline GPTQ must beat."""
    w = w.detach().double()
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], group):
        grp = w[:, g0:g0 + group]
        for j in range(grp.shape[1]):
            out[:, g0 + j] = _quant_like(grp[:, j], grp, bits, symmetric)
    return out.float()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool = False,
                  blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The GPTQ-quantized (dequantized, fp32) weight for ``w`` (out, in) given the input Hessian ``h`` (in, in)."""
    w = w.detach().double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight input dim {cols}")
    dead = torch.diagonal(h) == 0  # channels never active in calibration: no information, quantize as zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scale_src = None
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1, err1, hinv1 = w[:, b0:b1].clone(), torch.zeros_like(w[:, b0:b1]), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # group scales from the current (error-updated) weights
                g1 = min(col + group, cols)
                scale_src = torch.cat([w1[:, i:], w[:, b1:]], dim=1)[:, : g1 - col]
            wq = _quant_like(w1[:, i], scale_src, bits, symmetric)
            q[:, col] = wq
            e = (w1[:, i] - wq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return q.float()


def _quant_like(col: torch.Tensor, group_cols: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize one column with the per-row scale of its group (computed from ``group_cols``)."""
    tiny = 1e-12
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (group_cols.abs().amax(dim=1) / qmax).clamp_min(tiny)
        return torch.clamp(torch.round(col / scale), -qmax - 1, qmax) * scale
    lo, hi = group_cols.amin(dim=1).clamp(max=0), group_cols.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(tiny)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(col / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
