"""``orbit``: OrbitQuant (arXiv 2607.02461), spec section 13.

Offline: ``W' = rot(W)`` row-wise, per-row norm (bf16), unit rows quantized to the Lloyd-Max codebook
C_{d, b_w}. Runtime: ``x' = rot(x)`` in fp32, per-token norm, unit token quantized to C_{d, b_a},
rescaled by the raw norm; ``y = x_hat' @ W_hat'.T + b``. One rotation and one codebook per input
dimension d, shared by every layer with that d.
"""

from __future__ import annotations

from orbitquant.quant.act import NoActQuant, OrbitActQuant
from orbitquant.quant.codebook import get_codebook
from orbitquant.quant.config import OrbitConfig, torch_dtype
from orbitquant.quant.methods.base import RotatedQuantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import DenseWeight, OrbitWeight


@register_method
class OrbitQuantizer(RotatedQuantizer):
    config_cls = OrbitConfig

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        c: OrbitConfig = self.config
        m = ref.module
        d = m.in_features
        rot = self.rotation(d).to(m.weight.device)
        store = (DenseWeight(rot(m.weight.detach()).to(m.weight.dtype)) if c.w_bits == 16
                 else OrbitWeight(None, get_codebook(d, c.w_bits, c.codebook, m.weight.device), c.eps,
                                  torch_dtype(c.norm_dtype), weight=m.weight, rotation=rot))
        act = (NoActQuant() if c.a_bits == 16
               else OrbitActQuant(get_codebook(d, c.a_bits, c.codebook, m.weight.device), c.eps))
        return QuantLinear(store, m.bias, act, rotation=rot, compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment=f"orbit w{c.w_bits}a{c.a_bits}")
