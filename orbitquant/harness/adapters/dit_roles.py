"""Role table of diffusers' ``DiTTransformer2DModel`` (shared by the digits model and DiT-XL/2).

DiT gives every block its own timestep MLP (``norm1.emb.timestep_embedder``); like every timestep
embedder it stays in source precision (role ``embed``). ``norm1.linear`` is the adaLN-zero
modulation (D -> 6D). ``proj_out_1`` is the final modulation and ``proj_out_2`` the output
projection (role ``final``).
"""

from __future__ import annotations

from torch import nn

from orbitquant.harness.adapters.roles import RoleTable
from orbitquant.quant.types import LayerRef

_B = r"(?P<stack>transformer_blocks)\.(?P<block>\d+)\."
DIT_ROLES = RoleTable("dit", (
    (_B + r"attn1\.to_q", "attn.q"),
    (_B + r"attn1\.to_k", "attn.k"),
    (_B + r"attn1\.to_v", "attn.v"),
    (_B + r"attn1\.to_out\.0", "attn.out"),
    (_B + r"ff\.net\.0\.proj", "ff.up"),
    (_B + r"ff\.net\.2", "ff.down"),
    (_B + r"norm1\.linear", "adaln"),
    (_B + r"norm1\.emb\.timestep_embedder\.linear_[12]", "embed"),
    (r"proj_out_[12]", "final"),
), stacks=("transformer_blocks",))


def dit_layer_refs(model: nn.Module) -> list[LayerRef]:
    """Every ``nn.Linear`` of a diffusers DiT with its role."""
    return DIT_ROLES.refs(model)
