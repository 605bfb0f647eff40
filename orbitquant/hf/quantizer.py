"""OrbitQuant as a diffusers quantization backend: quantize at load time, save and reload packed checkpoints.

    import orbitquant.hf.quantizer as oqh          # registers quant_method "orbitquant" with diffusers
    cfg = oqh.OrbitQuantDiffusersConfig(method="orbit", w_bits=4, a_bits=8)
    model = FluxTransformer2DModel.from_pretrained(fp_dir, quantization_config=cfg)   # quantized as it loads
    model.save_pretrained(q_dir)                                   # packed codes + quantization_config in config.json
    model = FluxTransformer2DModel.from_pretrained(q_dir)           # restores the packed state, no re-quantization

How it hooks into ``ModelMixin.from_pretrained`` (diffusers' quantizer protocol, ``DiffusersQuantizer``):

* ``_process_model_before_weight_loading`` (the model is still on the meta device) lists the layers to quantize:
  the adapter's role table when the model class is one of our families (FLUX, Wan, CogVideoX, Z-Image, DiT), so
  the paper's policy by role applies; otherwise every ``nn.Linear`` with role ``linear``. Modules named in
  ``modules_to_not_convert`` are left out. For a pre-quantized checkpoint it instead swaps in ``QuantLinear``
  skeletons (built from the layer manifest saved in the safetensors header) whose packed buffers the loader fills.
* ``check_if_quantized_param`` / ``create_quantized_param``: each target layer's weight (and bias) is taken as the
  loader reads it, the layer is quantized with the same code ``quantize_`` uses (``api.convert_layer``) and swapped
  in, and the fp tensors are dropped. At most one layer's fp weights are alive beyond what the loader itself holds.
* ``_process_model_after_weight_loading`` checks every target layer was loaded and attaches a ``QuantReport``
  (``model.orbitquant_report``).

Every data-free method runs at load time (the method class says: ``needs_calibration`` false; ``data_free_methods()``
lists them): calibrated ones need the model's sampler and calibration data, which ``from_pretrained`` does not
have.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from orbitquant.quant.api import (
    QuantReport,
    _check_layers,
    _peak_memory,
    _set_submodule,
    convert_layer,
    layer_treatment,
    quantizer_for,
    resident_bytes,
)
from orbitquant.quant.checkpoint import FORMAT, config_dict, layer_records, rebuild_layer, saved_layer_slot
from orbitquant.quant.config import QuantConfig
from orbitquant.quant.nn import RUNTIMES, construction_runtime
from orbitquant.quant.types import LayerRef

QUANT_METHOD = "orbitquant"
ROLE_MODES = ("auto", "linear")
#: the safetensors header key holding the layer manifest of a saved model
METADATA_KEY = "orbitquant"
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
        default = OrbitQuantDiffusersConfig(method=self.method).to_dict()
        return {k: v for k, v in self.to_dict().items() if k in ("quant_method", "method") or default.get(k) != v}


def _build_quant_config(method: str, w_bits, a_bits, seed, options: dict) -> QuantConfig:
    """``OrbitQuantDiffusersConfig`` fields -> the method's QuantConfig, every error as one line naming the fix."""
    from orbitquant.harness.factory import build_quant_config
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


# ---------------------------------------------------------------------------------------------- layer selection
def _role_table(model: nn.Module):
    """The role table of the adapter whose diffusers class ``model`` is (or derives from); None for other models."""
    from orbitquant.harness.adapters.diffusers_base import roles_for_class

    return roles_for_class(type(model))


def _excluded(fqn: str, names: list[str]) -> bool:
    """Whether ``fqn`` is one of ``names`` or contains one as whole dotted parts ("proj_out", "blocks.0")."""
    padded = f".{fqn}."
    return any(f".{n}." in padded for n in names)


def diffusers_layers(model: nn.Module, config: OrbitQuantDiffusersConfig) -> list[LayerRef]:
    """The linears (with roles) that loading ``model``'s class with ``config`` considers, in model order.

    ``quantize_(fp_model, config.quant_config(), diffusers_layers(fp_model, config), runtime=config.runtime)``
    on the fully loaded fp model gives exactly the layers that quantize-at-load builds.
    """
    table = _role_table(model) if config.roles == "auto" else None
    if table is not None:
        try:
            refs = table.refs(model)
        except KeyError as e:
            raise _error(f"{e.args[0]}; or pass roles='linear' to treat every nn.Linear alike") from None
    else:
        refs = [LayerRef(n, "linear", -1, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [r for r in refs if not _excluded(r.fqn, config.modules_to_not_convert)]


ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation to this


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc; a no-op elsewhere).

    Each layer's conversion frees a few transient buffers of about its fp32 size; glibc raises its mmap threshold
    after the first large free and serves later ones from the heap, where the holes between long-lived packed
    layers are never given back. The loader trims after each layer so the resident set stays at what is alive
    plus one layer's transients (279 MiB FLUX-like model of docs/diffusers.md, compact runtime: peak anonymous
    memory ~480 -> ~140 MiB for ~15 ms a layer)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@torch.no_grad()
def align_tensors_(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` whose data does not start on a 64-byte boundary into a
    fresh (aligned) tensor; returns the bytes copied.

    diffusers loads safetensors through mmap, so tensors it does not convert sit at whatever offset they have in
    the file, and CPU matmul kernels round differently for different alignments (last-ulp differences, measured
    on this machine). The loader calls this after loading, fresh or pre-quantized, so a saved-and-reloaded model
    computes bit-identically to the one that was saved; call it on a plain fp load to compare it bit for bit.
    """
    copied, done = 0, {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0:
                    continue
                if id(t) not in done:  # a tensor shared by two modules stays shared
                    new = t.detach().clone()
                    done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(
                        t, nn.Parameter) else new
                    copied += t.numel() * t.element_size()
                table[name] = done[id(t)]
    return copied


# --------------------------------------------------------------------------------------------------- quantizer
class OrbitQuantDiffusersQuantizer(DiffusersQuantizer):
    """diffusers' loader hooks for ``quant_method="orbitquant"`` (see the module docstring for the flow).

    ``pre_quantized`` (set by diffusers when ``config.json`` carries a ``quantization_config``) selects between
    quantizing fp weights as they load and restoring a saved packed state.
    """

    requires_calibration = False
    # apply the class's _keep_in_fp32_modules as a plain fp load does, so every tensor gets the dtype it would
    # have there: quantize-at-load then equals quantize_ on the fp-loaded model
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: OrbitQuantDiffusersConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.config = quantization_config.quant_config()
        self._quantizer = None
        self._layer_of: dict[str, str] = {}  # checkpoint key -> fqn of the layer it feeds
        self._expected: dict[str, set[str]] = {}  # fqn -> tensor names the layer needs before it can be built
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # tensors read so far, per unfinished layer
        self._built: set[str] = set()  # layers assembled (quantized or restored)
        self._targets: dict[str, tuple[LayerRef, str]] = {}  # fresh: fqn -> (ref on the meta model, treatment)
        self._layers: list[LayerRef] = []  # every considered layer (roles, blocks), model order
        self._records: dict[str, Any] = {}  # fresh: fqn -> LayerRecord
        self._manifest: dict | None = None  # pre-quantized: the saved layer manifest
        self._saved: dict[str, dict] = {}  # the manifest of the loaded model, for save_pretrained
        self._t0 = 0.0
        #: most bytes of not-yet-quantized fp tensors held at once (fresh loads): the loader's extra memory
        self.peak_pending_bytes = 0

    # ------------------------------------------------------------------ diffusers protocol: environment
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """One device only: layers are quantized where they load and rotations are shared per input dim."""
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            devices = {str(v) for v in device_map.values()}
            if len(devices) > 1 or "disk" in devices:
                raise _error(f"orbitquant quantizes on one device; got device_map over {sorted(devices)}: pass "
                             "device_map=None (or a single device such as 'cuda') and offload after loading")
        elif isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise _error(f"orbitquant quantizes on one device; device_map={device_map!r} may split the model: pass "
                         "device_map=None or a single device such as 'cuda'")

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # layers are assembled from tensors in arrival order; threads would interleave them

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    # ------------------------------------------------------------------ before weights
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """Read the layer manifest from a pre-quantized checkpoint's safetensors header (before the model is
        prepared, which needs it)."""
        if self.pre_quantized:
            from safetensors import safe_open

            for f in checkpoint_files:
                if isinstance(f, (str, Path)) and str(f).endswith(".safetensors"):
                    with safe_open(str(f), framework="pt") as h:
                        meta = h.metadata() or {}
                    if METADATA_KEY in meta:
                        self._manifest = json.loads(meta[METADATA_KEY])
                        break
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, device_map=None,
                                             keep_in_fp32_modules: list[str] | None = None, **kwargs: Any):
        self._t0 = time.perf_counter()
        self.modules_to_not_convert = list(self.quantization_config.modules_to_not_convert)
        self._quantizer = quantizer_for(self.config)
        if self.pre_quantized:
            self._prepare_skeletons(model)
        else:
            self._plan_fresh(model)
        return model

    def _plan_fresh(self, model: nn.Module) -> None:
        self._layers = diffusers_layers(model, self.quantization_config)
        for ref in self._layers:
            treatment = layer_treatment(ref, self.config)
            if treatment == "skip":
                continue
            self._targets[ref.fqn] = (ref, treatment)
            self._expected[ref.fqn] = {"weight"} | ({"bias"} if ref.module.bias is not None else set())
            for name in self._expected[ref.fqn]:
                self._layer_of[f"{ref.fqn}.{name}"] = ref.fqn
        if not self._targets:
            raise _error(f"orbitquant found no layer to quantize in {type(model).__name__}: skip_roles / adaln / "
                         "modules_to_not_convert leave every linear in source precision")

    @torch.no_grad()  # a skeleton's weight is a Parameter: with grad on, its packed state would keep a graph alive
    def _prepare_skeletons(self, model: nn.Module) -> None:
        """Swap in each saved layer's QuantLinear (placeholder packed state) so the loader fills its buffers."""
        m = self._manifest
        if m is None:
            raise _error("this checkpoint's config.json says quant_method 'orbitquant' but its safetensors header has "
                         "no orbitquant layer manifest (saved with safe_serialization=False, or by another tool): "
                         "re-save it with save_pretrained(dir), or quantize the fp checkpoint at load time")
        if m.get("format") != FORMAT:
            raise _error(f"unknown orbitquant checkpoint format {m.get('format')!r} (this version reads {FORMAT})")
        if m.get("config") != config_dict(self.config):
            raise _error("the orbitquant config in config.json differs from the one in the weights' header; the "
                         "checkpoint was edited by hand: re-save it with save_pretrained(dir)")
        for fqn, rec in m["layers"].items():
            old, fits = saved_layer_slot(model, fqn, rec)
            if not fits:
                raise _error(f"the quantized checkpoint has a {rec['in']}->{rec['out']} linear {fqn!r} that "
                             f"{type(model).__name__} lacks: load it with the model class it was saved from")
            # compact: a skeleton never materializes a dense weight; the real runtime is set once it is loaded
            with construction_runtime("compact"):
                new = rebuild_layer(fqn, rec, self.config, self._quantizer)
            new.nonfinite = self.config.nonfinite
            _set_submodule(model, fqn, new)
            release_freed_memory()
            self._expected[fqn] = set(new.state_dict())
            for name in self._expected[fqn]:
                self._layer_of[f"{fqn}.{name}"] = fqn
            self._layers.append(LayerRef(fqn, rec["role"], rec["block"], old))

    # ------------------------------------------------------------------ while weights load
    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        """Tensors of layers we build (fp weight/bias of a target, or a saved layer's packed state)."""
        return param_name in self._layer_of

    def check_quantized_param_shape(self, param_name: str, current_param: torch.Tensor,
                                    loaded_param: torch.Tensor) -> bool:
        # shapes are checked when the layer is assembled (load_state_dict(strict=True) / quantize_layer)
        return True

    @torch.no_grad()
    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device, state_dict: dict[str, Any], unexpected_keys: list[str] | None = None,
                               **kwargs: Any) -> None:
        """Collect one tensor of a layer; once the layer has all of them, build it and swap it in."""
        fqn = self._layer_of[param_name]
        name = param_name[len(fqn) + 1:]
        # packed state is taken as saved: the loader has already cast floating tensors to torch_dtype, which
        # would round bf16 norms / fp32 scales; fp weights are taken as cast, exactly as a plain fp load sets them
        value = state_dict[param_name] if self.pre_quantized else param_value
        pending = self._pending.setdefault(fqn, {})
        pending[name] = value if self.pre_quantized else value.to(target_device)
        if not self.pre_quantized:
            held = sum(t.numel() * t.element_size() for p in self._pending.values() for t in p.values())
            self.peak_pending_bytes = max(self.peak_pending_bytes, held)
        if set(pending) >= self._expected[fqn]:
            tensors = self._pending.pop(fqn)
            if self.pre_quantized:
                self._restore(model, fqn, tensors, target_device)
            else:
                self._quantize(model, fqn, tensors)

    def _quantize(self, model: nn.Module, fqn: str, tensors: dict[str, torch.Tensor]) -> None:
        ref, treatment = self._targets.pop(fqn)
        m = ref.module  # still the meta nn.Linear inside the model: give it the loaded tensors, then convert it
        for name, t in tensors.items():
            setattr(m, name, nn.Parameter(t))
        _check_layers(model, [ref])  # shape and NaN/Inf checks, as quantize_ does
        new, self._records[fqn] = convert_layer(ref, treatment, self._quantizer, self.config,
                                                self.quantization_config.runtime)
        _set_submodule(model, fqn, new)
        self._built.add(fqn)
        m.to("meta")  # drop this layer's fp weights now
        release_freed_memory()  # ~15 ms a layer; keeps the peak at one layer's transients (docs/diffusers.md)

    def _restore(self, model: nn.Module, fqn: str, tensors: dict[str, torch.Tensor], target_device) -> None:
        layer = model.get_submodule(fqn)
        layer.load_state_dict(tensors, strict=True)
        layer.to(target_device)
        layer.set_runtime(self.quantization_config.runtime)  # fast: dequantize once, now
        self._built.add(fqn)
        release_freed_memory()

    # ------------------------------------------------------------------ after weights
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        unfinished = [fqn for fqn in self._expected if fqn not in self._built]  # model order
        if unfinished:
            missing = [f"{fqn}.{n}" for fqn in unfinished for n in sorted(self._expected[fqn] - set(
                self._pending.get(fqn, {})))]
            what = "packed tensors" if self.pre_quantized else "weights"
            fix = ("the quantized checkpoint is incomplete: save it again with save_pretrained(dir)" if self.pre_quantized
                   else "load the fp checkpoint of this model class, or list those modules in modules_to_not_convert")
            raise _error(f"orbitquant: the checkpoint lacks the {what} of {len(unfinished)} layer(s) to quantize, "
                         f"e.g. {missing[:3]}; {fix}")
        self._pending.clear()
        align_tensors_(model)
        release_freed_memory()
        # the manifest save_pretrained writes (it hands get_state_dict_and_metadata only the state dict)
        self._saved = layer_records(model, self._layers)
        model.config.quantization_config = self.quantization_config  # as diffusers' own quantizers do
        if not self.pre_quantized:
            model.orbitquant_report = self._report(model)
        return model

    def _report(self, model: nn.Module) -> QuantReport:
        """The same report ``quantize_`` gives (no per-layer error probe: there is no input at load time)."""
        report = QuantReport(method=self.config.method, config=self.config.to_dict(), probe="none")
        for ref in self._layers:
            rec = self._records.get(ref.fqn)
            if rec is None:  # a skipped layer: its record describes the loaded source-precision module
                live = LayerRef(ref.fqn, ref.role, ref.block, model.get_submodule(ref.fqn))
                _, rec = convert_layer(live, "skip", self._quantizer, self.config)
            report.layers.append(rec)
        report.seconds = time.perf_counter() - self._t0
        report.peak_memory = _peak_memory()
        report.runtime = self.quantization_config.runtime
        report.resident_bytes = resident_bytes(model, self._layers)
        return report

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False):
        """The state dict as is (quantized layers already hold only packed state) and the layer manifest for the
        safetensors header, which a reload needs to rebuild each layer's structure."""
        if not safe_serialization:
            raise _error("orbitquant models save with safetensors only (the layer manifest lives in its header): "
                         "call save_pretrained(dir) without safe_serialization=False")
        manifest = {"format": FORMAT, "config": config_dict(self.config), "layers": self._saved}
        return state_dict, {METADATA_KEY: json.dumps(manifest, separators=(",", ":"))}


def register() -> None:
    """Map ``quant_method="orbitquant"`` to our config and quantizer in diffusers' AUTO mappings (idempotent).

    Called on import of this module; ``from_pretrained`` of a saved OrbitQuant checkpoint needs it (import
    ``orbitquant.hf.quantizer`` first). Refuses to replace a foreign class already registered under the name."""
    from diffusers.quantizers import auto

    for mapping, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OrbitQuantDiffusersConfig),
                         (auto.AUTO_QUANTIZER_MAPPING, OrbitQuantDiffusersQuantizer)):
        have = mapping.get(QUANT_METHOD)
        # a reloaded copy of this module has new class objects with the same qualified name: replace those
        if have is not None and have is not cls and (have.__module__, have.__qualname__) != (cls.__module__,
                                                                                             cls.__qualname__):
            raise RuntimeError(f"diffusers already maps quant_method {QUANT_METHOD!r} to {have!r}")
        mapping[QUANT_METHOD] = cls


register()
