"""PTQ4DiT's numerics: Spearman-weighted salience balancing (CSB + SSC) and the percentile-MSE uniform
quantizers (static per-tensor asymmetric activations, per-output-channel asymmetric weights)."""

from __future__ import annotations

import torch

from orbitquant.quant.act import ActQuantizer, NonFiniteInput
from orbitquant.quant.primitives import pack_codes, unpack_codes
from orbitquant.quant.weights import WeightStore

#: Q-Diffusion / PTQ4DiT ``scale_method='mse'`` candidates: quantile clips of both tails
PERCENTILES = (0.999, 0.9999, 0.99999)
#: the smallest step size (PTQ4DiT clamps at 1e-8)
MIN_DELTA = 1e-8


# --------------------------------------------------------------------------------------------- CSB + SSC
def rankdata(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor with ties given their average rank (``scipy.stats.rankdata``)."""
    v = v.double().flatten()
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of each group's last member
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(v)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (0 when either is constant: undefined there)."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return 0.0 if den == 0 else float((ra @ rb).item() / den)


def ssc_weights(sx: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSC: ``rho_t = Spearman(sX_t, sW)`` per row of ``sx`` (T, d) and ``eta = softmax(-rho)`` (T,)."""
    rho = torch.tensor([spearman(row, sw) for row in sx], dtype=torch.float64)
    return rho, torch.softmax(-rho, dim=0)


def balance_scale(sx: torch.Tensor, sw: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """CSB: ``B = sqrt(sX / sW)`` per input channel, so ``max|X_j| / B_j == max|W_j| B_j == sqrt(sX_j sW_j)``.
    Both saliences are clamped at ``eps`` (a dead channel must not give B = 0 or inf)."""
    return (sx.double().clamp_min(eps) / sw.double().clamp_min(eps)).sqrt().float()


# ------------------------------------------------------------------------------ percentile-MSE uniform
def quantile_sorted(xs: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of an already-sorted (rows, n) tensor: the ``q`` quantile, linear interpolation
    (``torch.quantile``'s default), without its 16M-element limit."""
    n = xs.shape[1]
    pos = q * (n - 1)
    i = min(int(pos), n - 1)
    j = min(i + 1, n - 1)
    frac = pos - i
    return xs[:, i] + frac * (xs[:, j] - xs[:, i])


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, integer zero point) of the asymmetric grid spanning [lo, hi] with 2^bits levels (Q-Diffusion's
    ``quantize(x, max, min)``: the zero point is not clamped into the code range)."""
    delta = ((hi - lo) / (2**bits - 1)).clamp_min(MIN_DELTA)
    return delta, torch.round(-lo / delta)


def fake_quant_affine(x: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / delta) + zero, 0, 2^b - 1) - zero) * delta``."""
    return (torch.clamp(torch.round(x / delta) + zero, 0, 2**bits - 1) - zero) * delta


def percentile_range(x: torch.Tensor, bits: int, percentiles: tuple[float, ...] = PERCENTILES,
                     per_row: bool = False, minmax: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipping range with the least L2 fake-quant error among the quantile clips ``[q(1 - p), q(p)]`` for
    ``p`` in ``percentiles`` (the official code's ``scale_method='mse'``: only these candidates, its min/max is
    computed but never scored), plus the plain min/max when ``minmax`` (an ablation); per row of a 2-D ``x``
    or for the whole tensor.

    Returns ``(lo, hi, choice)`` with shapes (rows,) or (1,); ``choice`` k is the k-th candidate in the order
    [min/max (only with ``minmax``)] + ``percentiles``; ties go to the earliest.
    """
    x2 = x.float().reshape(x.shape[0], -1) if per_row else x.float().reshape(1, -1)
    xs = torch.sort(x2, dim=1).values
    cands = [(quantile_sorted(xs, 1.0 - p), quantile_sorted(xs, p)) for p in percentiles]
    if minmax:
        cands.insert(0, (xs[:, 0], xs[:, -1]))
    if not cands:
        raise ValueError("percentile_range needs at least one candidate (percentiles or minmax)")
    errs = []
    for lo, hi in cands:
        delta, zero = affine_params(lo[:, None], hi[:, None], bits)
        errs.append((fake_quant_affine(x2, delta, zero, bits) - x2).pow(2).sum(dim=1))
    choice = torch.stack(errs).argmin(dim=0)  # ties: the earliest candidate
    rows = torch.arange(x2.shape[0])
    lo = torch.stack([c[0] for c in cands])[choice, rows]
    hi = torch.stack([c[1] for c in cands])[choice, rows]
    return lo, hi, choice


# ----------------------------------------------------------------------------------------- runtime modules
class StaticAffineActQuant(ActQuantizer):
    """Static per-tensor asymmetric activation quantizer: one step ``delta`` and zero point from calibration."""

    def __init__(self, bits: int, delta: float, zero: float) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("delta", torch.tensor(float(delta)))
        self.register_buffer("zero", torch.tensor(float(zero)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not torch.isfinite(xf.abs().amax()):
            raise NonFiniteInput("activation contains NaN or Inf")
        return fake_quant_affine(xf, self.delta, self.zero, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, delta={self.delta.item():.4g}, zero={self.zero.item():.0f}"


class AffineWeight(WeightStore):
    """Per-output-channel asymmetric weights: packed b-bit codes in [0, 2^b), fp32 step and fp32 (integer
    valued) zero point per row; dequantized as ``(code - zero) * step``."""

    symmetric, granularity = False, "channel"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits, self.shape = bits, tuple(codes.shape)
        self.register_buffer("codes", pack_codes(codes.to(torch.int32).cpu(), bits).to(codes.device))
        self.register_buffer("scale", scale.reshape(-1).float())
        self.register_buffer("zero", zero.reshape(-1).float())

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    shape: tuple[int, int]) -> AffineWeight:
        self = cls.__new__(cls)
        WeightStore.__init__(self)
        self.bits, self.shape = bits, tuple(shape)
        if (packed.numel() != -(-shape[0] * shape[1] * bits // 8) or scale.numel() != shape[0]
                or zero.numel() != shape[0]):
            raise ValueError(f"saved weights do not fit shape {shape} at {bits} bits")
        self.register_buffer("codes", packed)
        self.register_buffer("scale", scale.reshape(-1).float())
        self.register_buffer("zero", zero.reshape(-1).float())
        return self

    def dequantize(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        q = unpack_codes(self.codes.cpu(), self.bits, n).view(self.shape).to(self.scale.device).float()
        return (q - self.zero[:, None]) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, asymmetric, per channel"
