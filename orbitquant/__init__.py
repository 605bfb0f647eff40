"""orbitquant: calibration-free weight+activation PTQ for diffusion transformers, and a harness to benchmark it.

    import orbitquant as oq
    report = oq.quantize_(model, oq.OrbitConfig(w_bits=4, a_bits=4, seed=0))
    report = oq.quantize_(model, oq.RTNConfig(w_bits=4, a_bits=8))
"""

from .api import LayerRecord, QuantReport, quantize_
from .codebook import distortion, get_codebook, lloyd_max
from .config import FPConfig, OrbitConfig, QuantConfig, RTNConfig
from .nn import QuantLinear
from .rotation import RPBH, HaarRotation, RandomizedHadamard, make_rotation
from .types import LayerRef, MetricResult, Samples

__version__ = "0.1.0"

__all__ = [
    "quantize_", "QuantReport", "LayerRecord",
    "QuantConfig", "FPConfig", "RTNConfig", "OrbitConfig",
    "QuantLinear", "lloyd_max", "distortion", "get_codebook",
    "RPBH", "RandomizedHadamard", "HaarRotation", "make_rotation",
    "LayerRef", "MetricResult", "Samples",
]
