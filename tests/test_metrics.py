"""Digits metrics against known answers: real digits score well, noise scores badly, PSNR matches its formula."""

from __future__ import annotations

import math

import pytest
import torch

from orbitquant.harness.data import digits_split, load_digits_tensor
from orbitquant.harness.metrics.digits import DigitsContext
from orbitquant.harness.types import Samples
from orbitquant.quant.registry import METRICS


@pytest.fixture(scope="module")
def ctx():
    return DigitsContext()


def _metric(name):
    return METRICS.get(name)()


def _real(n_per_class=30):
    x, y = load_digits_tensor()
    idx = torch.cat([torch.nonzero(y == c).flatten()[:n_per_class] for c in range(10)])
    return Samples(images=x[idx], labels=y[idx])


def test_classifier_is_accurate_on_held_out_digits(ctx):
    d = digits_split(seed=0)
    with torch.no_grad():
        acc = (ctx.net(d["x_test"]).argmax(1) == d["y_test"]).float().mean().item()
    assert acc > 0.97


def test_realism_metrics_separate_real_digits_from_noise(ctx):
    real = _real()
    g = torch.Generator().manual_seed(0)
    noise = Samples(images=torch.rand(real.images.shape, generator=g) * 2 - 1, labels=real.labels)
    assert _metric("class_acc").compute(real, None, ctx).value > 0.97
    assert _metric("class_acc").compute(noise, None, ctx).value < 0.3
    fid_real = _metric("fid_vs_real").compute(real, None, ctx).value
    fid_noise = _metric("fid_vs_real").compute(noise, None, ctx).value
    assert fid_noise > 20 * max(fid_real, 1e-3)
    is_real = _metric("inception_score").compute(real, None, ctx).value
    one_class = Samples(images=real.images[real.labels == 3], labels=real.labels[real.labels == 3])
    assert is_real > 8.0  # near the maximum of 10 for a confident, balanced classifier
    assert _metric("inception_score").compute(one_class, None, ctx).value < 1.5


def test_fidelity_metrics_follow_their_definitions(ctx):
    real = _real(10)
    sigma = 0.05
    g = torch.Generator().manual_seed(1)
    noisy = Samples(images=real.images + sigma * torch.randn(real.images.shape, generator=g), labels=real.labels)
    psnr = _metric("psnr_vs_fp").compute(noisy, real, ctx).value
    assert abs(psnr - 10 * math.log10(4 / sigma**2)) < 0.5  # peak-to-peak 2, per-sample MSE ~ sigma^2
    assert _metric("psnr_vs_fp").compute(real, real, ctx).value == math.inf
    assert _metric("ssim_vs_fp").compute(real, real, ctx).value == pytest.approx(1.0)
    assert _metric("ssim_vs_fp").compute(noisy, real, ctx).value < 0.99
    assert _metric("fid_vs_fp").compute(real, real, ctx).value < 1e-3
    assert _metric("fid_vs_fp").compute(noisy, real, ctx).value > 1e-3


def test_paired_metrics_need_a_matching_reference(ctx):
    real = _real(2)
    with pytest.raises(ValueError, match="reference"):
        _metric("psnr_vs_fp").compute(real, None, ctx)
    shuffled = Samples(images=real.images, labels=real.labels.flip(0))
    with pytest.raises(ValueError, match="labels"):
        _metric("psnr_vs_fp").compute(real, shuffled, ctx)


def test_every_metric_declares_direction():
    for name, cls in METRICS.items():
        assert cls.name == name
        assert isinstance(cls.higher_is_better, bool)


def test_metrics_check_their_weights_before_any_work(monkeypatch, tmp_path):
    import pytest

    from orbitquant.harness.factory import build_metrics
    from orbitquant.harness.metrics import digits_net

    metrics = build_metrics(["class_acc", "fid_vs_fp", "psnr_vs_fp"])
    for m in metrics:
        m.check()  # shipped weights: fine
    monkeypatch.setattr(digits_net, "CLASSIFIER_PATH", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        metrics[0].check()
    metrics[2].check()  # PSNR needs no weights
