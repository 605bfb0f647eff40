"""Metrics of the ``eval=digits`` protocol, on the shipped digit classifier (``digits_net``).

Fidelity to the fp model under shared noise (primary: they rank quantizers on a model this small):
``psnr_vs_fp`` and ``ssim_vs_fp`` (generic, in ``similarity.py``) and ``fid_vs_fp``. Realism checks: ``fid_vs_real`` (all 1797 digits),
``class_acc`` (the classifier agrees with the requested class), ``inception_score`` (its analogue on
the classifier's softmax). torchmetrics does the arithmetic; the feature network is ours.
"""

from __future__ import annotations

import functools

import torch

from ..registry import register_metric
from ..types import MetricResult
from .base import Metric
from .digits_net import DigitFeatures, DigitLogits, load_classifier
from .similarity import paired as _paired


class DigitsContext:
    """Lazily loaded classifier and real-data features shared by the digits metrics."""

    @functools.cached_property
    def net(self):
        return load_classifier()

    @functools.cached_property
    def real_images(self) -> torch.Tensor:
        from ..data import load_digits_tensor

        return load_digits_tensor()[0]


def _fid(ctx: DigitsContext, a: torch.Tensor, b: torch.Tensor) -> float:
    from .features import prepare_torch_fidelity

    prepare_torch_fidelity()  # a torch-fidelity install without torchvision would break the import below
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=DigitFeatures(ctx.net))
    with torch.inference_mode(False), torch.no_grad():
        fid.update(b, real=True)
        fid.update(a, real=False)
        return max(float(fid.compute()), 0.0)  # tiny negatives are sqrtm round-off


class DigitsMetric(Metric):
    context_cls = DigitsContext

    def check(self) -> None:
        from .digits_net import CLASSIFIER_PATH

        if not CLASSIFIER_PATH.exists():
            raise FileNotFoundError(f"metric {self.name}: digit classifier weights not found at {CLASSIFIER_PATH}; "
                                    "run `python scripts/train_digits.py` to recreate them")


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
        with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # torchmetrics shuffles into splits with the global RNG; keep the metric deterministic
            metric.update(samples.images.float())
            mean, std = metric.compute()
        return self.result(mean, len(samples), split_std=float(std))
