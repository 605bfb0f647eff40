"""SVDQuant (baselines/svdquant): smoothing search, low-rank branch, group-64 INT quantizers, clip search."""

from __future__ import annotations

import pytest
import torch

import orbitquant as oq
from baselines.svdquant import SVDQuantConfig, low_rank, smoothing_candidates
from orbitquant.quant.nn import LowRankQuantLinear
from orbitquant.quant.primitives import relative_error


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
    from orbitquant.quant.act import ChannelScale, NoActQuant
    from orbitquant.quant.weights import DenseWeight

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
        from orbitquant.quant.types import LayerRef

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
    from orbitquant.quant.primitives import fake_quant_groups

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


def test_weight_range_is_the_recipes_ratio_one_unless_clip_search():
    """The INT4 recipe runs no weight-clip search (calib_range strategy Manual, ratio 1.0); clip_search=true does."""
    from baselines.svdquant import SVDQuantQuantizer

    g = torch.Generator().manual_seed(5)
    resid = torch.distributions.StudentT(2.0).sample((96, 128))  # heavy tails: a shrink pays off
    x = torch.randn(256, 128, generator=g)
    ch = {"y": x @ resid.T, "x_s": x, "x_q": x}
    lr = torch.zeros_like(resid)
    assert not SVDQuantConfig().clip_search
    assert SVDQuantQuantizer(SVDQuantConfig())._clip(ch, lr, resid)[0] == 1.0
    shrink, err = SVDQuantQuantizer(SVDQuantConfig(clip_search=True))._clip(ch, lr, resid)
    assert 0.8 <= shrink < 1.0 and err < SVDQuantQuantizer(SVDQuantConfig())._clip(ch, lr, resid)[1]


class _FFN(torch.nn.Module):
    """up -> GELU (tanh) -> down, as diffusers' FeedForward; with ``glu`` the down-projection reads a signed input."""

    def __init__(self, d=64, hidden=256, glu=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up, self.down = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(hidden, d, generator=g) / d ** 0.5)
            self.down.weight.copy_(torch.randn(d, hidden, generator=g) / hidden ** 0.5)
        self.glu = glu

    def hidden(self, x):
        h = self.up(x)
        return h * torch.nn.functional.silu(h.flip(-1)) if self.glu else torch.nn.functional.gelu(h, approximate="tanh")

    def forward(self, x):
        return self.down(self.hidden(x))

    def refs(self):
        from orbitquant.quant.types import LayerRef

        return [LayerRef("up", "ff.up", 0, self.up), LayerRef("down", "ff.down", 0, self.down)]


def _quantize_ffn(glu=False, **kw):
    model = _FFN(glu=glu)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(4))  # (batch, tokens, d)
    h = model.hidden(x).detach()
    ref = torch.nn.functional.linear(h, model.down.weight, model.down.bias).detach()
    model.orig_down = (model.down.weight.detach().clone(), model.down.bias.detach().clone())
    cfg = SVDQuantConfig(rank=8, alpha_grid=4, lowrank_iters=2, **kw)
    report = oq.quantize_(model, cfg, layers=model.refs(), calibrate=lambda: model(x))
    return model, report, h, ref


def test_gelu_down_projection_input_is_shifted_and_quantized_unsigned():
    """The INT4 recipe: shift_activations shifts the GELU output by 0.171875 (>= 0) and allow_unsigned quantizes
    it as uint4 (codes 0..15, scale max / 15); the bias absorbs -W 1 shift."""
    from baselines.svdquant import DOWN_SHIFT, UnsignedGroupActQuant, fake_quant_groups_unsigned

    model, report, h, ref = _quantize_ffn()
    down = model.down
    assert isinstance(down.act, UnsignedGroupActQuant) and down.rotation.shift == DOWN_SHIFT == 0.171875
    assert "shifted-unsigned" in down.treatment and report.calibration["shifted_unsigned_layers"] == 1
    assert model.up.act.symmetric and type(model.up.rotation).__name__ == "ChannelScale"  # not a down-proj
    t = down.rotation(h)  # (h + shift) / lam: non-negative
    assert float(t.min()) >= 0.0
    q = down.act(t)
    assert float(q.min()) >= 0.0
    # unsigned grid: per token x group of 64, codes 0..15 with scale max / 15
    groups = t.reshape(-1, 64)
    scale = groups.amax(dim=-1, keepdim=True) / 15
    codes = q.reshape(-1, 64) / scale
    torch.testing.assert_close(codes, codes.round().clamp(0, 15), rtol=0, atol=1e-3)
    torch.testing.assert_close(q, fake_quant_groups_unsigned(t, 4, 64))
    w, b = model.orig_down  # the unquantized down-projection
    torch.testing.assert_close(down.bias, b - w.sum(dim=1) * DOWN_SHIFT, rtol=1e-5, atol=1e-5)
    # end to end: the unsigned grid has twice the resolution of the signed one on this non-negative input
    err = relative_error(ref, down(h))
    model_signed, report_signed, _, _ = _quantize_ffn(shift_down=False)
    assert report_signed.calibration["shifted_unsigned_layers"] == 0
    assert model_signed.down.act.symmetric and type(model_signed.down.rotation).__name__ == "ChannelScale"
    assert err < 0.8 * relative_error(ref, model_signed.down(h))  # measured 0.113 vs 0.189


def test_signed_down_projection_input_is_not_shifted():
    """A GLU FFN's down-projection input is signed (upstream: intermediate_lowerbound None): no shift."""
    model, report, _, _ = _quantize_ffn(glu=True)
    assert report.calibration["shifted_unsigned_layers"] == 0
    assert model.down.act.symmetric and "shifted" not in model.down.treatment


class _FusedOut(torch.nn.Module):
    """FLUX single block: proj_out reads cat(attention output (d wide, signed), GELU(mlp)) and returns d."""

    def __init__(self, d=64, hidden=256, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mlp, self.out = torch.nn.Linear(d, hidden), torch.nn.Linear(d + hidden, d)
        with torch.no_grad():
            self.mlp.weight.copy_(torch.randn(hidden, d, generator=g) / d ** 0.5)
            self.out.weight.copy_(torch.randn(d, d + hidden, generator=g) / (d + hidden) ** 0.5)

    def hidden(self, x):
        return torch.cat([x * 2.0, torch.nn.functional.gelu(self.mlp(x), approximate="tanh")], dim=-1)

    def forward(self, x):
        return self.out(self.hidden(x))


def _quantize_fused(**kw):
    from orbitquant.quant.types import LayerRef

    model = _FusedOut()
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(4))
    h = model.hidden(x).detach()
    ref = torch.nn.functional.linear(h, model.out.weight, model.out.bias).detach()
    w, b = model.out.weight.detach().clone(), model.out.bias.detach().clone()
    cfg = SVDQuantConfig(rank=8, alpha_grid=4, lowrank_iters=2, **kw)
    report = oq.quantize_(model, cfg, layers=[LayerRef("out", "fused.out", 0, model.out)], calibrate=lambda: model(x))
    return model, report, h, ref, (w, b)


def test_fused_out_projection_shifts_only_its_mlp_half():
    """Upstream splits FLUX's proj_out (ConcatLinear) and shifts the GELU half: here channels out_features: are
    shifted and quantized unsigned, the attention half stays signed, and the bias absorbs -W[:, d:] 1 shift."""
    from baselines.svdquant import DOWN_SHIFT, UnsignedGroupActQuant, fake_quant_groups_split

    model, report, h, ref, (w, b) = _quantize_fused()
    out = model.out
    assert isinstance(out.act, UnsignedGroupActQuant) and out.act.start == 64 and out.rotation.start == 64
    assert report.calibration["shifted_unsigned_layers"] == 1
    t = out.rotation(h)
    assert float(t[..., 64:].min()) >= 0.0 and float(t[..., :64].min()) < 0.0  # only the MLP half shifted
    q = out.act(t)
    assert float(q[..., :64].min()) < 0.0  # the attention half keeps its sign
    torch.testing.assert_close(q, fake_quant_groups_split(t, 4, 64, 64))
    torch.testing.assert_close(out.bias, b - w[:, 64:].sum(dim=1) * DOWN_SHIFT, rtol=1e-5, atol=1e-5)
    err = relative_error(ref, out(h))
    signed, rep_signed, _, _, _ = _quantize_fused(shift_fused=False)
    assert rep_signed.calibration["shifted_unsigned_layers"] == 0 and signed.out.act.symmetric
    err_signed = relative_error(ref, signed.out(h))
    assert 0.02 < err < 0.9 * err_signed, (err, err_signed)


def test_searches_use_calib_samples_worth_of_tokens_or_the_reservoir_cap():
    """Upstream searches on every token of its 128 calibration samples; ours on calib_samples x tokens-per-sample
    tokens per layer (here 4 images x 64 tokens = 256 seen), or a capped reservoir."""
    _, report, _, _ = _quantize_ffn()
    assert SVDQuantConfig().reservoir is None and SVDQuantConfig().calib_samples == 128
    assert report.calibration["search_tokens_per_layer"] == 256  # every token: 128 samples x 64 > 256 seen
    _, report, _, _ = _quantize_ffn(calib_samples=2)
    assert report.calibration["search_tokens_per_layer"] == 2 * 64
    _, report, _, _ = _quantize_ffn(reservoir=100)
    assert report.calibration["search_tokens_per_layer"] == 100
