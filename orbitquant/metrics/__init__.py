"""Metrics; importing this package registers them."""

from . import digits, inception, similarity  # noqa: F401
from .base import Metric
from .digits import DigitsContext

__all__ = ["DigitsContext", "Metric"]
