"""``rtn``: uniform round-to-nearest with min/max scales: per-output-channel weights, dynamic per-token
activations (``group > 0``: per group of input channels, both symmetric). The simplest correct calibration-free
baseline."""

from __future__ import annotations

from orbitquant.quant.act import GroupActQuant, uniform_act
from orbitquant.quant.config import RTNConfig
from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import GroupWeight, uniform_store


@register_method
class RTNQuantizer(Quantizer):
    config_cls = RTNConfig

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        c: RTNConfig = self.config
        m = ref.module
        if c.group and c.w_bits != 16:
            store = GroupWeight(m.weight, c.w_bits, c.group)
        else:
            store = uniform_store(m.weight, c.w_bits, c.w_symmetric, c.w_granularity, m.weight.dtype)
        if c.group and c.a_bits != 16:
            act = GroupActQuant(c.a_bits, c.group, symmetric=True)
        else:
            act = uniform_act(c.a_bits, c.a_symmetric, c.a_granularity)
        return QuantLinear(store, m.bias, act, compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment=f"rtn w{c.w_bits}a{c.a_bits}")
