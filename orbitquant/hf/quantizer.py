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

The config and its validation live in ``orbitquant.hf.config``, layer selection and the loader's memory
helpers in ``orbitquant.hf.layers``; this module holds the loader hooks and the registration, and re-exports
those modules' public names, so ``from orbitquant.hf.quantizer import ...`` works as before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
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
from orbitquant.quant.nn import construction_runtime
from orbitquant.quant.types import LayerRef

from .config import QUANT_METHOD, ROLE_MODES, OrbitQuantDiffusersConfig, _error, data_free_methods
from .layers import ALIGNMENT, align_tensors_, diffusers_layers, release_freed_memory

#: the public names of the backend, wherever they are defined (users import them all from here)
__all__ = ["ALIGNMENT", "METADATA_KEY", "QUANT_METHOD", "ROLE_MODES", "OrbitQuantDiffusersConfig",
           "OrbitQuantDiffusersQuantizer", "align_tensors_", "data_free_methods", "diffusers_layers", "register",
           "release_freed_memory"]

#: the safetensors header key holding the layer manifest of a saved model
METADATA_KEY = "orbitquant"


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

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """``model.dequantize()``: every quantized layer back to a plain ``nn.Linear`` holding the weights it computed
        with (activations then unquantized), so the result differs from the fp model by the weight error alone."""
        from orbitquant.quant.dequant import dequantize_

        dequantize_(model)
        if hasattr(model, "orbitquant_report"):
            del model.orbitquant_report
        return model

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
            fix = ("the quantized checkpoint is incomplete: save it again with save_pretrained(dir)"
                   if self.pre_quantized
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

    Called on ``import orbitquant``: ``from_pretrained`` of a saved OrbitQuant checkpoint needs it. Also maps the
    config in transformers' config mapping (when transformers is installed), because diffusers'
    ``PipelineQuantizationConfig(quant_backend=...)`` checks both libraries for the backend and compares their config
    signatures; no transformers quantizer is registered, so asking it to quantize a transformers component (a text
    encoder) fails in transformers with its own unknown-quantization error: OrbitQuant quantizes diffusers models.
    Refuses to replace a foreign class already registered under the name."""
    from diffusers.quantizers import auto

    mappings = [(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OrbitQuantDiffusersConfig),
                (auto.AUTO_QUANTIZER_MAPPING, OrbitQuantDiffusersQuantizer)]
    try:
        from transformers.quantizers import auto as tauto
    except ImportError:  # transformers is optional for diffusers
        tauto = None
    if tauto is not None:
        mappings.append((tauto.AUTO_QUANTIZATION_CONFIG_MAPPING, OrbitQuantDiffusersConfig))
    for mapping, cls in mappings:
        have = mapping.get(QUANT_METHOD)
        # a reloaded copy of this module has new class objects with the same qualified name: replace those
        if have is not None and have is not cls and (have.__module__, have.__qualname__) != (cls.__module__,
                                                                                             cls.__qualname__):
            raise RuntimeError(f"diffusers already maps quant_method {QUANT_METHOD!r} to {have!r}")
        mapping[QUANT_METHOD] = cls


register()
