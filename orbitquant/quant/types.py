"""The library's layer type: one linear with its role (methods address layers by role, never by name)."""

from __future__ import annotations

from dataclasses import dataclass

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
