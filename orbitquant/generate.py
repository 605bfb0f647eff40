"""Sample previews and the fp reference's cache key (samples themselves stream to ``samplestore`` stores)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import cache_key
from .viz import save_gif, save_grid, save_mp4

MAX_PREVIEW = 100  # samples in grid.png (the first ones: column k = class k for class-conditional models)
MAX_VIDEO_FILES = 8  # animated previews written per run (every frame is in the store's shards)


def save_previews(samples, out_dir: Path) -> dict[str, str]:
    """``grid.png`` of the first samples (videos: their first frames) and, for videos, GIF/mp4 previews of the
    first few. Reads only those samples from the store. Returns the paths relative to the run directory, with the
    store itself as ``samples``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = samples.head(MAX_PREVIEW) if hasattr(samples, "head") else samples.images[:MAX_PREVIEW]
    video = head.ndim == 5
    save_grid(head[:, 0] if video else head, out_dir / "grid.png")
    files = {"samples": out_dir.name, "grid.png": f"{out_dir.name}/grid.png"}
    if video:
        for i, clip in enumerate(head[:MAX_VIDEO_FILES]):
            files[f"gif_{i:03d}"] = f"{out_dir.name}/{save_gif(clip, out_dir / f'{i:06d}.gif').name}"
            mp4 = save_mp4(clip, out_dir / f"{i:06d}.mp4")
            if mp4 is not None:
                files[f"mp4_{i:03d}"] = f"{out_dir.name}/{mp4.name}"
    return files


def reference_key(model_cfg: dict, protocol: dict, seed: int, fingerprint: str) -> str:
    """Cache key of the fp reference: model config, sampling protocol, seed and the weights' fingerprint."""
    return cache_key(model=model_cfg, protocol=protocol, seed=seed, weights=fingerprint)
