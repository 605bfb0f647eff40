"""Test-session settings: single-threaded torch (fast and deterministic on small CPU tensors) and no hub access."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
# Without a GPU the Triton kernels (orbitquant/kernels/triton_orbit.py) run in Triton's CPU interpreter;
# the switch must be set before triton is first imported (its library functions are decorated at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch-fidelity (installed --no-deps for the metric tests) is imported by torchmetrics and imports torchvision: the
# harness registers its package without running its __init__ when orbitquant.harness.metrics is imported; do it before any
# test module imports torchmetrics directly
from orbitquant.harness.metrics.features import prepare_torch_fidelity  # noqa: E402

prepare_torch_fidelity()
