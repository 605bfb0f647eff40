"""Test-session settings: single-threaded torch (fast and deterministic on small CPU tensors) and no hub access."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
