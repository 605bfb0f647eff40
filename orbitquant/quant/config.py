"""Typed, validated quantization configs: pure data, one dataclass per method.

``quantize_`` looks the quantizer up by the config's type. Bit widths are 1..8, or 16 for "leave this
operand in source precision" (so W4A16 means weight-only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from orbitquant.quant.types import ROLES

ADALN_POLICIES = ("int4_g64", "method", "fp")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bits(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= 8 or value == 16):
        raise ValueError(f"{what} must be an integer in 1..8 (or 16 to leave it unquantized), got {value!r}")
    return value


def torch_dtype(name: str | None) -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16 (None stays None), with an error listing valid names."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def check_symmetric_bits(config) -> None:
    """Symmetric uniform quantization needs >= 2 bits; say which operand and how to fix it."""
    for what in ("w", "a"):
        if getattr(config, f"{what}_symmetric") and getattr(config, f"{what}_bits") == 1:
            raise ValueError(f"{what}_bits=1 needs {what}_symmetric=false (symmetric RTN needs >= 2 bits)")


def check_rotation(kind: str) -> None:
    """A rotation name from ``rotation.ROTATIONS``, with the valid ones in the error."""
    from orbitquant.quant.rotation import ROTATIONS

    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")


@dataclass(frozen=True)
class QuantConfig:
    """Fields shared by every method: bit widths and the layer policy by role.

    * ``skip_roles`` stay in source precision (default: embedders, timestep MLPs, final layer).
    * ``adaln``: ``int4_g64`` = INT4 group-64 weight-only RTN with ``adaln_act_dtype`` activations (the
      paper's policy), ``method`` = treat like every other linear, ``fp`` = leave untouched.
    * ``probe_tokens``: rows of each layer's probe input kept to measure per-layer output error.
    * ``nonfinite``: NaN/Inf reaching a quantized layer raises (naming layer and sampler step), or with
      ``record`` is logged to ``nn.NONFINITE_EVENTS`` (results.json ``nonfinite``), zeroed, and the run goes on.
    """

    method: ClassVar[str] = ""
    w_bits: int = 4
    a_bits: int = 8
    skip_roles: tuple[str, ...] = ("embed", "final")
    adaln: str = "int4_g64"
    adaln_act_dtype: str | None = "bfloat16"
    probe_tokens: int = 256
    nonfinite: str = "raise"  # NaN/Inf reaching a quantized layer: "raise" (names layer and step) | "record"

    def __post_init__(self) -> None:
        if self.nonfinite not in ("raise", "record"):
            raise ValueError(f"nonfinite must be 'raise' or 'record', got {self.nonfinite!r}")
        _bits(self.w_bits, "w_bits")
        _bits(self.a_bits, "a_bits")
        object.__setattr__(self, "skip_roles", tuple(self.skip_roles))
        bad = [r for r in self.skip_roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles in skip_roles: {bad}; valid roles: {', '.join(ROLES)}")
        if self.adaln not in ADALN_POLICIES:
            raise ValueError(f"adaln must be one of {ADALN_POLICIES}, got {self.adaln!r}")
        torch_dtype(self.adaln_act_dtype)
        if self.probe_tokens < 0:
            raise ValueError("probe_tokens must be >= 0")

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


@dataclass(frozen=True)
class FPConfig(QuantConfig):
    """Identity: every linear keeps its weights and activations (bit-exact); bit widths are ignored."""

    method: ClassVar[str] = "fp"
    w_bits: int = 16
    a_bits: int = 16
    adaln: str = "fp"


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest uniform min/max quantization, no calibration.

    Weights: one scale per output channel (``w_granularity="channel"``) or per tensor; activations:
    dynamic, one scale per token (``a_granularity="token"``) or per tensor; symmetric (absmax) or
    asymmetric (min/max with zero point). ``group > 0`` instead gives one absmax scale per (output row, group
    of input channels) and per (token, group): the control for group-wise methods such as SVDQuant.
    """

    method: ClassVar[str] = "rtn"
    w_granularity: str = "channel"
    a_granularity: str = "token"
    w_symmetric: bool = True
    a_symmetric: bool = False
    group: int = 0  # > 0: weights per (row, group of input channels), activations per (token, group), both absmax

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group < 0:
            raise ValueError(f"group must be 0 (per channel / per token) or a positive group size, got {self.group}")
        if self.group and not (self.w_symmetric and self.a_symmetric):
            raise ValueError("group > 0 is the symmetric group-wise control (as SVDQuant's INT recipe); "
                             "set w_symmetric=true and a_symmetric=true, or group=0")
        if self.w_granularity not in ("channel", "tensor"):
            raise ValueError(f"w_granularity must be 'channel' or 'tensor', got {self.w_granularity!r}")
        if self.a_granularity not in ("token", "tensor"):
            raise ValueError(f"a_granularity must be 'token' or 'tensor', got {self.a_granularity!r}")
        check_symmetric_bits(self)


@dataclass(frozen=True)
class OrbitConfig(QuantConfig):
    """OrbitQuant: rotate (RPBH), normalise per token / weight row, quantize to one Lloyd-Max codebook per d.

    ``seed`` draws one rotation per input dimension; ``rotation`` is ``rpbh`` (paper) or any of
    ``rotation.ROTATIONS`` for the rotation study (``rpbh_kron``: RPBH plus a Haar mix across blocks,
    ``rpbh2``, ``hadamard_kron``, ``hadamard``, ``haar``, ``none``); ``codebook`` is ``beta`` (exact
    sphere marginal) or ``gaussian`` (N(0, 1/d)).
    """

    method: ClassVar[str] = "orbit"
    seed: int = 0
    rotation: str = "rpbh"
    codebook: str = "beta"
    eps: float = 1e-10
    norm_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rotation(self.rotation)
        if self.codebook not in ("beta", "gaussian"):
            raise ValueError(f"codebook must be 'beta' or 'gaussian', got {self.codebook!r}")
        if not self.eps > 0:
            raise ValueError("eps must be > 0")
        torch_dtype(self.norm_dtype)


def build_quant_config(quant_cfg: dict) -> QuantConfig:
    """``{method: orbit, tag: w4a8, w_bits: 4, ...}`` -> validated ``OrbitConfig``; ``tag`` only names run dirs."""
    kwargs = dict(quant_cfg)
    if "method" not in kwargs:
        raise KeyError("quant config needs a 'method' entry")
    method = kwargs.pop("method")
    kwargs.pop("tag", None)
    from orbitquant.quant.registry import METHODS

    cls = METHODS.get(method).config_cls
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for quant={method}; valid: {', '.join(sorted(valid))}")
    return cls(**kwargs)
