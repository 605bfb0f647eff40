"""Calibration artifacts: what a calibrated method fitted (scales, GPTQ codes, ...), cached on disk so
later runs with the same (model, method config, calibration protocol, quant_seed) skip calibration.

An artifact is one safetensors file written atomically; its metadata holds the method's calibration
facts (JSON) and a SHA-256 of every tensor, checked on load: a corrupted or truncated file is reported
and recomputed, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from orbitquant.quant.atomic import atomic_path

log = logging.getLogger(__name__)


def cache_key(**parts) -> str:
    """A short stable hash of JSON-serialisable parts (configs, protocols, seeds, weight fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_artifact(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write ``tensors`` and the JSON ``info`` to ``path`` atomically (``atomic.atomic_path``): a reader sees the old
    artifact or the whole new one; a full disk raises ``atomic.DiskFull``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"info": json.dumps(info, default=str), "sha256": _digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_artifact(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, info)`` from ``path``; None (with a warning) if it is missing, unreadable or fails its checksum."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        info = json.loads(meta["info"])
        if _digest(tensors) != meta.get("sha256"):
            raise ValueError("checksum mismatch")
    except Exception as e:  # any corruption: recompute rather than trust it
        log.warning("calibration artifact %s is unusable (%s); recalibrating and overwriting it", path, e)
        return None
    return tensors, info


#: bumped when what a method calibrates changes meaning (2: the baselines' official defaults of issue 20 -- ViDiT-Q's
#: ranges by timestep value, Q-DiT's Hessians, SmoothQuant's roles...): older artifacts are never reused
CALIBRATION_VERSION = 2


def calibration_path(cache_dir: str | Path, cfg: dict, fingerprint: str) -> Path:
    """Where a run's calibration artifact lives: keyed by the model (config and weights), the method's full
    config (bits, hyper-parameters, seed), the calibration protocol, quant_seed, dtype and device."""
    key = cache_key(model=cfg["model"], weights=fingerprint, quant=cfg["quant"], calib=cfg["calib"],
                    quant_seed=cfg["quant_seed"], dtype=cfg["dtype"], device=cfg["device"],
                    version=CALIBRATION_VERSION)
    return Path(cache_dir) / "calibration" / f"{cfg['model']['name']}-{cfg['quant']['method']}-{key}.safetensors"
