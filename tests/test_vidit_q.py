"""ViDiT-Q (baselines/vidit_q): the dynamic W8A8 plan, timestep-aware channel balancing, the mixed-precision
bit plan, the static-dynamic reconstruction, the calibration artifact and a run through run.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_run import _run
from torch import nn

import orbitquant as oq
from baselines.vidit_q import ActScaleEMA, ViDiTQConfig, ViDiTQQuantizer
from baselines.vidit_q.layers import (
    ScheduledQuantLinear,
    StepSchedule,
    TimestepHook,
    check_timerange,
    current_timestep,
    timestep_value,
)
from orbitquant.quant.api import quantizer_for
from orbitquant.quant.calib import DenoiserCall, denoiser_call
from orbitquant.quant.types import LayerRef


def _fq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max RTN per row (ViDiT-Q's quantizer: the range holds 0, zero point rounded)."""
    mn, mx = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (mx - mn) / (2 ** bits - 1)
    zero = torch.round(-mn / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def _model(d=32, out=24, seed=0, roles=("attn.q",)):
    g = torch.Generator().manual_seed(seed)
    mods = nn.ModuleList()
    for _ in roles:
        lin = nn.Linear(d, out if len(roles) == 1 else d)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / d ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        mods.append(lin)
    model = nn.Sequential(*mods)
    refs = [LayerRef(f"{i}", role, 0, m) for i, (role, m) in enumerate(zip(roles, mods))]
    return model, refs


def _tokens(batch=3, n=10, d=32, seed=1, outlier=20.0):
    x = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed))
    x[..., :3] *= outlier
    return x


def _calibrate(model, xs_by_step, n_steps):
    def run():
        for step, x in xs_by_step:
            with denoiser_call(step, ("cond",), n_steps):
                model(x)
    return run


def test_dynamic_plan_is_per_channel_asym_weights_and_per_token_asym_activations():
    model, refs = _model()
    lin = refs[0].module
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = _tokens()
    cfg = ViDiTQConfig(plan="dynamic", w_bits=4, a_bits=6)
    assert not quantizer_for(cfg).needs_calibration
    rep = oq.quantize_(model, cfg, refs)  # no calibrate: the dynamic plan needs none
    expect = _fq(x, 6) @ _fq(w, 4).T + b
    torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)
    assert rep.layers[0].treatment == "vidit_q dynamic w4a6" and rep.layers[0].w_bits == 4


def test_activation_range_holds_zero_like_the_code():
    from baselines.vidit_q.layers import TokenActQuant

    x = torch.tensor([[0.5, 1.0, 2.0, 3.1], [-1.0, 0.2, 0.7, 1.3], [0.0, 0.0, 0.0, 0.0]])
    q = TokenActQuant(2)(x)
    # the range is [0, 3.1], not [0.5, 3.1]
    torch.testing.assert_close(q[0], torch.tensor([0.0, 1.0 + 1 / 30, 2.0 + 2 / 30, 3.1]))
    torch.testing.assert_close(q[:2], _fq(x[:2], 2))
    assert torch.equal(q[2], x[2])  # an all-zero token stays exact


def test_auto_plan_follows_the_code_table_and_needs_calibration_below_w8a8():
    assert ViDiTQConfig(w_bits=8, a_bits=8).resolved_plan == "dynamic"
    for w, a in ((4, 8), (8, 4), (4, 4), (2, 4), (3, 3)):
        cfg = ViDiTQConfig(w_bits=w, a_bits=a)
        assert cfg.resolved_plan == "timestep_cb" and quantizer_for(cfg).needs_calibration
    model, refs = _model()
    with pytest.raises(ValueError, match="needs calibration"):
        oq.quantize_(model, ViDiTQConfig(w_bits=4, a_bits=8), refs)


def test_act_scale_is_an_ema_of_mean_over_batch_of_max_over_tokens_per_range():
    col = ActScaleEMA(check_timerange([[0, 500], [501, 1000]]), momentum=0.95)
    xs = [_tokens(seed=s) for s in range(3)]
    cur = [x.abs().amax(dim=1).mean(dim=0) for x in xs]
    for step, x in zip((0, 1, 3), xs):  # n_steps = 4: steps 0, 1 -> t = 1000, 750 (range 1); step 3 -> t = 250
        with denoiser_call(step, ("cond", "uncond"), 4):
            col.observe("l", x)
    torch.testing.assert_close(col.scale["l"][1], 0.95 * cur[0] + 0.05 * cur[1])
    torch.testing.assert_close(col.scale["l"][0], cur[2])
    assert col.updates["l"] == [1, 2] and col.unpublished == 0
    col.observe("l", xs[0])  # no published call: counted as t = 500, the [0, 500] range
    assert col.updates["l"] == [2, 2] and col.unpublished == 1


def test_timestep_cb_matches_a_hand_computation_and_switches_weights_by_step():
    model, refs = _model()
    lin = refs[0].module
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    early, late = _tokens(seed=2, outlier=30.0), _tokens(seed=3, outlier=3.0)
    cfg = ViDiTQConfig(plan="timestep_cb", w_bits=4, a_bits=8, alpha=(0.3, 0.6))
    oq.quantize_(model, cfg, refs, calibrate=_calibrate(model, [(0, early), (3, late)], 4))
    q = model[0]
    assert isinstance(q, ScheduledQuantLinear) and q.schedule.keys == ((1, 4), (0, 4))
    x = _tokens(seed=4)
    outs = {}
    for step, xs, alpha in ((0, early, 0.6), (3, late, 0.3)):  # alpha[r] follows timerange order: [0, 500] first
        a = xs.abs().amax(dim=1).mean(dim=0)
        s = a ** alpha / w.abs().amax(dim=0) ** (1 - alpha)
        with denoiser_call(step, ("cond",), 4):
            outs[step] = model(x)
        torch.testing.assert_close(outs[step], _fq(x / s, 8) @ _fq(w * s, 4).T + b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs[0], outs[3])
    assert q.nbytes == 2 * (q.stores[0].nbytes) + 24 * 4  # both ranges' weights are stored


def test_alpha_zero_ignores_activation_statistics():
    model, refs = _model()
    w = refs[0].module.weight.detach().clone()
    early, late = _tokens(seed=2, outlier=30.0), _tokens(seed=3, outlier=3.0)
    cfg = ViDiTQConfig(plan="timestep_cb", w_bits=4, a_bits=8, alpha=(0.0, 0.0))
    oq.quantize_(model, cfg, refs, calibrate=_calibrate(model, [(0, early), (3, late)], 4))
    q = model[0]
    torch.testing.assert_close(q.transforms[0].inv_scale, q.transforms[1].inv_scale)
    torch.testing.assert_close(q.transforms[0].inv_scale, w.abs().amax(dim=0))  # s = 1 / max|W_:,j|
    torch.testing.assert_close(q.stores[0].dequantize(), q.stores[1].dequantize())


def test_mixed_precision_gives_w8_to_ffn_and_to_the_first_quarter():
    model, refs = _model(roles=("attn.q", "ff.up", "ff.down"))
    calib = _calibrate(model, [(s, _tokens(seed=s)) for s in range(8)], 8)
    cfg = ViDiTQConfig(plan="timestep_cb", w_bits=4, a_bits=8, mixed_precision=True)
    rep = oq.quantize_(model, cfg, refs, calibrate=calib)
    bits_at = {}
    for i in range(3):
        layer = model[i]
        bits_at[i] = [layer.stores[layer.select(DenoiserCall(s, ("cond",), 8))].bits for s in range(8)]
        assert layer.stores[layer.select(None)].bits == layer.store.bits  # the probe's default (t = 500)
    assert bits_at[0] == [8, 8, 4, 4, 4, 4, 4, 4]  # attention: W8 in the first (noisiest) quarter only
    assert bits_at[1] == bits_at[2] == [8] * 8     # FFN: W8 everywhere
    assert model[0].schedule.keys == ((1, 8), (1, 4), (0, 4)) and model[1].schedule.keys == ((1, 8), (0, 8))
    assert [r.treatment for r in rep.layers] == ["vidit_q timestep_cb+mp w4/8a8"] + ["vidit_q timestep_cb+mp w8a8"] * 2
    assert [r.w_bits for r in rep.layers] == [4, 8, 8]
    # the dynamic plan takes the same bit plan without calibration (one range)
    model, refs = _model(roles=("attn.q", "ff.up"))
    oq.quantize_(model, ViDiTQConfig(plan="dynamic", w_bits=3, a_bits=8, mixed_precision=True), refs)
    assert model[0].schedule.keys == ((0, 8), (0, 3))
    assert type(model[1]) is oq.QuantLinear and model[1].store.bits == 8  # one variant: a plain QuantLinear


def test_schedule_reaches_only_the_pairs_a_step_can_use():
    assert StepSchedule.reachable((500, 1000), (8, 4, 4, 4)) == ((1, 8), (1, 4), (0, 4))
    assert StepSchedule.reachable((300, 1000), (8, 4)) == ((1, 8), (1, 4), (0, 4))
    assert StepSchedule.reachable((1000,), (5,)) == ((0, 5),)
    s = StepSchedule((500, 1000), (4,), ((1, 4), (0, 4)))
    assert [s.variant(DenoiserCall(i, ("cond",), 32)) for i in (0, 15, 16, 31)] == [0, 0, 1, 1]
    assert s.variant(None) == s.default == 1  # no published call: t = 500
    with pytest.raises(ValueError, match="contiguous"):
        check_timerange([[0, 500], [502, 1000]])


class _Denoiser(nn.Module):
    """A denoiser taking ``(x, timestep)`` like the diffusers transformers (timestep on the 0..1000 scale)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x, timestep):
        return self.lin(x)


def _shifted_timesteps(n=8, shift=7.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)  # Wan's scheduler; FLUX shifts likewise (mu)
    sched.set_timesteps(n)
    return sched.timesteps.float()


def test_timestep_ranges_follow_timestep_values_on_a_shifted_schedule():
    # upstream: QuantModel.forward sets cur_timestep_id = t[0] (the model's timestep input) and find_interval
    # looks it up in timerange: ranges are timestep VALUES. With FlowMatch shift 7 and 8 steps the values are
    # 1000, 977, 946, 904, 842, 742, 550, 47: only the last step is in [0, 500]; by step index (t = 1000 (1 -
    # step / 8)) steps 4..7 would be.
    ts = _shifted_timesteps()
    assert [round(float(t)) for t in ts] == [1000, 977, 946, 904, 842, 742, 550, 47]
    model, refs = _model()
    den = _Denoiser(model[0])
    w_absmax = den.lin.weight.detach().abs().amax(dim=0).clone()
    xs = [_tokens(seed=10 + i, outlier=30.0 if i < 7 else 2.0) for i in range(8)]

    def calib():
        for i, t in enumerate(ts):
            with denoiser_call(i, ("cond",), 8):
                den(xs[i], timestep=t.expand(3))

    cfg = ViDiTQConfig(plan="timestep_cb", w_bits=4, a_bits=8, alpha=(0.3, 0.6))
    rep = oq.quantize_(den, cfg, [LayerRef("lin", "attn.q", 0, den.lin)], calibrate=calib)
    assert rep.calibration["updates_per_range"] == [1, 7]  # index-based: [4, 4]
    assert rep.calibration["timestep_valued_calls"] == 8 and rep.calibration["unpublished_calls"] == 0
    q = den.lin
    assert isinstance(q, ScheduledQuantLinear) and q.schedule.keys == ((1, 4), (0, 4))
    picked = []
    for i, t in enumerate(ts):  # sampling: each step uses the variant of its timestep value
        with denoiser_call(i, ("cond",), 8):
            den(xs[0], timestep=t.expand(3))
        picked.append(q.schedule.keys[q.active][0])
    assert picked == [1] * 7 + [0]  # index-based: [1, 1, 1, 1, 0, 0, 0, 0]
    # the act_scale of range [0, 500] is the last step's alone (no outlier channels): s_0 = a_7^0.3 / max|W|^0.7
    a7 = xs[7].abs().amax(dim=1).mean(dim=0)
    r0 = q.transforms[q.schedule.keys.index((0, 4))].inv_scale
    torch.testing.assert_close(r0, (w_absmax ** 0.7 / a7 ** 0.3).float())


def test_timestep_value_conventions_and_hook():
    class FluxTransformer2DModel(nn.Module):  # FLUX pipelines pass t / 1000
        def forward(self, hidden_states, timestep=None):
            return hidden_states

    class ZImageTransformer2DModel(FluxTransformer2DModel):  # Z-Image passes (1000 - t) / 1000
        pass

    x = torch.zeros(2, 3)
    assert timestep_value(FluxTransformer2DModel(), (x,), {"timestep": torch.tensor([0.7, 0.7])}) == pytest.approx(700)
    assert timestep_value(ZImageTransformer2DModel(), (x,), {"timestep": torch.tensor([0.3])}) == pytest.approx(700)
    assert timestep_value(_Denoiser(nn.Linear(3, 3)), (x, torch.tensor([700.0])), {}) == 700.0
    assert timestep_value(_Denoiser(nn.Linear(3, 3)), (x,), {}) is None
    seen = []
    den = _Denoiser(nn.Linear(3, 3))
    den.lin.register_forward_hook(lambda *_: seen.append(current_timestep()))
    hook = TimestepHook().attach(den)
    den(x, timestep=torch.tensor([321.0, 321.0]))
    assert seen == [321.0] and hook.published == 1
    assert current_timestep() is None  # reset after the forward
    hook.detach()


def test_static_dynamic_transform_cancels_unquantized_and_runs_quantized():
    x = _tokens(seed=5)
    calib_steps = [(0, _tokens(seed=6)), (3, _tokens(seed=7))]
    model, refs = _model()
    ref_out = model(x)
    oq.quantize_(model, ViDiTQConfig(plan="static_dynamic", w_bits=16, a_bits=16), refs,
                 calibrate=_calibrate(model, calib_steps, 4))
    torch.testing.assert_close(model(x), ref_out, rtol=1e-4, atol=1e-4)
    errs = {}
    for plan in ("dynamic", "static_dynamic"):
        model, refs = _model()
        oq.quantize_(model, ViDiTQConfig(plan=plan, w_bits=4, a_bits=4), refs,
                     calibrate=_calibrate(model, calib_steps, 4))
        errs[plan] = oq.quant.primitives.relative_error(ref_out, model(x))
    assert errs["static_dynamic"] < errs["dynamic"], errs  # outlier channels: scaling + rotation help


@pytest.mark.parametrize("plan, mp", [("timestep_cb", True), ("static_dynamic", False)])
def test_calibration_artifact_round_trip_is_bit_exact(plan, mp, tmp_path):
    cache = tmp_path / "vq.safetensors"
    calib_xs = [(s, _tokens(seed=10 + s)) for s in range(8)]
    cfg = ViDiTQConfig(plan=plan, w_bits=3, a_bits=6, mixed_precision=mp)
    x = _tokens(seed=20)
    outs = []
    for run in range(2):
        model, refs = _model(roles=("attn.q", "ff.up"))
        rep = oq.quantize_(model, cfg, refs, calibrate=_calibrate(model, calib_xs, 8) if run == 0 else None,
                           calibration_cache=cache)
        assert ("saved" in rep.calibration) == (run == 0) and ("cached" in rep.calibration) == (run == 1)
        res = []
        for step in (0, 3, 7, None):
            if step is None:
                res.append(model(x))
            else:
                with denoiser_call(step, ("cond",), 8):
                    res.append(model(x))
        outs.append(torch.stack(res))
    assert torch.equal(outs[0], outs[1])


def test_scheduled_layer_state_dict_round_trip():
    model, refs = _model()
    cfg = ViDiTQConfig(plan="timestep_cb", w_bits=4, a_bits=8, mixed_precision=True)
    oq.quantize_(model, cfg, refs, calibrate=_calibrate(model, [(0, _tokens()), (3, _tokens(seed=2))], 4))
    q = model[0]
    keys = q.state_dict().keys()
    assert not any(k.startswith(("store.", "rotation.")) for k in keys)  # each variant saved once
    assert sum(k.endswith(".codes") for k in keys) == len(q.schedule.keys) == 3
    clone = copy.deepcopy(q)
    for st in clone.stores:
        st.codes.zero_()
    clone.load_state_dict(q.state_dict())  # rebuilds the active variant's dequantized weight
    x = _tokens(seed=9)
    for step in (0, 1, 2, 3):
        with denoiser_call(step, ("cond",), 4):
            assert torch.equal(clone(x), q(x))


def test_config_validation():
    with pytest.raises(ValueError, match="plan"):
        ViDiTQConfig(plan="naive")
    with pytest.raises(ValueError, match="one value per timerange"):
        ViDiTQConfig(alpha=(0.1,))
    with pytest.raises(ValueError, match="mp_high_bits"):
        ViDiTQConfig(w_bits=8, mp_high_bits=4, mixed_precision=True)
    with pytest.raises(ValueError, match="unknown roles"):
        ViDiTQConfig(mp_high_roles=("mlp",))
    with pytest.raises(ValueError, match="rotation"):
        ViDiTQConfig(rotation="dct")
    assert isinstance(quantizer_for(ViDiTQConfig()), ViDiTQQuantizer)


def test_run_py_on_tiny_dit(tmp_path):
    _run(["-m", "model=tiny_dit", "quant=vidit_q,vidit_q_mp", "eval=c2i_smoke", "calib=c2i_smoke",
          "dtype=float32", "w_bits=4", "a_bits=8"], tmp_path)
    runs = {p.parts[-4]: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/results.json")}
    assert sorted(runs) == ["w4a8", "w4a8-mp"]
    for tag, res in runs.items():
        s = res["quant_report"]["summary"]
        cal = s["calibration"]  # ranges follow timestep values: a smoke schedule may leave a range without steps,
        filled = set(cal.get("ranges_filled_from_neighbour", []))  # which then takes its neighbour's statistics
        assert res["status"] == "ok" and max(cal["updates_per_range"]) > 0, (tag, cal)
        assert all(n > 0 or i in filled for i, n in enumerate(cal["updates_per_range"])), (tag, cal)
        assert res["metrics"]["psnr_vs_fp"]["value"] > 10
    assert "vidit_q timestep_cb w4a8" in runs["w4a8"]["quant_report"]["summary"]["treatments"]
    assert set(runs["w4a8-mp"]["quant_report"]["summary"]["treatments"]) >= {
        "vidit_q timestep_cb+mp w4/8a8", "vidit_q timestep_cb+mp w8a8"}


@pytest.mark.slow
@pytest.mark.parametrize("model, eval_", [("tiny_dit", "c2i_smoke"), ("tiny_flux", "t2i_smoke"),
                                          ("tiny_wan", "t2v_smoke"), ("tiny_cogvideox", "t2v_smoke"),
                                          ("tiny_zimage", "t2i_smoke")])
def test_run_py_every_preset_on_every_tiny_family(model, eval_, tmp_path):
    _run(["-m", f"model={model}", "quant=vidit_q,vidit_q_mp,vidit_q_sd", f"eval={eval_}", f"calib={eval_}",
          "dtype=float32", "bits=w4a8,w8a8"], tmp_path)
    runs = {p.parts[-4]: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("**/results.json")}
    assert sorted(runs) == ["w4a8", "w4a8-mp", "w4a8-sd", "w8a8", "w8a8-mp", "w8a8-sd"]
    assert all(r["status"] == "ok" and r["nonfinite"]["events"] == 0 for r in runs.values())
    assert runs["w8a8"]["quant_report"]["summary"]["calibration"] == {}  # auto at W8A8: the dynamic plan, uncalibrated
    assert runs["w8a8"]["quant_report"]["summary"]["treatments"].keys() >= {"vidit_q dynamic w8a8"}
