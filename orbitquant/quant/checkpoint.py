"""Packed quantized checkpoints: ``save_quantized(model, dir, config)`` / ``load_quantized(model, dir)``.

A checkpoint directory holds

* ``model.safetensors``: the model's ``state_dict`` with every quantized linear as its persistent packed
  state (OrbitQuant: b-bit codes as a bit stream, bf16 row norms, bias) and every other parameter as is;
* ``orbitquant.json``: the format, the full quantization config (method, bits, rotation kind and seed,
  codebook density), and per quantized layer its shape, role, block and treatment. Rotations and
  codebooks are not stored: they are functions of (kind, d, seed) and (d, bits, density), rebuilt on load.

Loading rebuilds each layer's module structure from the config (one layer at a time, on zeros) and
loads its packed state; outputs are bit-identical to the model that was saved. Only data-free methods
can be rebuilt this way (calibrated ones are restored from their calibration artifact instead).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from orbitquant.quant.api import _adaln_layer, _set_submodule, quantizer_for
from orbitquant.quant.atomic import atomic_path, atomic_write
from orbitquant.quant.config import QuantConfig
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.types import LayerRef

FORMAT = "orbitquant-packed-v1"
WEIGHTS, MANIFEST = "model.safetensors", "orbitquant.json"


def config_dict(config: QuantConfig) -> dict:
    """The config as plain JSON data, method included."""
    return {"method": config.method, **json.loads(json.dumps(dataclasses.asdict(config)))}


def layer_records(model: nn.Module, layers: list[LayerRef] | None = None) -> dict[str, dict]:
    """The manifest entry of every ``QuantLinear`` in ``model``: shape, bias, compute dtype, role, block and
    treatment (what :func:`rebuild_layer` needs). ``layers`` supplies roles and blocks (default ``linear``, -1)."""
    info = {r.fqn: (r.role, r.block) for r in layers or []}
    records = {}
    for fqn, m in model.named_modules():
        if isinstance(m, QuantLinear):
            role, block = info.get(fqn, ("linear", -1))
            records[fqn] = {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                            "dtype": str(m.compute_dtype).removeprefix("torch."), "role": role, "block": block,
                            "treatment": m.treatment, "adaln": m.treatment == "int4_g64 wo"}
    return records


def rebuild_layer(fqn: str, rec: dict, config: QuantConfig, quantizer) -> QuantLinear:
    """The module structure of one saved layer (a manifest record), built on a zero weight: its packed state is
    placeholder until the saved tensors are loaded into it (``load_state_dict``). Data-free methods only."""
    # built on meta then zeroed: no random init (it would cost time and advance the global RNG)
    stand_in = nn.Linear(rec["in"], rec["out"], bias=rec["bias"], dtype=getattr(torch, rec["dtype"]), device="meta")
    stand_in = stand_in.to_empty(device="cpu")
    for t in stand_in.parameters():
        nn.init.zeros_(t)  # structure only: the packed state comes from the file
    ref = LayerRef(fqn, rec["role"], rec["block"], stand_in)
    return _adaln_layer(ref, config) if rec["adaln"] else quantizer.quantize_layer(ref)


def saved_layer_slot(model: nn.Module, fqn: str, rec: dict) -> tuple[nn.Module | None, bool]:
    """The module at ``fqn`` (None if absent) and whether it is the in->out linear the manifest ``rec`` records."""
    try:
        old = model.get_submodule(fqn)
    except AttributeError:
        return None, False
    return old, getattr(old, "in_features", None) == rec["in"] and getattr(old, "out_features", None) == rec["out"]


def save_quantized(model: nn.Module, directory: str | Path, config: QuantConfig,
                   layers: list[LayerRef] | None = None, meta: dict | None = None) -> Path:
    """Write ``model`` (already quantized with ``config``) as a packed checkpoint; returns the directory.
    ``layers`` (the adapter's, as given to ``quantize_``) supplies roles and blocks; ``meta`` is free JSON
    (e.g. the model config and fingerprint) checked by nobody but useful to readers."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    records = layer_records(model, layers)
    if not records:
        raise ValueError("the model has no quantized layers: run quantize_ first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    manifest = {"format": FORMAT, "config": config_dict(config), "layers": records, "meta": meta or {}}
    text = json.dumps(manifest, indent=1)  # the report may hold non-finite errors: JSON's NaN/Infinity, as before
    # a directory with a manifest is complete: an old manifest goes first (it would vouch for the new weights),
    # the new one is written last, each file atomically
    (out / MANIFEST).unlink(missing_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, tmp)
    atomic_write(out / MANIFEST, lambda f: f.write(text.encode()))
    return out


def read_manifest(directory: str | Path) -> dict:
    """The checkpoint's manifest, with a clear error when the directory is not a complete checkpoint."""
    d = Path(directory)
    if not (d / MANIFEST).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a quantized checkpoint (needs {MANIFEST} and {WEIGHTS}; write one with "
                                "save_quantized or run.py quant_checkpoint=<dir>)")
    manifest = json.loads((d / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d}: unknown checkpoint format {manifest.get('format')!r} (this version reads {FORMAT})")
    return manifest


@torch.no_grad()
def load_quantized(model: nn.Module, directory: str | Path, config: QuantConfig | None = None,
                   runtime: str = "fast") -> dict:
    """Replace ``model``'s linears by the checkpoint's quantized layers and load every saved tensor.

    ``model`` is the fp model (or a skeleton with the same module names). With ``config``, the checkpoint
    must have been written with exactly that config (else ValueError listing the differences). Returns
    the manifest.
    """
    from safetensors import safe_open

    from orbitquant.quant.config import build_quant_config

    manifest = read_manifest(directory)
    saved = build_quant_config(manifest["config"])
    if config is not None and config_dict(config) != config_dict(saved):
        diff = [f"{k}: checkpoint {v!r} vs requested {config_dict(config).get(k)!r}"
                for k, v in config_dict(saved).items() if config_dict(config).get(k) != v]
        raise ValueError(f"checkpoint {directory} was written with another quant config ({'; '.join(diff[:4])})")
    quantizer = quantizer_for(saved)
    if quantizer.needs_calibration:
        raise ValueError(f"quant={saved.method} is calibrated: its layers cannot be rebuilt from a checkpoint; its "
                         "calibration artifact (results/cache/calibration) already avoids recalibrating")
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for fqn, rec in manifest["layers"].items():
            old, fits = saved_layer_slot(model, fqn, rec)
            if not fits:
                raise ValueError(f"checkpoint {directory} has a {rec['in']}->{rec['out']} linear {fqn!r} that this "
                                 f"model lacks ({type(old).__name__ if old is not None else 'no such module'}): "
                                 "wrong model?")
            new = rebuild_layer(fqn, rec, saved, quantizer)
            prefix = fqn + "."
            state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            new.load_state_dict(state, strict=True)  # refreshes the dequantized weight
            new.set_runtime(runtime)
            keys -= {prefix + k for k in state}
            _set_submodule(model, fqn, new)
        rest = {k: f.get_tensor(k) for k in keys}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {directory} has tensors this model lacks, e.g. {unexpected[:3]}: wrong model?")
    quantized = set(manifest["layers"])
    absent = [k for k in missing if not any(k.startswith(q + ".") for q in quantized)]
    if absent:
        raise ValueError(f"checkpoint {directory} lacks {len(absent)} tensors of this model, e.g. {absent[:3]}")
    return manifest


def check_checkpoint(directory: str | Path | None, config: QuantConfig) -> None:
    """Fail fast (before any model is loaded) when ``run.py quant_checkpoint=`` cannot be honoured."""
    if not directory:
        return
    if quantizer_for(config).needs_calibration:
        raise ValueError(f"quant_checkpoint supports data-free methods; quant={config.method} is calibrated (its "
                         "calibration artifact is cached instead): drop quant_checkpoint")
    if (Path(directory) / MANIFEST).exists():
        saved = config_dict(_saved_config(directory))
        want = config_dict(config)
        if saved != want:
            diff = [f"{k}: {v!r} -> {want.get(k)!r}" for k, v in saved.items() if want.get(k) != v]
            raise ValueError(f"quant_checkpoint {directory} holds another quant config ({'; '.join(diff[:4])}); "
                             "point quant_checkpoint at a new directory")


def _saved_config(directory: str | Path) -> QuantConfig:
    from orbitquant.quant.config import build_quant_config

    return build_quant_config(read_manifest(directory)["config"])


def quantize_or_load(model: nn.Module, config: QuantConfig, layers: list[LayerRef], checkpoint: str | Path | None,
                     runtime: str = "fast", meta: dict | None = None, **quantize_kwargs) -> dict:
    """The runner's quantization step: load ``checkpoint`` when it holds one, else ``quantize_`` (and save to
    ``checkpoint`` when given). Returns the report as a dict (the saved one, marked ``loaded_from``, on load)."""
    from orbitquant.quant.api import quantize_

    if checkpoint and (Path(checkpoint) / MANIFEST).exists():
        want, have = (meta or {}).get("fingerprint"), read_manifest(checkpoint)["meta"].get("fingerprint")
        if want and have and want != have:
            raise ValueError(f"quant_checkpoint {checkpoint} was written for other model weights (fingerprint {have} "
                             f"vs {want}); point quant_checkpoint at a new directory")
        manifest = load_quantized(model, checkpoint, config, runtime=runtime)
        report = manifest["meta"].get("report", {"summary": {}})
        report["summary"]["loaded_from"] = str(checkpoint)
        return report
    report = quantize_(model, config, layers, runtime=runtime, **quantize_kwargs).to_dict()
    if checkpoint:
        save_quantized(model, checkpoint, config, layers, meta={**(meta or {}), "report": report})
        report["summary"]["saved_to"] = str(checkpoint)
    return report
