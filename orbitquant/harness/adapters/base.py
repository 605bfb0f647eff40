"""The adapter contract: all model knowledge of one family behind one small class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from orbitquant.harness.adapters.plan_facts import PlanFacts
from orbitquant.harness.types import Samples
from orbitquant.quant.types import LayerRef


class ModelAdapter(PlanFacts, ABC):
    """Loads a family's pipeline, lists its linears with roles, and samples from it; the cost planner's facts of
    the family (CFG, tokens, FLOPs, pipeline size) are :class:`PlanFacts` attributes it overrides."""

    name: str
    modality: ClassVar[str] = "image"

    @abstractmethod
    def load(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
        """The pipeline with real weights (local path or HF cache); a clear error if they are absent."""

    @abstractmethod
    def build_tiny(self, seed: int = 0) -> Any:
        """A random-init pipeline of the same architecture, small enough for CPU tests (no hub)."""

    @abstractmethod
    def denoiser(self, pipe: Any) -> nn.Module:
        """The module that quantization acts on."""

    @abstractmethod
    def layers(self, denoiser: nn.Module) -> list[LayerRef]:
        """Every ``nn.Linear`` of the denoiser exactly once, each with a role."""

    @abstractmethod
    def probe(self, pipe: Any) -> None:
        """Run one small, deterministic denoiser evaluation (drives per-layer error probes)."""

    @abstractmethod
    def generate(self, pipe: Any, **protocol: Any) -> Samples:
        """Deterministic samples for an evaluation protocol, written batch by batch to ``sink`` (a
        ``samplestore`` sink; default memory, returning :class:`Samples`). Batches the sink already has are
        skipped, which is how a killed run resumes."""

    @abstractmethod
    def n_items(self, protocol: dict) -> int:
        """How many samples ``generate(**protocol)`` makes (sizes stores and plans before sampling)."""

    #: a real family at true size: on a CPU the run warns that it will be slow
    heavy: ClassVar[bool] = False

    def needs(self) -> list:
        """What loading needs (weights), as ``preflight.Need`` items checked before the run starts."""
        return []

    def check_protocol(self, protocol: dict, eval_name: str = "") -> None:
        """Fail early, with the fix, when an eval protocol does not fit this model's ``generate``."""
        import inspect

        params = inspect.signature(self.generate).parameters
        fixed = {"pipe", "seed", "progress", "desc", "shard"}
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        required = {n for n, p in params.items() if p.default is p.empty and n not in fixed
                    and p.kind is p.KEYWORD_ONLY}
        unknown = set() if accepts_any else set(protocol) - set(params)
        missing = required - set(protocol)
        if missing or unknown:
            raise ValueError(
                f"eval={eval_name} does not fit model={self.name} ({self.modality}): "
                + (f"missing {sorted(missing)} " if missing else "")
                + (f"unexpected {sorted(unknown)} " if unknown else "")
                + ("- pick a calib protocol made for this model family (conf/calib/)"
                   if eval_name.startswith("calib=") else
                   "- pick an eval protocol made for this model family (conf/eval/)"))

    def fingerprint(self) -> str:
        """Identifies the loaded weights (keys caches of fp reference samples)."""
        return ""
