"""The library's own methods (fp, rtn, orbit); importing this package registers every module in it.
Methods reimplemented from other papers live in ``baselines/``."""

from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.registry import import_submodules

import_submodules(__name__)

__all__ = ["Quantizer"]
