"""Layer inventories of full-size architectures built on the meta device (no weights, seconds).

The transformer configs ship in ``orbitquant/assets/configs/`` (see the README there for provenance).
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from torch import nn

from orbitquant.harness.adapters.roles import RoleTable
from orbitquant.harness.paths import CONFIGS
from orbitquant.quant.api import layer_treatment
from orbitquant.quant.config import OrbitConfig
from orbitquant.quant.rotation import largest_pow2_divisor
from orbitquant.quant.types import LayerRef


def role_tables() -> dict[str, RoleTable]:
    """Model config name -> role table, for every shipped transformer config (``assets/configs/<name>.json``): its
    ``_class_name`` finds the adapter that declares that transformer class (no list kept here)."""
    from orbitquant.harness.adapters.diffusers_base import roles_by_class_name

    by_class = roles_by_class_name()
    out = {}
    for f in sorted(CONFIGS.glob("*.json")):
        cls = json.loads(f.read_text()).get("_class_name")
        if cls not in by_class:
            raise KeyError(f"{f.name}: no registered adapter declares transformer_cls = {cls!r}")
        out[f.stem] = by_class[cls]
    return out

_TREATMENT_NAMES = {"method": "orbit", "adaln": "adaln_int4", "skip": "untouched"}


def build_meta(name: str) -> nn.Module:
    """The full-size transformer of ``name`` with every tensor on the meta device."""
    import diffusers

    if not (CONFIGS / f"{name}.json").is_file():
        raise KeyError(f"no shipped config for {name!r}; known: {', '.join(sorted(role_tables()))}")
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    cls = getattr(diffusers, cfg.pop("_class_name"))
    with torch.device("meta"):
        return cls.from_config(cfg)


def inventory(refs: list[LayerRef], config: OrbitConfig | None = None) -> dict:
    """Counts by the paper's policy, and the RPBH block size of every input dim the method sees."""
    config = config or OrbitConfig()
    treat = {r.fqn: _TREATMENT_NAMES[layer_treatment(r, config)] for r in refs}
    dims = sorted({r.module.in_features for r in refs if treat[r.fqn] == "orbit"})
    return {
        "total": len(refs),
        "by_treatment": {k: Counter(treat.values()).get(k, 0) for k in ("orbit", "adaln_int4", "untouched")},
        "by_role": dict(sorted(Counter(r.role for r in refs).items())),
        "dims": {str(d): largest_pow2_divisor(d) for d in dims},
    }


def meta_inventory(name: str) -> dict:
    model = build_meta(name)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), **inventory(role_tables()[name].refs(model))}
