"""SVDQuant (baselines/svdquant): smoothing search, low-rank branch, group-64 INT quantizers, clip search."""

from __future__ import annotations

import pytest
import torch

import orbitquant as oq
from baselines.svdquant import SVDQuantConfig, low_rank, smoothing_candidates
from orbitquant.nn import LowRankQuantLinear
from orbitquant.primitives import relative_error


def _layer_and_tokens(d=256, out=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, d, generator=g) / d ** 0.5)
    x = torch.randn(512, d, generator=g)
    x[:, :4] *= 30.0  # outlier channels
    return lin, x


def test_candidates_and_low_rank():
    c = smoothing_candidates(20)
    assert len(c) == 39 and c[0] == (0.0, 0.0) and (0.5, 0.5) in c and (0.05, 0.0) in c
    m = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    exact = low_rank(m, 8, True, 0)
    assert torch.linalg.matrix_rank(exact) == 8
    s = torch.linalg.svdvals(m.double())
    assert (m - exact).norm().item() == pytest.approx(s[8:].norm().item(), rel=1e-5)  # Eckart-Young
    approx = low_rank(m, 8, False, 0)
    assert (m - approx).norm() <= 1.05 * (m - exact).norm()


def test_svdquant_beats_rtn_with_outliers_and_the_branch_helps():
    errs, reports = {}, {}
    for name, cfg in {"rtn": oq.RTNConfig(w_bits=4, a_bits=4, a_symmetric=True),
                      "svdq_r0": SVDQuantConfig(rank=0, clip_grid=20),
                      "svdq": SVDQuantConfig(rank=32, clip_grid=20)}.items():
        lin, x = _layer_and_tokens()
        seq = torch.nn.Sequential(lin)
        ref = seq(x)
        reports[name] = oq.quantize_(seq, cfg, calibrate=(lambda s=seq, xx=x: s(xx)) if name != "rtn" else None)
        errs[name] = relative_error(ref, seq(x))
    assert errs["svdq_r0"] < 0.7 * errs["rtn"], errs  # smoothing + group-64 alone
    assert errs["svdq"] < 0.9 * errs["svdq_r0"], errs  # the 16-bit rank-32 branch on top
    layer = reports["svdq"].layers[0]
    assert layer.treatment == "svdquant w4a4 r32"
    # bytes: 4-bit codes + bf16 group scales (4 groups of 64) + fp32 bias + the bf16 branch 32 * (in + out)
    assert layer.bytes_q == 192 * 256 // 2 + 192 * 4 * 2 + 192 * 4 + 32 * (256 + 192) * 2


def test_low_rank_quant_linear_computes_branch_plus_quantized_path():
    from orbitquant.nn import ChannelScale, DenseWeight, NoActQuant

    g = torch.Generator().manual_seed(2)
    w, up, down, lam = (torch.randn(6, 10, generator=g), torch.randn(6, 3, generator=g),
                        torch.randn(3, 10, generator=g), torch.rand(10, generator=g) + 0.5)
    q = LowRankQuantLinear(DenseWeight(w), None, up, down, act=NoActQuant(), rotation=ChannelScale(1 / lam))
    x = torch.randn(4, 10, generator=g)
    expect = (x / lam) @ w.T + (x / lam) @ down.bfloat16().float().T @ up.bfloat16().float().T
    torch.testing.assert_close(q(x), expect, rtol=1e-4, atol=1e-4)
    assert q.rank == 3 and q.nbytes == 6 * 10 * 4 + (6 * 3 + 3 * 10) * 2
    with pytest.raises(ValueError, match="do not fit"):
        LowRankQuantLinear(DenseWeight(w), None, up, down[:, :9])


def test_config_validation():
    with pytest.raises(ValueError, match="2..8"):
        SVDQuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="max_shrink"):
        SVDQuantConfig(max_shrink=1.0)


class _QKV(torch.nn.Module):
    """One attention's q/k/v on a shared input (or, with ``split``, k reading a scaled copy)."""

    def __init__(self, d=128, outs=(64, 64, 96), split=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v = (torch.nn.Linear(d, o) for o in outs)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v):
                lin.weight.copy_(torch.randn(lin.out_features, d, generator=g) / d ** 0.5)
        self.split = split

    def forward(self, x):
        return self.q(x), self.k(2.0 * x if self.split else x), self.v(x)

    def refs(self):
        from orbitquant.types import LayerRef

        return [LayerRef(n, f"attn.{n}", 0, getattr(self, n)) for n in ("q", "k", "v")]


def _quantize_qkv(share, split=False, d=128, outs=(64, 64, 96)):
    model = _QKV(d, outs, split)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, d, generator=g)
    x[:, :3] *= 20.0
    cfg = SVDQuantConfig(rank=8, alpha_grid=4, lowrank_iters=2, clip_grid=4, reservoir=128, share_qkv=share,
                         probe_tokens=0)
    report = oq.quantize_(model, cfg, layers=model.refs(), calibrate=lambda: model(x))
    return model, report, x


def test_shared_qkv_one_smoothing_one_down_factor_and_the_runtime_formula():
    from orbitquant.primitives import fake_quant_groups

    model, report, x = _quantize_qkv(True)
    q, k, v = model.q, model.k, model.v
    assert all(isinstance(m, LowRankQuantLinear) for m in (q, k, v))
    for m in (k, v):
        torch.testing.assert_close(m.rotation.inv_scale, q.rotation.inv_scale, rtol=0, atol=0)
        torch.testing.assert_close(m.lr_down, q.lr_down, rtol=0, atol=0)
        assert m.lr_down.data_ptr() == q.lr_down.data_ptr()  # one storage for the shared D
    assert q.rank == 8 and q.lr_up.shape == (64, 8) and v.lr_up.shape == (96, 8)
    # D counted once: r (in + out_q + out_k + out_v), not 3 r (in + out)
    cal = report.calibration
    assert cal["shared_qkv_groups"] == 1
    assert cal["extra_params"] == 8 * (128 + 64 + 64 + 96)
    assert cal["extra_params_unshared"] == 8 * (3 * 128 + 64 + 64 + 96)
    # each layer: fq_a(x / lam) Q^T + (x / lam) D^T U^T + b
    for m in (q, k, v):
        xs = x * m.rotation.inv_scale
        expect = (fake_quant_groups(xs, 4, True, 64) @ m.store.dequantize().float().T
                  + xs @ m.lr_down.float().T @ m.lr_up.float().T + m.bias)
        torch.testing.assert_close(m(x).float(), expect, rtol=1e-3, atol=1e-3)


def test_share_qkv_false_and_different_inputs_fit_per_layer():
    model, report, _ = _quantize_qkv(False)
    assert report.calibration["shared_qkv_groups"] == 0
    assert report.calibration["extra_params"] == report.calibration["extra_params_unshared"]
    assert not torch.equal(model.q.lr_down, model.k.lr_down)
    assert model.q.lr_down.data_ptr() != model.k.lr_down.data_ptr()
    # k sees a different input (its absmax differs): the group falls back to per-layer fits
    model, report, _ = _quantize_qkv(True, split=True)
    assert report.calibration["shared_qkv_groups"] == 0
    assert report.calibration["extra_params"] == 8 * (3 * 128 + 64 + 64 + 96)
    assert len({m.lr_down.data_ptr() for m in (model.q, model.k, model.v)}) == 3
