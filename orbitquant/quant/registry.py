"""Registries for methods, models and metrics: plain path-safe names, collision errors, near-match hints.

Entries register themselves on import; lookups import the defining packages lazily so that
``import orbitquant`` stays light.
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class Registry(Generic[T]):
    """A name -> object table for one kind of thing."""

    def __init__(self, kind: str, modules: tuple[str, ...]) -> None:
        self.kind = kind
        self._modules = modules  # imported on first lookup; they call register()
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits and '_'")

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            hint = difflib.get_close_matches(str(name), list(self._entries), n=1)
            did = f" Did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{did} Valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())


METHODS: Registry[Any] = Registry("method", ("orbitquant.quant.methods", "baselines"))
MODELS: Registry[Any] = Registry("model", ("orbitquant.harness.adapters",))
METRICS: Registry[Any] = Registry("metric", ("orbitquant.harness.metrics",))

register_method = METHODS.register
register_model = MODELS.register
register_metric = METRICS.register
