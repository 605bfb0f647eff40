"""``OrbitQuantDiffusersConfig``: the diffusers ``quantization_config`` of the orbitquant backend, and its validation.

Every setting is checked when the config is built, with one-line errors naming the fix (diffusers surfaces the
message as is), and resolved into the method's typed QuantConfig; the stored attributes are that config as plain
JSON, so ``config.json`` says exactly what was applied. ``orbitquant.hf.quantizer`` re-exports these names.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from orbitquant.quant.api import quantizer_for
from orbitquant.quant.checkpoint import config_dict
from orbitquant.quant.config import QuantConfig
from orbitquant.quant.nn import RUNTIMES

QUANT_METHOD = "orbitquant"
ROLE_MODES = ("auto", "linear")
#: the config keys that are not fields of the method's QuantConfig
_LOADER_KEYS = ("quant_method", "runtime", "modules_to_not_convert", "roles")


class _QuantMethodName(str):
    """The ``quant_method`` string. diffusers' own configs hold a member of its closed ``QuantizationMethod`` enum,
    and ``from_pretrained`` reads ``quant_method.value``; a str with a ``value`` satisfies that without patching
    the enum, and serializes to JSON as a plain string."""

    @property
    def value(self) -> str:
        return str.__str__(self)


def _error(msg: str) -> ValueError:
    """A one-line ValueError (diffusers surfaces the message as is; newlines would split it in logs)."""
    return ValueError(" ".join(str(msg).split()))


class OrbitQuantDiffusersConfig(QuantizationConfigMixin):
    """diffusers ``quantization_config`` for OrbitQuant and the other data-free methods of this package.

    Args:
        method: ``orbit`` (default), ``rtn``, ``hadamard_rtn`` or ``fp``.
        w_bits, a_bits: 1..8, or 16 to leave that operand unquantized (default: the method's).
        seed: rotation seed (``orbit``, ``hadamard_rtn``; default: the method's, 0).
        runtime: ``fast`` keeps each layer's dequantized weight resident, ``compact`` only the packed state
            (decoded per forward; bit-identical outputs).
        modules_to_not_convert: module names (or dotted parts of names, e.g. ``"proj_out"``,
            ``"transformer_blocks.0"``) whose linears stay in source precision.
        roles: ``auto`` uses the model family's role table when the class is one of ours (the paper's policy:
            ``skip_roles`` untouched, ``adaln`` INT4 g64 weight-only); ``linear`` treats every ``nn.Linear`` alike
            (what ``quantize_(model, config)`` without layers does).
        **options: any other field of the method's config dataclass (``rotation``, ``codebook``, ``adaln``,
            ``skip_roles``, ``w_granularity``, ...).

    Everything is validated here, with one-line errors naming the fix; the stored attributes are the method's
    complete resolved config as plain JSON, so ``config.json`` says exactly what was applied.
    """

    def __init__(self, method: str = "orbit", w_bits: int | None = None, a_bits: int | None = None,
                 seed: int | None = None, runtime: str = "fast", modules_to_not_convert: list[str] | None = None,
                 roles: str = "auto", **options: Any) -> None:
        # from_dict passes the saved quant_method back in: accept ours only
        qm = options.pop("quant_method", QUANT_METHOD)
        if str(qm) != QUANT_METHOD:
            raise _error(f"OrbitQuantDiffusersConfig is for quant_method {QUANT_METHOD!r}, got {qm!r}")
        self.quant_method = _QuantMethodName(QUANT_METHOD)
        qcfg = _build_quant_config(method, w_bits, a_bits, seed, options)
        for key, value in config_dict(qcfg).items():  # the full resolved config (method first), JSON types
            setattr(self, key, value)
        if runtime not in RUNTIMES:
            raise _error(f"OrbitQuantDiffusersConfig: runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime
        names = [] if modules_to_not_convert is None else modules_to_not_convert
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise _error("OrbitQuantDiffusersConfig: modules_to_not_convert must be a list of module names, "
                         f"got {modules_to_not_convert!r}")
        self.modules_to_not_convert = list(names)
        if roles not in ROLE_MODES:
            raise _error(f"OrbitQuantDiffusersConfig: roles must be one of {ROLE_MODES}, got {roles!r}")
        self.roles = roles

    def quant_config(self) -> QuantConfig:
        """The typed, validated method config (``OrbitConfig``, ``RTNConfig``, ...) these settings describe."""
        fields = {k: v for k, v in self.__dict__.items() if k not in _LOADER_KEYS}
        return _build_quant_config(fields.pop("method"), fields.pop("w_bits"), fields.pop("a_bits"),
                                   fields.pop("seed", None), fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON settings (what ``save_pretrained`` writes into ``config.json``)."""
        out = copy.deepcopy(self.__dict__)
        out["quant_method"] = QUANT_METHOD
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """The settings that differ from this method's defaults (``repr`` prints these)."""
        # the method config's own defaults, serialized as __init__ serializes them (config_dict), and the loader
        # options' defaults from __init__'s signature; not a default OrbitQuantDiffusersConfig, which refuses a method
        # whose defaults need calibration (qdit's GPTQ) though it is valid here with other options (weights=rtn)
        from orbitquant.quant.registry import METHODS

        default = config_dict(METHODS.get(self.method).config_cls())
        default.update({k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()
                        if k in _LOADER_KEYS})
        default["modules_to_not_convert"] = default["modules_to_not_convert"] or []  # None in the signature
        return {k: v for k, v in self.to_dict().items() if k in ("quant_method", "method") or default.get(k) != v}


def _build_quant_config(method: str, w_bits, a_bits, seed, options: dict) -> QuantConfig:
    """``OrbitQuantDiffusersConfig`` fields -> the method's QuantConfig, every error as one line naming the fix."""
    from orbitquant.quant.config import build_quant_config
    from orbitquant.quant.registry import METHODS

    try:
        cls = METHODS.get(method).config_cls
    except KeyError as e:
        raise _error(f"OrbitQuantDiffusersConfig: {e.args[0]}") from None
    fields = dict(options)
    for key, value in (("w_bits", w_bits), ("a_bits", a_bits), ("seed", seed)):
        if value is not None:
            fields[key] = value
    if "seed" in fields and "seed" not in cls.__dataclass_fields__:
        raise _error(f"OrbitQuantDiffusersConfig: method {method!r} has no seed (it draws no rotation); drop seed=")
    try:
        qcfg = build_quant_config({"method": method, **fields})
    except (ValueError, TypeError, KeyError) as e:
        raise _error(f"OrbitQuantDiffusersConfig: {e.args[0] if e.args else e}") from None
    quantizer = quantizer_for(qcfg)
    if quantizer.needs_calibration:
        raise _error(f"OrbitQuantDiffusersConfig: method {method!r} needs calibration data, which from_pretrained "
                     f"cannot provide; load the fp model and call orbitquant.quantize_(model, config, layers, "
                     f"calibrate=...) (run.py quant={method}), or use a data-free method: "
                     f"{', '.join(data_free_methods())}")
    return qcfg


def data_free_methods() -> list[str]:
    """The registered methods whose default configuration needs no calibration data (the method class decides)."""
    from orbitquant.quant.registry import METHODS

    return [n for n, cls in METHODS.items() if not cls(cls.config_cls()).needs_calibration]
