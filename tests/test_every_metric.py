"""Every registered metric, enumerated from the registry (a new metric is tested the moment it registers): it either
scores digits samples against their fp reference, or (weights / data absent on this machine) its preflight names
every missing piece and its fix in one error, before any model loads."""

from __future__ import annotations

import math

import pytest
import torch

from orbitquant.harness.factory import metric_contexts
from orbitquant.quant.registry import METRICS


@pytest.fixture(scope="module")
def digits_pair():
    """Digits samples of a W4A8 RTN model and the fp samples of the same noise (20 each)."""
    import orbitquant as oq
    from orbitquant.quant.registry import MODELS

    adapter = MODELS.get("digits")()
    proto = dict(n_per_class=2, steps=8, guidance=2.0, batch_size=20, seed=0, progress=False)
    ref = adapter.generate(adapter.load(torch.float32), **proto)
    pipe = adapter.load(torch.float32)
    den = adapter.denoiser(pipe)
    oq.quantize_(den, oq.RTNConfig(w_bits=4, a_bits=8), adapter.layers(den))
    return adapter.generate(pipe, **proto), ref


@pytest.mark.parametrize("name", METRICS.names())
def test_every_metric_scores_digits_or_names_what_it_misses(name, digits_pair):
    metric = METRICS.get(name)()
    assert metric.name == name  # the registry key is the metric's own name
    try:
        metric.check()
    except FileNotFoundError:
        pass  # checked below
    except ValueError as e:  # a required option: the error names it and how to set it; then score against fp
        assert f"eval.metrics.{name}." in str(e), e
        metric = METRICS.get(name)(reference="fp")
    try:
        metric.check()
    except FileNotFoundError as e:  # offline: weights / reference statistics / evaluator absent
        assert name in str(e) and str(e).strip(), e
        return
    samples, ref = digits_pair
    ctx = metric_contexts([metric]).get(metric.context_cls)
    res = metric.compute(samples, ref, ctx)
    assert res.name == name and res.n > 0 and not math.isnan(res.value)
    if metric.needs_reference:  # a paired metric against the reference itself is at its best value
        best = metric.compute(ref, ref, ctx).value
        assert best != res.value and (best > res.value) == metric.higher_is_better
