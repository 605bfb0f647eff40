"""``svdquant``: SVDQuant (Li et al., ICLR 2025) with INT4 quantizers, as in BASELINES_SPEC section 8.5.

Per target linear, from calibration activations (the model's own sampler, every step and CFG half):

1. **Smoothing search** over ``(0, 0)``, ``(alpha, 0)`` and ``(alpha, 1 - alpha)`` for alpha in
   {1/n, ..., (n-1)/n} (n = ``alpha_grid`` = 20: 39 candidates): ``lam_j = absmax_X(j)^alpha /
   absmax_W(j)^beta``, ``W^ = W diag(lam)``, ``X^ = X / lam``.
2. **Low-rank split**: ``Q <- 0``; repeat ``L <- rank-r SVD of (W^ - Q)``, ``Q <- fq_w(W^ - L)`` while
   the layer output error ``||X W^T - (X^ L^T + fq_a(X^) Q^T)||`` improves (at most ``lowrank_iters``).
   Each smoothing candidate is scored with one split in place (the code's ``allow_low_rank``); the
   winner gets the full alternation (a speed deviation: 39 x 5 SVDs per layer would dominate).
3. **Weight range**: the INT4 recipe keeps the residual's absmax scale (deepcompressor ``calib_range``
   ``strategy: Manual, ratio: 1.0``: no search). ``clip_search=true`` instead searches the weight scale
   shrink in [1 - max_shrink, 1] over ``clip_grid`` points by the same output error (not upstream).
4. **Quantizers**: weights symmetric INT-b per group of ``group`` (64) input channels with bf16 scales;
   activations symmetric, dynamic, per token x group of 64; the rank-r branch ``L = U D`` in bf16 on the
   smoothed, unquantized input. Runtime: ``y = fq_a(x / lam) R_q^T + (x / lam) D^T U^T + b``.
5. **Shifted unsigned FFN down-projection** (``shift_down``, the INT4 recipe's ``pipeline.shift_activations:
   true`` + ``ipts.allow_unsigned: true``): the input of a GELU FFN's down-projection (roles ``ff.down``,
   ``ctx.ff.down``) is shifted by ``DOWN_SHIFT = 0.171875`` (deepcompressor's GELU lower bound, ``-0.17``
   rounded to a bf16/fp16-exact value) so it is non-negative, the bias absorbs ``- W 1 * shift`` (computed
   from the unquantized weight, as ``ShiftedLinear.from_linear``), and the layer (smoothing search, low-rank
   split, quantizers) is fitted on the shifted input with *unsigned* INT-b activations (codes [0, 2^b - 1],
   scale max / (2^b - 1) per token x group). Runtime: ``x' = x + shift``, then the formula above on ``x'``.
   Applied where calibration shows the input bounded below by ``-shift`` (a GELU-type FFN; a GLU FFN's
   down-projection is signed and stays as it is, as upstream's ``intermediate_lowerbound`` is None for GLU).
   A fused out-projection (role ``fused.out``, FLUX's single-block ``proj_out`` on ``cat(attn, mlp)``) gets
   the shift on its MLP half only (channels ``out_features:``, ``shift_fused``): signed groups on the
   attention half, unsigned on the shifted MLP half, as upstream's ``ConcatLinear`` split (which also gives
   each half its own smoothing and low-rank branch; here the layer keeps one of each).

The searches are measured on calibration tokens: by default (``reservoir=null``) a seeded uniform sample of
``calib_samples`` (128, deepcompressor's ``quant.calib.num_samples``) samples' worth of tokens per layer (a
sample: one image / video at one sampler step and CFG half, i.e. ``calib_samples x tokens-per-sample``
tokens), where upstream uses every token of its 128 calibration samples (``sample_size: -1``); an integer
``reservoir`` caps it at that many tokens (for memory on large models).

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

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from orbitquant.quant.act import ActQuantizer, ChannelScale, GroupActQuant, NonFiniteInput
from orbitquant.quant.calib import ActivationCollector
from orbitquant.quant.config import QuantConfig
from orbitquant.quant.methods.base import CollectingQuantizer
from orbitquant.quant.nn import LowRankQuantLinear
from orbitquant.quant.primitives import dequantize_groups, fake_quant_groups, quantize_groups
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import GroupWeight


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
    clip_search: bool = False  # False: weight scale ratio 1.0 (the INT4 recipe); True: search clip_grid shrinks
    clip_grid: int = 80
    max_shrink: float = 0.2
    reservoir: int | None = None  # None: calib_samples samples' worth of tokens per layer; an int caps the tokens
    calib_samples: int = 128  # deepcompressor quant.calib.num_samples
    shift_down: bool = True   # shifted, unsigned input of GELU FFN down-projections (the INT4 recipe)
    shift_fused: bool = True  # the same for the MLP half of a fused attention+MLP out-projection (FLUX proj_out)
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
        if (self.reservoir is not None and self.reservoir < 1) or self.calib_samples < 1:
            raise ValueError("reservoir (null or >= 1) and calib_samples (>= 1) must be positive")


#: deepcompressor's GELU lower bound (``FeedForwardConfigStruct.infer_lowerbound('gelu')``): the down-projection shift
DOWN_SHIFT = 0.171875
#: roles whose input is an FFN's activation output (a shift candidate)
DOWN_ROLES = ("ff.down", "ctx.ff.down")
#: a fused out-projection whose input is ``cat(attention output (out_features wide), MLP activation)``
FUSED_ROLES = ("fused.out",)


def fake_quant_groups_unsigned(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Unsigned round-to-nearest per row and contiguous group of ``group`` channels: codes [0, 2^b - 1], scale
    max / (2^b - 1), zero point 0 (deepcompressor's ``uint`` activations; negative values clamp to 0)."""
    xf = x.float()
    d = xf.shape[-1]
    g = d if group <= 0 or group >= d else group
    pad = (-d) % g
    xp = torch.nn.functional.pad(xf, (0, pad)).unflatten(-1, (-1, g))
    hi_q = (1 << bits) - 1
    scale = (xp.amax(dim=-1, keepdim=True) / hi_q).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(xp / scale), 0, hi_q) * scale
    return q.flatten(-2)[..., :d].to(x.dtype)


def fake_quant_groups_split(x: torch.Tensor, bits: int, group: int, start: int) -> torch.Tensor:
    """Symmetric signed groups on channels ``[:start]``, unsigned groups on the shifted ``[start:]`` (``start`` a
    multiple of ``group``): deepcompressor's ``ConcatLinear`` halves of a fused out-projection, each with its own
    input quantizer. ``start = 0``: all unsigned."""
    if start <= 0:
        return fake_quant_groups_unsigned(x, bits, group)
    return torch.cat([fake_quant_groups(x[..., :start], bits, True, group),
                      fake_quant_groups_unsigned(x[..., start:], bits, group)], dim=-1)


class UnsignedGroupActQuant(ActQuantizer):
    """Dynamic unsigned INT-b per token x channel group, for a shifted (non-negative) input; with ``start > 0``
    only channels ``[start:]`` (the shifted MLP half of a fused out-projection), the rest signed."""

    def __init__(self, bits: int, group: int, start: int = 0) -> None:
        super().__init__()
        self.bits, self.group, self.symmetric, self.start = bits, group, False, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        return fake_quant_groups_split(xf, self.bits, self.group, self.start)

    def bits_per_element(self, d: int) -> float:
        return self.bits + 16 / (self.group if 0 < self.group < d else d)  # fp16 scale per token and group

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={self.group}, unsigned=True" + (f", from={self.start}" if self.start else "")


class ShiftedChannelScale(nn.Module):
    """``(x + shift) * inv_scale`` per channel: the down-projection's shift (on channels ``[start:]``), then the
    smoothing."""

    def __init__(self, shift: float, inv_scale: torch.Tensor, start: int = 0) -> None:
        super().__init__()
        self.shift, self.start = float(shift), int(start)
        self.register_buffer("inv_scale", inv_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.start:
            xf = torch.cat([xf[..., :self.start], xf[..., self.start:] + self.shift], dim=-1)
        else:
            xf = xf + self.shift
        return xf * self.inv_scale

    def extra_repr(self) -> str:
        return f"shift={self.shift}" + (f", from={self.start}" if self.start else "")


@dataclass
class SampleCollector(ActivationCollector):
    """The shared collector with a per-layer reservoir of ``samples`` samples' worth of tokens (tokens per sample
    from the first input a layer sees: the product of its middle dims), capped at ``cap``; it also records the
    per-channel min/max of the ``bounded`` layers (the shift candidates)."""

    samples: int = 128
    cap: int | None = None
    bounded: frozenset = frozenset()
    sizes: dict = field(default_factory=dict)
    lo: dict = field(default_factory=dict)
    hi: dict = field(default_factory=dict)

    def _observe(self, fqn: str, x: torch.Tensor) -> None:
        if fqn not in self.sizes:
            per_sample = math.prod(x.shape[1:-1]) if x.dim() >= 3 else 1
            self.sizes[fqn] = min(self.samples * per_sample, self.cap or math.inf)
        if fqn in self.bounded:
            xf = x.detach().float().reshape(-1, x.shape[-1])
            lo, hi = xf.amin(dim=0).cpu(), xf.amax(dim=0).cpu()
            self.lo[fqn] = torch.minimum(self.lo[fqn], lo) if fqn in self.lo else lo
            self.hi[fqn] = torch.maximum(self.hi[fqn], hi) if fqn in self.hi else hi
        self.reservoir = self.sizes[fqn]
        super()._observe(fqn, x)


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


@register_method
class SVDQuantQuantizer(CollectingQuantizer):
    config_cls = SVDQuantConfig

    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        c: SVDQuantConfig = self.config
        self.layers = layers
        bounded = frozenset(r.fqn for r in layers if (c.shift_down and r.role in DOWN_ROLES)
                            or (c.shift_fused and r.role in FUSED_ROLES))
        self.collector = SampleCollector(reservoir=c.reservoir or 1, seed=c.seed, samples=c.calib_samples,
                                         cap=c.reservoir, bounded=bounded).attach(layers)

    def _shift(self, ref: LayerRef) -> tuple[float, int]:
        """``(shift, start)``: the input shift of ``ref`` and the first channel it applies to. ``DOWN_SHIFT``
        from channel 0 for a down-projection whose calibration input stayed at or above ``-DOWN_SHIFT``
        (GELU-type); for a fused out-projection (``cat(attn, mlp)``, attention ``out_features`` wide) from
        channel ``out_features`` when its MLP half stayed above, and the split falls on a group boundary,
        as upstream's ``ConcatLinear`` split; else ``(0.0, 0)``."""
        lo = self.collector.lo.get(ref.fqn)
        if lo is None:
            return 0.0, 0
        start = ref.module.out_features if ref.role in FUSED_ROLES else 0
        if start and (start >= lo.numel() or start % self.config.group):
            return 0.0, 0
        return (DOWN_SHIFT, start) if float(lo[start:].min()) >= -DOWN_SHIFT else (0.0, 0)

    def finish_calibration(self) -> dict:
        self.choices: dict[str, dict] = {}  # per layer: alpha, beta, clip, calibration error, extra params
        self._fitted: dict[str, dict] = {}  # group members fitted jointly, waiting for their quantize_layer
        c: SVDQuantConfig = self.config
        stats = self.collected()
        groups = shared_input_groups(self.layers, {f: st.absmax for f, st in stats.items()}) if c.share_qkv else []
        self.group_of = {r.fqn: g for g in groups for r in g}
        unshared = sum(c.rank * (r.module.in_features + r.module.out_features) for r in self.layers)
        shared = unshared - sum(c.rank * r.module.in_features for g in groups for r in g[1:])  # D once per group
        shifted = [r.fqn for r in self.layers if self._shift(r)[0]]
        return {"tokens_per_layer": min(st.tokens for st in stats.values()),
                "search_tokens_per_layer": min(len(st.reservoir) for st in stats.values()),
                "candidates": len(smoothing_candidates(c.alpha_grid)), "shared_qkv_groups": len(groups),
                "shifted_unsigned_layers": len(shifted), "extra_params": shared, "extra_params_unshared": unshared}

    def _fq_x(self, x_s: torch.Tensor, unsigned_from: int | None) -> torch.Tensor:
        """Activation fake-quant: signed groups, or unsigned from channel ``unsigned_from`` (shifted input)."""
        c: SVDQuantConfig = self.config
        if unsigned_from is None:
            return fake_quant_groups(x_s, c.a_bits, True, c.group)
        return fake_quant_groups_split(x_s, c.a_bits, c.group, unsigned_from)

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

    def _fit(self, x: torch.Tensor, w: torch.Tensor, ax: torch.Tensor,
             unsigned: int | None = None) -> tuple[float, dict]:
        """Smoothing search (each candidate scored with one low-rank split in place), then the iterative
        low-rank refinement for the winner. ``unsigned``: ``x[..., unsigned:]`` is a shifted, non-negative input."""
        c: SVDQuantConfig = self.config
        y = x @ w.T
        aw = w.abs().amax(dim=0).clamp_min(1e-5)
        best_err, best = float("inf"), {}
        for alpha, beta in smoothing_candidates(c.alpha_grid):
            lam = (ax.clamp_min(1e-5) ** alpha / aw ** beta).clamp_min(1e-5)
            x_s = x / lam
            err, _ = self._split(y, x_s, self._fq_x(x_s, unsigned), w * lam, 1)
            if err < best_err:
                best_err, best = err, {"alpha": alpha, "beta": beta, "lam": lam}
        x_s = x / best["lam"]
        x_q = self._fq_x(x_s, unsigned)
        best_err, best["lowrank"] = self._split(y, x_s, x_q, w * best["lam"], c.lowrank_iters)
        best.update(y=y, x_s=x_s, x_q=x_q)  # reused by the clip search
        return best_err, best

    def _clip(self, ch: dict, lr: torch.Tensor, resid: torch.Tensor) -> tuple[float, float]:
        """Weight range of the residual: ratio 1.0 (upstream), or with ``clip_search`` the shrink of least layer
        output error. Returns (shrink, its error)."""
        c: SVDQuantConfig = self.config
        search = c.clip_search and c.clip_grid > 1
        shrinks = torch.linspace(1.0 - c.max_shrink, 1.0, c.clip_grid).tolist() if search else [1.0]
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
            ax = st.absmax.to(w.device).float()
            shift, start = self._shift(ref)
            if shift:  # fit on the shifted input x + shift >= 0 (its absmax is max + shift)
                x, ax = x.clone(), ax.clone()
                x[:, start:] += shift
                ax[start:] = self.collector.hi[ref.fqn][start:].to(w.device).float() + shift
            _, ch = self._fit(x, w, ax, unsigned=start if shift else None)
            lam, lr = ch["lam"], ch["lowrank"]
            resid = w * lam - lr
            clip, err = self._clip(ch, lr, resid)
            self.choices[ref.fqn] = {"alpha": ch["alpha"], "beta": ch["beta"], "clip": clip, "calib_err": err,
                                     "extra_params": c.rank * (m.in_features + m.out_features)}
            up, down = self._factors(lr, m.out_features, m.in_features)
        bias, act, rot = m.bias, GroupActQuant(c.a_bits, c.group, symmetric=True), ChannelScale(1.0 / lam)
        shift, start = self._shift(ref)
        if shift and ref.fqn not in self.group_of:
            # ShiftedLinear: W (x + shift) + b - W 1 shift, the correction from the unquantized weight, in fp64
            corr = m.weight.detach().double()[:, start:].sum(dim=1) * shift
            bias = (-corr if m.bias is None else m.bias.detach().double() - corr).to(m.weight.dtype)
            act, rot = UnsignedGroupActQuant(c.a_bits, c.group, start), ShiftedChannelScale(shift, 1.0 / lam, start)
        return LowRankQuantLinear(GroupWeight(resid, c.w_bits, c.group, clip), bias, up, down, act=act,
                                  rotation=rot, compute_dtype=m.weight.dtype, name=ref.fqn,
                                  treatment=f"svdquant w{c.w_bits}a{c.a_bits} r{c.rank}"
                                  + (" shifted-unsigned" if shift else ""))
