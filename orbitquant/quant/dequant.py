"""Back to plain ``nn.Linear``: the weights a quantized layer actually computes with, activations unquantized.

``QuantLinear`` computes ``y = W_q T(x) (+ side branch) + b`` where ``T`` is its input transform (rotation,
smoothing scales, shifts; linear or affine) and ``W_q`` the dequantized weight store. With the activation quantizer
off the whole map is affine in ``x``, so the equivalent dense layer is read off the layer itself: ``b' = f(0)`` and
``W'^T = f(I) - f(0)``. One rule for every method (OrbitQuant's rotated codes, SmoothQuant's scales, SVDQuant's
low-rank branch and shifted inputs) instead of a per-store inverse; the result's error against the fp layer is the
weight-quantization error alone.
"""

from __future__ import annotations

import torch
from torch import nn

from orbitquant.quant.nn import NoActQuant, QuantLinear


@torch.no_grad()
def dequantize_layer(layer: QuantLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """The dense ``nn.Linear`` equivalent to ``layer`` with its activations left unquantized, in the layer's
    compute dtype (or ``dtype``)."""
    act, fusable = layer.act, layer._fusable
    device = next((b.device for b in layer.buffers()), torch.device("cpu"))
    compute = layer.compute_dtype
    try:
        layer.act, layer._fusable = NoActQuant(), False
        eye = torch.eye(layer.in_features, dtype=compute, device=device)
        b = layer(torch.zeros(1, layer.in_features, dtype=compute, device=device))[0]
        w = (layer(eye) - b).T.contiguous()
    finally:
        layer.act, layer._fusable = act, fusable
    out_dtype = dtype or compute
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None or bool(b.abs().max() > 0),
                      device=device, dtype=out_dtype)
    dense.weight.copy_(w)
    if dense.bias is not None:
        dense.bias.copy_(b)
    return dense


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantLinear`` of ``model`` by its dense equivalent (in place); returns ``model``."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantize_layer(m, dtype))
    return model
