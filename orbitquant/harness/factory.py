"""Build typed objects from plain config dicts (what Hydra composes), with errors that name the fix."""

from __future__ import annotations

from typing import Any

from orbitquant.harness.adapters.base import ModelAdapter
from orbitquant.harness.metrics.base import Metric
from orbitquant.quant.config import build_quant_config  # noqa: F401  (re-exported: run configs)
from orbitquant.quant.registry import METRICS, MODELS


def _split(cfg: dict, key: str, kind: str) -> tuple[str, dict]:
    cfg = dict(cfg)
    if key not in cfg:
        raise KeyError(f"{kind} config needs a {key!r} entry")
    return cfg.pop(key), cfg


def build_adapter(model_cfg: dict) -> ModelAdapter:
    """``{adapter: digits, name: digits_outliers, **kwargs}`` -> adapter instance."""
    adapter, kwargs = _split(model_cfg, "adapter", "model")
    cls = MODELS.get(adapter)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for model adapter {adapter!r}: {e}") from None


def metric_specs(spec) -> list[tuple[str, dict]]:
    """``eval.metrics`` -> ``[(name, options)]``. Accepted: a list of names and/or one-key ``{name: options}`` dicts,
    or one mapping ``name -> options`` (``None`` = defaults), e.g. ``{fid: {reference: /data/ref.npz}, isc: null}``
    (then ``eval.metrics.fid.reference=...`` works on the command line)."""
    items = spec.items() if isinstance(spec, dict) else [
        next(iter(e.items())) if isinstance(e, dict) and len(e) == 1 else (e, None) for e in spec]
    out = []
    for name, opts in items:
        if not isinstance(name, str) or not (opts is None or isinstance(opts, dict)):
            raise ValueError(f"bad metric entry {name!r}: {opts!r}; give a name or {{name: {{option: value}}}}")
        out.append((name, dict(opts or {})))
    return out


def build_metrics(spec) -> list[Metric]:
    """Metric instances from ``eval.metrics`` (see ``metric_specs``); unknown options name the valid ones."""
    metrics = []
    for name, opts in metric_specs(spec):
        cls = METRICS.get(name)
        try:
            metrics.append(cls(**opts))
        except TypeError as e:
            raise TypeError(f"bad options {sorted(opts)} for metric {name!r}: {e}") from None
    return metrics


def metric_contexts(metrics: list[Metric]) -> dict[type, Any]:
    """One shared context object per context class the metrics ask for."""
    return {m.context_cls: m.context_cls() for m in metrics if m.context_cls is not None}
