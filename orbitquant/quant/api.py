"""``quantize_``: one verb that applies a method to a module, layer by layer, by role."""

from __future__ import annotations

import copy
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from orbitquant.quant.act import NoActQuant
from orbitquant.quant.artifacts import load_artifact, save_artifact
from orbitquant.quant.config import QuantConfig, torch_dtype
from orbitquant.quant.layer_stats import rotation_ks
from orbitquant.quant.nn import QuantLinear, construction_runtime
from orbitquant.quant.primitives import relative_error, sqnr_db
from orbitquant.quant.registry import METHODS
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import GroupWeight

ADALN_TREATMENT = "int4_g64 wo"  # the shared adaLN policy (INT4 g64 weight-only), the same for every method


@dataclass
class LayerRecord:
    """What happened to one linear layer."""

    fqn: str
    role: str
    block: int
    treatment: str  # "skip" | "int4_g64 wo" | "<method> w<W>a<A>" | "fp"
    in_features: int
    out_features: int
    w_bits: int  # bits per stored weight code (source float bits when not quantized)
    a_bits: int  # bits per activation code (source float bits when not quantized)
    bytes_src: int
    bytes_q: int
    rel_err: float | None = None  # ||y_q - y|| / ||y|| on the probe input
    sqnr_db: float | None = None  # -20 log10 rel_err
    ks_rot: float | None = None  # KS distance of rotated, normalized input coordinates (x sqrt(d)) to N(0, 1)
    ks_raw: float | None = None  # the same before the rotation (layers with a rotation only)
    #: measured bits per weight: the layer's saved state (codes, scales, zero points, low-rank branches, per-range
    #: copies; bias excluded) over its in x out weights -- not the label's w_bits
    w_bits_eff: float | None = None
    #: measured bits per input-activation element: the code plus per-token / per-group side information
    a_bits_eff: float | None = None


@dataclass
class QuantReport:
    """Layers by role, bits, bytes (persistent state as saved), per-layer output error and wall time."""

    method: str
    config: dict
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    probe: str = "none"  # "model" (adapter probe batch) | "gaussian" | "none"
    calibration: dict = field(default_factory=dict)  # seconds, tokens seen, fitted hyper-parameters
    peak_memory: dict = field(default_factory=dict)  # bytes: process max RSS so far; CUDA max allocated in quantize_
    runtime: str = "fast"  # QuantLinear runtime mode: fast (dequantized weight resident) | compact (packed only)
    resident_bytes: int = 0  # linear layers in memory between forwards, in that mode (skipped layers as they are)

    def by_role(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        groups: dict[str, list[LayerRecord]] = defaultdict(list)
        for r in self.layers:
            groups[r.role].append(r)
        for role, rs in sorted(groups.items()):
            errs = [r.rel_err for r in rs if r.rel_err is not None]
            out[role] = {
                "count": len(rs),
                "treatment": dict(Counter(r.treatment for r in rs)),
                "mean_rel_err": sum(errs) / len(errs) if errs else None,
                "max_rel_err": max(errs) if errs else None,
            }
        return out

    def summary(self) -> dict:
        src = sum(r.bytes_src for r in self.layers)
        q = sum(r.bytes_q for r in self.layers)
        errs = [r.rel_err for r in self.layers if r.rel_err is not None and r.treatment != "skip"]
        return {
            "method": self.method,
            "n_linear": len(self.layers),
            "treatments": dict(Counter(r.treatment for r in self.layers)),
            "linear_bytes_src": src,
            "linear_bytes_quant": q,
            "compression": src / q if q else None,
            **self.effective_bits(),
            "mean_rel_err": sum(errs) / len(errs) if errs else None,
            "max_rel_err": max(errs) if errs else None,
            **self._diagnostics(),
            "probe": self.probe,
            "seconds": round(self.seconds, 3),
            "calibration": self.calibration,
            "peak_memory": self.peak_memory,
            "runtime": self.runtime,
            "linear_bytes_resident": self.resident_bytes,
        }

    def effective_bits(self) -> dict:
        """Measured bits over the linears the method quantizes (skipped ones and the shared adaLN policy are the same
        for every method): per weight (weighted by each layer's weights) and per activation element (weighted by
        each layer's input width) -- what iso-bit comparisons read instead of the nominal W/A label."""
        qs = [r for r in self.layers if r.treatment not in ("skip", ADALN_TREATMENT) and r.w_bits_eff is not None]
        if not qs:
            return {"eff_w_bits": None, "eff_a_bits": None}
        w = sum(r.w_bits_eff * r.in_features * r.out_features for r in qs) / sum(r.in_features * r.out_features
                                                                                 for r in qs)
        a = sum(r.a_bits_eff * r.in_features for r in qs) / sum(r.in_features for r in qs)
        return {"eff_w_bits": round(w, 3), "eff_a_bits": round(a, 3)}

    def _diagnostics(self) -> dict:
        """Mean/min SQNR and mean/max KS over the measured layers (None where no layer has them)."""
        out = {}
        for key, aggs in (("sqnr_db", ("mean", "min")), ("ks_rot", ("mean", "max")), ("ks_raw", ("mean",))):
            vals = [getattr(r, key) for r in self.layers if getattr(r, key) is not None and r.treatment != "skip"]
            vals = [v for v in vals if math.isfinite(v)]
            for a in aggs:
                fn = {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}[a]
                out[f"{a}_{key}"] = round(fn(vals), 5) if vals else None
        return out

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "config": self.config, "by_role": self.by_role(),
                "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """A short per-role text table."""
        lines = [f"{'role':<10} {'n':>3}  {'treatment':<28} {'mean rel err':>12}"]
        for role, info in self.by_role().items():
            err = "-" if info["mean_rel_err"] is None else f"{info['mean_rel_err']:.4f}"
            treat = ", ".join(f"{k} x{v}" for k, v in info["treatment"].items())
            lines.append(f"{role:<10} {info['count']:>3}  {treat:<28} {err:>12}")
        return "\n".join(lines)


def _all_linears(model: nn.Module) -> list[LayerRef]:
    return [LayerRef(fqn=n, role="linear", block=-1, module=m)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_layers(model: nn.Module, layers: list[LayerRef]) -> None:
    seen = set()
    for ref in layers:
        if ref.fqn in seen:
            raise ValueError(f"layer {ref.fqn!r} is listed twice")
        seen.add(ref.fqn)
        try:
            found = model.get_submodule(ref.fqn)
        except AttributeError:
            raise ValueError(f"layer {ref.fqn!r} is not a submodule of the model") from None
        if found is not ref.module:
            raise ValueError(f"layer {ref.fqn!r} does not match the module in the model")
        if not isinstance(ref.module, nn.Linear):
            raise TypeError(f"layer {ref.fqn!r} is a {type(ref.module).__name__}, not nn.Linear")
        w = ref.module.weight
        # a NaN/Inf anywhere makes the sum non-finite; only then (or on a finite-value overflow) look closer
        if w.device.type != "meta" and not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
            raise ValueError(f"layer {ref.fqn!r} has NaN or Inf weights; fix the checkpoint before quantizing")


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in (m.weight, m.bias) if p is not None)


def quantizer_for(config: QuantConfig):
    """The registered quantizer whose config class is exactly ``type(config)``."""
    for _, cls in METHODS.items():
        if type(config) is cls.config_cls:
            return cls(config)
    raise KeyError(f"no method registered for {type(config).__name__}; methods: {', '.join(METHODS.names())}")


def _adaln_layer(ref: LayerRef, config: QuantConfig) -> QuantLinear:
    m = ref.module
    return QuantLinear(GroupWeight(m.weight, bits=4, group=64), m.bias, NoActQuant(torch_dtype(config.adaln_act_dtype)),
                       compute_dtype=m.weight.dtype, name=ref.fqn, treatment=ADALN_TREATMENT)


def layer_treatment(ref: LayerRef, config: QuantConfig) -> str:
    """The policy by role: ``skip`` (source precision), ``adaln`` (INT4 g64 weight-only) or ``method``."""
    if ref.role in config.skip_roles:
        return "skip"
    if ref.role == "adaln" and config.adaln != "method":
        return "skip" if config.adaln == "fp" else "adaln"
    return "method"


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig, layers: list[LayerRef] | None = None,
              probe: Callable[[], object] | None = None,
              calibrate: Callable[[], object] | None = None,
              calibration_cache: str | Path | None = None, runtime: str = "fast") -> QuantReport:
    """Quantize ``model`` in place and report what was done.

    ``runtime`` is the mode of every new layer: ``fast`` keeps the dequantized weight resident, ``compact``
    only the packed state (see :class:`QuantLinear`); the report's ``linear_bytes_resident`` says what that costs.

    ``layers`` (from a model adapter) gives every ``nn.Linear`` with a role; without it every
    ``nn.Linear`` is quantized with role ``linear``. The policy by role: ``config.skip_roles`` stay in
    source precision, ``adaln`` layers follow ``config.adaln``, everything else gets the method.
    ``probe`` runs the model once on a small batch; each quantized layer's relative output error is
    measured on the inputs it saw there (without a probe: on N(0, 1) inputs).

    ``calibrate`` runs the model's real sampler on calibration data; methods that need calibration
    (``needs_calibration``) refuse to run without it. ``calibration_cache`` is an artifact path: when it
    holds a valid artifact the method restores it instead of calibrating; otherwise the method's
    calibration products are written there for later runs (see ``artifacts.calibration_path``).

    Layers are converted one at a time and each replaced ``nn.Linear`` is moved to the meta device,
    so peak memory stays near one model copy plus one layer.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. OrbitConfig, RTNConfig), got {type(config).__name__}")
    t0 = time.perf_counter()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    if layers is None:
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise ValueError("model already contains QuantLinear layers; quantize a fresh copy")
        layers = _all_linears(model)
    _check_layers(model, layers)
    quantizer = quantizer_for(config)
    cache = Path(calibration_cache) if calibration_cache is not None and quantizer.needs_calibration else None
    t_load = time.perf_counter()
    cached = load_artifact(cache) if cache is not None else None
    if quantizer.needs_calibration and calibrate is None and cached is None:
        raise ValueError(f"method {config.method!r} needs calibration data: pass calibrate= (a callable that runs "
                         "the model's sampler; run.py builds it from conf/calib/)")
    plan = {ref.fqn: layer_treatment(ref, config) for ref in layers}
    targets = [ref for ref in layers if plan[ref.fqn] != "skip"]

    # capture probe inputs before anything changes
    inputs: dict[str, torch.Tensor] = {}
    probe_kind = "none"
    if config.probe_tokens and targets:
        if probe is not None:
            probe_kind = "model"
            hooks = []
            for ref in targets:
                def hook(mod, args, _out, fqn=ref.fqn):
                    if fqn not in inputs:
                        x = args[0].detach()
                        inputs[fqn] = x.reshape(-1, x.shape[-1])[: config.probe_tokens].clone()
                hooks.append(ref.module.register_forward_hook(hook))
            try:
                probe()
            finally:
                for h in hooks:
                    h.remove()
        else:
            probe_kind = "gaussian"
            g = torch.Generator().manual_seed(0)
            for ref in targets:
                w = ref.module.weight
                inputs[ref.fqn] = torch.randn(config.probe_tokens, w.shape[1], generator=g).to(w.device, w.dtype)
    quantizer.prepare([ref for ref in targets if plan[ref.fqn] == "method"], model)
    calibration = {}
    if cached is not None:
        facts = quantizer.load_calibration_state(*cached)
        calibration = {**facts, "seconds_when_fitted": facts.get("seconds"), "cached": str(cache),
                       "seconds": round(time.perf_counter() - t_load, 3)}
    elif quantizer.needs_calibration:
        t_cal = time.perf_counter()
        calibrate()
        calibration = {**quantizer.finish_calibration(), "seconds": round(time.perf_counter() - t_cal, 3)}

    # stream layer by layer: build one replacement, measure it, swap it in, drop the original
    report = QuantReport(method=config.method, config=config.to_dict(), probe=probe_kind, calibration=calibration)
    for ref in layers:
        new, rec = convert_layer(ref, plan[ref.fqn], quantizer, config, runtime, inputs.pop(ref.fqn, None))
        if new is not None:
            _set_submodule(model, ref.fqn, new)
            ref.module.to("meta")  # free the replaced weights now, even if the caller still holds ``layers``
        report.layers.append(rec)
    if cache is not None and cached is None:
        state = quantizer.calibration_state()
        if state is not None:
            save_artifact(cache, state[0], {**state[1], **calibration})
            report.calibration["saved"] = str(cache)
    report.seconds = time.perf_counter() - t0
    report.peak_memory = _peak_memory()
    report.runtime, report.resident_bytes = runtime, resident_bytes(model, layers)
    return report


@torch.no_grad()
def convert_layer(ref: LayerRef, treatment: str, quantizer, config: QuantConfig, runtime: str = "fast",
                  probe_input: torch.Tensor | None = None) -> tuple[QuantLinear | None, LayerRecord]:
    """One layer's replacement under ``treatment`` (see :func:`layer_treatment`) and its record.

    Returns ``(None, record)`` for ``skip``. The original module is left untouched (the caller swaps the
    replacement in and frees it); ``probe_input`` rows, when given, measure the layer's output error.
    ``quantize_`` and the diffusers load-time quantizer (``orbitquant.hf.quantizer``) both build layers
    here, so the two give identical layers for the same config.
    """
    m = ref.module
    src_bits = torch.finfo(m.weight.dtype).bits
    with construction_runtime(runtime):  # a compact layer never materializes its dense weight
        new = None if treatment == "skip" else (
            _adaln_layer(ref, config) if treatment == "adaln" else quantizer.quantize_layer(ref))
    rec = LayerRecord(ref.fqn, ref.role, ref.block, "skip" if new is None else new.treatment,
                      m.in_features, m.out_features,
                      src_bits if new is None else new.store.bits,
                      src_bits if new is None or new.act.bits == 16 else new.act.bits,
                      _layer_bytes(m), _layer_bytes(m) if new is None else new.nbytes)
    if new is not None:
        bias = 0 if new.bias is None else new.bias.numel() * new.bias.element_size()
        rec.w_bits_eff = round(8 * (new.nbytes - bias) / (m.in_features * m.out_features), 4)
        rec.a_bits_eff = round(src_bits if new.act.bits == 16 else new.act.bits_per_element(m.in_features), 4)
    if new is not None:
        new.nonfinite = config.nonfinite
        new.set_runtime(runtime)
        if probe_input is not None:
            y, yq = m(probe_input), new(probe_input)
            rec.rel_err, rec.sqnr_db = relative_error(y, yq), sqnr_db(y, yq)
            rec.ks_rot, rec.ks_raw = rotation_ks(new.rotation, probe_input)
    return new, rec


def resident_bytes(model: nn.Module, layers: list[LayerRef]) -> int:
    """Bytes the given linear layers hold between forwards: packed state (+ dequantized weight in fast mode)
    for quantized ones, parameters and buffers for the rest."""
    total = 0
    for ref in layers:
        m = model.get_submodule(ref.fqn)
        total += m.resident_bytes if isinstance(m, QuantLinear) else _layer_bytes(m)
    return total


def set_runtime(model: nn.Module, mode: str) -> int:
    """Put every ``QuantLinear`` of ``model`` in runtime ``mode`` (fast | compact); returns their resident bytes."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in qs:
        m.set_runtime(mode)
    return sum(m.resident_bytes for m in qs)


def _peak_memory() -> dict:
    out = {}
    try:
        import resource

        out["cpu_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except ImportError:  # not on POSIX
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


@contextmanager
def quantized(model: nn.Module, config: QuantConfig, layers: list[LayerRef], **kwargs) -> Iterator[QuantReport]:
    """Quantize ``model`` in place for the duration of the block, then put the original layers back
    (for searches that score many quantized variants of one model; costs one copy of the linears)."""
    originals = {ref.fqn: copy.deepcopy(ref.module) for ref in layers}
    try:
        yield quantize_(model, config, layers, **kwargs)
    finally:
        for fqn, module in originals.items():
            _set_submodule(model, fqn, module)
