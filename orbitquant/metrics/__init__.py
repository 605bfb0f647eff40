"""Metrics; importing this package registers them."""

from . import clip_score, digits, geneval, inception, lpips, similarity, vbench  # noqa: F401
from .base import Metric
from .digits import DigitsContext

__all__ = ["DigitsContext", "Metric"]
