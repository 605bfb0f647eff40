"""Sharded sample generation under ``torchrun`` (torch.distributed): one run, its samples split across ranks.

    torchrun --nproc_per_node=8 run.py model=flux1_dev eval=flux_dev_fidelity device=cuda

Every rank loads and quantizes the model (rank 0 first, so a calibrated method fits once and the others
restore its artifact) and samples its contiguous part of the protocol's items into the run's sample store
(``samplestore``; sample k always gets the noise of index k, so the parts make exactly the unsharded set); rank 0
reads the whole store, scores, and writes results.json. Without torchrun (WORLD_SIZE unset) this is a no-op:
rank 0 of 1.
"""

from __future__ import annotations

import atexit
import os

import torch


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
