"""Which native kernel a quantizer or weight store may use for a tensor (shared by ``act`` and ``weights``)."""

from __future__ import annotations

from types import ModuleType

import torch


def cpu_kernel() -> ModuleType | None:
    """The compiled CPU kernel module (``orbitquant.kernels.orbit_cpu``), or None when disabled or unavailable."""
    # imported here: the kernel package is optional machinery, loaded (and JIT-built) on first use only
    from orbitquant.kernels import orbit_cpu

    return orbit_cpu()


def gpu_kernels(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernel module for CUDA tensors (None on CPU, without Triton, or with kernels disabled)."""
    if x.device.type != "cuda":
        return None
    from orbitquant.kernels import enabled, triton_orbit

    return triton_orbit if enabled() and triton_orbit.available() else None
