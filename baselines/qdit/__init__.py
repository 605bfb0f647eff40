"""``qdit``: Q-DiT (Chen et al., CVPR 2025) as specified in BASELINES_SPEC section 8.1.

* Targets: every linear the layer policy gives the method (in DiT blocks: q/k/v, out-proj, FFN up and
  down), weights and input activations.
* Activations: dynamic asymmetric min/max per token x contiguous group of ``g_l`` input channels,
  recomputed at every forward (every step, both CFG halves); no clipping. The official quantizer clamps the
  zero point to the code range, which clips a group of one sign (an all-positive group keeps only
  ``[0, max - min]``); that is ``a_zero_clamp=true``, off by default (measured in UPSTREAM.md).
* Weights: GPTQ with the same per-layer group size ``g_l`` (asymmetric, a group's scales computed at its
  first column from the weights as of the current GPTQ block's start, as the official code; damp 0.01,
  block 128, no act-order). Blocks are processed in order: the Hessians of block i come from a replay of
  the recorded calibration inputs through the model whose blocks 0..i-1 are already quantized, with every
  activation quantizer on, block i's own included (its layers' Hessians are of their quantized inputs; its
  weights are still fp), as in the official code. ``weights=rtn`` is the calibration-free per-group RTN
  variant.
* Group sizes: one fixed ``group_size`` (128, the cheap default the paper's ablation supports), or a
  per-layer map from the evolutionary search (``scripts/qdit_search.py`` writes it; ``groups=<file>``).
  The search is in ``search.py`` (one gene per input tensor: split q/k/v share one, as the fused qkv).
  A group larger than a layer's input dim means per token / per row.

Calibration (GPTQ only): ``n_calib`` conditional denoiser inputs from the model's own sampler, each
trajectory contributing its input at one random step (``orbitquant.quant.calib.InputRecorder``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from orbitquant.quant.act import GroupActQuant, NoActQuant
from orbitquant.quant.calib import InputRecorder
from orbitquant.quant.config import QuantConfig, check_symmetric_bits
from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import DenseWeight, GroupUniformWeight

from .gptq import gptq_quantize, rtn_groups

log = logging.getLogger(__name__)

#: Q-DiT's per-layer search space (official code, ``scripts/evolution.py``)
GROUP_SPACE = (32, 64, 128, 192, 288)


@dataclass(frozen=True)
class QDiTConfig(QuantConfig):
    method: ClassVar[str] = "qdit"
    group_size: int = 128          # tied weight / activation input-channel group; 0 = per row / per token
    groups: str | dict | None = None  # {layer fqn: group}, or a JSON file of it from scripts/qdit_search.py
    weights: str = "gptq"          # gptq | rtn
    w_symmetric: bool = False
    a_symmetric: bool = False
    n_calib: int = 256             # conditional denoiser inputs recorded for the GPTQ Hessians
    percdamp: float = 0.01
    blocksize: int = 128
    replay_batch: int = 32         # rows per replayed denoiser forward
    seed: int = 0                  # calibration step draw
    hessian_act_quant: bool = True  # Hessians from the block's own quantized activations (official); False: fp inputs
    a_zero_clamp: bool = False     # True: the official quantizer's clamped zero point (clips one-sign groups)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_symmetric_bits(self)
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per row / per token), got {self.group_size}")
        if self.weights not in ("gptq", "rtn"):
            raise ValueError(f"weights must be 'gptq' or 'rtn', got {self.weights!r}")
        if isinstance(self.groups, str) and not Path(self.groups).is_file():
            raise ValueError(f"groups file {self.groups!r} not found; write one with scripts/qdit_search.py "
                             "or set groups=null to use group_size")
        if isinstance(self.groups, dict) and not all(isinstance(g, int) and g >= 0 for g in self.groups.values()):
            raise ValueError("groups must map layer names to non-negative integer group sizes")
        if self.n_calib < 1 or self.replay_batch < 1 or self.blocksize < 1 or not 0 <= self.percdamp < 1:
            raise ValueError("n_calib, replay_batch and blocksize must be >= 1 and percdamp in [0, 1)")


def load_groups(path: str) -> dict[str, int]:
    """A per-layer group map written by the search (``{"groups": {fqn: g}, ...}`` or a plain ``{fqn: g}``)."""
    data = json.loads(Path(path).read_text())
    groups = data.get("groups", data)
    if not all(isinstance(g, int) and g >= 0 for g in groups.values()):
        raise ValueError(f"{path}: group sizes must be non-negative integers")
    return groups


class _BlockDone(Exception):
    """Raised by a Hessian hook once every layer of the block has been seen: the rest of the forward is moot."""


@register_method
class QDiTQuantizer(Quantizer):
    config_cls = QDiTConfig

    def __init__(self, config: QDiTConfig) -> None:
        super().__init__(config)
        self._groups = load_groups(config.groups) if isinstance(config.groups, str) else dict(config.groups or {})
        self._hessians: dict[str, torch.Tensor] = {}
        self._stores: dict[str, GroupUniformWeight] = {}  # GPTQ results, for the calibration artifact
        self._cached: dict[str, dict[str, torch.Tensor]] = {}
        self.recorder: InputRecorder | None = None

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.weights == "gptq" and self.config.w_bits != 16

    def group_of(self, ref: LayerRef) -> int:
        """The effective group of a layer: its searched or fixed size, capped at the input dim."""
        g = self._groups.get(ref.fqn, self.config.group_size)
        d = ref.module.in_features
        return d if g <= 0 or g >= d else g

    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        unknown = set(self._groups) - {r.fqn for r in layers}
        if unknown:
            raise ValueError(f"groups file names {len(unknown)} layers this model's policy does not give qdit, "
                             f"e.g. {sorted(unknown)[:3]}; was it searched on another model?")
        self.layers, self.model = layers, model
        if self.needs_calibration:
            if model is None:
                raise ValueError("qdit with GPTQ weights needs the model (quantize_ passes it)")
            self.recorder = InputRecorder(n=self.config.n_calib, seed=self.config.seed).attach(model)

    def finish_calibration(self) -> dict:
        rec = self.recorder
        rec.detach()
        if rec.rows == 0:
            raise RuntimeError("calibration recorded no denoiser inputs; does the calib protocol run the sampler?")
        if rec.rows < self.config.n_calib:
            log.warning("qdit recorded %d of n_calib=%d calibration inputs (one per trajectory): use a calib "
                        "protocol with >= %d trajectories for Q-DiT's setting", rec.rows, self.config.n_calib,
                        self.config.n_calib)
        return {"inputs_recorded": rec.rows, "n_calib": self.config.n_calib}

    # ---------------------------------------------------------------------------------------- Hessians
    def _collect_block(self, block: int) -> None:
        """Replay the recorded inputs through the current (partly quantized) model and accumulate ``2 X^T X / n``
        for every not-yet-quantized target of ``block``.

        As in the official ``quantize_model_gptq`` (activation quantizers are inserted before GPTQ, and its
        Hessian hooks sit on the linears *behind* them): every target of ``block`` sees its input through its
        own activation quantizer while its weights are still fp, so the Hessian is that of the quantized
        input, and later layers of the block see the quantized-activation outputs of earlier ones. The
        whole block is recorded in one replay, before any of its weights is quantized."""
        c: QDiTConfig = self.config
        refs = [r for r in self.layers if r.block == block and r.fqn not in self._hessians]
        sums = {r.fqn: torch.zeros(r.module.in_features, r.module.in_features, dtype=torch.float64,
                                   device=r.module.weight.device) for r in refs}
        counts = dict.fromkeys(sums, 0)
        seen: set[str] = set()

        def make_hook(ref):
            act = (GroupActQuant(c.a_bits, self.group_of(ref), c.a_symmetric, c.a_zero_clamp)
                   if c.a_bits != 16 and c.hessian_act_quant else None)

            def hook(_mod, args):
                x = args[0].detach()
                if act is not None:
                    x = act(x).to(args[0].dtype)
                xf = x.reshape(-1, x.shape[-1]).double()
                sums[ref.fqn] += xf.T @ xf
                counts[ref.fqn] += len(xf)
                seen.add(ref.fqn)
                if len(seen) == len(refs):
                    raise _BlockDone
                return None if act is None else (x, *args[1:])
            return hook

        hooks = [r.module.register_forward_pre_hook(make_hook(r)) for r in refs]
        try:
            for args, kwargs in self.recorder.batches(self.config.replay_batch):
                seen.clear()
                try:
                    self.model(*args, **kwargs)
                except _BlockDone:
                    pass
        finally:
            for h in hooks:
                h.remove()
        for fqn, s in sums.items():
            if counts[fqn] == 0:
                raise RuntimeError(f"calibration replay never reached {fqn}")
            self._hessians[fqn] = 2.0 * s / counts[fqn]

    # ------------------------------------------------------------------------------------------ layers
    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        c: QDiTConfig = self.config
        m = ref.module
        g = self.group_of(ref)
        if c.w_bits == 16:
            store = DenseWeight(m.weight)
        elif c.weights == "rtn":
            store = GroupUniformWeight(rtn_groups(m.weight, c.w_bits, g, c.w_symmetric))
        elif ref.fqn in self._cached:
            store = GroupUniformWeight.from_buffers(self._cached.pop(ref.fqn), c.w_bits, g, c.w_symmetric,
                                                    tuple(m.weight.shape)).to(m.weight.device)
        else:
            if ref.fqn not in self._hessians:
                self._collect_block(ref.block)
            h = self._hessians.pop(ref.fqn)
            store = GroupUniformWeight(gptq_quantize(m.weight, h, c.w_bits, g, c.w_symmetric, c.blocksize, c.percdamp))
            self._stores[ref.fqn] = store
        act = NoActQuant() if c.a_bits == 16 else GroupActQuant(c.a_bits, g, c.a_symmetric, c.a_zero_clamp)
        return QuantLinear(store, m.bias, act, compute_dtype=m.weight.dtype, name=ref.fqn,
                           treatment=f"qdit w{c.w_bits}a{c.a_bits} g{g}")

    def calibration_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self._stores:
            return None
        tensors = {f"{fqn}.{k}": v for fqn, st in self._stores.items() for k, v in st.state_dict().items()}
        return tensors, {"layers": len(self._stores)}

    def load_calibration_state(self, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        self.recorder.detach()
        for ref in self.layers:
            bufs = {k: tensors.get(f"{ref.fqn}.{k}") for k in ("codes", "scales", "zeros")}
            if any(v is None for v in bufs.values()):
                raise ValueError(f"calibration artifact lacks {ref.fqn}; delete it to recalibrate")
            self._cached[ref.fqn] = bufs
        return info
