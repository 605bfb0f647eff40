"""Built-in methods; importing this package registers them. Baselines live in ``baselines/``."""

from orbitquant.quant.methods import fp, orbit, rtn  # noqa: F401
from orbitquant.quant.methods.base import Quantizer

__all__ = ["Quantizer"]
