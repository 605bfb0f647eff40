"""Each multirun keeps its own sweep record.

Hydra writes ``multirun.yaml`` (the composed config and the sweep's overrides) into the sweep directory, which for
us is the shared results root (run directories are keyed by model / method / tag / eval / seeds, not by sweep), so
every ``-m`` overwrote the one before. This Hydra callback also saves each sweep's record under
``<results_dir>/../sweeps/<start time>-<pid>/multirun.yaml`` as the sweep starts, so a sweep killed halfway still
has its record; ``scripts/sweep_status.py`` reads run directories, not these.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def sweep_record_dir(results_dir: str | Path) -> Path:
    """Where this sweep's record goes: a fresh folder per sweep beside the results root."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    return Path(results_dir).resolve().parent / "sweeps" / f"{stamp}-{os.getpid()}"


class SweepRecord(Callback):
    """``on_multirun_start``: save the sweep's composed config and overrides (Hydra's ``multirun.yaml``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = sweep_record_dir(config.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        # the same content Hydra writes to <sweep dir>/multirun.yaml; interpolations stay unresolved, as there
        (out / "multirun.yaml").write_text(OmegaConf.to_yaml(config))
