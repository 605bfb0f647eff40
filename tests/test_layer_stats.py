"""The layer-error diagnostics: SQNR is the relative error in dB, and the KS distance of normalized
coordinates to N(0, 1) is small after a rotation and large on outlier-channel inputs before it."""

from __future__ import annotations

import math

import torch
from torch import nn

import orbitquant as oq
from orbitquant.quant.layer_stats import ks_to_normal, normalized_coordinates, rotation_ks
from orbitquant.quant.primitives import relative_error, sqnr_db
from orbitquant.quant.rotation import make_rotation


def test_sqnr_is_minus_twenty_log10_of_the_relative_error():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 32, generator=g)
    yq = y + 0.05 * torch.randn(64, 32, generator=g)
    assert math.isclose(sqnr_db(y, yq), -20 * math.log10(relative_error(y, yq)), rel_tol=1e-9)


def _outlier_tokens(d: int = 512, n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 60.0  # four channels carry most of each token's energy
    return x


def test_ks_small_after_haar_rotation_and_large_on_raw_outlier_tokens():
    x = _outlier_tokens()
    raw = ks_to_normal(normalized_coordinates(x))
    haar = ks_to_normal(normalized_coordinates(make_rotation("haar", 512, 0)(x)))
    assert raw > 0.25 and haar < 0.02
    ks_rot, ks_raw = rotation_ks(make_rotation("rpbh", 512, 0), x)
    assert ks_raw == raw and ks_rot < raw / 5
    assert rotation_ks(None, x) == (None, None)


def test_quantize_records_sqnr_for_every_layer_and_ks_only_for_rotated_ones():
    torch.manual_seed(2)
    mk = lambda: nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))  # noqa: E731
    orbit = oq.quantize_(mk(), oq.OrbitConfig(w_bits=4, a_bits=4))
    rtn = oq.quantize_(mk(), oq.RTNConfig(w_bits=4, a_bits=4))
    for r in orbit.layers:
        assert math.isclose(r.sqnr_db, -20 * math.log10(r.rel_err), rel_tol=1e-6)
        assert r.ks_rot is not None and r.ks_raw is not None
    assert all(r.ks_rot is None and r.sqnr_db is not None for r in rtn.layers)
    s, t = orbit.summary(), rtn.summary()
    assert s["mean_sqnr_db"] > t["mean_sqnr_db"] - 10 and s["mean_ks_rot"] is not None
    assert t["mean_ks_rot"] is None and t["min_sqnr_db"] <= t["mean_sqnr_db"]
