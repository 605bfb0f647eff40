"""Shared calibration pipeline: run the model's real sampler on calibration conditions and record,
per target linear, bounded statistics of its inputs.

Memory is bounded per layer: a running per-channel absmax, a token count, and a seeded reservoir of
at most ``reservoir`` input tokens (for searching hyper-parameters on real activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .types import LayerRef


@dataclass
class LayerStats:
    absmax: torch.Tensor  # (d,) max |x_j| over every calibration token
    tokens: int = 0
    reservoir: torch.Tensor | None = None  # (<= R, d) uniform sample of input tokens
    seen_for_reservoir: int = 0


@dataclass
class ActivationCollector:
    """Forward hooks on the target linears; ``with collector.attach(layers): run_sampler()``."""

    reservoir: int = 256
    seed: int = 0
    stats: dict[str, LayerStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)
        self._hooks: list = []

    def _observe(self, fqn: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        st = self.stats.get(fqn)
        amax = x.abs().amax(dim=0)
        if st is None:
            st = self.stats[fqn] = LayerStats(absmax=amax.cpu())
        else:
            st.absmax = torch.maximum(st.absmax, amax.cpu())
        st.tokens += len(x)
        # reservoir sampling (Vitter's algorithm R), vectorised over the batch of tokens
        x, res, seen = x.cpu(), st.reservoir, st.seen_for_reservoir
        n_fill = min(self.reservoir - (0 if res is None else len(res)), len(x))
        if n_fill > 0:
            res = x[:n_fill].clone() if res is None else torch.cat([res, x[:n_fill]])
            seen, x = seen + n_fill, x[n_fill:]
        if len(x):
            slots = (torch.rand(len(x), generator=self._gen) * torch.arange(seen + 1, seen + len(x) + 1)).long()
            keep = slots < self.reservoir
            res[slots[keep]] = x[keep]
            seen += len(x)
        st.reservoir, st.seen_for_reservoir = res, seen

    def attach(self, layers: list[LayerRef]) -> "ActivationCollector":
        for ref in layers:
            def hook(_mod, args, _out, fqn=ref.fqn):
                self._observe(fqn, args[0])
            self._hooks.append(ref.module.register_forward_hook(hook))
        return self

    def __enter__(self) -> "ActivationCollector":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
