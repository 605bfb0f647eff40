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


@functools.lru_cache(maxsize=None)
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

    def __init__(self, d: int, seed: int = 0, permute: bool = True) -> None:
        super().__init__(d)
        self.h = largest_pow2_divisor(d)
        self.seed = seed
        g = _generator(seed, d)
        perm = torch.randperm(d, generator=g) if permute else torch.arange(d)
        signs = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
        self.register_buffer("perm", perm)
        self.register_buffer("signs", signs)
        if self.h < min(SMALL_BLOCK_WARNING, d):
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
        self.register_buffer("q", q.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self._compute_dtype(x)
        return x.to(dt) @ self.q.to(dt).T


ROTATIONS: dict[str, type[Rotation]] = {
    "rpbh": RPBH, "hadamard": RandomizedHadamard, "haar": HaarRotation, "none": IdentityRotation,
}


def make_rotation(kind: str, d: int, seed: int = 0) -> Rotation:
    """Build a rotation by name: ``rpbh`` | ``hadamard`` | ``haar`` | ``none``."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")
    if kind == "none":
        return IdentityRotation(d)
    return ROTATIONS[kind](d, seed)
