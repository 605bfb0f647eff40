"""Core value types shared by adapters, methods and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Roles an adapter may give a linear layer. Methods address layers by role, never by name.
ROLES = (
    "attn.q", "attn.k", "attn.v", "attn.out",          # self-attention
    "ctx.q", "ctx.k", "ctx.v", "ctx.out",              # text/context stream or cross-attention
    "ff.up", "ff.gate", "ff.down",                      # feed-forward
    "fused.out",                                        # FLUX single block: concat(attn, mlp) -> D
    "ctx.ff.up", "ctx.ff.down",                         # context-stream feed-forward
    "adaln",                                            # modulation linears inside blocks
    "embed",                                            # patch/text/timestep/class embedders
    "final",                                            # final modulation and output projection
    "linear",                                           # anything else (no adapter)
)


@dataclass(frozen=True)
class LayerRef:
    """One ``nn.Linear`` of a denoiser, as an adapter sees it."""

    fqn: str
    role: str
    block: int  # -1 outside the block stack
    module: nn.Linear

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} for {self.fqn}; valid roles: {', '.join(ROLES)}")


@dataclass
class Samples:
    """Generated images in [-1, 1] with the conditioning that produced them, in memory.

    Runs stream their samples to disk instead (``samplestore.SampleSet``, same ``batches`` / ``labels`` / ``meta``
    / ``fingerprint`` interface); this class serves calibration, tests and small sets. Metrics read both through
    :meth:`batches`.
    """

    images: torch.Tensor  # (N, C, H, W) or videos (N, F, C, H, W), float32 in [-1, 1] (or uint8), CPU
    labels: torch.Tensor  # (N,) int64 class labels (or prompt indices)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, *, uint8: bool = False):
        """``(images, labels)`` slices in order: float32 in [-1, 1], or uint8 rounded like a saved PNG."""
        for s in range(0, len(self), batch_size):
            x = self.images[s:s + batch_size]
            if uint8 and x.dtype != torch.uint8:
                x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            elif not uint8 and x.dtype == torch.uint8:
                x = x.float() / 127.5 - 1.0
            yield x, self.labels[s:s + batch_size]

    def fingerprint(self) -> str:
        """Identifies the sample values: keys feature caches (``features.tensor_checksum`` of the images)."""
        from .metrics.features import tensor_checksum

        return tensor_checksum(self.images.detach())


@dataclass(frozen=True)
class MetricResult:
    """One metric value with its direction and sample count; ``std`` is a spread over samples if known."""

    name: str
    value: float
    higher_is_better: bool
    n: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "higher_is_better": self.higher_is_better, "n": self.n, **self.extra}
