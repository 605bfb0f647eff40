"""The quantizer protocol shared by ``orbitquant/methods`` and ``baselines/`` (they differ in provenance only)."""

from __future__ import annotations

from typing import ClassVar

from ..config import QuantConfig
from ..nn import QuantLinear
from ..types import LayerRef


class Quantizer:
    """Turns the layers a policy assigns to the method into ``QuantLinear`` replacements.

    Calibrated methods set ``needs_calibration`` and install observers in ``prepare``; the calibration
    data then flows through the model between ``prepare`` and ``convert``.
    """

    config_cls: ClassVar[type[QuantConfig]] = QuantConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: QuantConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    def prepare(self, layers: list[LayerRef]) -> None:
        """Install observers (calibrated methods only)."""

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        raise NotImplementedError

    def convert(self, layers: list[LayerRef]) -> dict[str, QuantLinear]:
        """Replacement module for every layer (by fqn); the caller swaps them in."""
        return {ref.fqn: self.quantize_layer(ref) for ref in layers}
