"""``fp``: the identity method. Layers become QuantLinear with the original weight and no quantizers,
so the harness path is exercised while outputs stay bit-exact."""

from __future__ import annotations

from orbitquant.quant.config import FPConfig
from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import DenseWeight


@register_method
class FPQuantizer(Quantizer):
    config_cls = FPConfig

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        m = ref.module
        return QuantLinear(DenseWeight(m.weight), m.bias, compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment="fp")
