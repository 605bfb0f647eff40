"""Orthogonal input rotations: RPBH (OrbitQuant), randomized Hadamard, dense Haar, identity.

All act on the last dimension of a tensor, so the same module rotates activation tokens at runtime
and weight rows offline: with ``W' = rot(W)`` (row-wise) and ``x' = rot(x)``, ``x' @ W'.T == x @ W.T``.

RPBH (randomized permuted block-Hadamard): gather by a seeded permutation, multiply by seeded
Rademacher signs, then a block-diagonal Walsh-Hadamard transform with blocks of h = the largest power
of two dividing d, scaled by 1/sqrt(h). The WHT is the reshape-based butterfly (log2 h stages of
adds/subtracts, O(d log h) per token); no dense d x d matrix is ever used at runtime.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: A block size below this mixes too few coordinates for the N(0, 1/d) marginal to be convincing.
SMALL_BLOCK_WARNING = 256


def largest_pow2_divisor(d: int) -> int:
    """h such that h is a power of two, h | d and 2h does not divide d."""
    if d < 1:
        raise ValueError(f"dimension must be positive, got {d}")
    return d & -d


def fwht(x: torch.Tensor, h: int) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform on contiguous blocks of ``h`` along the last dim.

    The butterfly runs log2(h) stages; each writes sums and differences of paired strided views into
    one of two ping-pong buffers (no per-stage concatenation). The input is not modified.
    """
    if h & (h - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {h}")
    shape = x.shape
    n = x.numel() // h
    src = x.reshape(n, h)
    if torch.is_grad_enabled() and x.requires_grad:  # out= ops are not differentiable: the same sums, stacked
        s = 1
        while s < h:
            a = src.view(n, h // (2 * s), 2, s)
            src, s = torch.stack((a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]), dim=2).reshape(n, h), 2 * s
        return src.view(shape)
    bufs = (torch.empty_like(src), torch.empty_like(src))
    s, k = 1, 0
    while s < h:
        a = src.view(n, h // (2 * s), 2, s)
        dst = bufs[k % 2]
        o = dst.view(n, h // (2 * s), 2, s)
        torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
        src, s, k = dst, 2 * s, k + 1
    return src.view(shape)


def _generator(seed: int, d: int) -> torch.Generator:
    # one stable stream per (seed, d): layers with the same input dim share their rotation
    state = np.random.SeedSequence([int(seed), int(d)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@functools.cache
def _warn_small_block(d: int, h: int) -> None:
    log.warning(
        "RPBH for d=%d uses Hadamard blocks of only h=%d (largest power of two dividing d); coordinates "
        "mix within %d-wide blocks, so the fixed-marginal assumption is weaker than at large h", d, h, h)


class Rotation(nn.Module):
    """An orthogonal transform of the last dimension (size ``d``)."""

    kind = "abstract"

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense (d, d) matrix R with rot(x) = x @ R.T (for tests and analysis only)."""
        return self(torch.eye(self.d, dtype=dtype)).T

    def extra_repr(self) -> str:
        return f"d={self.d}"


class IdentityRotation(Rotation):
    kind = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self._compute_dtype(x))


class RPBH(Rotation):
    """Randomized permuted block-Hadamard rotation: permute -> signs -> block FWHT -> 1/sqrt(h)."""

    kind = "rpbh"

    def __init__(self, d: int, seed: int = 0, permute: bool = True, warn: bool = True) -> None:
        super().__init__(d)
        self.h = largest_pow2_divisor(d)
        self.seed = seed
        g = _generator(seed, d)
        perm = torch.randperm(d, generator=g) if permute else torch.arange(d)
        signs = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
        # derived from (d, seed): not saved (a checkpoint records the seed; see orbitquant.quant.checkpoint)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("signs", signs, persistent=False)
        if warn and self.h < min(SMALL_BLOCK_WARNING, d):
            _warn_small_block(d, self.h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"{self.kind} rotation expects last dim {self.d}, got shape {tuple(x.shape)}")
        dt = self._compute_dtype(x)
        y = x.to(dt).index_select(-1, self.perm) * self.signs.to(dt)
        return fwht(y, self.h) * (1.0 / math.sqrt(self.h))

    def extra_repr(self) -> str:
        return f"d={self.d}, h={self.h}, seed={self.seed}"


class RandomizedHadamard(RPBH):
    """Signs + block Hadamard without the permutation (the plain randomized Hadamard of QuaRot-style methods)."""

    kind = "hadamard"

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__(d, seed, permute=False)


class HaarRotation(Rotation):
    """A dense Haar-random orthogonal matrix (QR of a Gaussian, sign-fixed): the O(d^2) reference."""

    kind = "haar"

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__(d)
        g = _generator(seed, d)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        self.register_buffer("q", q.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self._compute_dtype(x)
        return x.to(dt) @ self.q.to(dt).T


class TwoStageRPBH(Rotation):
    """Two independent RPBH draws in sequence. The second permutation carries every block's mass into
    other blocks, so an input outlier spreads over up to h^2 coordinates instead of h (O(2 d log h))."""

    kind = "rpbh2"

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__(d)
        self.stage1, self.stage2 = RPBH(d, seed, warn=False), RPBH(d, seed + 1_000_003, warn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x))


class KronRPBH(Rotation):
    """RPBH followed by a seeded Haar rotation across the m = d / h Hadamard blocks: the transform is
    ``(Q_m kron H_h / sqrt(h)) D P`` - permutation P, signs D, then a Kronecker product of the block
    Hadamard and a small dense Haar-random Q_m. Every output coordinate mixes all d inputs (like a dense
    Haar rotation) for O(d log h + d m) per token, with m the odd part of d (m = 15 for d = 1920 and
    3840, 35 for 8960, 3 for 3072); at m = 1 it is RPBH. Orthogonal, so it folds into the
    weights like RPBH. Our design for dims whose power-of-two block is small (issue: rotation study)."""

    kind = "rpbh_kron"

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__(d)
        self.rpbh = RPBH(d, seed, warn=False)
        self.h, self.m = self.rpbh.h, d // self.rpbh.h
        g = _generator(seed + 2_000_003, self.m)
        q, r = torch.linalg.qr(torch.randn(self.m, self.m, generator=g, dtype=torch.float64))
        self.register_buffer("q", q * torch.sign(torch.diagonal(r)), persistent=False)  # float64: m^2 numbers, exact orthogonality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rpbh(x)
        if self.m == 1:
            return y
        shape = y.shape
        y = y.reshape(-1, self.m, self.h)  # token, block, position in block
        return torch.matmul(self.q.to(y.dtype), y).reshape(shape)  # mix block k' into k at every position

    def extra_repr(self) -> str:
        return f"d={self.d}, h={self.h}, m={self.m}, seed={self.rpbh.seed}"


def paley_hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n = q + 1 for a prime q = 3 (mod 4) (Paley's first construction), float64."""
    q = n - 1
    if q < 3 or q % 4 != 3 or any(q % p == 0 for p in range(2, int(q ** 0.5) + 1)):
        raise ValueError(f"Paley I needs n - 1 prime and = 3 (mod 4), got n = {n}")
    chi = torch.tensor([0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, chi[idx]  # skew: S^T = -S
    return s + torch.eye(n, dtype=torch.float64)


def kron_factor(d: int) -> int | None:
    """The smallest n with d / n a power of two and a Paley Hadamard matrix of order n (n = 1 when d is a
    power of two); None if there is none (then no Hadamard matrix of order d is constructed here)."""
    odd = d // largest_pow2_divisor(d)
    if odd == 1:
        return 1
    n = odd
    while n <= d:
        if n % 4 == 0:
            try:
                paley_hadamard(n)
                return n
            except ValueError:
                pass
        n *= 2
    return None


class KronHadamard(Rotation):
    """QuaRot-style randomized full Hadamard: signs, then ``H_{2^k} kron H_n / sqrt(d)`` with H_n from Paley's
    construction, so every output mixes all d inputs with weights +-1/sqrt(d). Falls back to the block
    Hadamard (with a warning) when d has no such factor."""

    kind = "hadamard_kron"

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__(d)
        self.seed = seed
        g = _generator(seed, d)
        self.register_buffer("signs", torch.randint(0, 2, (d,), generator=g).float() * 2 - 1, persistent=False)
        n = kron_factor(d)
        if n is None:
            log.warning("hadamard_kron: no Paley factor for d=%d; using the block Hadamard (h=%d)", d,
                        largest_pow2_divisor(d))
            n = 1
        self.n, self.p = n, d // n if n > 1 else largest_pow2_divisor(d)
        self.register_buffer("hn", paley_hadamard(n).float() if n > 1 else torch.ones(1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self._compute_dtype(x)
        y = x.to(dt) * self.signs.to(dt)
        shape = y.shape
        if self.n == 1:
            return fwht(y, self.p) * (1.0 / math.sqrt(self.p))
        y = fwht(y.reshape(-1, self.n, self.p), self.p)  # H_{2^k} on the fast (power-of-two) index
        y = torch.matmul(self.hn.to(dt), y)  # H_n on the slow index
        return y.reshape(shape) * (1.0 / math.sqrt(self.d))

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}, seed={self.seed}"


ROTATIONS: dict[str, type[Rotation]] = {
    "rpbh": RPBH, "hadamard": RandomizedHadamard, "haar": HaarRotation, "none": IdentityRotation,
    "rpbh2": TwoStageRPBH, "rpbh_kron": KronRPBH, "hadamard_kron": KronHadamard,
}


def make_rotation(kind: str, d: int, seed: int = 0) -> Rotation:
    """Build a rotation by name (``ROTATIONS``): ``rpbh`` (paper) | ``hadamard`` | ``haar`` | ``none`` |
    ``rpbh2`` | ``rpbh_kron`` | ``hadamard_kron``."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")
    if kind == "none":
        return IdentityRotation(d)
    return ROTATIONS[kind](d, seed)
