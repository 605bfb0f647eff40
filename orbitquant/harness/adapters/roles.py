"""Role tables: ordered ``(regex, role)`` rules that give every ``nn.Linear`` of a family its role.

A rule's regex is matched against the full module name; a named group ``stack`` picks the block
stack (a key of the table's ``stacks`` offsets) and ``block`` the index inside it, so blocks get one
global index in execution order (e.g. FLUX dual blocks 0..18, single blocks 19..56). A linear no
rule matches is an error naming the table to extend, never a silent guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from orbitquant.quant.types import LayerRef

#: the diffusers ``Attention`` module's four linears (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and their
#: self-attention roles; a cross-attention maps them to ``ctx.*``
ATTN_RULES = (("to_q", "attn.q"), ("to_k", "attn.k"), ("to_v", "attn.v"), (r"to_out\.0", "attn.out"))


@dataclass(frozen=True)
class RoleTable:
    family: str
    rules: tuple[tuple[str, str], ...]
    stacks: tuple[str, ...] = ()  # block stacks in execution order; their blocks are numbered globally

    def refs(self, model: nn.Module) -> list[LayerRef]:
        compiled = [(re.compile(rx + r"$"), role) for rx, role in self.rules]
        offsets = self._offsets(model)
        out = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            for rx, role in compiled:
                m = rx.match(name)
                if m:
                    break
            else:
                raise KeyError(f"{self.family} role table has no rule for linear {name!r}; "
                               f"add one in orbitquant/harness/adapters/ (roles by family)")
            gd = m.groupdict()
            block = offsets[gd.get("stack") or ""] + int(gd["block"]) if gd.get("block") is not None else -1
            out.append(LayerRef(fqn=name, role=role, block=block, module=mod))
        return out

    def _offsets(self, model: nn.Module) -> dict[str, int]:
        """Global block offsets: stacks in table order, each as long as the model's ModuleList."""
        offsets, start = {"": 0}, 0
        for stack in self.stacks:
            offsets[stack] = start
            blocks = getattr(model, stack, None)
            start += len(blocks) if isinstance(blocks, nn.ModuleList) else 0
        return offsets
