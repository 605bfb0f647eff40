"""``hadamard_rtn``: QuaRot-style data-free control (BASELINES_SPEC section 8.6).

The same RPBH rotation as OrbitQuant (one draw per input dim and seed, folded into the weights,
applied online to activations), followed by uniform round-to-nearest: symmetric per-output-channel
weights and symmetric per-token dynamic activations. Identical rotation, different scalar quantizer:
the comparison with ``orbit`` isolates the Lloyd-Max codebook (and the norm/unit-vector split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from orbitquant.quant.act import uniform_act
from orbitquant.quant.config import QuantConfig, check_rotation, check_symmetric_bits
from orbitquant.quant.methods.base import RotatedQuantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import uniform_store


@dataclass(frozen=True)
class HadamardRTNConfig(QuantConfig):
    """Rotation (``rpbh`` like orbit, or ``hadamard`` / ``haar``) + symmetric RTN, no calibration."""

    method: ClassVar[str] = "hadamard_rtn"
    seed: int = 0
    rotation: str = "rpbh"
    w_symmetric: bool = True
    a_symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rotation(self.rotation)
        check_symmetric_bits(self)


@register_method
class HadamardRTNQuantizer(RotatedQuantizer):
    config_cls = HadamardRTNConfig

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        c: HadamardRTNConfig = self.config
        m = ref.module
        rot = self.rotation(m.in_features).to(m.weight.device)  # the same seeded draw per (d, seed) as orbit
        w_rot = rot(m.weight.detach())
        store = uniform_store(w_rot, c.w_bits, c.w_symmetric, "channel", m.weight.dtype)
        act = uniform_act(c.a_bits, c.a_symmetric, "token")
        return QuantLinear(store, m.bias, act, rotation=rot, compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment=f"hadamard_rtn w{c.w_bits}a{c.a_bits}")
