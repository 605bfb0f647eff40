"""Registries for methods, models and metrics: plain path-safe names, collision errors, near-match hints.

Entries register themselves on import; lookups import the defining packages lazily so that
``import orbitquant`` stays light.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class Registry(Generic[T]):
    """A name -> object table for one kind of thing."""

    def __init__(self, kind: str, modules: tuple[str, ...], name_of: Callable[[T], str | None] | None = None) -> None:
        self.kind = kind
        self._modules = modules  # imported on first lookup; they call register()
        self._name_of = name_of  # an entry's own name (bare @register), if the kind has one
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name_or_obj: str | T) -> Any:
        """``@register("name")`` or bare ``@register``: the name is then the entry's own (``name_of``), so it is
        written once. A given name that differs from the entry's own is an error (they would drift)."""
        if not isinstance(name_or_obj, str):
            return self._decorator(self._own_name(name_or_obj))(name_or_obj)
        return self._decorator(name_or_obj)

    def _own_name(self, obj: T) -> str:
        if self._name_of is None:
            raise TypeError(f"{self.kind}s are registered with an explicit name: @register_{self.kind}(\"name\")")
        return self._name_of(obj)

    def _decorator(self, name: str) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits and '_'")

        def deco(obj: T) -> T:
            if self._name_of is not None and (own := self._name_of(obj)) not in (None, name):
                raise ValueError(f"{self.kind} {obj!r} is registered as {name!r} but names itself {own!r}; "
                                 f"register it with a bare @register_{self.kind}")
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


def import_submodules(package: str) -> None:
    """Import every module and subpackage of ``package`` (so each registers itself): a new method, family or
    metric file is found without editing any list. Modules whose name starts with ``_`` are skipped."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


METHODS: Registry[Any] = Registry("method", ("orbitquant.quant.methods", "baselines"),
                                  name_of=lambda cls: cls.config_cls.method)
MODELS: Registry[Any] = Registry("model", ("orbitquant.harness.adapters",))
METRICS: Registry[Any] = Registry("metric", ("orbitquant.harness.metrics",), name_of=lambda cls: cls.__dict__.get("name"))

register_method = METHODS.register
register_model = MODELS.register
register_metric = METRICS.register
