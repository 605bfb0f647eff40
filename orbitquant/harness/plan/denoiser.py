"""One denoiser forward: rows per sampling step (classifier-free guidance per family), tokens per row and FLOPs per
row, from the shipped transformer configs (``orbitquant/assets/configs/<name>.json``) and the protocol's resolution.
Counted, never timed: a forward's seconds are ``timing.py``'s. What differs by family (the CFG rule, the token
geometry, the rows of each linear, the attention) is declared on the family's adapter class
(``orbitquant.harness.adapters.plan_facts.PlanFacts``), found through the model registry by adapter name."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orbitquant.harness.adapters.plan_facts import CfgRule, Geometry
from orbitquant.harness.plan.base import CONFIGS, DIGITS_CONFIG, PlanError

if TYPE_CHECKING:
    from orbitquant.harness.adapters.base import ModelAdapter

__all__ = ["CfgRule", "Flops", "Geometry", "adapter_class", "cfg_rule", "cfg_rules", "denoiser_params",
           "forward_flops", "forwards_per_step", "geometry", "shipped_config", "text_tokens"]


# ---------------------------------------------------------------------------------------------- the family's facts
def adapter_class(adapter: str) -> type[ModelAdapter]:
    """The registered adapter class of a model adapter name (``model.adapter``): it holds the family's facts."""
    from orbitquant.quant.registry import MODELS

    try:
        return MODELS.get(adapter)
    except KeyError as e:
        raise PlanError(f"{e.args[0]} (model.adapter names a registered adapter)") from None


def _missing(adapter: str, cls: type, what: str, fix: str) -> PlanError:
    """The error of a family whose adapter lacks a fact: the attribute to add (``fix``) and where."""
    return PlanError(f"no {what} for model adapter {adapter!r}; add {fix} to {cls.__module__}.{cls.__qualname__} "
                     "(see orbitquant.harness.adapters.plan_facts.PlanFacts)")


def cfg_rules() -> dict[str, CfgRule]:
    """Model adapter name -> its CFG rule, for every registered family that declares one (``cfg_rule``)."""
    from orbitquant.quant.registry import MODELS

    return {name: cls.cfg_rule for name, cls in MODELS.items() if getattr(cls, "cfg_rule", None) is not None}


def cfg_rule(adapter: str) -> CfgRule:
    """The CFG rule of a model adapter name (its class's ``cfg_rule``)."""
    cls = adapter_class(adapter)
    rule = getattr(cls, "cfg_rule", None)
    if rule is None:
        raise _missing(adapter, cls, "CFG rule", "`cfg_rule = CfgRule(...)`")
    return rule


def forwards_per_step(adapter: str, guidance: float) -> tuple[int, int]:
    """(denoiser rows per sample per step, denoiser calls per batch per step) for a family at ``guidance``."""
    rule = cfg_rule(adapter)
    if not rule.is_active(guidance):
        return 1, 1
    return 2, (2 if rule.mode == "calls" else 1)


# ---------------------------------------------------------------------------------------------- geometry
@functools.cache
def shipped_config(model_name: str) -> dict | None:
    """The transformer config of a model config name (``orbitquant/assets/configs/<name>.json``; the digits models
    read ``assets/digits_dit/config.json``); None for models without one (tiny / random test pipelines)."""
    if model_name in ("digits", "digits_outliers"):
        return json.loads(DIGITS_CONFIG.read_text())
    path = CONFIGS / f"{model_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def geometry(adapter: str, model_name: str, protocol: dict, text_tokens: int) -> Geometry | None:
    """Tokens per denoiser row from the shipped transformer config and the protocol's resolution: the family's
    ``plan_geometry`` (e.g. VAE x8 spatial then the patch; videos x4 temporal). None when the model has no shipped
    config (tiny test pipelines)."""
    cfg = shipped_config(model_name)
    if cfg is None:
        return None
    cls = adapter_class(adapter)
    geo = cls.plan_geometry(cfg, protocol, text_tokens)
    if geo is None:
        raise _missing(adapter, cls, "token rule", "a `plan_geometry` classmethod")
    return geo


def text_tokens(adapter_obj: ModelAdapter, adapter: str = "") -> tuple[int, str]:
    """Text tokens per row and how: the adapter instance's ``plan_text_tokens`` (an instance, since options such as
    FLUX's ``max_sequence_length`` change it). E.g. the pipeline's ``max_sequence_length``, an upper bound where the
    pipeline keeps the prompt's real tokens; 0 for class-conditional models. ``adapter`` (the name) is unused."""
    return adapter_obj.plan_text_tokens()


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Flops:
    """FLOPs of one denoiser row forward: 2 x in x out x rows for every block linear (rows: the tokens of its
    stream; adaLN/modulation linears see one vector per sample), and 4 x Lq x Lkv x inner per attention layer
    (QK^T and PV). Embedders and the final layer (outside the blocks, < 1% of linear FLOPs) are not counted."""

    linear: float
    attention: float
    block_linear_params: int
    denoiser_params: int
    detail: str

    @property
    def total(self) -> float:
        return self.linear + self.attention


@functools.cache
def _layer_table(model_name: str) -> tuple[tuple[tuple[str, str, int, int], ...], dict[str, int], int]:
    """((fqn, role, in, out) of every linear, block count per stack, all denoiser params) of the true-size denoiser,
    built on the meta device from its shipped config (no weights)."""
    import torch

    from orbitquant.harness.adapters.dit_roles import DIT_ROLES
    from orbitquant.harness.inventory import build_meta, role_tables

    if model_name in ("digits", "digits_outliers"):
        from diffusers import DiTTransformer2DModel

        cfg = {k: v for k, v in shipped_config(model_name).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = DiTTransformer2DModel.from_config(cfg)
        table = DIT_ROLES
    else:
        model, table = build_meta(model_name), role_tables()[model_name]
    refs = table.refs(model)
    stacks = {s: len(getattr(model, s)) for s in table.stacks}
    rows = tuple((r.fqn, r.role, r.module.in_features, r.module.out_features) for r in refs)
    return rows, stacks, sum(p.numel() for p in model.parameters())


def _linear_rows(cls: type[ModelAdapter], fqn: str, role: str, m: int, t: int) -> int | None:
    """Rows a block linear sees per sample (None: outside the blocks, not counted)."""
    if role in ("embed", "final"):
        return None
    if role == "adaln":  # one modulation vector per sample
        return 1
    return cls.plan_linear_rows(fqn.split(".", 1)[0], role, m, t)


def forward_flops(adapter: str, model_name: str, geo: Geometry) -> Flops | None:
    """FLOPs of one denoiser row forward at ``geo`` (None without a shipped config)."""
    cfg = shipped_config(model_name)
    if cfg is None:
        return None
    cls = adapter_class(adapter)
    rows, stacks, total_params = _layer_table(model_name)
    m, t = geo.media_tokens, geo.text_tokens
    linear, params = 0.0, 0
    for fqn, role, fin, fout in rows:
        n = _linear_rows(cls, fqn, role, m, t)
        if n is not None:
            linear += 2.0 * fin * fout * n
            params += fin * fout
    attn = cls.plan_attention_flops(cfg, stacks, m, t)
    if attn is None:
        raise _missing(adapter, cls, "attention rule", "a `plan_attention_flops` classmethod")
    return Flops(linear, attn, params, total_params,
                 f"{params / 1e9:.3g} B block-linear weights over their streams; attention in "
                 f"{' + '.join(f'{v} {k}' for k, v in stacks.items())}")


def denoiser_params(model_name: str) -> int:
    """All parameters of the true-size denoiser of ``model_name`` (0 without a shipped config: tiny test pipelines)."""
    return _layer_table(model_name)[2] if shipped_config(model_name) is not None else 0
