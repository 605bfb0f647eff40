"""The quantizer protocol shared by ``orbitquant/quant/methods`` (the library's own methods) and ``baselines/``
(methods reimplemented from other papers, each with an UPSTREAM.md)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from orbitquant.quant.config import QuantConfig
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.rotation import Rotation, make_rotation
from orbitquant.quant.types import LayerRef


class Quantizer:
    """Turns each layer the policy assigns to the method into a ``QuantLinear`` replacement.

    Calibrated methods set ``needs_calibration`` and install observers in ``prepare``; the calibration
    sampler then runs, ``finish_calibration`` fits what it determines, and ``quantize_layer`` is called
    layer by layer in model order, each replacement swapped in before the next call (so a method may
    replay the model to see inputs produced by the already-quantized layers, as GPTQ does).
    """

    config_cls: ClassVar[type[QuantConfig]] = QuantConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: QuantConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        """Install observers (calibrated methods only); the calibration sampler runs next. ``layers`` are
        the layers this method will quantize; ``model`` the module they belong to."""

    def finish_calibration(self) -> dict:
        """Remove observers and fit what the calibration determines; returns facts for the report."""
        return {}

    def calibration_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """What calibration produced, as (tensors, JSON facts), for the artifact cache; called after every
        layer is quantized. None: nothing to cache."""
        return None

    def load_calibration_state(self, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        """Restore a cached :meth:`calibration_state` instead of calibrating (after ``prepare``, which may
        have installed observers: remove them). Returns the facts for the report."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore a calibration artifact")

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        """The replacement for one layer; ``quantize_`` calls it layer by layer and swaps each in at once,
        so at most one extra layer's weights are alive at a time."""
        raise NotImplementedError


class RotatedQuantizer(Quantizer):
    """A quantizer whose layers share one seeded rotation per input dim (``config.rotation``, ``config.seed``)."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self._rotations: dict[int, Rotation] = {}

    def rotation(self, d: int) -> Rotation:
        """The one rotation for input dim ``d``, drawn from the config seed and shared across layers."""
        if d not in self._rotations:
            self._rotations[d] = make_rotation(self.config.rotation, d, self.config.seed)
        return self._rotations[d]


class CollectingQuantizer(Quantizer):
    """A calibrated method fed by an ``ActivationCollector`` on its layers (per-channel absmax, a seeded token
    reservoir); its config has ``reservoir`` and ``seed``."""

    needs_calibration = True

    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        from orbitquant.quant.calib import ActivationCollector

        self.layers = layers
        self.collector = ActivationCollector(reservoir=self.config.reservoir, seed=self.config.seed).attach(layers)

    def collected(self) -> dict:
        """Detach the hooks and return the per-layer statistics, every target layer present."""
        self.collector.__exit__()
        stats = self.collector.stats
        missing = [r.fqn for r in self.layers if r.fqn not in stats]
        if missing:
            raise RuntimeError(f"calibration never reached {len(missing)} layers, e.g. {missing[:3]}")
        return stats
