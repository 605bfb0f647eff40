"""Model adapters, one module per family; importing this package registers them."""

from . import cogvideox, digits, dit, flux, wan, zimage  # noqa: F401
from .base import ModelAdapter

__all__ = ["ModelAdapter"]
