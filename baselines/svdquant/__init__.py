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

**Shared-input groups** (``share_qkv``, as deepcompressor's ``exclusive: false``): the q/k/v linears of one
block (roles ``attn.q/k/v``; likewise ``ctx.q/k/v``) read the same input, checked on the collected
per-channel absmax (else they are fitted per layer). They are fitted as one linear ``W_cat = [Wq; Wk; Wv]``:
one smoothing vector ``lam`` (the search on ``W_cat``, objective the output error of the concatenated
output), one rank-r branch ``L_cat = U_cat D`` (shared ``D``; each layer keeps its rows of ``U_cat``), and
the residual quantized per layer with its own clip (searched per layer on its own output error: the group-64
weight quantizer never mixes rows, so this is the concatenated search with one clip per layer). The three
``LowRankQuantLinear`` hold ``D`` in one shared storage; each layer's ``nbytes`` still counts it (the
report's per-layer bytes are an upper bound), and the calibration facts give the branch parameters with
``D`` counted once per group: ``r (in + out_q + out_k + out_v)``.
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
    share_qkv: bool = True    # q/k/v of a block (same input) share one smoothing and one low-rank branch

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


#: shared-input groups: the q/k/v projections of one attention (same block), in this order
QKV_GROUPS = {"attn": ("attn.q", "attn.k", "attn.v"), "ctx": ("ctx.q", "ctx.k", "ctx.v")}


def shared_input_groups(layers: list[LayerRef], absmax: dict[str, torch.Tensor]) -> list[list[LayerRef]]:
    """The q/k/v groups (two or more members, same block and input width) whose collected per-channel
    absmax agree, i.e. that really read the same input; members in q, k, v order."""
    by_key: dict[tuple[int, str], list[LayerRef]] = {}
    for ref in layers:
        for kind, roles in QKV_GROUPS.items():
            if ref.role in roles and ref.block >= 0:
                by_key.setdefault((ref.block, kind), []).append(ref)
    groups = []
    for (_, kind), refs in sorted(by_key.items()):
        refs = sorted(refs, key=lambda r: QKV_GROUPS[kind].index(r.role))
        if len(refs) < 2 or len({r.role for r in refs}) != len(refs):
            continue
        a0 = absmax[refs[0].fqn]
        if all(r.module.in_features == refs[0].module.in_features and absmax[r.fqn].shape == a0.shape
               and torch.allclose(absmax[r.fqn], a0, rtol=1e-6, atol=0.0) for r in refs[1:]):
            groups.append(refs)
    return groups


def _output_error(y: torch.Tensor, x_s: torch.Tensor, x_q: torch.Tensor, lr: torch.Tensor, q: torch.Tensor) -> float:
    """Relative layer output error ``||y - (X^ L^T + fq_a(X^) Q^T)|| / ||y||``: the objective of every search."""
    return ((y - (x_s @ lr.T + x_q @ q.T)).norm() / y.norm()).item()


@register_method("svdquant")
class SVDQuantQuantizer(CollectingQuantizer):
    config_cls = SVDQuantConfig

    def finish_calibration(self) -> dict:
        self.choices: dict[str, dict] = {}  # per layer: alpha, beta, clip, calibration error, extra params
        self._fitted: dict[str, dict] = {}  # group members fitted jointly, waiting for their quantize_layer
        c: SVDQuantConfig = self.config
        stats = self.collected()
        groups = shared_input_groups(self.layers, {f: st.absmax for f, st in stats.items()}) if c.share_qkv else []
        self.group_of = {r.fqn: g for g in groups for r in g}
        unshared = sum(c.rank * (r.module.in_features + r.module.out_features) for r in self.layers)
        shared = unshared - sum(c.rank * r.module.in_features for g in groups for r in g[1:])  # D once per group
        return {"tokens_per_layer": min(st.tokens for st in stats.values()), "reservoir": c.reservoir,
                "candidates": len(smoothing_candidates(c.alpha_grid)), "shared_qkv_groups": len(groups),
                "extra_params": shared, "extra_params_unshared": unshared}

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

    def _clip(self, ch: dict, lr: torch.Tensor, resid: torch.Tensor) -> tuple[float, float]:
        """Clip search on the residual by the layer output error: (best shrink, its error)."""
        c: SVDQuantConfig = self.config
        shrinks = torch.linspace(1.0 - c.max_shrink, 1.0, c.clip_grid).tolist() if c.clip_grid > 1 else [1.0]
        errs = [_output_error(ch["y"], ch["x_s"], ch["x_q"], lr, self._fq_w(resid, s)) for s in shrinks]
        i = min(range(len(errs)), key=errs.__getitem__)
        return shrinks[i], errs[i]

    def _factors(self, lr: torch.Tensor, out: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``L = U D`` with ``U = u s`` (out, r) and ``D = vh`` (r, in)."""
        r = self.config.rank
        if not r:
            return torch.zeros(out, 0), torch.zeros(0, d)
        u, s, vh = torch.linalg.svd(lr.double(), full_matrices=False)
        return (u[:, :r] * s[:r]).float(), vh[:r].float()

    def _fit_group(self, group: list[LayerRef]) -> None:
        """Fit q/k/v jointly on ``W_cat``: one smoothing, one branch ``U_cat D``; residual and clip per layer.
        Runs at the group's first ``quantize_layer``, while every member still has its weights."""
        c: SVDQuantConfig = self.config
        ws = [r.module.weight.detach().float() for r in group]
        w = torch.cat(ws)
        st = self.collector.stats[group[0].fqn]  # same input: the first member's reservoir serves all
        x = st.reservoir.to(w.device).float()
        _, ch = self._fit(x, w, st.absmax.to(w.device).float())
        lam, lr = ch["lam"], ch["lowrank"]
        up_cat, down = self._factors(lr, w.shape[0], w.shape[1])
        down = down.to(torch.bfloat16)  # one tensor: the members' lr_down buffers share its storage
        rows = 0
        for ref, wi in zip(group, ws):
            sl = slice(rows, rows + wi.shape[0])
            rows += wi.shape[0]
            part = {"y": ch["y"][:, sl], "x_s": ch["x_s"], "x_q": ch["x_q"]}
            resid = wi * lam - lr[sl]
            clip, err = self._clip(part, lr[sl], resid)
            first = ref is group[0]
            self._fitted[ref.fqn] = {"lam": lam, "resid": resid, "clip": clip, "up": up_cat[sl], "down": down}
            self.choices[ref.fqn] = {"alpha": ch["alpha"], "beta": ch["beta"], "clip": clip, "calib_err": err,
                                     "group": [r.fqn for r in group],
                                     "extra_params": c.rank * (wi.shape[0] + (wi.shape[1] if first else 0))}

    def quantize_layer(self, ref: LayerRef) -> LowRankQuantLinear:
        c: SVDQuantConfig = self.config
        m = ref.module
        if ref.fqn in self.group_of:
            if ref.fqn not in self._fitted:
                self._fit_group(self.group_of[ref.fqn])
            f = self._fitted.pop(ref.fqn)
            lam, resid, clip, up, down = f["lam"], f["resid"], f["clip"], f["up"], f["down"]
        else:
            st = self.collector.stats[ref.fqn]
            w = m.weight.detach().float()
            x = st.reservoir.to(w.device).float()
            _, ch = self._fit(x, w, st.absmax.to(w.device).float())
            lam, lr = ch["lam"], ch["lowrank"]
            resid = w * lam - lr
            clip, err = self._clip(ch, lr, resid)
            self.choices[ref.fqn] = {"alpha": ch["alpha"], "beta": ch["beta"], "clip": clip, "calib_err": err,
                                     "extra_params": c.rank * (m.in_features + m.out_features)}
            up, down = self._factors(lr, m.out_features, m.in_features)
        return LowRankQuantLinear(GroupWeight(resid, c.w_bits, c.group, clip), m.bias, up, down,
                                  act=GroupActQuant(c.a_bits, c.group, symmetric=True),
                                  rotation=ChannelScale(1.0 / lam), compute_dtype=m.weight.dtype, name=ref.fqn,
                                  treatment=f"svdquant w{c.w_bits}a{c.a_bits} r{c.rank}")
