"""Built-in methods; importing this package registers them. Baselines live in ``baselines/``."""

from . import fp, orbit, rtn  # noqa: F401
from .base import Quantizer

__all__ = ["Quantizer"]
