"""Per-layer diagnostics measured on the probe batch while quantizing (the harness's "layer error" metric).

* ``sqnr_db``: 10 log10 ||y||^2 / ||y - y_q||^2 of the layer output (= -20 log10 of the relative error);
* ``ks_rot`` / ``ks_raw``: Kolmogorov-Smirnov distance between the coordinates of the layer's input tokens,
  normalized to unit length and scaled by sqrt(d), and N(0, 1) -- after the layer's rotation and before it.
  OrbitQuant's codebook assumes the rotated coordinates follow (nearly) N(0, 1/d); ``ks_rot`` says how
  well that holds on real activations, ``ks_raw`` what the rotation fixed. Only for layers whose input
  transform is an orthogonal rotation (orbit, hadamard_rtn; not a smoothing scale).
"""

from __future__ import annotations

import math

import torch
from scipy import stats

from orbitquant.quant.rotation import Rotation

MAX_VALUES = 100_000  # KS on at most this many coordinates (a seeded subsample): a few ms per layer


def ks_to_normal(z: torch.Tensor, seed: int = 0) -> float:
    """KS distance of the values of ``z`` to N(0, 1) (a seeded subsample of at most ``MAX_VALUES``)."""
    z = z.detach().reshape(-1).double()
    if z.numel() > MAX_VALUES:
        z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_VALUES]]
    # only the statistic is used: the asymptotic p-value skips the exact one, ~90% of quantize_'s time (measured)
    return float(stats.kstest(z.numpy(), "norm", method="asymp").statistic)


def normalized_coordinates(x: torch.Tensor) -> torch.Tensor:
    """sqrt(d) x / ||x|| per token (all-zero tokens dropped): N(0, 1) coordinates for a uniform direction."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    n = x.norm(dim=-1, keepdim=True)
    keep = n.squeeze(-1) > 0
    return (x[keep] / n[keep]) * math.sqrt(x.shape[-1])


def rotation_ks(rotation: object, x: torch.Tensor) -> tuple[float | None, float | None]:
    """(ks_rot, ks_raw) for a layer whose input transform is a :class:`Rotation`, else (None, None)."""
    if not isinstance(rotation, Rotation):
        return None, None
    with torch.no_grad():
        return ks_to_normal(normalized_coordinates(rotation(x.float()))), ks_to_normal(normalized_coordinates(x))
