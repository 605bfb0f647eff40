"""A sweep's jobs and their configs, as Hydra's basic sweeper and compose give them: the sweep expanded into its
jobs' overrides, and each job's config composed cheaply (``_Composer``: plain keys set in place, config-group axes
assembled from a star of compositions)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from orbitquant.harness.plan.base import PlanError


def squash(e: BaseException) -> str:
    """An exception's message on one line (Hydra puts the fix on its second line)."""
    return " ".join(str(e).split())


def parse_overrides(overrides: list[str]):
    """Hydra's parsed overrides; a grammar error is a PlanError naming them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors come in several types
        raise PlanError(f"config error: cannot parse overrides {overrides}: {squash(e)}") from None


def expand_sweep(params: dict[str, str], argv: list[str]) -> list[list[str]]:
    """Every job's overrides: ``hydra.sweeper.params`` then ``argv`` (later wins per key), comma lists expanded into
    their cartesian product in key order -- Hydra's BasicSweeper.split_arguments."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = parse_overrides([f"{k}={v}" for k, v in params.items()] + list(argv))
    try:
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception as e:  # noqa: BLE001 - HydraException for unsupported sweep kinds
        raise PlanError(f"config error: cannot expand the sweep: {squash(e)}") from None


_INTERP = re.compile(r"\$\{([A-Za-z_]\w*)")
_HIDDEN = ("hydra", "_plan_subdir_")  # composed config nodes that are not the job's config


class _Composer:
    """Each job's config as Hydra composes it, cheaply.

    * Plain-key sweep values (``seed=0,1,2``) are set on a composed config in place (what Hydra's override does);
      only the top-level entries that interpolate a swept key (transitively: ``quant.seed -> quant_seed -> seed``)
      are re-resolved per job.
    * Config-group axes (``quant=a,b,c bits=x,y``): Hydra composes the first job's choices (the base) and every
      single-axis change of it (a star: 1 + sum(options - 1) compositions instead of their product); a job that
      changes several axes is the base plus each axis's difference from the base -- when those differences touch
      disjoint config paths (a group option writes its own package: ``quant.*``, ``w_bits``/``a_bits``), which is
      what Hydra's merge gives. Overlapping differences, ``hydra.*`` or add/delete overrides are composed by Hydra.
    """

    def __init__(self, conf_dir: Path) -> None:
        self.conf_dir = conf_dir
        self._hydra: dict[tuple[str, ...], Any] = {}  # fixed overrides -> Hydra's composed config (with hydra)
        self._flats: dict[tuple[str, ...], dict[tuple, Any]] = {}
        self._ready: dict[tuple[str, ...], tuple[Any, dict, set[str], Any]] = {}
        self._base: tuple[str, ...] | None = None
        self._template: str | None = None  # hydra.sweep.subdir, unresolved
        self.composed = self.assembled = 0

    def _is_plain(self, override) -> bool:
        key = override.get_key_element()
        return (not override.is_force_add() and not override.is_add() and not override.is_delete()
                and not key.startswith("hydra") and not (self.conf_dir / key.split("@")[0]).is_dir())

    def _compose(self, fixed: tuple[str, ...]):
        from hydra import compose

        if fixed not in self._hydra:
            try:
                self._hydra[fixed] = compose(config_name="config", overrides=list(fixed), return_hydra_config=True)
            except Exception as e:  # noqa: BLE001 - Hydra raises several exception types for bad input
                raise PlanError(f"config error ({' '.join(fixed)}): {squash(e)}") from None
            self.composed += 1
        return self._hydra[fixed]

    def _flat(self, fixed: tuple[str, ...]) -> dict[tuple, Any]:
        """The composed config's leaf paths, unresolved, without ``hydra`` (cached)."""
        from omegaconf import OmegaConf

        if fixed not in self._flats:
            raw = OmegaConf.to_container(self._compose(fixed), resolve=False)
            raw.pop("hydra")
            self._flats[fixed] = _flatten(raw)
        return self._flats[fixed]

    def _assemble(self, fixed: tuple[str, ...], axes: list[int]):
        """The base plus each changed axis's difference (unresolved), or None when they overlap or do not resolve."""
        from omegaconf import OmegaConf

        base = self._base
        writes = [_axis_writes(self.conf_dir, fixed[i], base[i]) for i in axes]
        if any(w is None for w in writes) or any(a & b for a, b in itertools.combinations(writes, 2)):
            return None  # two axes may write the same key: their merge order matters, let Hydra compose it
        base_flat = self._flat(base)
        flat = dict(base_flat)
        touched: list[set[tuple]] = []
        for i in axes:
            star = self._flat(base[:i] + (fixed[i],) + base[i + 1:])
            diff = {k for k in set(base_flat) | set(star) if base_flat.get(k, _GONE) != star.get(k, _GONE)}
            if any(_overlap(diff, t) for t in touched):
                return None
            touched.append(diff)
            for k in diff:
                flat.pop(k, None)
            flat.update({k: star[k] for k in diff if k in star})
        cfg = OmegaConf.create({**_unflatten(flat), "_plan_subdir_": self._template})
        try:
            OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. a ${hydra:...} interpolation: let Hydra compose it
            return None
        self.assembled += 1
        return cfg

    def compose(self, job: list[str], swept: set[str]) -> tuple[dict, str]:
        """(the job's resolved config without ``hydra``, its sweep subdir)."""
        from omegaconf import OmegaConf

        parsed = parse_overrides(job)
        late = [o for o in parsed if o.get_key_element() in swept and self._is_plain(o)]
        rest = [(s, o) for s, o in zip(job, parsed) if not any(o is x for x in late)]
        fixed = tuple(s for s, _ in rest)
        if fixed not in self._ready:
            if self._base is None or len(self._base) != len(fixed):
                self._base = fixed
                self._template = OmegaConf.to_container(self._compose(fixed).hydra.sweep, resolve=False)["subdir"]
            axes = [i for i, (s, o) in enumerate(rest) if o.get_key_element() in swept and s != self._base[i]]
            risky = any(o.get_key_element().startswith("hydra") or o.is_add() or o.is_force_add() or o.is_delete()
                        for _, o in rest if o.get_key_element() in swept)
            cfg = self._assemble(fixed, axes) if len(axes) > 1 and not risky else None
            if cfg is None:
                cfg = self._compose(fixed)
            raw = OmegaConf.to_container(cfg, resolve=False)
            refs = {k: set(_INTERP.findall(json.dumps(v, default=str))) for k, v in raw.items()}
            dynamic = {o.get_key_element().split(".")[0] for o in late}
            grew = True
            while grew:
                more = {k for k, r in refs.items() if r & dynamic} - dynamic
                dynamic |= more
                grew = bool(more)
            static = {k: _plain_node(cfg, k) for k in cfg if k not in _HIDDEN and k not in dynamic}
            subdir = (lambda c: str(c.hydra.sweep.subdir)) if "hydra" in cfg else (lambda c: str(c._plan_subdir_))
            self._ready[fixed] = (cfg, static, dynamic, subdir)
        cfg, static, dynamic, subdir = self._ready[fixed]  # updated in place: every job of it sets the same keys
        for o in late:
            OmegaConf.update(cfg, o.get_key_element(), o.value(), merge=True)
        c = {k: static[k] if k in static else _plain_node(cfg, k) for k in cfg if k not in _HIDDEN}
        return c, subdir(cfg)


_GONE = object()
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


def _axis_writes(conf_dir: Path, *overrides: str) -> set[str] | None:
    """Top-level config keys the group options of ``overrides`` (``quant=orbit``) write: their package's root, or
    for ``_global_`` options their own top-level keys, plus the packages of the groups their defaults list
    overrides. None when an option cannot be read (then nothing is assembled from it)."""
    import yaml

    out: set[str] = set()
    for ov in overrides:
        group, option = ov.split("=", 1)
        path = conf_dir / group / f"{option}.yaml"
        try:
            text = path.read_text()
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError):
            return None
        m = _PACKAGE.search(text)
        pkg = m.group(1) if m else group.replace("/", ".")
        own = {str(k) for k in data if k != "defaults"}
        out |= own if pkg == "_global_" else {pkg.split(".")[0]}
        for entry in data.get("defaults", []) or []:
            if isinstance(entry, dict):
                name = str(next(iter(entry))).replace("override", "").replace("optional", "").strip()
                out.add(name.lstrip("/").split("/")[0] if name.startswith("/") else pkg.split(".")[0])
            elif entry != "_self_":
                out.add(pkg.split(".")[0] if pkg != "_global_" else "*")  # another option of the group
    return out


def _flatten(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Leaf paths of a nested dict (lists and empty dicts are leaves)."""
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _overlap(a: set[tuple], b: set[tuple]) -> bool:
    """Whether two sets of config paths touch the same node (one path a prefix of the other)."""
    return any(x[:len(y)] == y or y[:len(x)] == x for x in a for y in b)


def _plain_node(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    v = cfg[key]
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def plain_config(cfg) -> dict:
    """A composed config as plain resolved data, without the ``hydra`` node (whose runtime fields only exist inside
    a real Hydra run)."""
    return {k: _plain_node(cfg, k) for k in cfg if k != "hydra"}
