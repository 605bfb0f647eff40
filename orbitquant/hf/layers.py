"""What the diffusers loader does to a model besides quantizing its layers: which linears it considers
(``diffusers_layers``: the family's role table, or every ``nn.Linear``, less ``modules_to_not_convert``), and the
memory hygiene that keeps a load lean and a reload bit-identical (``release_freed_memory``, ``align_tensors_``).
``orbitquant.hf.quantizer`` re-exports these names.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from orbitquant.quant.types import LayerRef

from .config import OrbitQuantDiffusersConfig, _error


def _role_table(model: nn.Module):
    """The role table of the adapter whose diffusers class ``model`` is (or derives from); None for other models."""
    from orbitquant.harness.adapters.diffusers_base import roles_for_class

    return roles_for_class(type(model))


def _excluded(fqn: str, names: list[str]) -> bool:
    """Whether ``fqn`` is one of ``names`` or contains one as whole dotted parts ("proj_out", "blocks.0")."""
    padded = f".{fqn}."
    return any(f".{n}." in padded for n in names)


def diffusers_layers(model: nn.Module, config: OrbitQuantDiffusersConfig) -> list[LayerRef]:
    """The linears (with roles) that loading ``model``'s class with ``config`` considers, in model order.

    ``quantize_(fp_model, config.quant_config(), diffusers_layers(fp_model, config), runtime=config.runtime)``
    on the fully loaded fp model gives exactly the layers that quantize-at-load builds.
    """
    table = _role_table(model) if config.roles == "auto" else None
    if table is not None:
        try:
            refs = table.refs(model)
        except KeyError as e:
            raise _error(f"{e.args[0]}; or pass roles='linear' to treat every nn.Linear alike") from None
    else:
        refs = [LayerRef(n, "linear", -1, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [r for r in refs if not _excluded(r.fqn, config.modules_to_not_convert)]


ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation to this


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc; a no-op elsewhere).

    Each layer's conversion frees a few transient buffers of about its fp32 size; glibc raises its mmap threshold
    after the first large free and serves later ones from the heap, where the holes between long-lived packed
    layers are never given back. The loader trims after each layer so the resident set stays at what is alive
    plus one layer's transients (279 MiB FLUX-like model of docs/diffusers.md, compact runtime: peak anonymous
    memory ~480 -> ~140 MiB for ~15 ms a layer)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@torch.no_grad()
def align_tensors_(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` whose data does not start on a 64-byte boundary into a
    fresh (aligned) tensor; returns the bytes copied.

    diffusers loads safetensors through mmap, so tensors it does not convert sit at whatever offset they have in
    the file, and CPU matmul kernels round differently for different alignments (last-ulp differences, measured
    on this machine). The loader calls this after loading, fresh or pre-quantized, so a saved-and-reloaded model
    computes bit-identically to the one that was saved; call it on a plain fp load to compare it bit for bit.
    """
    copied, done = 0, {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0:
                    continue
                if id(t) not in done:  # a tensor shared by two modules stays shared
                    new = t.detach().clone()
                    done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(
                        t, nn.Parameter) else new
                    copied += t.numel() * t.element_size()
                table[name] = done[id(t)]
    return copied
