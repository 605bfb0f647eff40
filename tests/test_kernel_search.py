"""The native kernel's codebook search on its own (``orbit_cpu().encode``): it must return exactly
``torch.bucketize(u, thresholds)`` -- the contract of ``Codebook.encode`` -- for every code path it has
(the |u| search of symmetric codebooks up to 32 levels, the full search of other small codebooks, the
uniform grid above), in the vector lanes and in the scalar tail, on thresholds, one ulp either side of them,
+-0, subnormals and +-inf."""

from __future__ import annotations

import math

import pytest
import torch

from orbitquant.kernels import orbit_cpu
from orbitquant.quant.codebook import Codebook, get_codebook


@pytest.fixture(scope="module")
def kernel():
    k = orbit_cpu()
    assert k is not None, "the native CPU kernel did not build (see the warning in the log)"
    return k


def _probes(cb: Codebook, g: torch.Generator, scale: float) -> torch.Tensor:
    t = cb.thresholds
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 3e38, -3e38, math.inf, -math.inf])
    u = torch.cat([torch.randn(4001, generator=g) * scale, torch.rand(401, generator=g) * 4 - 2, t,
                   torch.nextafter(t, torch.full_like(t, math.inf)), torch.nextafter(t, torch.full_like(t, -math.inf)),
                   cb.centroids, special.repeat(9)])
    return u[torch.randperm(len(u), generator=g)]  # specials land in vector lanes and in the tail


def _check(kernel, cb: Codebook, u: torch.Tensor) -> None:
    ref = torch.bucketize(u, cb.thresholds)
    got = kernel.encode(u, *cb.kernel_args(), False)
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref), u[got.long() != ref][:8]
    assert torch.equal(kernel.encode(u, *cb.kernel_args(), True), cb.centroids[ref])
    assert torch.equal(cb.encode(u), ref)  # the torch path's grid, on the same probes


@pytest.mark.parametrize("d", [2, 3, 96, 3072])
@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_search_is_bucketize_on_lloyd_max_codebooks(kernel, d, bits):
    g = torch.Generator().manual_seed(d * 10 + bits)
    _check(kernel, get_codebook(d, bits), _probes(get_codebook(d, bits), g, 1 / math.sqrt(d)))


@pytest.mark.parametrize("levels", [2, 4, 8, 16, 32, 64, 256])
def test_kernel_search_is_bucketize_on_asymmetric_codebooks(kernel, levels):
    g = torch.Generator().manual_seed(levels)
    cb = Codebook(torch.sort(torch.randn(levels, generator=g))[0])
    _check(kernel, cb, _probes(cb, g, 2.0))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17])
def test_kernel_search_handles_short_inputs(kernel, n):
    cb = get_codebook(64, 4)
    _check(kernel, cb, torch.linspace(-0.5, 0.5, n))
