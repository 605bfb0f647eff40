"""Deterministic sampling, sample files, and the cached fp reference samples."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .artifacts import cache_key
from .types import Samples
from .viz import save_gif, save_grid, save_mp4

MAX_VIDEO_FILES = 8  # animated previews written per run (all frames are in samples.npz)


def save_samples(samples: Samples, out_dir: Path) -> dict[str, str]:
    """``samples.npz`` (float images in [-1, 1], labels) and ``grid.png`` (column k = class k).

    Returns the paths relative to ``out_dir``'s parent (the run directory), so results move with it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "samples.npz", images=samples.images.numpy(), labels=samples.labels.numpy())
    video = samples.images.ndim == 5
    save_grid(samples.images[:, 0] if video else samples.images, out_dir / "grid.png")  # videos: first frames
    files = {name: f"{out_dir.name}/{name}" for name in ("samples.npz", "grid.png")}
    if video:
        for i, clip in enumerate(samples.images[:MAX_VIDEO_FILES]):
            files[f"gif_{i:03d}"] = f"{out_dir.name}/{save_gif(clip, out_dir / f'{i:06d}.gif').name}"
            mp4 = save_mp4(clip, out_dir / f"{i:06d}.mp4")
            if mp4 is not None:
                files[f"mp4_{i:03d}"] = f"{out_dir.name}/{mp4.name}"
    return files


def load_samples(path: Path) -> Samples:
    data = np.load(path)
    return Samples(images=torch.from_numpy(data["images"]), labels=torch.from_numpy(data["labels"]))


def reference_key(model_cfg: dict, protocol: dict, seed: int, fingerprint: str) -> str:
    """Cache key of the fp reference: model config, sampling protocol, seed and the weights' fingerprint."""
    return cache_key(model=model_cfg, protocol=protocol, seed=seed, weights=fingerprint)


def reference_samples(generate, cache_dir: Path, key: str) -> tuple[Samples | None, bool]:
    """The fp samples for ``key``: from ``cache_dir`` if present, else ``generate()`` and cache them.

    Returns ``(samples, was_cached)``. The cache is what lets a sweep score every method against the
    same fp samples without re-sampling the fp model in every job.
    """
    path = cache_dir / f"{key}.npz"
    if path.exists():
        return load_samples(path), True
    samples = generate()
    if samples is None:  # a non-zero rank of a sharded run: rank 0 holds (and caches) the merged samples
        return None, False
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temp name: parallel jobs of a sweep may build the same reference at once (last rename wins,
    # and both wrote identical samples)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, images=samples.images.numpy(), labels=samples.labels.numpy())
    os.replace(tmp, path)
    return samples, False
