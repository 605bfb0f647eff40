"""Parity checks of the baselines (see each baselines/<name>/UPSTREAM.md)."""

from __future__ import annotations

import copy

import torch

import orbitquant as oq
from baselines.hadamard_rtn import HadamardRTNConfig
from orbitquant.primitives import relative_error


def _mlp(seed=0, d=384):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))


def _outlier_tokens(n=256, d=384, scale=30.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= scale  # a few large channels, as in real DiT activations
    return x


def test_same_rotation_as_orbit():
    a, b = _mlp(), _mlp()
    oq.quantize_(a, HadamardRTNConfig(w_bits=4, a_bits=4, seed=3))
    oq.quantize_(b, oq.OrbitConfig(w_bits=4, a_bits=4, seed=3))
    for la, lb in ((a[0], b[0]), (a[2], b[2])):
        assert torch.equal(la.rotation.perm, lb.rotation.perm) and torch.equal(la.rotation.signs, lb.rotation.signs)


def test_unquantized_rotation_cancels():
    m = _mlp()
    ref = copy.deepcopy(m)
    oq.quantize_(m, HadamardRTNConfig(w_bits=16, a_bits=16))
    x = torch.randn(32, 384)
    assert relative_error(ref(x), m(x)) < 1e-5  # fp32 rounding of the rotation only


def test_rotation_rescues_rtn_on_outlier_channels():
    x = _outlier_tokens()
    errs = {}
    for name, cfg in {"rtn": oq.RTNConfig(w_bits=4, a_bits=4, a_symmetric=True),
                      "hadamard_rtn": HadamardRTNConfig(w_bits=4, a_bits=4),
                      "orbit": oq.OrbitConfig(w_bits=4, a_bits=4)}.items():
        seq = torch.nn.Sequential(_mlp()[0])
        ref = seq(x)
        oq.quantize_(seq, cfg)
        errs[name] = relative_error(ref, seq(x))
    # per-token RTN spends its range on the 4 outlier channels; the rotation spreads them out
    assert errs["hadamard_rtn"] < 0.7 * errs["rtn"], errs
    assert errs["orbit"] < 0.7 * errs["rtn"], errs
