"""orbitquant: calibration-free weight+activation PTQ for diffusion transformers, and a harness to benchmark it.

    import orbitquant as oq
    report = oq.quantize_(model, oq.OrbitConfig(w_bits=4, a_bits=4, seed=0))
    report = oq.quantize_(model, oq.RTNConfig(w_bits=4, a_bits=8))

Layout: ``orbitquant.quant`` is the quantization library, ``orbitquant.kernels`` its native / Triton kernels,
``orbitquant.hf`` the diffusers backend, ``orbitquant.harness`` the benchmark harness ``run.py`` drives
(docs/extending.md).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from orbitquant.quant.api import LayerRecord, QuantReport, quantize_
from orbitquant.quant.codebook import distortion, get_codebook, lloyd_max
from orbitquant.quant.config import FPConfig, OrbitConfig, QuantConfig, RTNConfig
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.rotation import RPBH, HaarRotation, RandomizedHadamard, make_rotation
from orbitquant.quant.types import LayerRef

__version__ = "0.1.0"

__all__ = [
    "quantize_", "QuantReport", "LayerRecord",
    "QuantConfig", "FPConfig", "RTNConfig", "OrbitConfig",
    "QuantLinear", "lloyd_max", "distortion", "get_codebook",
    "RPBH", "RandomizedHadamard", "HaarRotation", "make_rotation",
    "LayerRef", "MetricResult", "Samples",
]

#: module paths users imported before the library / harness split, and where they live now
_MOVED = {"orbitquant.checkpoint": "orbitquant.quant.checkpoint", "orbitquant.hf_quantizer": "orbitquant.hf.quantizer"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import orbitquant.checkpoint`` returns ``orbitquant.quant.checkpoint`` itself (one module object, so
    registrations and monkeypatches are shared), imported lazily: no shim files beside the two halves."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())

# the diffusers backend registers on import, so a saved quantized model reloads with plain from_pretrained after
# `import orbitquant` (as diffusers' built-in backends do); costs diffusers' import (~2 s), which every user of a
# diffusion model pays anyway
import orbitquant.hf.quantizer  # noqa: E402, F401


#: harness types still reachable as ``oq.Samples`` / ``oq.MetricResult``, imported on first use so that
#: ``import orbitquant`` (the library) never imports the harness
_HARNESS_TYPES = ("MetricResult", "Samples")


def __getattr__(name: str):
    if f"orbitquant.{name}" in _MOVED:  # orbitquant.checkpoint as an attribute, as before the split
        return importlib.import_module(f"orbitquant.{name}")
    if name in _HARNESS_TYPES:
        return getattr(importlib.import_module("orbitquant.harness.types"), name)
    raise AttributeError(f"module 'orbitquant' has no attribute {name!r}")
