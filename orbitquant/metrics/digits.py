"""Metrics of the ``eval=digits`` protocol, on the shipped digit classifier (``digits_net``).

Fidelity to the fp model under shared noise (primary: they rank quantizers on a model this small):
``psnr_vs_fp``, ``ssim_vs_fp``, ``fid_vs_fp``. Realism checks: ``fid_vs_real`` (all 1797 digits),
``class_acc`` (the classifier agrees with the requested class), ``inception_score`` (its analogue on
the classifier's softmax). torchmetrics does the arithmetic; the feature network is ours.
"""

from __future__ import annotations

import functools

import torch

from ..registry import register_metric
from ..types import MetricResult, Samples
from .base import Metric
from .digits_net import DigitFeatures, DigitLogits, load_classifier

DATA_RANGE = 2.0  # images live in [-1, 1]


class DigitsContext:
    """Lazily loaded classifier and real-data features shared by the digits metrics."""

    @functools.cached_property
    def net(self):
        return load_classifier()

    @functools.cached_property
    def real_images(self) -> torch.Tensor:
        from ..data import load_digits_tensor

        return load_digits_tensor()[0]


def _paired(samples: Samples, reference: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        raise ValueError("this metric compares with the fp reference samples, but none were given")
    if samples.images.shape != reference.images.shape or not torch.equal(samples.labels, reference.labels):
        raise ValueError("samples and fp reference differ in shape or labels; they must come from the same protocol")
    return samples.images.float(), reference.images.float()


def _fid(ctx: DigitsContext, a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=DigitFeatures(ctx.net))
    with torch.inference_mode(False), torch.no_grad():
        fid.update(b, real=True)
        fid.update(a, real=False)
        return max(float(fid.compute()), 0.0)  # tiny negatives are sqrtm round-off


class DigitsMetric(Metric):
    context_cls = DigitsContext


@register_metric("psnr_vs_fp")
class PSNRvsFP(DigitsMetric):
    """Mean per-sample PSNR (dB, peak-to-peak 2) against the fp sample with the same noise and class."""

    name, higher_is_better, needs_reference = "psnr_vs_fp", True, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        a, b = _paired(samples, reference)
        per = peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, dim=(1, 2, 3), reduction="none")
        return self.result(per.mean(), len(a), std=per.std().item() if torch.isfinite(per).all() else 0.0)


@register_metric("ssim_vs_fp")
class SSIMvsFP(DigitsMetric):
    """Mean per-sample SSIM against the fp sample (3x3 Gaussian window, sigma 0.5: the images are 8x8)."""

    name, higher_is_better, needs_reference = "ssim_vs_fp", True, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.functional.image import structural_similarity_index_measure

        a, b = _paired(samples, reference)
        per = structural_similarity_index_measure(a, b, data_range=DATA_RANGE, kernel_size=3, sigma=0.5,
                                                  reduction="none")
        return self.result(per.mean(), len(a), std=per.std().item())


@register_metric("fid_vs_fp")
class FIDvsFP(DigitsMetric):
    """FID between the sample set and the fp sample set, on the classifier's 64-d features."""

    name, higher_is_better, needs_reference = "fid_vs_fp", False, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        a, b = _paired(samples, reference)
        return self.result(_fid(ctx, a, b), len(a))


@register_metric("fid_vs_real")
class FIDvsReal(DigitsMetric):
    """FID between the samples and all 1797 real digits, on the classifier's 64-d features."""

    name, higher_is_better = "fid_vs_real", False

    def compute(self, samples, reference, ctx) -> MetricResult:
        return self.result(_fid(ctx, samples.images.float(), ctx.real_images), len(samples), n_real=len(ctx.real_images))


@register_metric("class_acc")
class ClassAccuracy(DigitsMetric):
    """Fraction of samples the classifier assigns to the class they were conditioned on."""

    name, higher_is_better = "class_acc", True

    def compute(self, samples, reference, ctx) -> MetricResult:
        with torch.no_grad():
            pred = ctx.net(samples.images.float()).argmax(1)
        return self.result((pred == samples.labels).float().mean(), len(samples))


@register_metric("inception_score")
class DigitsInceptionScore(DigitsMetric):
    """Inception-score analogue exp(E KL(p(y|x) || p(y))) on the classifier (max 10), 5 splits."""

    name, higher_is_better = "inception_score", True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.image.inception import InceptionScore

        metric = InceptionScore(feature=DigitLogits(ctx.net), splits=5)
        with torch.inference_mode(False), torch.no_grad():
            metric.update(samples.images.float())
            mean, std = metric.compute()
        return self.result(mean, len(samples), split_std=float(std))
