"""Model adapters, one module per family; importing this package registers them."""

from . import digits, flux, wan  # noqa: F401
from .base import ModelAdapter

__all__ = ["ModelAdapter"]
