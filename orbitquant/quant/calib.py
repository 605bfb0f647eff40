"""Shared calibration pipeline: run the model's real sampler on calibration conditions and record
bounded statistics of what the denoiser and its linears see.

* Adapters publish, for every denoiser forward, a :class:`DenoiserCall` (sampler step index and how
  the batch splits into CFG halves) through :func:`denoiser_call`; collectors read it with
  :func:`current_call`, so statistics are keyed by (timestep index, CFG half).
* :class:`ActivationCollector` keeps per linear a per-channel absmax per (step, half), a token count
  and a seeded reservoir of at most ``reservoir`` tokens: memory never grows with the sample count.
* :class:`InputRecorder` keeps up to ``n`` conditional denoiser inputs ``(x_t, t, cond)`` (one step per
  trajectory, Q-DiT's protocol) for methods that replay the denoiser block by block (GPTQ).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orbitquant.quant.types import LayerRef

HALVES = ("cond", "uncond")


@dataclass(frozen=True)
class DenoiserCall:
    """What one denoiser forward is: sampler step ``step`` (of ``n_steps``), and the CFG half of each equal
    chunk of its batch along dim 0 (``("cond", "uncond")`` for a batch ``[cond; uncond]``, ``("cond",)``
    for a call without guidance or a separate conditional call)."""

    step: int
    halves: tuple[str, ...] = ("cond",)
    n_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.halves or any(h not in HALVES for h in self.halves):
            raise ValueError(f"halves must be a non-empty tuple of {HALVES}, got {self.halves!r}")


_CALL: ContextVar[DenoiserCall | None] = ContextVar("orbitquant_denoiser_call", default=None)


def current_call() -> DenoiserCall | None:
    """The denoiser call being run, as published by the adapter's sampler (None outside a sampler)."""
    return _CALL.get()


#: run after every published denoiser forward, with its DenoiserCall (``orbitquant.quant.nn`` registers the deferred
#: NaN/Inf check of CUDA layers here)
AFTER_CALL: list = []


def _after_call(call: DenoiserCall | None) -> None:
    if sys.exc_info()[0] is not None:  # the forward raised (always_call hooks run then): report that, not ours
        return
    for hook in AFTER_CALL:
        hook(call)


@contextmanager
def denoiser_call(step: int, halves: tuple[str, ...] = ("cond",), n_steps: int | None = None) -> Iterator[None]:
    """Publish the current denoiser call for the duration of the block (adapters wrap each forward)."""
    call = DenoiserCall(step, tuple(halves), n_steps)
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)
    _after_call(call)  # only when the block did not raise


CFG_LAYOUTS = ("cond_first", "uncond_first", "calls")


@contextmanager
def publish_calls(denoiser: nn.Module, layout: str, rows: int, n_steps: int | None = None) -> Iterator[None]:
    """Publish a :class:`DenoiserCall` around every forward of a diffusers denoiser during one pipeline call.

    The step index counts changes of the ``timestep`` argument (keyword, or the second positional one), so
    it is right whatever the number of forwards per step. ``layout`` is how the pipeline runs CFG:
    ``cond_first`` / ``uncond_first`` (one forward on the concatenated batch of ``2 * rows``; a batch of
    ``rows`` means no guidance) or ``calls`` (separate forwards, conditional first).
    """
    if layout not in CFG_LAYOUTS:
        raise ValueError(f"cfg layout must be one of {CFG_LAYOUTS}, got {layout!r}")
    state = {"t": None, "step": -1, "k": 0, "tokens": []}

    def pre(_mod, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) and t.numel() else t
        if t != state["t"] or state["step"] < 0:
            state.update(t=t, step=state["step"] + 1, k=0)
        else:
            state["k"] += 1
        if layout == "calls":
            halves = (HALVES[min(state["k"], 1)],)
        else:
            halves = HALVES if layout == "cond_first" else HALVES[::-1]
            batch = _batch_of(args, kwargs)
            if batch != 2 * rows:
                halves = ("cond",)
        state["tokens"].append(_CALL.set(DenoiserCall(state["step"], halves, n_steps)))

    def post(_mod, _args, _kwargs, _out):
        call = _CALL.get()
        _CALL.reset(state["tokens"].pop())
        _after_call(call)

    h1 = denoiser.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = denoiser.register_forward_hook(post, with_kwargs=True, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
        for tok in reversed(state["tokens"]):
            _CALL.reset(tok)


def split_halves(x: torch.Tensor, call: DenoiserCall | None) -> list[tuple[str, torch.Tensor]]:
    """``x`` (batch first) cut into its CFG halves; ``[("all", x)]`` when the layout is unknown or does not
    divide the batch (e.g. a model that packs the batch into one sequence)."""
    if call is None:
        return [("all", x)]
    k = len(call.halves)
    if k == 1:
        return [(call.halves[0], x)]
    if x.dim() < 2 or x.shape[0] % k:
        return [("all", x)]
    return list(zip(call.halves, x.chunk(k)))


@dataclass
class LayerStats:
    absmax: torch.Tensor  # (d,) max |x_j| over every calibration token
    tokens: int = 0
    reservoir: torch.Tensor | None = None  # (<= R, d) uniform sample of input tokens
    seen_for_reservoir: int = 0
    #: (step, half) -> (d,) absmax of that sampler step and CFG half; step -1 / half "all" when unknown
    absmax_by_key: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


@dataclass
class ActivationCollector:
    """Forward hooks on the target linears; ``with collector.attach(layers): run_sampler()``."""

    reservoir: int = 256
    seed: int = 0
    stats: dict[str, LayerStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)
        self._hooks: list = []

    def _observe(self, fqn: str, x: torch.Tensor) -> None:
        call = current_call()
        x = x.detach().float()
        per_key = {(call.step if call else -1, half): part.reshape(-1, x.shape[-1]).abs().amax(dim=0).cpu()
                   for half, part in split_halves(x, call)}
        x = x.reshape(-1, x.shape[-1])
        amax = torch.stack(list(per_key.values())).amax(dim=0)
        st = self.stats.get(fqn)
        if st is None:
            st = self.stats[fqn] = LayerStats(absmax=amax)
        else:
            st.absmax = torch.maximum(st.absmax, amax)
        for key, a in per_key.items():
            old = st.absmax_by_key.get(key)
            st.absmax_by_key[key] = a if old is None else torch.maximum(old, a)
        st.tokens += len(x)
        # reservoir sampling (Vitter's algorithm R), vectorised over the batch of tokens
        x, res, seen = x.cpu(), st.reservoir, st.seen_for_reservoir
        n_fill = min(self.reservoir - (0 if res is None else len(res)), len(x))
        if n_fill > 0:
            res = x[:n_fill].clone() if res is None else torch.cat([res, x[:n_fill]])
            seen, x = seen + n_fill, x[n_fill:]
        if len(x):
            slots = (torch.rand(len(x), generator=self._gen) * torch.arange(seen + 1, seen + len(x) + 1)).long()
            keep = slots < self.reservoir
            res[slots[keep]] = x[keep]
            seen += len(x)
        st.reservoir, st.seen_for_reservoir = res, seen

    def attach(self, layers: list[LayerRef]) -> ActivationCollector:
        for ref in layers:
            def hook(_mod, args, _out, fqn=ref.fqn):
                self._observe(fqn, args[0])
            self._hooks.append(ref.module.register_forward_hook(hook))
        return self

    def __enter__(self) -> ActivationCollector:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


# ------------------------------------------------------------------------------ denoiser input recording
def _batch_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a denoiser call: the leading dim of its first tensor (or list) argument."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            return len(v)
    return None


def _take(v: Any, batch: int, rows: torch.Tensor) -> tuple[Any, bool]:
    """Rows ``rows`` of a batch-first value (tensor with leading dim ``batch``, or list of ``batch`` tensors);
    other values are returned as is. The flag says whether ``v`` was batched."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return v.detach()[rows.to(v.device)].clone(), True
    if isinstance(v, list) and len(v) == batch and v and isinstance(v[0], torch.Tensor):
        return [v[i].detach().clone() for i in rows.tolist()], True
    return v, False


@dataclass
class Record:
    """Some rows of one denoiser call: positional and keyword arguments, and which of them are batched."""

    args: tuple
    kwargs: dict
    batched: frozenset  # indices (int) of batched positional args and names (str) of batched kwargs
    rows: int


@dataclass
class InputRecorder:
    """Keeps up to ``n`` conditional denoiser inputs, Q-DiT style: within each batch of trajectories every
    trajectory contributes its input at one random sampler step (distinct steps while the batch is no
    larger than the step count). Needs the adapter's :class:`DenoiserCall` (with ``n_steps``); without it
    the conditional rows of the first calls are kept until ``n`` rows are recorded."""

    n: int = 256
    seed: int = 0
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)
        self._assign: torch.Tensor | None = None
        self._handle = None

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.records)

    @staticmethod
    def _split(call: DenoiserCall | None, batch: int) -> tuple[int, int]:
        """(CFG halves in this call's batch, rows per half): one half when the batch does not split evenly."""
        k = len(call.halves) if call else 1
        k = 1 if batch % k else k
        return k, batch // k

    def _keep(self, args: tuple, kwargs: dict, batch: int, rows: torch.Tensor) -> None:
        """Record ``rows`` of this call's batched arguments (unbatched ones as they are)."""
        taken_args = [_take(a, batch, rows) for a in args]
        taken_kw = {key: _take(v, batch, rows) for key, v in kwargs.items()}
        batched = {i for i, (_, b) in enumerate(taken_args) if b} | {key for key, (_, b) in taken_kw.items() if b}
        self.records.append(Record(tuple(v for v, _ in taken_args), {key: v for key, (v, _) in taken_kw.items()},
                                   frozenset(batched), len(rows)))

    def _hook(self, _mod, args, kwargs) -> None:
        if self.rows >= self.n:
            return
        call, batch = current_call(), _batch_of(args, kwargs)
        if batch is None:
            return
        k, chunk = self._split(call, batch)
        cond = [i for i, h in enumerate(call.halves if call and k > 1 else ("cond",)) if h == "cond"]
        if call is not None and k == 1 and call.halves[0] != "cond":
            return  # a separate unconditional call
        base = cond[0] * chunk if cond else 0
        if call is not None and call.n_steps:
            if call.step == 0 or self._assign is None or len(self._assign) != chunk:
                steps = call.n_steps
                self._assign = (torch.randperm(steps, generator=self._gen)[:chunk] if chunk <= steps
                                else torch.randint(steps, (chunk,), generator=self._gen))
            rows = torch.nonzero(self._assign == call.step).flatten()
        else:
            rows = torch.arange(chunk)
        rows = rows[: self.n - self.rows] + base
        if len(rows) == 0:
            return
        self._keep(args, kwargs, batch, rows)

    def attach(self, denoiser: nn.Module) -> InputRecorder:
        self._handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def batches(self, max_rows: int = 32) -> Iterator[tuple[tuple, dict]]:
        """The recorded inputs as (args, kwargs) batches of at most ``max_rows`` rows, merging records whose
        unbatched arguments agree."""
        group: list[Record] = []
        for rec in self.records:
            if group and (sum(r.rows for r in group) + rec.rows > max_rows or not _compatible(group[0], rec)):
                yield _merge(group)
                group = []
            group.append(rec)
        if group:
            yield _merge(group)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _compatible(a: Record, b: Record) -> bool:
    if a.batched != b.batched or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    if any(i not in a.batched and not _same(x, y) for i, (x, y) in enumerate(zip(a.args, b.args))):
        return False
    return all(k in a.batched or _same(a.kwargs[k], b.kwargs[k]) for k in a.kwargs)


def _cat(values: list) -> Any:
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]


def _merge(group: list[Record]) -> tuple[tuple, dict]:
    first = group[0]
    args = tuple(_cat([r.args[i] for r in group]) if i in first.batched else a for i, a in enumerate(first.args))
    kwargs = {k: _cat([r.kwargs[k] for r in group]) if k in first.batched else v for k, v in first.kwargs.items()}
    return args, kwargs
