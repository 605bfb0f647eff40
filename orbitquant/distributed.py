"""Sharded sample generation under ``torchrun`` (torch.distributed): one run, its samples split across ranks.

    torchrun --nproc_per_node=8 run.py model=flux1_dev eval=flux_dev_fidelity device=cuda

Every rank loads and quantizes the model (rank 0 first, so a calibrated method fits once and the others
restore its artifact), samples its contiguous shard of the protocol's items (sample k always gets the noise
of index k, so shards concatenate to exactly the unsharded set), and writes ``samples/shard-RRR-of-WWW.npz``;
rank 0 merges the shards in order, scores, and writes results.json. Without torchrun (WORLD_SIZE unset)
this is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .types import Samples


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA; each rank on its GPU)."""
    rank, world = rank_world()
    if world > 1 and not torch.distributed.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(torch.distributed.destroy_process_group)
    return rank, world


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shard_range(n: int, shard: tuple[int, int]) -> range:
    """The contiguous item indices of ``shard = (rank, world)`` among ``n`` items (sizes differ by at most 1)."""
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard} is not (rank, world) with 0 <= rank < world")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather(samples: Samples, out_dir: Path, shard: tuple[int, int], name: str) -> Samples | None:
    """Write this rank's shard to ``out_dir``; on rank 0 return all shards merged in order (else None)."""
    rank, world = shard
    if world == 1:
        return samples
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-shard-{rank:03d}-of-{world:03d}.npz"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, images=samples.images.numpy(), labels=samples.labels.numpy())
    os.replace(tmp, path)
    barrier()
    if rank != 0:
        return None
    paths = [out_dir / f"{name}-shard-{r:03d}-of-{world:03d}.npz" for r in range(world)]
    parts = [dict(np.load(p)) for p in paths]
    for p in paths:  # merged below; the run keeps one samples.npz
        p.unlink()
    meta = {**samples.meta, "shards": world}
    meta.pop("shard", None)
    if "denoiser_forwards" in meta:
        meta["denoiser_forwards_rank0"] = meta.pop("denoiser_forwards")
    return Samples(images=torch.from_numpy(np.concatenate([p["images"] for p in parts])),
                   labels=torch.from_numpy(np.concatenate([p["labels"] for p in parts])), meta=meta)
