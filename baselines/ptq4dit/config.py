"""The ``ptq4dit`` config: which layers CSB balances, how SSC weighs the calibration (``ssc``), the
percentile-MSE range search and the reconstruction settings, validated before any calibration runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from orbitquant.quant.config import QuantConfig
from orbitquant.quant.types import ROLES

from .quantizers import PERCENTILES

#: CSB targets (paper: Projection1 = qkv, Projection2 = attention out-proj, FC1; never FC2 = ff.down)
BALANCED_ROLES = ("attn.q", "attn.k", "attn.v", "ctx.q", "ctx.k", "ctx.v", "attn.out", "ctx.out",
                  "ff.up", "ff.gate", "ctx.ff.up")
SSC_MODES = ("timestep", "sample", "max")


@dataclass(frozen=True)
class PTQ4DiTConfig(QuantConfig):
    method: ClassVar[str] = "ptq4dit"
    csb: bool = True                   # channel-wise salience balancing (false: the paper's "Baseline")
    ssc: str = "timestep"              # timestep (paper) | sample (official code) | max (CSB without SSC)
    balance_roles: tuple[str, ...] = BALANCED_ROLES
    timesteps: int | None = None       # None: every sampler step; n: n evenly spaced steps (paper: 25)
    ssc_samples: int = 2               # ssc=sample: samples per (step, CFG half) (code: 4 per step)
    percentiles: tuple[float, ...] = PERCENTILES
    minmax_candidate: bool = False     # true: also score plain min/max (ablation; the code scores percentiles only)
    reservoir: int = 2048              # calibration tokens per layer for the activation range search
    recon_iters: int = 0               # 0: no reconstruction (tag *-norecon); code: 20000 per block
                                       # (conf/quant/ptq4dit_recon.yaml)
    recon_unit: str = "block"          # block (BRECQ, PTQ4DiT) | layer
    recon_rows: int = 4                # denoiser inputs kept per (step, CFG half) for reconstruction
    recon_batch: int = 32
    recon_weight: float = 0.01         # AdaRound rounding-regulariser weight
    recon_b_range: tuple[float, float] = (20.0, 2.0)
    recon_warmup: float = 0.2
    recon_lr: float = 4e-5             # activation step sizes (Adam, cosine); the code's effective value
    recon_w_lr: float = 1e-3           # rounding logits (Adam default, as upstream)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("balance_roles", "percentiles", "recon_b_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [r for r in self.balance_roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles in balance_roles: {bad}; valid roles: {', '.join(ROLES)}")
        if self.ssc not in SSC_MODES:
            raise ValueError(f"ssc must be one of {SSC_MODES}, got {self.ssc!r}")
        if self.recon_unit not in ("block", "layer"):
            raise ValueError(f"recon_unit must be 'block' or 'layer', got {self.recon_unit!r}")
        if not all(0.5 < p < 1 for p in self.percentiles):
            raise ValueError("percentiles must lie in (0.5, 1)")
        if not self.percentiles and not self.minmax_candidate:
            raise ValueError("the range search needs percentiles or minmax_candidate: true")
        if self.timesteps is not None and self.timesteps < 1:
            raise ValueError("timesteps must be >= 1 (or null for every step)")
        if min(self.ssc_samples, self.reservoir, self.recon_rows, self.recon_batch) < 1 or self.recon_iters < 0:
            raise ValueError("ssc_samples, reservoir, recon_rows and recon_batch must be >= 1, recon_iters >= 0")
        if len(self.recon_b_range) != 2 or not 0 <= self.recon_warmup < 1:
            raise ValueError("recon_b_range is (start, end) and recon_warmup in [0, 1)")
