"""What PTQ4DiT records during the shared calibration pipeline, restricted to the selected sampler steps
(``timesteps``): per-layer activation statistics, with per-sample absmax rows for ``ssc=sample``
(``StepCollector``), and the denoiser inputs the reconstruction replays (``StepRecorder``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orbitquant.quant.calib import (
    ActivationCollector,
    InputRecorder,
    _batch_of,
    current_call,
    split_halves,
)


def selected_steps(n_steps: int, n: int | None) -> set[int]:
    """``n`` evenly spaced indices of ``n_steps`` sampler steps (all when ``n`` is None or >= n_steps; the
    middle step when ``n == 1``, the paper's T/2 ablation)."""
    if n is None or n >= n_steps:
        return set(range(n_steps))
    if n == 1:
        return {n_steps // 2}
    return {round(i * (n_steps - 1) / (n - 1)) for i in range(n)}


def _step_selected(n: int | None) -> bool:
    call = current_call()
    return n is None or call is None or call.n_steps is None or call.step in selected_steps(call.n_steps, n)


@dataclass
class StepCollector(ActivationCollector):
    """``ActivationCollector`` restricted to the selected steps; with ``per_sample`` it also keeps the
    per-sample absmax (max over tokens) of the first ``per_sample`` rows per (step, CFG half)."""

    timesteps: int | None = None
    per_sample: int = 0
    sample_absmax: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._counts: dict[tuple[str, int, str], int] = {}

    def _observe(self, fqn: str, x: torch.Tensor) -> None:
        if not _step_selected(self.timesteps):
            return
        super()._observe(fqn, x)
        if not self.per_sample:
            return
        call = current_call()
        step = call.step if call else -1
        for half, part in split_halves(x.detach().float(), call):
            key = (fqn, step, half)
            need = self.per_sample - self._counts.get(key, 0)
            if need <= 0:
                continue
            d = part.shape[-1]
            rows = part.reshape(part.shape[0], -1, d) if part.dim() >= 3 else part.reshape(1, -1, d)
            amax = rows[:need].abs().amax(dim=1).cpu()
            self.sample_absmax.setdefault(fqn, []).extend(amax)
            self._counts[key] = self._counts.get(key, 0) + len(amax)


@dataclass
class StepRecorder(InputRecorder):
    """Denoiser inputs for reconstruction: up to ``per_half`` rows per (selected step, CFG half), one random
    row per half per denoiser call (so the rows spread over trajectory batches); a call without sampler
    information (no ``DenoiserCall``) gives its first rows."""

    per_half: int = 4
    timesteps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._counts: dict[tuple[int, str], int] = {}

    def _hook(self, _mod, args, kwargs) -> None:
        if not _step_selected(self.timesteps):
            return
        call, batch = current_call(), _batch_of(args, kwargs)
        if batch is None:
            return
        k, chunk = self._split(call, batch)
        names = call.halves if call and k > 1 else (call.halves[0] if call else "all",)
        step = call.step if call else -1
        picks = []
        for i, half in enumerate(names):
            need = self.per_half - self._counts.get((step, half), 0)
            if need <= 0:
                continue
            if call is None:
                rows = torch.arange(min(need, chunk))
            else:
                rows = torch.randint(chunk, (1,), generator=self._gen)
            picks.append(rows + i * chunk)
            self._counts[(step, half)] = self._counts.get((step, half), 0) + len(rows)
        if not picks:
            return
        self._keep(args, kwargs, batch, torch.cat(picks))
