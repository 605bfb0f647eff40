"""Fidelity to the fp model under shared noise, for any image samples in [-1, 1]: PSNR and SSIM."""

from __future__ import annotations

import torch

from ..registry import register_metric
from ..types import MetricResult, Samples
from .base import Metric

DATA_RANGE = 2.0  # images live in [-1, 1]


def paired(samples: Samples, reference: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        raise ValueError("this metric compares with the fp reference samples, but none were given")
    if samples.images.shape != reference.images.shape or not torch.equal(samples.labels, reference.labels):
        raise ValueError("samples and fp reference differ in shape or labels; they must come from the same protocol")
    return samples.images.float(), reference.images.float()


def _per_sample(per: torch.Tensor) -> list[float]:
    """Per-sample values (6 significant digits) for paired analyses: sample i of every method shares seed and prompt."""
    return [float(f"{v:.6g}") for v in per.double().tolist()]


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(N, F, C, H, W) videos -> (N * F, C, H, W) frames; images pass through."""
    return x.flatten(0, 1) if x.ndim == 5 else x


@register_metric("psnr_vs_fp")
class PSNRvsFP(Metric):
    """Mean per-sample PSNR (dB, peak-to-peak 2) against the fp sample with the same noise and class."""

    name, higher_is_better, needs_reference = "psnr_vs_fp", True, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        a, b = paired(samples, reference)
        per = peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, dim=tuple(range(1, a.ndim)), reduction="none")
        return self.result(per.mean(), len(a), std=per.std().item() if torch.isfinite(per).all() else 0.0,
                           per_sample=_per_sample(per))


@register_metric("ssim_vs_fp")
class SSIMvsFP(Metric):
    """Mean per-sample SSIM (videos: mean over frames) against the fp sample (3x3 Gaussian window, sigma 0.5, so 8x8 digits work too)."""

    name, higher_is_better, needs_reference = "ssim_vs_fp", True, True

    def compute(self, samples, reference, ctx) -> MetricResult:
        from torchmetrics.functional.image import structural_similarity_index_measure

        a, b = paired(samples, reference)
        per = structural_similarity_index_measure(_frames(a), _frames(b), data_range=DATA_RANGE, kernel_size=3,
                                                  sigma=0.5, reduction="none").view(len(a), -1).mean(1)
        return self.result(per.mean(), len(a), std=per.std().item(), per_sample=_per_sample(per))
