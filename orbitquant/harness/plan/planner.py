"""The plan of a sweep: every job resolved and priced, the run / fp reference / calibration dedup of ``run.py``,
totals, and the notes on what is and is not counted (``make_plan``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orbitquant.harness.plan.base import BENCH, CONF, DEFAULT_CEILING, DEFAULT_MFU, PlanError
from orbitquant.harness.plan.checklist import Check, checklist
from orbitquant.harness.plan.fmt import fmt_hours
from orbitquant.harness.plan.memory import MemoryOutline, memory_outline
from orbitquant.harness.plan.protocol import ProtocolCost, protocol_cost
from orbitquant.harness.plan.sweep import _Composer, expand_sweep, parse_overrides, squash
from orbitquant.harness.plan.timing import Ceiling, load_ceiling, load_timings


@dataclass
class Job:
    """One job of the sweep, resolved."""

    overrides: list[str]
    model: str
    method: str
    tag: str
    eval: str
    seed: int
    quant_seed: int
    subdir: str
    needs_calibration: bool
    duplicate_of: str | None = None  # another job's subdir: run.py skips this one (results exist)
    calibration: str | None = None  # "new" | "cached" | None (no calibration)
    eval_cost: str = ""  # key into Plan.protocols
    calib_cost: str | None = None


@dataclass
class Plan:
    """A priced sweep: its jobs, the protocols they sample (keyed), the fp references and calibrations it builds
    once, host-memory outlines, the ceiling used for projections, notes on what is and is not counted, and the
    checklist."""

    argv: list[str]
    experiment: str | None
    device: str
    dtype: str
    jobs: list[Job]
    protocols: dict[str, ProtocolCost]
    references: dict[str, str]  # reference key -> eval cost key
    calibrations: dict[str, str]  # calibration key -> calib cost key
    memory: dict[str, MemoryOutline]  # eval cost key -> outline
    ceiling: Ceiling | None
    mfu: float
    checklist: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[Job]:
        return [j for j in self.jobs if j.duplicate_of is None]

    def totals(self) -> dict[str, Any]:
        """Forwards, GPU seconds (None if any part has no estimate) and raw disk bytes of the whole sweep."""
        parts = ([self.protocols[k] for k in self.references.values()]
                 + [self.protocols[j.eval_cost] for j in self.runs]
                 + [self.protocols[k] for k in self.calibrations.values()])
        secs = [p.gpu_seconds for p in parts]
        disk = [self.protocols[k].disk_bytes for k in self.references.values()] + [
            self.protocols[j.eval_cost].disk_bytes for j in self.runs]
        return {"jobs": len(self.jobs), "runs": len(self.runs), "references": len(self.references),
                "calibrations": len(self.calibrations), "forwards": sum(p.forwards for p in parts),
                "gpu_seconds": sum_or_none(secs), "disk_bytes": sum_or_none(disk)}

    def quantized_upper(self) -> float | None:
        """GPU seconds if every quantized run's block linears take the measured orbit-fast / bf16 ratio (max)."""
        if self.ceiling is None or self.ceiling.quant_linear_ratio is None or self.totals()["gpu_seconds"] is None:
            return None
        k = self.ceiling.quant_linear_ratio[2]
        extra = 0.0
        for j in self.runs:
            p = self.protocols[j.eval_cost]
            if j.method != "fp" and p.flops is not None and p.timing is not None and p.timing.kind == "projection":
                extra += p.gpu_seconds * (p.flops.linear / p.flops.total) * (k - 1)
        return self.totals()["gpu_seconds"] + extra


def sum_or_none(values: list) -> Any:
    """The sum, or None when any part has no estimate (one unknown part makes the whole unknown)."""
    return None if any(v is None for v in values) else sum(values)


def _cost_key(kind: str, name: str, model_cfg: dict, protocol: dict, store: str, method: str) -> str:
    return json.dumps([kind, name, model_cfg, protocol, store, method], sort_keys=True, default=str)


def make_plan(argv: list[str], *, conf_dir: Path = CONF, bench_dir: Path = BENCH,
              ceiling_file: Path | None = DEFAULT_CEILING, mfu: float = DEFAULT_MFU, check: bool = True) -> Plan:
    """The plan of ``python run.py -m <argv>`` (``argv``: Hydra overrides, e.g. ``["experiment=digits"]``)."""
    from orbitquant.harness.cli import check_group_overrides

    if not 0 < mfu <= 1:
        raise PlanError(f"mfu={mfu} must be in (0, 1]: the fraction of the measured GEMM ceiling a forward sustains")
    argv = [a for a in argv if a.strip()]
    if err := check_group_overrides(argv, conf_dir):  # before any heavy import: a typo costs a second
        raise PlanError(err)
    exp = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == "experiment"]
    if exp and "," in exp[-1]:
        raise PlanError(f"config error: experiment={exp[-1]}: plan one experiment at a time")

    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from orbitquant.harness.factory import build_quant_config
    from orbitquant.quant.api import quantizer_for
    from orbitquant.quant.artifacts import cache_key

    ceiling = load_ceiling(ceiling_file)
    timings = load_timings(bench_dir)
    parsed = parse_overrides(argv)
    base_args = [a for a, o in zip(argv, parsed) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        comp = _Composer(Path(conf_dir))
        try:
            from hydra import compose

            base = compose(config_name="config", overrides=base_args, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"config error: {squash(e)}") from None
        sweeper_params = base.hydra.sweeper.get("params")
        params = OmegaConf.to_container(sweeper_params, resolve=True) if sweeper_params is not None else {}
        job_lists = expand_sweep({k: str(v) for k, v in params.items()}, argv)
        swept = {o.get_key_element() for o in parse_overrides([f"{k}={v}" for k, v in params.items()] + argv)
                 if o.is_sweep_override()}
        cfgs = [(job, *comp.compose(job, swept)) for job in job_lists]

    protocols: dict[str, ProtocolCost] = {}
    references: dict[str, str] = {}
    calibrations: dict[str, str] = {}
    memory: dict[str, MemoryOutline] = {}
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    metric_sets: dict[str, list] = {}
    from orbitquant.harness.factory import build_metrics

    def price(c: dict, kind: str, store: str, method: str) -> str:
        """Key of the job's ``kind`` protocol (``eval`` or ``calib``) on its model, priced the first time."""
        key = _cost_key(kind, c[kind]["name"], c["model"], c[kind]["protocol"], store, method)
        if key not in protocols:
            protocols[key] = protocol_cost(kind, c[kind]["name"], c[kind]["protocol"], c["model"], store, method,
                                           timings, ceiling, mfu)
        return key

    for job, c, subdir in cfgs:
        try:
            qcfg = build_quant_config(c["quant"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlanError(f"config error ({' '.join(job)}): {e}") from None
        needs = quantizer_for(qcfg).needs_calibration
        store = c["eval"].get("store", "float32")
        method = c["quant"]["method"]
        j = Job(job, c["model"]["name"], method, str(c["quant"].get("tag", method)), c["eval"]["name"],
                int(c["seed"]), int(c["quant_seed"]), subdir, needs)
        timed = method if any(r.get("method", "fp") == method and r["model"] == j.model for r in timings) else "fp"
        j.eval_cost = price(c, "eval", store, timed)
        if subdir in seen:
            j.duplicate_of = seen[subdir]
            jobs.append(j)
            continue
        seen[subdir] = subdir
        fpk = price(c, "eval", store, "fp")
        references.setdefault(cache_key(model=c["model"], protocol=c["eval"]["protocol"], dtype=c["dtype"],
                                        device=c["device"], seed=c["seed"], store=store), fpk)
        if needs:
            ck = price(c, "calib", "float32", "fp")  # the calibration sampler runs the fp model (observers only)
            protocols[ck].bytes_per_sample = 0  # calibration samples are discarded
            akey = cache_key(model=c["model"], quant=c["quant"], calib=c["calib"], quant_seed=c["quant_seed"],
                             dtype=c["dtype"], device=c["device"])
            j.calibration = "cached" if akey in calibrations else "new"
            calibrations.setdefault(akey, ck)
            j.calib_cost = ck
        if fpk not in memory:
            ms = metric_sets.setdefault(c["eval"]["name"], build_metrics(c["eval"]["metrics"]))
            memory[fpk] = memory_outline(protocols[fpk], ms, c["dtype"], c["eval"]["name"])
        jobs.append(j)

    first = cfgs[0][1]
    plan = Plan(argv, exp[-1] if exp else None, str(first["device"]), str(first["dtype"]), jobs, protocols,
                references, calibrations, memory, ceiling, mfu)
    plan.notes = _notes(plan)
    if check:
        plan.checklist = checklist([c for _, c, _ in cfgs])
    return plan


def _notes(plan: Plan) -> list[str]:
    notes = [
        "counted: runs, samples, forwards, tokens, bytes (from the composed configs and shipped transformer configs)",
        ("forwards are denoiser rows (one sample through the denoiser once); CFG per family: "
         "orbitquant.harness.plan.CFG_RULES"),
        ("fp reference: sampled once per (model, eval protocol, dtype, device, seed), cached; the quant=fp run also "
        "samples its own set (orbitquant/harness/stages.py sample() runs for every method)"),
        ("disk: raw bytes of every sample store (uint8 = F x H x W x 3 per video / H x W x 3 per image, float32 = 4 B "
        "per value, + 8 B label); npz compression of uint8 shards is not counted, so these are upper bounds; not "
        "counted: previews, feature caches, calibration artifacts, quantized checkpoints, GenEval/VBench exports"),
        ("not counted in GPU time: VAE decode and text encoding (unless a timing file gives VAE decode), quantizer "
        "fitting (GPTQ, smoothing / clip searches, SVD), metric evaluators (Inception, CLIP, GenEval, VBench)"),
    ]
    c = plan.ceiling
    if c is not None:
        notes.append(f"projection: seconds per forward = FLOPs / ({plan.mfu:.0%} x {c.bf16_tflops:g} TFLOP/s measured "
                     f"bf16 GEMM ceiling of {c.gpu}, {c.source}); FLOPs = 2 x in x out x rows per block linear + "
                     "4 x Lq x Lkv x inner per attention layer; the fraction is an assumption, not a measurement")
        if c.quant_linear_ratio is not None:
            up = plan.quantized_upper()
            tail = f"; with every quantized run's linears at the max ratio: {fmt_hours(up)} GPU-h in all" if up else ""
            notes.append("quantized runs simulate quantization (fake-quant) and are slower than bf16: measured "
                         f"{c.quant_ratio_detail} ({c.source}); the GPU-h above price them as bf16, a lower bound"
                         + tail)
    else:
        notes.append("no measured GPU ceiling file: GPU-hours not projected (pass --ceiling results/bench/gpu-*.json)")
    return notes
