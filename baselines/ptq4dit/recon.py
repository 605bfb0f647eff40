"""BRECQ / Q-Diffusion reconstruction as PTQ4DiT runs it (``quant/block_recon.py`` of the official code).

Per unit (a DiT block, or one linear): minimise ``lp_loss(f_q(x~), f_fp(x)) + round_loss`` where ``x~`` is
the unit's input in the model whose earlier units are already quantized and ``f_fp(x)`` the unit's output
in the fp model (``asym=True``). Weights: AdaRound soft rounding (rectified sigmoid, zeta 1.1, gamma -0.1),
regulariser ``weight * sum(1 - |2h - 1|^b)`` off during the first ``warmup`` of the iterations, ``b``
annealed linearly 20 -> 2 after it, Adam (default lr 1e-3) on the rounding logits. Activation step sizes:
Adam with lr 4e-5 and a cosine schedule, straight-through rounding. Both optimisers step together.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


class RoundingLinear(nn.Module):
    """Training-time stand-in for one target linear: ``x * inv`` -> learnable-step activation fake-quant ->
    matmul with the AdaRound weight. ``mode``: ``soft`` (training), ``hard`` (learned rounding) or
    ``nearest`` (round-to-nearest, i.e. no reconstruction)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv: torch.Tensor | None,
                 w_bits: int, w_delta: torch.Tensor | None, w_zero: torch.Tensor | None,
                 a_bits: int, a_delta: float | None, a_zero: float | None) -> None:
        super().__init__()
        self.w_bits, self.a_bits, self.mode = w_bits, a_bits, "soft"
        w = weight.detach().float()
        self.register_buffer("w", w)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("inv", None if inv is None else inv.float())
        if w_bits != 16:
            self.register_buffer("w_delta", w_delta.reshape(-1, 1).float())
            self.register_buffer("w_zero", w_zero.reshape(-1, 1).float())
            self.register_buffer("w_floor", torch.floor(w / self.w_delta))
            rest = w / self.w_delta - self.w_floor  # in [0, 1): the soft value at init is exactly W
            self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        if a_bits != 16:
            self.a_delta = nn.Parameter(torch.tensor(float(a_delta)))
            self.register_buffer("a_zero", torch.tensor(float(a_zero)))

    def soft_targets(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self, mode: str | None = None) -> torch.Tensor:
        """Integer codes in [0, 2^b) of the learned (``hard``) or nearest rounding."""
        mode = mode or self.mode
        if mode == "nearest":
            q = torch.round(self.w / self.w_delta) + self.w_zero
        else:
            q = self.w_floor + (self.alpha >= 0).float() + self.w_zero
        return torch.clamp(q, 0, 2**self.w_bits - 1)

    def weight(self) -> torch.Tensor:
        if self.w_bits == 16:
            return self.w
        if self.mode == "soft":
            q = torch.clamp(self.w_floor + self.soft_targets() + self.w_zero, 0, 2**self.w_bits - 1)
        else:
            q = self.codes()
        return (q - self.w_zero) * self.w_delta

    def act_delta(self) -> torch.Tensor:
        return self.a_delta.detach().abs().clamp_min(1e-8) if self.mode != "soft" else self.a_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float() if self.inv is None else x.float() * self.inv
        if self.a_bits != 16:
            d = self.act_delta()
            t = (torch.clamp(round_ste(t / d) + self.a_zero, 0, 2**self.a_bits - 1) - self.a_zero) * d
        return F.linear(t, self.weight(), self.bias).to(x.dtype)

    def round_loss(self, b: float) -> torch.Tensor:
        if self.w_bits == 16:
            return torch.zeros(())
        return (1 - ((self.soft_targets() - 0.5).abs() * 2).pow(b)).sum()


def temperature(count: int, iters: int, warmup: float, b_start: float, b_end: float) -> float:
    """``LinearTempDecay``: ``b_start`` until ``warmup * iters``, then linear to ``b_end`` at ``iters``."""
    start = warmup * iters
    if count < start:
        return b_start
    rel = (count - start) / max(iters - start, 1e-12)
    return b_end + (b_start - b_end) * max(0.0, 1 - rel)


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """BRECQ's ``lp_loss(reduction='none')``: ``|pred - tgt|^p`` summed over dim 1, averaged over the rest."""
    return (pred.float() - tgt.float()).abs().pow(p).sum(1).mean()


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor of a module output (a tensor, a tuple/list of them, or an object with ``.sample``)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors_of(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in tensors_of(o)]
    sample = getattr(out, "sample", None)
    return [sample] if isinstance(sample, torch.Tensor) else []


def clone_tree(v: Any, device: torch.device | str | None = None) -> Any:
    """Detached normal (non-inference) copies of every tensor in ``v`` (tuples, lists, dicts recursed)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().clone()
        return t if device is None else t.to(device)
    if isinstance(v, tuple):
        return tuple(clone_tree(x, device) for x in v)
    if isinstance(v, list):
        return [clone_tree(x, device) for x in v]
    if isinstance(v, dict):
        return {k: clone_tree(x, device) for k, x in v.items()}
    return v


def unit_error(run, batches: list, targets: list) -> float:
    """Relative output error ``||f_q(x~) - f_fp(x)|| / ||f_fp(x)||`` of a unit over all batches."""
    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), tgt in zip(batches, targets):
            for o, t in zip(tensors_of(run(args, kwargs)), tgt):
                t = t.to(o.device)
                num += (o.double() - t.double()).pow(2).sum().item()
                den += t.double().pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def reconstruct(run, mods: list[RoundingLinear], batches: list, targets: list, *, iters: int, weight: float,
                b_range: tuple[float, float], warmup: float, lr: float, w_lr: float, seed: int) -> dict:
    """Optimise the rounding logits and activation steps of ``mods`` so that ``run(args, kwargs)`` (the unit
    with ``mods`` swapped in) matches ``targets``; returns loss facts. Leaves ``mods`` in ``hard`` mode."""
    w_params = [m.alpha for m in mods if m.w_bits != 16]
    a_params = [m.a_delta for m in mods if m.a_bits != 16]
    opt_w = torch.optim.Adam(w_params, lr=w_lr) if w_params else None
    opt_a = torch.optim.Adam(a_params, lr=lr) if a_params else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0.0) if opt_a else None
    gen = torch.Generator().manual_seed(seed)
    for m in mods:
        m.mode = "soft"
    first = last = None
    with torch.enable_grad():
        for count in range(1, iters + 1):
            k = int(torch.randint(len(batches), (1,), generator=gen))
            args, kwargs = batches[k]
            outs = tensors_of(run(args, kwargs))
            rec = sum(lp_loss(o, t.to(o.device)) for o, t in zip(outs, targets[k]))
            b = temperature(count, iters, warmup, *b_range)
            reg = (weight * sum(m.round_loss(b) for m in mods)) if count >= warmup * iters else 0.0
            loss = rec + reg
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.zero_grad()
            loss.backward()
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.step()
            if sched is not None:
                sched.step()
            last = float(rec.detach())
            first = last if first is None else first
    for m in mods:
        m.mode = "hard"
    return {"rec_loss_first": first, "rec_loss_last": last}
