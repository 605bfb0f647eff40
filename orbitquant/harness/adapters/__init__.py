"""Model adapters, one module per family; importing this package registers them."""

from orbitquant.harness.adapters import cogvideox, digits, dit, flux, wan, zimage  # noqa: F401
from orbitquant.harness.adapters.base import ModelAdapter

__all__ = ["ModelAdapter"]
