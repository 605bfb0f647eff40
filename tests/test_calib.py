"""The shared calibration pipeline: adapters publish (step, CFG half) per denoiser forward; collectors key
their statistics by it; the input recorder keeps Q-DiT's one-step-per-trajectory conditional inputs and
replays them exactly."""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.digits import DigitsAdapter
from orbitquant.quant.calib import (
    ActivationCollector,
    DenoiserCall,
    InputRecorder,
    current_call,
    denoiser_call,
    publish_calls,
    split_halves,
)


def _digits():
    a = DigitsAdapter()
    pipe = a.build_tiny()
    return a, pipe, a.denoiser(pipe)


def test_denoiser_call_context_nests_and_resets():
    assert current_call() is None
    with denoiser_call(3, ("cond", "uncond"), 10):
        assert current_call() == DenoiserCall(3, ("cond", "uncond"), 10)
        with denoiser_call(4):
            assert current_call().step == 4
        assert current_call().step == 3
    assert current_call() is None
    x = torch.arange(8.0).view(4, 2)
    halves = split_halves(x, DenoiserCall(0, ("uncond", "cond")))
    assert [h for h, _ in halves] == ["uncond", "cond"] and torch.equal(halves[1][1], x[2:])
    assert split_halves(x[:3], DenoiserCall(0, ("cond", "uncond")))[0][0] == "all"  # odd batch: layout unknown


def test_digits_sampler_publishes_steps_and_cfg_halves():
    a, pipe, model = _digits()
    seen = []
    h = model.register_forward_pre_hook(lambda *_: seen.append(current_call()))
    a.generate(pipe, n_per_class=1, steps=3, guidance=2.0, batch_size=10, seed=0, progress=False)
    h.remove()
    assert [c.step for c in seen] == [0, 1, 2] and all(c.halves == ("cond", "uncond") and c.n_steps == 3 for c in seen)


def test_collector_keys_absmax_by_step_and_half():
    a, pipe, model = _digits()
    ref = next(r for r in a.layers(model) if r.role == "attn.q")
    inputs = []
    h = ref.module.register_forward_hook(lambda _m, args, _o: inputs.append((current_call(), args[0].detach().clone())))
    col = ActivationCollector(reservoir=8)
    with col.attach([ref]):
        a.generate(pipe, n_per_class=1, steps=2, guidance=2.0, batch_size=10, seed=0, progress=False)
    h.remove()
    st = col.stats[ref.fqn]
    assert set(st.absmax_by_key) == {(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")}
    call, x = inputs[1]
    assert call.step == 1
    assert torch.equal(st.absmax_by_key[(1, "uncond")], x[10:].reshape(-1, x.shape[-1]).abs().amax(0))
    assert torch.equal(st.absmax, torch.stack(list(st.absmax_by_key.values())).amax(0))


def test_publish_calls_counts_steps_by_timestep_and_splits_by_layout():
    seen = []

    class Den(torch.nn.Module):
        def forward(self, x, timestep):
            seen.append(current_call())
            return x

    den = Den()
    with publish_calls(den, "calls", rows=2, n_steps=2):
        for t in (1.0, 0.5):
            den(torch.zeros(2, 3), timestep=torch.tensor([t, t]))  # cond
            den(torch.zeros(2, 3), timestep=torch.tensor([t, t]))  # uncond
    assert [(c.step, c.halves) for c in seen] == [(0, ("cond",)), (0, ("uncond",)), (1, ("cond",)), (1, ("uncond",))]
    seen.clear()
    with publish_calls(den, "uncond_first", rows=2):
        den(torch.zeros(4, 3), torch.tensor(1.0))
        den(torch.zeros(2, 3), torch.tensor(0.5))  # a step without guidance
    assert [(c.step, c.halves) for c in seen] == [(0, ("uncond", "cond")), (1, ("cond",))]
    assert current_call() is None and not den._forward_pre_hooks and not den._forward_hooks


def test_tiny_dit_pipeline_publishes_cond_first_halves():
    from orbitquant.harness.adapters.dit import DiTAdapter

    a = DiTAdapter(tiny=True)
    pipe = a.load(torch.float32)
    seen = []
    h = a.denoiser(pipe).register_forward_pre_hook(lambda *_: seen.append(current_call()))
    a.generate(pipe, classes=[1, 2], steps=2, guidance=1.5, batch_size=2, seed=0, progress=False)
    h.remove()
    assert [(c.step, c.halves, c.n_steps) for c in seen] == [(0, ("cond", "uncond"), 2), (1, ("cond", "uncond"), 2)]


def test_input_recorder_takes_one_distinct_step_per_trajectory_from_the_cond_half():
    a, pipe, model = _digits()
    rec = InputRecorder(n=100, seed=0).attach(model)
    a.generate(pipe, n_per_class=1, steps=16, guidance=2.0, batch_size=5, seed=0, progress=False)  # 2 batches of 5
    rec.detach()
    assert rec.rows == 10
    labels = torch.cat([r.kwargs["class_labels"] for r in rec.records])
    assert sorted(labels.tolist()) == list(range(10))  # conditional rows only (null class is 10), each once
    assert not model._forward_pre_hooks


def test_input_recorder_replays_the_recorded_rows_exactly():
    a, pipe, model = _digits()
    outs = []
    h = model.register_forward_hook(lambda _m, _a, o: outs.append(o.sample.detach().clone()))
    rec = InputRecorder(n=100, seed=1).attach(model)
    a.generate(pipe, n_per_class=1, steps=8, guidance=1.0, batch_size=10, seed=0, progress=False)
    rec.detach()
    h.remove()
    assert rec.rows == 10
    # rows recorded at step s are those rows of forward s's output
    replayed = [model(*args, **kw).sample for args, kw in rec.batches(max_rows=64)]
    expected = []
    for r in rec.records:
        t = float(r.kwargs["timestep"][0]) / 1000
        step = round((1 - t) * 8)
        idx = [int(lbl) for lbl in r.kwargs["class_labels"]]  # labels 0..9 are the row indices here
        expected.append(outs[step][idx])
    torch.testing.assert_close(torch.cat(replayed), torch.cat(expected))


def test_nan_reaching_a_quantized_layer_names_the_layer_and_the_sampler_step():
    import pytest

    import orbitquant as oq
    from orbitquant.quant.act import NonFiniteInput

    m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    oq.quantize_(m, oq.OrbitConfig())
    x = torch.randn(2, 8)
    x[0, 3] = float("inf")
    with pytest.raises(NonFiniteInput, match=r"layer '0' \(orbit w4a8\) at sampler step 7: .*NaN or Inf"):
        with denoiser_call(7):
            m(x)


def test_nonfinite_record_policy_logs_zeroes_and_continues():
    import orbitquant as oq
    from orbitquant.quant import nn as qnn

    m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    oq.quantize_(m, oq.OrbitConfig(nonfinite="record"))
    x = torch.randn(2, 8)
    x[1, 2] = float("nan")
    qnn.NONFINITE_EVENTS.clear()
    with denoiser_call(5):
        y = m(x)
    assert torch.isfinite(y).all()
    assert qnn.NONFINITE_EVENTS == [{"layer": "0", "step": 5, "values": 1}]
    qnn.NONFINITE_EVENTS.clear()
