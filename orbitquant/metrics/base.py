"""The metric contract: a named computation over samples (and the fp reference), with a direction."""

from __future__ import annotations

from typing import Any, ClassVar

from ..types import MetricResult, Samples


class Metric:
    """``compute(samples, reference, ctx)``; ``reference`` is the fp model's samples under the same noise."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    needs_reference: ClassVar[bool] = False
    context_cls: ClassVar[type | None] = None  # shared lazy resources (feature nets, real data), one per run

    def check(self) -> None:
        """Raise (FileNotFoundError / ValueError, naming the fix) if the metric cannot run, e.g. its feature
        network's weights are missing. Called before the model is loaded, so a run never samples for
        hours and then fails at scoring."""

    def compute(self, samples: Samples, reference: Samples | None, ctx: Any) -> MetricResult:
        raise NotImplementedError

    def result(self, value: float, n: int, **extra: float) -> MetricResult:
        return MetricResult(self.name, float(value), self.higher_is_better, n, extra)
