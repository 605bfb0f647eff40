"""Sample previews and the fp reference's cache key (samples themselves stream to ``samplestore`` stores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orbitquant.harness.viz import save_gif, save_grid, save_mp4, to_uint8
from orbitquant.quant.artifacts import cache_key

MAX_PREVIEW = 100  # images in grid.png (the first ones: column k = class k for class-conditional models)
MAX_VIDEO_PREVIEW = 20  # first frames in grid.png for videos (each is read whole to get it)
MAX_VIDEO_FILES = 8  # animated previews written per run (every frame is in the store's shards)
TILE = 256  # grid tiles are at most this many pixels a side (1024² samples are downsized; digits upsized x4)


def _tile(frame) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> a uint8 (h, w, C) tile no larger than ``TILE`` (area-averaged when downsized)."""
    from PIL import Image

    arr = to_uint8(frame[None])[0]
    h, w = arr.shape[:2]
    if max(h, w) <= TILE:
        return arr
    k = TILE / max(h, w)
    im = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).resize(
        (max(1, round(w * k)), max(1, round(h * k))), Image.BOX)
    out = np.asarray(im)
    return out[..., None] if out.ndim == 2 else out


def save_previews(samples, out_dir: Path) -> dict[str, str]:
    """``grid.png`` of the first samples (videos: their first frames) and, for videos, GIF/mp4 previews of the
    first few. Reads the store one sample at a time and keeps only small tiles, so previews of 1024² images or
    81-frame videos cost what a digit costs. Returns the paths relative to the run directory, with the store itself
    as ``samples``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"samples": out_dir.name}
    tiles: list[np.ndarray] = []
    for x, _ in samples.batches(1):
        item = x[0]
        video = item.ndim == 4
        if video and len(tiles) < MAX_VIDEO_FILES:
            i = len(tiles)
            files[f"gif_{i:03d}"] = f"{out_dir.name}/{save_gif(item, out_dir / f'{i:06d}.gif').name}"
            mp4 = save_mp4(item, out_dir / f"{i:06d}.mp4")
            if mp4 is not None:
                files[f"mp4_{i:03d}"] = f"{out_dir.name}/{mp4.name}"
        tiles.append(_tile(item[0] if video else item))
        if len(tiles) >= (MAX_VIDEO_PREVIEW if video else MAX_PREVIEW):
            break
    if tiles and len({t.shape for t in tiles}) == 1:
        save_grid(np.stack(tiles), out_dir / "grid.png", scale=4 if tiles[0].shape[0] <= 32 else 1)
        files["grid.png"] = f"{out_dir.name}/grid.png"
    return files


def reference_key(model_cfg: dict, protocol: dict, seed: int, fingerprint: str) -> str:
    """Cache key of the fp reference: model config, sampling protocol, seed and the weights' fingerprint."""
    return cache_key(model=model_cfg, protocol=protocol, seed=seed, weights=fingerprint)


def run_reference_key(c: dict, fingerprint: str) -> str:
    """The fp reference key of a run's resolved config (``results.json['config']``): its eval protocol, dtype,
    device and sample-store format, seed and weights. One definition for ``run.py`` and ``scripts/score.py``."""
    protocol = {**c["eval"]["protocol"], "dtype": c["dtype"], "device": c["device"],
                "store": c["eval"].get("store", "float32")}
    return reference_key(c["model"], protocol, c["seed"], fingerprint)
