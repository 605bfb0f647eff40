"""Metrics of the ``eval=digits`` protocol, on the shipped digit classifier (``digits_net``).

Fidelity to the fp model under shared noise (primary: they rank quantizers on a model this small):
``psnr_vs_fp`` and ``ssim_vs_fp`` (generic, in ``similarity.py``) and ``fid_vs_fp``. Realism checks: ``fid_vs_real`` (all 1797 digits),
``class_acc`` (the classifier agrees with the requested class), ``inception_score`` (its analogue on
the classifier's softmax). torchmetrics does the arithmetic, updated one batch at a time (``batch_size`` images;
the default, ``base.READ_BYTES``, holds a whole digits protocol in one batch, so its numbers are bit-identical to
scoring it at once -- smaller batches move them by float32 rounding, as the classifier's convolutions round
differently per batch shape); the feature network is ours.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable, Iterator

import torch

from orbitquant.harness.metrics.base import Metric, SampleSource, item_batches, paired_batches
from orbitquant.harness.metrics.digits_net import DigitFeatures, DigitLogits, load_classifier
from orbitquant.harness.types import MetricResult
from orbitquant.quant.registry import register_metric


class DigitsContext:
    """Lazily loaded classifier and real-data features shared by the digits metrics."""

    @functools.cached_property
    def net(self):
        return load_classifier()

    @functools.cached_property
    def real_images(self) -> torch.Tensor:
        from orbitquant.harness.data import load_digits_tensor

        return load_digits_tensor()[0]


def _fid(ctx: DigitsContext, pairs: Iterable[tuple[torch.Tensor | None, torch.Tensor | None]]) -> float:
    """FID between the ``real`` and ``fake`` images of ``(real, fake)`` batches (either may be None), on the
    classifier's features: torchmetrics keeps float64 running sums of the features and their outer products."""
    from orbitquant.harness.metrics.features import prepare_torch_fidelity

    prepare_torch_fidelity()  # a torch-fidelity install without torchvision would break the import below
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=DigitFeatures(ctx.net), sync_on_compute=False)  # rank 0 scores alone
    with torch.inference_mode(False), torch.no_grad():
        for real, fake in pairs:
            if real is not None:
                fid.update(real, real=True)
            if fake is not None:
                fid.update(fake, real=False)
        return max(float(fid.compute()), 0.0)  # tiny negatives are sqrtm round-off


class DigitsMetric(Metric):
    """A digits-classifier metric; ``batch_size`` = images per classifier call (and per metric update)."""

    context_cls = DigitsContext

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def needs(self) -> list:
        from orbitquant.harness.metrics.digits_net import CLASSIFIER_PATH
        from orbitquant.harness.preflight import file_need

        return [file_need("digit classifier weights", CLASSIFIER_PATH,
                          "they ship with the repo; `python scripts/train_digits.py` recreates them")]

    def batches(self, samples: SampleSource) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return item_batches(samples, self.batch_size)


@register_metric
class FIDvsFP(DigitsMetric):
    """FID between the sample set and the fp sample set, on the classifier's 64-d features."""

    name, higher_is_better, needs_reference = "fid_vs_fp", False, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        pairs = ((b, a) for a, b, _ in paired_batches(samples, reference, self.batch_size))
        return self.result(_fid(ctx, pairs), len(samples))


@register_metric
class FIDvsReal(DigitsMetric):
    """FID between the samples and all 1797 real digits, on the classifier's 64-d features."""

    name, higher_is_better = "fid_vs_real", False

    def compute(self, samples, reference, ctx) -> MetricResult:
        real = ctx.real_images  # the digits data set itself: 1797 8x8 images, always in memory
        pairs = itertools.chain([(real, None)], ((None, x) for x, _ in self.batches(samples)))
        return self.result(_fid(ctx, pairs), len(samples), n_real=len(real))


@register_metric
class ClassAccuracy(DigitsMetric):
    """Fraction of samples the classifier assigns to the class they were conditioned on."""

    name, higher_is_better = "class_acc", True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.classification import MulticlassAccuracy

        acc = MulticlassAccuracy(num_classes=ctx.net.head.out_features, average="micro", sync_on_compute=False)
        with torch.no_grad():
            for x, labels in self.batches(samples):
                acc.update(ctx.net(x), labels)
        return self.result(acc.compute(), len(samples))


@register_metric
class DigitsInceptionScore(DigitsMetric):
    """Inception-score analogue exp(E KL(p(y|x) || p(y))) on the classifier (max 10), 5 splits."""

    name, higher_is_better = "inception_score", True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():  # it keeps every sample's 10 logits (per-sample values, not images)
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            metric = InceptionScore(feature=DigitLogits(ctx.net), splits=5, sync_on_compute=False)
        with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # torchmetrics shuffles into splits with the global RNG; keep the metric deterministic
            for x, _ in self.batches(samples):
                metric.update(x)
            mean, std = metric.compute()
        return self.result(mean, len(samples), split_std=float(std))
