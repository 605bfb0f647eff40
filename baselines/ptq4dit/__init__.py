"""``ptq4dit``: PTQ4DiT (Wu et al., NeurIPS 2024) as specified in BASELINES_SPEC sections 3 and 8.3.

* **CSB + SSC** on the layers of ``balance_roles`` (q/k/v, attention out-projections, FFN up/gate; never
  ``ff.down``, the paper's FC2): per calibration timestep ``t`` (``ssc=timestep``, the paper) or per
  calibration sample (``ssc=sample``, the official code), ``sX_t = max over tokens |X_t|`` per input
  channel, ``sW = max over outputs |W|``, ``rho_t = Spearman(sX_t, sW)``, ``eta = softmax(-rho)``,
  ``sX = sum_t eta_t sX_t``, ``B = sqrt(sX / sW)``; ``W <- W diag(B)`` offline and ``x <- x / B`` online
  (as upstream: its re-parameterisation is unreleased). Linears that read the same input (q/k/v, a SwiGLU
  gate/up pair) share one ``B`` with ``sW`` over all of them, as on the paper's fused qkv. ``ssc=max`` is
  CSB without SSC (one absmax over all calibration), ``csb=false`` the unbalanced baseline.
* **Quantizers**: weights asymmetric per output channel, activations static asymmetric per tensor, each
  range the least-L2 one among the quantile clips {0.999, 0.9999, 0.99999} (both tails; as the code, which
  never scores min/max; ``minmax_candidate=true`` adds the plain min/max as a candidate, an ablation);
  weights on the balanced weight, activations on a seeded reservoir of balanced calibration tokens.
* **Reconstruction** (``recon_iters > 0``; 0 = the "CSB+SSC only" variant): BRECQ/Q-Diffusion per DiT block
  (``recon_unit=block``) or per linear, AdaRound weights + learned activation steps (``recon.py``).

Statistics are computed on fp activations during the shared calibration pipeline (the model's own
sampler); ``timesteps`` restricts them (and the reconstruction data) to that many evenly spaced steps.

This module is the registered quantizer (balancing, range fits, the reconstruction driver, artifacts) and
re-exports the names other code imports from ``baselines.ptq4dit``; ``config.py`` holds the config,
``calib.py`` the step-restricted recorders, ``quantizers.py`` the CSB/SSC maths and the quantizers,
``recon.py`` the AdaRound / BRECQ optimisation.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from orbitquant.quant.act import ChannelScale, NoActQuant
from orbitquant.quant.methods.base import Quantizer
from orbitquant.quant.nn import QuantLinear
from orbitquant.quant.registry import register_method
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import DenseWeight

from .calib import StepCollector, StepRecorder, selected_steps
from .config import BALANCED_ROLES, SSC_MODES, PTQ4DiTConfig
from .quantizers import (
    AffineWeight,
    StaticAffineActQuant,
    affine_params,
    balance_scale,
    percentile_range,
    ssc_weights,
)
from .recon import RoundingLinear, clone_tree, reconstruct, tensors_of, unit_error

#: what other code imports from ``baselines.ptq4dit`` (the config and calibration live in submodules)
__all__ = ["BALANCED_ROLES", "SSC_MODES", "PTQ4DiTConfig", "PTQ4DiTQuantizer", "StepCollector", "StepRecorder",
           "selected_steps"]

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a pre-hook once the unit's input is captured: the rest of the forward is moot."""


def _block_module_fqn(model: nn.Module, fqns: list[str]) -> str | None:
    """The DiT block holding these layers: the shortest prefix ``<stack>.<i>`` whose parent is a ModuleList,
    the same for all of them (None if there is none)."""
    found = set()
    for fqn in fqns:
        parts = fqn.split(".")
        hit = None
        for i in range(1, len(parts)):
            parent = model.get_submodule(".".join(parts[: i - 1])) if i > 1 else model
            if parts[i - 1].isdigit() and isinstance(parent, nn.ModuleList):
                hit = ".".join(parts[:i])
                break
        found.add(hit)
    return found.pop() if len(found) == 1 and None not in found else None


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@register_method
class PTQ4DiTQuantizer(Quantizer):
    config_cls = PTQ4DiTConfig
    needs_calibration = True

    def prepare(self, layers: list[LayerRef], model: nn.Module | None = None) -> None:
        c: PTQ4DiTConfig = self.config
        self.layers, self.model = layers, model
        self.collector = StepCollector(reservoir=c.reservoir, seed=c.seed, timesteps=c.timesteps,
                                       per_sample=c.ssc_samples if c.csb and c.ssc == "sample" else 0).attach(layers)
        self.recorder = None
        if self.recon:
            if model is None:
                raise ValueError("ptq4dit with recon_iters > 0 needs the model (quantize_ passes it)")
            self.recorder = StepRecorder(n=1 << 62, seed=c.seed, per_half=c.recon_rows,
                                         timesteps=c.timesteps).attach(model)
        self.scales: dict[str, torch.Tensor] = {}   # fqn -> B (balanced layers only)
        self.states: dict[str, dict[str, torch.Tensor]] = {}  # fqn -> fitted quantizer state
        self.recon_facts: dict = {}

    @property
    def recon(self) -> bool:
        return self.config.recon_iters > 0 and (self.config.w_bits != 16 or self.config.a_bits != 16)

    # ------------------------------------------------------------------------------------- calibration
    def finish_calibration(self) -> dict:
        c: PTQ4DiTConfig = self.config
        self.collector.__exit__()
        if self.recorder is not None:
            self.recorder.detach()
        stats = self.collector.stats
        missing = [r.fqn for r in self.layers if r.fqn not in stats]
        if missing:
            raise RuntimeError(f"calibration never reached {len(missing)} layers, e.g. {missing[:3]}")
        facts = {"ssc": c.ssc if c.csb else "off", "tokens_per_layer": min(st.tokens for st in stats.values()),
                 "steps": sorted({k[0] for st in stats.values() for k in st.absmax_by_key}),
                 **(self._fit_balance() if c.csb else {"balanced_layers": 0})}
        if self.recon:
            self._prepare_recon()
            facts["recon"] = self.recon_facts  # filled in while the units are reconstructed
        return facts

    def _fit_balance(self) -> dict:
        """CSB + SSC: one ``B`` per group of balanced linears that read the same input."""
        c: PTQ4DiTConfig = self.config
        stats = self.collector.stats
        groups: list[list[LayerRef]] = []
        for ref in (r for r in self.layers if r.role in c.balance_roles):
            st = stats[ref.fqn]
            for g in groups:
                o = stats[g[0].fqn]
                if (g[0].block == ref.block and o.absmax.shape == st.absmax.shape and o.absmax_by_key.keys()
                        == st.absmax_by_key.keys() and all(torch.equal(o.absmax_by_key[k], st.absmax_by_key[k])
                                                          for k in st.absmax_by_key)):
                    g.append(ref)
                    break
            else:
                groups.append([ref])
        rhos, eta_max = [], []
        for g in groups:
            sw = torch.stack([r.module.weight.detach().float().abs().amax(dim=0).cpu() for r in g]).amax(dim=0)
            sx_t = self._salience_rows(g[0].fqn)
            rho, eta = ssc_weights(sx_t, sw)
            sx = (eta[:, None] * sx_t.double()).sum(dim=0).float()
            b = balance_scale(sx, sw)
            for r in g:
                self.scales[r.fqn] = b.to(r.module.weight.device)
            rhos.append(rho.mean().item())
            eta_max.append(eta.max().item())
        return {"balanced_layers": sum(len(g) for g in groups), "balance_groups": len(groups),
                "mean_rho": sum(rhos) / len(rhos) if rhos else None,
                "max_eta": max(eta_max) if eta_max else None,
                "ssc_rows": len(self._salience_rows(groups[0][0].fqn)) if groups else 0}

    def _salience_rows(self, fqn: str) -> torch.Tensor:
        """The rows SSC weighs: ``sX_t`` per step (max over CFG halves), per sample, or one overall max."""
        st = self.collector.stats[fqn]
        if self.config.ssc == "max":
            return st.absmax[None].float()
        if self.config.ssc == "sample":
            return torch.stack(self.collector.sample_absmax[fqn]).float()
        steps = sorted({k[0] for k in st.absmax_by_key})
        return torch.stack([torch.stack([a for k, a in st.absmax_by_key.items() if k[0] == s]).amax(dim=0)
                            for s in steps]).float()

    # ------------------------------------------------------------------------------------------ layers
    def _init_state(self, ref: LayerRef) -> dict[str, torch.Tensor]:
        """Balanced weight, and percentile-MSE ranges of weights (per row) and activations (per tensor)."""
        c: PTQ4DiTConfig = self.config
        m = ref.module
        w = m.weight.detach().float()
        b = self.scales.get(ref.fqn)
        st: dict[str, torch.Tensor] = {}
        if b is not None:
            st["inv_scale"] = (1.0 / b).float()
            w = w * b
        st["w"] = w
        if c.w_bits != 16:
            lo, hi, _ = percentile_range(w, c.w_bits, c.percentiles, per_row=True,
                                         minmax=c.minmax_candidate)
            st["w_scale"], st["w_zero"] = affine_params(lo, hi, c.w_bits)
        if c.a_bits != 16:
            x = self.collector.stats[ref.fqn].reservoir.to(w.device).float()
            if b is not None:
                x = x * st["inv_scale"]
            lo, hi, _ = percentile_range(x, c.a_bits, c.percentiles, minmax=c.minmax_candidate)
            delta, zero = affine_params(lo, hi, c.a_bits)
            st["act"] = torch.cat([delta, zero]).float()
        return st

    def _nearest(self, st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Round-to-nearest codes on the initial grid (the no-reconstruction variant)."""
        c: PTQ4DiTConfig = self.config
        out = {k: v for k, v in st.items() if k != "w"}
        if c.w_bits != 16:
            s, z = st["w_scale"][:, None], st["w_zero"][:, None]
            out["codes"] = torch.clamp(torch.round(st["w"] / s) + z, 0, 2**c.w_bits - 1)
        else:
            out["weight"] = st["w"]
        return out

    def _build(self, ref: LayerRef, st: dict[str, torch.Tensor]) -> QuantLinear:
        c: PTQ4DiTConfig = self.config
        m = ref.module
        if c.w_bits == 16:
            store = DenseWeight(st["weight"].to(m.weight.dtype))
        elif "packed" in st:
            store = AffineWeight.from_packed(st["packed"], st["w_scale"], st["w_zero"], c.w_bits, tuple(m.weight.shape))
        else:
            store = AffineWeight(st["codes"], st["w_scale"], st["w_zero"], c.w_bits)
        act = (NoActQuant() if c.a_bits == 16
               else StaticAffineActQuant(c.a_bits, st["act"][0].item(), st["act"][1].item()))
        rot = ChannelScale(st["inv_scale"].to(m.weight.device)) if "inv_scale" in st else None
        return QuantLinear(store.to(m.weight.device), m.bias, act, rotation=rot, compute_dtype=m.weight.dtype,
                           name=ref.fqn, treatment=f"ptq4dit w{c.w_bits}a{c.a_bits}")

    def quantize_layer(self, ref: LayerRef) -> QuantLinear:
        if ref.fqn not in self.states:
            if self.recon:
                self._reconstruct_unit(self._unit_of[ref.fqn])
            else:
                self.states[ref.fqn] = self._nearest(self._init_state(ref))
        return self._build(ref, self.states[ref.fqn])

    # ---------------------------------------------------------------------------------- reconstruction
    def _prepare_recon(self) -> None:
        """Units (blocks or layers), the recorded replay batches, and every unit's fp output on them."""
        c: PTQ4DiTConfig = self.config
        if self.recorder.rows == 0:
            raise RuntimeError("calibration recorded no denoiser inputs; does the calib protocol run the sampler?")
        self.units: dict[str, list[LayerRef]] = {}
        by_block: dict[int, list[LayerRef]] = {}
        for ref in self.layers:
            if c.recon_unit == "block" and ref.block >= 0:
                by_block.setdefault(ref.block, []).append(ref)
        block_fqn = {blk: _block_module_fqn(self.model, [r.fqn for r in refs]) for blk, refs in by_block.items()}
        for ref in self.layers:
            unit = block_fqn.get(ref.block) if c.recon_unit == "block" and ref.block >= 0 else None
            self.units.setdefault(unit or ref.fqn, []).append(ref)
        self._unit_of = {r.fqn: u for u, refs in self.units.items() for r in refs}
        self.batches = [clone_tree(b) for b in self.recorder.batches(c.recon_batch)]
        rows = self.recorder.rows
        self.recorder.records.clear()
        self.targets: dict[str, list] = {u: [] for u in self.units}
        hooks = []
        for u in self.units:
            def hook(_mod, _args, out, u=u):
                if len(self.targets[u]) == self._batch_index:  # the first call of the unit in this batch
                    self.targets[u].append([t.detach().clone() for t in tensors_of(out)])
            hooks.append(self.model.get_submodule(u).register_forward_hook(hook))
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.batches):
                    self._batch_index = i
                    self.model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        short = [u for u, t in self.targets.items() if len(t) != len(self.batches)]
        if short:
            raise RuntimeError(f"the fp replay never reached units {short[:3]}")
        self.recon_facts.update(rows=rows, batches=len(self.batches), units=len(self.units),
                                unit=c.recon_unit, iters=c.recon_iters, seconds=0.0, per_unit={})

    def _capture_inputs(self, unit: str) -> list[tuple[tuple, dict]]:
        """The unit's inputs when the recorded batches run through the model as quantized so far."""
        captured = []

        def pre(_mod, args, kwargs):
            captured.append((clone_tree(args), clone_tree(kwargs)))
            raise _Stop

        h = self.model.get_submodule(unit).register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                for args, kwargs in self.batches:
                    try:
                        self.model(*args, **kwargs)
                    except _Stop:
                        pass
        finally:
            h.remove()
        return captured

    def _reconstruct_unit(self, unit: str) -> None:
        c: PTQ4DiTConfig = self.config
        t0 = time.perf_counter()
        refs = self.units[unit]
        inputs = self._capture_inputs(unit)
        inits = {r.fqn: self._init_state(r) for r in refs}
        mods = {}
        for r in refs:
            st = inits[r.fqn]
            act = st.get("act")
            mods[r.fqn] = RoundingLinear(st["w"], r.module.bias, st.get("inv_scale"), c.w_bits, st.get("w_scale"),
                                         st.get("w_zero"), c.a_bits, None if act is None else act[0].item(),
                                         None if act is None else act[1].item()).to(r.module.weight.device)
        unit_mod = self.model.get_submodule(unit)
        frozen = [p for p in unit_mod.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for r in refs:
            _set_submodule(self.model, r.fqn, mods[r.fqn])
        try:
            def run(args, kwargs):
                return self.model.get_submodule(unit)(*args, **kwargs)

            for m in mods.values():
                m.mode = "nearest"
            err_before = unit_error(run, inputs, self.targets[unit])
            facts = reconstruct(run, list(mods.values()), inputs, self.targets[unit], iters=c.recon_iters,
                                weight=c.recon_weight, b_range=c.recon_b_range, warmup=c.recon_warmup,
                                lr=c.recon_lr, w_lr=c.recon_w_lr, seed=c.seed + len(self.recon_facts["per_unit"]))
            err_after = unit_error(run, inputs, self.targets[unit])
        finally:
            for r in refs:
                _set_submodule(self.model, r.fqn, r.module)
            for p in frozen:
                p.requires_grad_(True)
        for r in refs:
            m, st = mods[r.fqn], inits[r.fqn]
            out = {k: v for k, v in st.items() if k not in ("w", "act")}
            if c.w_bits != 16:
                out["codes"] = m.codes("hard").detach()
            else:
                out["weight"] = st["w"]
            if c.a_bits != 16:
                out["act"] = torch.stack([m.act_delta().detach().reshape(()), m.a_zero.reshape(())]).float()
            self.states[r.fqn] = out
        del self.targets[unit]
        seconds = time.perf_counter() - t0
        self.recon_facts["seconds"] = round(self.recon_facts["seconds"] + seconds, 3)
        self.recon_facts["per_unit"][unit] = {"rel_err_nearest": round(err_before, 6),
                                              "rel_err_recon": round(err_after, 6), **facts}
        log.info("ptq4dit recon %s: rel err %.4f -> %.4f (%.1f s)", unit, err_before, err_after, seconds)

    # -------------------------------------------------------------------------------------- artifacts
    def calibration_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        tensors = {}
        for fqn, st in self.states.items():
            for k, v in st.items():
                if k == "codes":
                    k, v = "packed", AffineWeight(v, st["w_scale"], st["w_zero"], self.config.w_bits).codes
                tensors[f"{k}.{fqn}"] = v
        return tensors, {"layers": len(self.states)}

    def load_calibration_state(self, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        self.collector.__exit__()
        if self.recorder is not None:
            self.recorder.detach()
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            k, _, fqn = key.partition(".")
            states.setdefault(fqn, {})[k] = v
        missing = [r.fqn for r in self.layers if r.fqn not in states]
        if missing:
            raise ValueError(f"calibration artifact lacks {len(missing)} layers, e.g. {missing[:3]}; delete it")
        self.states = states
        return info
