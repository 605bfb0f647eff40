"""Paths, defaults and the error every part of the planner shares."""

from __future__ import annotations

from orbitquant.harness.paths import PACKAGE

REPO = PACKAGE.parent
CONF = REPO / "conf"
BENCH = REPO / "results" / "bench"
CONFIGS = PACKAGE / "assets" / "configs"
DIGITS_CONFIG = PACKAGE / "assets" / "digits_dit" / "config.json"
DEFAULT_CEILING = BENCH / "gpu-nvidia-h100-80gb-hbm3.json"

#: Assumed fraction of the measured bf16 GEMM ceiling a whole denoiser forward sustains (an assumption, not a
#: measurement: attention kernels run below GEMM peak and norms, RoPE, modulation and launches add time).
DEFAULT_MFU = 0.4


class PlanError(ValueError):
    """Bad input to the planner (unknown option, a config that does not compose); the message names the fix."""
