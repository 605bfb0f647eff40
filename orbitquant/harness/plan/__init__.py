"""Cost plan of a sweep before it runs: runs, samples, denoiser forwards, tokens, disk, host memory, GPU-hours.

``python scripts/plan.py experiment=wan21_vbench`` (the CLI) composes the experiment exactly as
``python run.py -m experiment=wan21_vbench`` would, expands its sweep (``hydra.sweeper.params`` plus command-line
overrides, later ones winning, as Hydra's basic sweeper does) and prices every job. Every number says where it comes
from: *counted* from the configs (runs, samples, forwards, tokens, bytes), *measured* (a timing file under
``results/bench/``), or a *projection* (a formula with its assumptions, e.g. FLOPs at a fraction of a measured GEMM
ceiling). Nothing here loads weights or touches the network.

What a sweep does (``run.py``, ``orbitquant/harness/stages.py``):

* one run per unique run directory ``<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>``; ``quant=fp`` ignores the
  bit widths, so an fp job of every bit pair shares one directory and only its first job runs (the others find the
  results and skip);
* the fp reference samples: generated once per (model, eval protocol, dtype, device, seed) by the first job that
  needs them, cached (``results/cache/reference``), read by every other job of that seed; the ``quant=fp`` run itself
  still samples its own set (``stages.sample`` runs for every method: fp vs reference is the bit-exactness check);
* calibrated methods (``quantizer_for(cfg).needs_calibration``) run the calibration protocol once per calibration key
  (model, method config incl. bits, calib protocol, quant_seed, dtype, device), cached; calibration samples are
  discarded (``DiscardSink``), only activations are kept.

Denoiser forwards are counted in *rows*: one sample through the denoiser once. Classifier-free guidance costs a
second row per step, either by doubling the batch inside one call or by a second call (each adapter's ``cfg_rule``,
read from the adapter and the diffusers 0.42 pipeline it drives; ``cfg_rules()`` / ``CFG_RULES`` gather them).
``results.json``'s ``denoiser_forwards`` counts calls.

Measured timings replace the projection through forward-timing records under ``results/bench/`` (the schema is in
``timing.py``). The parts, one module each:

* ``sweep``: the sweep's jobs (Hydra's basic sweeper) and each job's composed config (``_Composer``);
* ``denoiser``: CFG rows per step, tokens and FLOPs of one denoiser forward, from the shipped configs and the facts
  each family's adapter declares (``orbitquant.harness.adapters.plan_facts``: CFG rule, token geometry, rows per
  linear, attention, nominal pipeline size);
* ``timing``: seconds per forward, measured (timing records) or projected (FLOPs at a measured GEMM ceiling);
* ``protocol``: one eval / calibration protocol on one model, priced (``ProtocolCost``);
* ``memory``: the host-memory outline of one run;
* ``planner``: the plan of a sweep (``make_plan``): runs, fp references and calibrations deduplicated as run.py does;
* ``checklist``: what a sweep needs (the preflight items of its models, metrics and prompt files), one line each;
* ``report``: the text / markdown table and ``--json``; ``scale``: docs/scale.md; ``fmt``: number formatting;
  ``base``: paths, defaults and ``PlanError``.
"""

from typing import Any

from orbitquant.harness.plan.base import BENCH, CONF, DEFAULT_CEILING, DEFAULT_MFU, PlanError
from orbitquant.harness.plan.denoiser import CfgRule, cfg_rule, cfg_rules, forward_flops, forwards_per_step, geometry
from orbitquant.harness.plan.fmt import fmt_sig
from orbitquant.harness.plan.planner import Plan, make_plan
from orbitquant.harness.plan.report import render, to_json
from orbitquant.harness.plan.scale import scale_doc
from orbitquant.harness.plan.sweep import expand_sweep, plain_config
from orbitquant.harness.plan.timing import TIMING_SCHEMA, load_ceiling, load_timings, timing_from_results

__all__ = [
    "BENCH", "CFG_RULES", "CONF", "DEFAULT_CEILING", "DEFAULT_MFU", "TIMING_SCHEMA", "CfgRule", "Plan", "PlanError",
    "cfg_rule", "cfg_rules", "expand_sweep", "fmt_sig", "forward_flops", "forwards_per_step", "geometry",
    "load_ceiling", "load_timings", "make_plan", "plain_config", "render", "scale_doc", "timing_from_results",
    "to_json",
]


def __getattr__(name: str) -> Any:
    """``CFG_RULES``: model adapter name -> CFG rule, derived from the registered adapters on each access (the rules
    live on the adapter classes, ``cfg_rule``; derived on access so that it never drifts from the registry)."""
    if name == "CFG_RULES":
        return cfg_rules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
