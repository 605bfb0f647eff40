"""Model adapters, one module per family; importing this package imports every module in it, and each adapter
registers itself (a new family's module is found without editing a list)."""

from orbitquant.harness.adapters.base import ModelAdapter
from orbitquant.quant.registry import import_submodules

import_submodules(__name__)

__all__ = ["ModelAdapter"]
