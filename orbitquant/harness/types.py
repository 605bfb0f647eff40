"""Harness value types: generated samples with their conditioning, and one metric value."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Samples:
    """Generated images in [-1, 1] with the conditioning that produced them, in memory.

    Runs stream their samples to disk instead (``samplestore.SampleSet``, same ``batches`` / ``labels`` / ``meta``
    / ``fingerprint`` interface); this class serves calibration, tests and small sets. Metrics read both through
    :meth:`batches`.
    """

    images: torch.Tensor  # (N, C, H, W) or videos (N, F, C, H, W), float32 in [-1, 1] (or uint8), CPU
    labels: torch.Tensor  # (N,) int64 class labels (or prompt indices)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, *, uint8: bool = False):
        """``(images, labels)`` slices in order: float32 in [-1, 1], or uint8 rounded like a saved PNG."""
        for s in range(0, len(self), batch_size):
            x = self.images[s:s + batch_size]
            if uint8 and x.dtype != torch.uint8:
                x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            elif not uint8 and x.dtype == torch.uint8:
                x = x.float() / 127.5 - 1.0
            yield x, self.labels[s:s + batch_size]

    def fingerprint(self) -> str:
        """Identifies the sample values: keys feature caches (``features.tensor_checksum`` of the images)."""
        from orbitquant.harness.metrics.features import tensor_checksum

        return tensor_checksum(self.images.detach())


@dataclass(frozen=True)
class MetricResult:
    """One metric value with its direction and sample count; ``std`` is a spread over samples if known."""

    name: str
    value: float
    higher_is_better: bool
    n: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "higher_is_better": self.higher_is_better, "n": self.n, **self.extra}
