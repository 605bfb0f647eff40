"""``svdquant``: SVDQuant (Li et al., ICLR 2025) with INT4 quantizers, as in BASELINES_SPEC section 8.5.

Per target linear, from calibration activations (the model's own sampler, every step and CFG half):

1. **Smoothing search** over ``(0, 0)``, ``(alpha, 0)`` and ``(alpha, 1 - alpha)`` for alpha in
   {1/n, ..., (n-1)/n} (n = ``alpha_grid`` = 20: 39 candidates): ``lam_j = absmax_X(j)^alpha /
   absmax_W(j)^beta``, ``W^ = W diag(lam)``, ``X^ = X / lam``.
2. **Low-rank split**: ``Q <- 0``; repeat ``L <- rank-r SVD of (W^ - Q)``, ``Q <- fq_w(W^ - L)`` while
   the layer output error ``||X W^T - (X^ L^T + fq_a(X^) Q^T)||`` improves (at most ``lowrank_iters``).
   Each smoothing candidate is scored with one split in place (the code's ``allow_low_rank``); the
   winner gets the full alternation (a speed deviation: 39 x 5 SVDs per layer would dominate).
3. **Clip search** on the residual ``R = W^ - L``: the weight scale shrink in [1 - max_shrink, 1] over
   ``clip_grid`` points, by the same output error.
4. **Quantizers**: weights symmetric INT-b per group of ``group`` (64) input channels with bf16 scales;
   activations symmetric, dynamic, per token x group of 64; the rank-r branch ``L = U D`` in bf16 on the
   smoothed, unquantized input. Runtime: ``y = fq_a(x / lam) R_q^T + (x / lam) D^T U^T + b``.

Errors are measured on a seeded reservoir of ``reservoir`` calibration tokens per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from orbitquant.config import QuantConfig
from orbitquant.methods.base import CollectingQuantizer
from orbitquant.nn import ChannelScale, GroupActQuant, GroupWeight, LowRankQuantLinear
from orbitquant.primitives import dequantize_groups, fake_quant_groups, quantize_groups
from orbitquant.registry import register_method
from orbitquant.types import LayerRef


@dataclass(frozen=True)
class SVDQuantConfig(QuantConfig):
    method: ClassVar[str] = "svdquant"
    w_bits: int = 4
    a_bits: int = 4
    rank: int = 32
    group: int = 64
    alpha_grid: int = 20      # smoothing candidates: (0,0), (a,0), (a,1-a) for a = k / alpha_grid
    lowrank_iters: int = 5    # the code allows 100 with early stop; it stops within a few on our models
    exact_svd: bool = False   # False: torch.svd_lowrank (q = rank + 10, 4 power iterations); True: full SVD
    clip_grid: int = 80
    max_shrink: float = 0.2
    reservoir: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.w_bits <= 8 or not 2 <= self.a_bits <= 8:
            raise ValueError("svdquant uses symmetric INT quantizers: w_bits and a_bits must be in 2..8")
        if self.rank < 0 or self.group < 1 or self.alpha_grid < 2 or self.lowrank_iters < 1 or self.clip_grid < 1:
            raise ValueError("rank >= 0, group >= 1, alpha_grid >= 2, lowrank_iters >= 1 and clip_grid >= 1")
        if not 0 <= self.max_shrink < 1:
            raise ValueError("max_shrink must be in [0, 1)")


def smoothing_candidates(n: int) -> list[tuple[float, float]]:
    """(alpha, beta) pairs of deepcompressor's grid search: (0, 0), (a, 0) and (a, 1 - a), a = k / n."""
    alphas = [k / n for k in range(1, n)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in alphas] + [(a, 1.0 - a) for a in alphas]


def low_rank(m: torch.Tensor, rank: int, exact: bool, seed: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``m`` (randomized unless ``exact``)."""
    if rank == 0:
        return torch.zeros_like(m)
    if exact or rank >= min(m.shape) - 10:
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(m.dtype)
    torch.manual_seed(seed)  # svd_lowrank draws its sketch from the global generator
    u, s, v = torch.svd_lowrank(m, q=rank + 10, niter=4)
    return (u[:, :rank] * s[:rank]) @ v[:, :rank].T


def _output_error(y: torch.Tensor, x_s: torch.Tensor, x_q: torch.Tensor, lr: torch.Tensor, q: torch.Tensor) -> float:
    """Relative layer output error ``||y - (X^ L^T + fq_a(X^) Q^T)|| / ||y||``: the objective of every search."""
    return ((y - (x_s @ lr.T + x_q @ q.T)).norm() / y.norm()).item()


@register_method("svdquant")
class SVDQuantQuantizer(CollectingQuantizer):
    config_cls = SVDQuantConfig

    def finish_calibration(self) -> dict:
        self.choices: dict[str, dict] = {}  # per layer: alpha, beta, clip, calibration error, extra params
        stats = self.collected()
        return {"tokens_per_layer": min(st.tokens for st in stats.values()), "reservoir": self.config.reservoir,
                "candidates": len(smoothing_candidates(self.config.alpha_grid))}

    def _fq_w(self, w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
        codes, scales = quantize_groups(w, self.config.w_bits, self.config.group, clip)
        return dequantize_groups(codes, scales.to(torch.bfloat16), self.config.group)

    def _split(self, y, x_s, x_q, w_s, iters: int) -> tuple[float, torch.Tensor]:
        """Alternate ``L <- SVD_r(W^ - Q)``, ``Q <- fq_w(W^ - L)`` while the output error improves."""
        c: SVDQuantConfig = self.config
        q, prev, keep = torch.zeros_like(w_s), float("inf"), None
        for it in range(iters):
            lr = low_rank(w_s - q, c.rank, c.exact_svd, c.seed + it)
            q_new = self._fq_w(w_s - lr)
            err = _output_error(y, x_s, x_q, lr, q_new)
            if err >= prev:  # early stop at the first non-improvement
                break
            prev, q, keep = err, q_new, lr
        return prev, keep

    def _fit(self, x: torch.Tensor, w: torch.Tensor, ax: torch.Tensor) -> tuple[float, dict]:
        """Smoothing search (each candidate scored with one low-rank split in place), then the iterative
        low-rank refinement for the winner."""
        c: SVDQuantConfig = self.config
        y = x @ w.T
        aw = w.abs().amax(dim=0).clamp_min(1e-5)
        best_err, best = float("inf"), {}
        for alpha, beta in smoothing_candidates(c.alpha_grid):
            lam = (ax.clamp_min(1e-5) ** alpha / aw ** beta).clamp_min(1e-5)
            x_s = x / lam
            err, _ = self._split(y, x_s, fake_quant_groups(x_s, c.a_bits, True, c.group), w * lam, 1)
            if err < best_err:
                best_err, best = err, {"alpha": alpha, "beta": beta, "lam": lam}
        x_s = x / best["lam"]
        x_q = fake_quant_groups(x_s, c.a_bits, True, c.group)
        best_err, best["lowrank"] = self._split(y, x_s, x_q, w * best["lam"], c.lowrank_iters)
        best.update(y=y, x_s=x_s, x_q=x_q)  # reused by the clip search
        return best_err, best

    def quantize_layer(self, ref: LayerRef) -> LowRankQuantLinear:
        c: SVDQuantConfig = self.config
        m = ref.module
        st = self.collector.stats[ref.fqn]
        w = m.weight.detach().float()
        x = st.reservoir.to(w.device).float()
        _, ch = self._fit(x, w, st.absmax.to(w.device).float())
        lam, lr = ch["lam"], ch["lowrank"]
        # clip search on the residual, by the same output error
        resid = w * lam - lr
        shrinks = torch.linspace(1.0 - c.max_shrink, 1.0, c.clip_grid).tolist() if c.clip_grid > 1 else [1.0]
        errs = [_output_error(ch["y"], ch["x_s"], ch["x_q"], lr, self._fq_w(resid, s)) for s in shrinks]
        clip = shrinks[min(range(len(errs)), key=errs.__getitem__)]
        self.choices[ref.fqn] = {"alpha": ch["alpha"], "beta": ch["beta"], "clip": clip,
                                 "calib_err": min(errs), "extra_params": c.rank * (m.in_features + m.out_features)}
        if c.rank:
            u, s, vh = torch.linalg.svd(lr.double(), full_matrices=False)
            up, down = (u[:, :c.rank] * s[:c.rank]).float(), vh[:c.rank].float()
        else:
            up, down = torch.zeros(m.out_features, 0), torch.zeros(0, m.in_features)
        return LowRankQuantLinear(GroupWeight(resid, c.w_bits, c.group, clip), m.bias, up, down,
                                  act=GroupActQuant(c.a_bits, c.group, symmetric=True),
                                  rotation=ChannelScale(1.0 / lam), compute_dtype=m.weight.dtype, name=ref.fqn,
                                  treatment=f"svdquant w{c.w_bits}a{c.a_bits} r{c.rank}")
