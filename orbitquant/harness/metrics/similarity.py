"""Fidelity to the fp model under shared noise, for any image samples in [-1, 1]: PSNR and SSIM.

Both read the samples and the fp reference in step, one batch of each at a time (``base.paired_batches``); the
per-sample values do not depend on the batch (each is a function of its own sample pair only), so streaming gives
the numbers of scoring the whole set at once.
"""

from __future__ import annotations

import torch

from orbitquant.harness.metrics.base import Metric, SampleSource, cat_or_empty, frames, paired_batches
from orbitquant.harness.types import MetricResult
from orbitquant.quant.registry import register_metric

DATA_RANGE = 2.0  # images live in [-1, 1]


def _per_sample(per: torch.Tensor) -> list[float]:
    """Per-sample values (6 significant digits) for paired analyses: sample i of every method shares seed and prompt."""
    return [float(f"{v:.6g}") for v in per.double().tolist()]


class PairedMetric(Metric):
    """A per-sample comparison with the fp sample; ``batch_size`` = images (video frames) read per batch from each
    set (default: ``base.READ_BYTES`` of float32 images)."""

    needs_reference = True

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def values(self, samples: SampleSource, reference: SampleSource | None) -> torch.Tensor:
        return cat_or_empty([self.per_sample(a, b) for a, b, _ in paired_batches(samples, reference, self.batch_size)],
                            "samples")


@register_metric
class PSNRvsFP(PairedMetric):
    """Mean per-sample PSNR (dB, peak-to-peak 2) against the fp sample with the same noise and class."""

    name, higher_is_better = "psnr_vs_fp", True

    def per_sample(self, a, b):
        from torchmetrics.functional.image import peak_signal_noise_ratio

        return peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, dim=tuple(range(1, a.ndim)), reduction="none")

    def compute(self, samples, reference, ctx) -> MetricResult:
        per = self.values(samples, reference)
        return self.result(per.mean(), len(per), std=per.std().item() if torch.isfinite(per).all() else 0.0,
                           per_sample=_per_sample(per))


@register_metric
class SSIMvsFP(PairedMetric):
    """Mean per-sample SSIM (videos: mean over frames) against the fp sample (3x3 Gaussian window, sigma 0.5, so 8x8 digits work too)."""

    name, higher_is_better = "ssim_vs_fp", True

    def per_sample(self, a, b):
        from torchmetrics.functional.image import structural_similarity_index_measure

        return structural_similarity_index_measure(frames(a), frames(b), data_range=DATA_RANGE, kernel_size=3,
                                                   sigma=0.5, reduction="none").view(len(a), -1).mean(1)

    def compute(self, samples, reference, ctx) -> MetricResult:
        per = self.values(samples, reference)
        return self.result(per.mean(), len(per), std=per.std().item(), per_sample=_per_sample(per))
