"""Role map for diffusers' ``DiTTransformer2DModel`` (shared by the digits model and DiT-XL/2)."""

from __future__ import annotations

import re

from torch import nn

from ..types import LayerRef

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_IN_BLOCK_ROLES = {
    "attn1.to_q": "attn.q",
    "attn1.to_k": "attn.k",
    "attn1.to_v": "attn.v",
    "attn1.to_out.0": "attn.out",
    "ff.net.0.proj": "ff.up",
    "ff.net.2": "ff.down",
    "norm1.linear": "adaln",
    # DiT gives every block its own timestep MLP; like every timestep embedder it stays in source precision.
    "norm1.emb.timestep_embedder.linear_1": "embed",
    "norm1.emb.timestep_embedder.linear_2": "embed",
}
_GLOBAL_ROLES = {"proj_out_1": "final", "proj_out_2": "final"}


def dit_layer_refs(model: nn.Module) -> list[LayerRef]:
    """Every ``nn.Linear`` of a diffusers DiT with its role; an unknown linear is an error, not a guess."""
    refs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        m = _BLOCK.match(name)
        role = _IN_BLOCK_ROLES.get(m.group(2)) if m else _GLOBAL_ROLES.get(name)
        if role is None:
            raise KeyError(f"DiT adapter has no role for linear {name!r}; add it to orbitquant/adapters/dit_roles.py")
        refs.append(LayerRef(fqn=name, role=role, block=int(m.group(1)) if m else -1, module=mod))
    return refs
