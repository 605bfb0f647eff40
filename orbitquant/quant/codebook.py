"""Lloyd-Max codebooks for the coordinate marginal of a uniform random unit vector in R^d.

A coordinate Z of a uniform point on the sphere S^{d-1} has density
``f_d(z) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) (1 - z^2)^((d-3)/2)`` on [-1, 1], i.e.
``Z^2 ~ Beta(1/2, (d-1)/2)``; it tends to N(0, 1/d). OrbitQuant quantizes every coordinate of a
rotated, normalised vector with the Lloyd-Max (MSE-optimal scalar) codebook of that density.

The codebook is symmetric, so only the 2^(b-1) positive centroids are solved for, on [0, 1] with a
fixed threshold at 0. We run a few over-relaxed Lloyd sweeps and then Newton's method on the
fixed-point equations ``c_i = E[Z | t_{i-1} < Z < t_i]`` with the exact tridiagonal Jacobian, which
converges quadratically where plain Lloyd iteration needs thousands of sweeps at >= 4 bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy import special

MAX_BITS = 8


def _check(d: int, bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if not isinstance(d, int) or d < 2:
        raise ValueError(f"dimension d must be an integer >= 2, got {d!r}")


class _HalfDensity:
    """The law of |Z| on [0, upper]: mass, first moment and density of an interval, vectorised."""

    upper: float
    second_moment: float

    def mass(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray: ...
    def moment(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray: ...
    def pdf(self, t: np.ndarray) -> np.ndarray: ...
    def quantile(self, p: np.ndarray) -> np.ndarray: ...


class _SphereCoordinate(_HalfDensity):
    def __init__(self, d: int) -> None:
        self.a, self.b = 0.5, (d - 1) / 2.0
        self.d = d
        self.upper = 1.0
        self.second_moment = 1.0 / d
        # log of 2 * Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)): the half-line density's constant
        self.log_c = math.log(2.0) + special.gammaln(d / 2) - special.gammaln((d - 1) / 2) - 0.5 * math.log(math.pi)

    def mass(self, lo, hi):
        lo2, hi2 = lo * lo, hi * hi
        inner = special.betainc(self.a, self.b, hi2) - special.betainc(self.a, self.b, lo2)
        outer = special.betaincc(self.a, self.b, lo2) - special.betaincc(self.a, self.b, hi2)
        # take the difference of the smaller tail values to avoid cancellation
        med = special.betaincinv(self.a, self.b, 0.5)
        return np.where(lo2 < med, inner, outer)

    def moment(self, lo, hi):
        # int_lo^hi z * 2 f_d(z) dz = 2 C_d [(1-lo^2)^((d-1)/2) - (1-hi^2)^((d-1)/2)] / (d-1)
        e = (self.d - 1) / 2.0
        with np.errstate(divide="ignore"):
            pw = lambda x: np.exp(e * np.log1p(-np.minimum(x * x, 1.0)))  # noqa: E731
            return np.exp(self.log_c) * (pw(lo) - pw(hi)) / (self.d - 1)

    def pdf(self, t):
        with np.errstate(divide="ignore"):
            return np.exp(self.log_c + (self.d - 3) / 2.0 * np.log1p(-np.minimum(t * t, 1.0)))

    def quantile(self, p):
        return np.sqrt(special.betaincinv(self.a, self.b, p))


class _Gaussian(_HalfDensity):
    """|N(0, 1)|: the d -> infinity limit (after scaling by sqrt(d))."""

    upper = math.inf
    second_moment = 1.0

    def mass(self, lo, hi):
        return 2.0 * (special.ndtr(-lo) - special.ndtr(-hi))

    def moment(self, lo, hi):
        phi = lambda x: np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
        return 2.0 * (phi(lo) - phi(hi))

    def pdf(self, t):
        return 2.0 * np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    def quantile(self, p):
        return special.ndtri(0.5 + 0.5 * p)


def _solve(dens: _HalfDensity, n: int, scale: float, tol: float = 1e-13, max_newton: int = 200) -> np.ndarray:
    """Positive Lloyd-Max centroids (n of them) for ``dens``; ``scale`` is the natural size of a coordinate."""
    c = dens.quantile((np.arange(n) + 0.5) / n)

    def cells(c):
        t = np.concatenate([[0.0], 0.5 * (c[:-1] + c[1:]), [dens.upper]])
        return t[:-1], t[1:]

    def update(c):
        lo, hi = cells(c)
        p = dens.mass(lo, hi)
        return dens.moment(lo, hi) / p, p, lo, hi

    for _ in range(30):  # over-relaxed Lloyd sweeps: a safe start for Newton
        m = update(c)[0]
        c = np.sort(c + 1.5 * (m - c))
        c = np.clip(c, 0.0, dens.upper if math.isfinite(dens.upper) else None)
        c = np.maximum.accumulate(c)
    for _ in range(max_newton):
        m, p, lo, hi = update(c)
        resid = c - m
        if np.max(np.abs(resid)) < tol * scale:
            break
        # d m_i / d t for the cell's two ends; interior thresholds move by 1/2 of each neighbour
        hi_in = np.where(np.arange(n) < n - 1, hi, 0.0)  # the outer end (1 or inf) does not move
        d_hi = np.where(np.arange(n) < n - 1, dens.pdf(hi_in) * (hi_in - m) / p, 0.0)
        d_lo = np.where(np.arange(n) > 0, dens.pdf(lo) * (m - lo) / p, 0.0)
        jac = np.eye(n)
        for i in range(n):
            jac[i, i] -= 0.5 * (d_lo[i] + d_hi[i])
            if i > 0:
                jac[i, i - 1] -= 0.5 * d_lo[i]
            if i < n - 1:
                jac[i, i + 1] -= 0.5 * d_hi[i]
        step = np.linalg.solve(jac, resid)
        lam, base = 1.0, np.max(np.abs(resid))
        while lam > 1e-4:  # damped: keep centroids ordered and the residual falling
            cand = c - lam * step
            if np.all(np.diff(cand) > 0) and cand[0] > 0 and np.max(np.abs(cand - update(cand)[0])) < base:
                break
            lam *= 0.5
        c = cand
    else:
        raise RuntimeError(f"Lloyd-Max did not converge (n={n}, residual {np.max(np.abs(resid)):.3e})")
    return c


@functools.lru_cache(maxsize=None)
def _lloyd_max_np(d: int | None, bits: int) -> tuple[np.ndarray, float]:
    n = 2 ** (bits - 1)
    dens: _HalfDensity = _Gaussian() if d is None else _SphereCoordinate(d)
    scale = 1.0 if d is None else 1.0 / math.sqrt(d)
    pos = _solve(dens, n, scale)
    lo = np.concatenate([[0.0], 0.5 * (pos[:-1] + pos[1:])])
    hi = np.concatenate([lo[1:], [dens.upper]])
    mse = dens.second_moment - float(np.sum(dens.mass(lo, hi) * pos * pos))
    return np.concatenate([-pos[::-1], pos]), mse


def lloyd_max(d: int, bits: int) -> torch.Tensor:
    """Sorted Lloyd-Max centroids (float64, length 2^bits) for a coordinate of a random unit vector in R^d.

    Decision thresholds are the midpoints between adjacent centroids. Cached by ``(d, bits)``.
    """
    _check(d, bits)
    return torch.from_numpy(_lloyd_max_np(d, bits)[0].copy())


def lloyd_max_gaussian(bits: int) -> torch.Tensor:
    """Sorted Lloyd-Max centroids (float64) for N(0, 1); divide by sqrt(d) for the N(0, 1/d) approximation."""
    _check(2, bits)
    return torch.from_numpy(_lloyd_max_np(None, bits)[0].copy())


def distortion(d: int, bits: int) -> float:
    """Per-coordinate MSE of :func:`lloyd_max`; ``d * distortion(d, b)`` = E||u - Q(u)||^2 for a random unit u."""
    _check(d, bits)
    return _lloyd_max_np(d, bits)[1]


def _cell(u: torch.Tensor, lo: float, inv_width: float) -> torch.Tensor:
    """``floor((u - lo) * inv_width)`` in float32, unclamped: the grid cell of ``Codebook.encode`` and of the
    native kernel (``lo`` and ``inv_width`` are float32 values, so no operand rounds differently)."""
    return ((u - lo) * inv_width).floor_()


def _grid(t: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(lo, inv_width, cells of the sorted float32 thresholds ``t``) with at most one threshold per cell."""
    if len(t) == 1:
        return float(t[0]), 1.0, torch.zeros(1, dtype=torch.long)
    width = float((t[1:].double() - t[:-1].double()).min()) / 2
    lo = float(t[0])
    for _ in range(8):  # half the smallest gap leaves one threshold per cell; rounding would need a finer grid
        inv = float(torch.tensor(1.0 / width, dtype=torch.float32))
        cells = _cell(t, lo, inv).long()
        if bool((cells[1:] > cells[:-1]).all()):
            return lo, inv, cells
        width /= 2
    raise RuntimeError("codebook thresholds too close for a lookup grid")  # not reachable for Lloyd-Max tables


class Codebook(torch.nn.Module):
    """A scalar codebook as buffers: exact nearest-centroid quantization against the midpoint thresholds.

    ``encode`` returns ``#{thresholds t : t < u}`` (what ``torch.bucketize`` returns), but computes it
    with a uniform-grid lookup table instead of a binary search, which is ~10x slower on CPU. The cell of u
    is ``cell(u) = clamp(floor((u - lo) * inv_width))`` in float32, and the tables are built by applying that
    same float32 function to the thresholds. ``cell`` is monotone (each float op rounds monotonically), so
    every threshold in an earlier cell is below u and every one in a later cell is above it; the grid is
    fine enough that each cell holds at most one threshold. Hence two gathers and one comparison give the
    exact count, with no rounding fix-up: ``idx = base[cell(u)] + (u > inside[cell(u)])``. The native
    kernel evaluates the same float32 expression on the same tables (``kernel_args``).
    """

    def __init__(self, centroids: torch.Tensor) -> None:
        super().__init__()
        c = centroids.to(torch.float64)
        t = (0.5 * (c[:-1] + c[1:])).float()  # the grid is built on the thresholds actually compared against
        self.register_buffer("centroids", c.float(), persistent=False)
        self.register_buffer("thresholds", t, persistent=False)
        lo, inv_width, cells = _grid(t)
        n_cells = int(cells[-1]) + 1
        base = torch.searchsorted(cells, torch.arange(n_cells, dtype=cells.dtype), right=False)
        inside = torch.full((n_cells,), math.inf, dtype=torch.float32)
        inside[cells] = t
        self.lo, self.inv_width, self.n_cells = lo, inv_width, n_cells
        self.register_buffer("_base", base, persistent=False)
        self.register_buffer("_base32", base.int(), persistent=False)  # the native kernel's copy
        self.register_buffer("_inside", inside, persistent=False)

    @property
    def bits(self) -> int:
        return int(math.log2(len(self.centroids)))

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for every element (int64); equals ``torch.bucketize(u, thresholds)``.

        Inputs must not be NaN (callers check: ``QuantLinear`` on activations, ``quantize_`` on weights).
        """
        flat = u.reshape(-1).float()  # 1-D index_select is several times faster than advanced indexing on CPU
        j = _cell(flat, self.lo, self.inv_width).clamp_(0, self.n_cells - 1).long()
        idx = self._base.index_select(0, j)
        idx += flat > self._inside.index_select(0, j)
        return idx.view(u.shape)

    def kernel_args(self) -> tuple:
        """The tables the native kernel searches (``orbitquant.kernels``): same thresholds, same answers."""
        return self.thresholds, self.centroids, self._base32, self._inside, self.lo, self.inv_width

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.centroids.index_select(0, idx.reshape(-1)).view(idx.shape)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(u))

    def extra_repr(self) -> str:
        return f"levels={len(self.centroids)}"


@functools.lru_cache(maxsize=None)
def _codebook(d: int, bits: int, density: str, device: str) -> Codebook:
    if density == "beta":
        c = lloyd_max(d, bits)
    elif density == "gaussian":
        c = lloyd_max_gaussian(bits) / math.sqrt(d)
    else:
        raise ValueError(f"unknown codebook density {density!r}; use 'beta' (exact) or 'gaussian' (N(0,1/d))")
    return Codebook(c).to(device)


def get_codebook(d: int, bits: int, density: str = "beta", device: str | torch.device = "cpu") -> Codebook:
    """The shared :class:`Codebook` for ``(d, bits)`` on ``device``: one instance serves every layer of that dim."""
    _check(d, bits)
    return _codebook(d, bits, density, str(torch.device(device)))
