"""Re-score a finished run from the samples it saved, without sampling again; results.json is updated atomically.

    python scripts/score.py results/runs/dit_xl_2/orbit/w4a8/imagenet/q0-s0
    python scripts/score.py RUN --metrics fid,isc --set fid.reference=/data/VIRTUAL_imagenet256_labeled.npz
    python scripts/score.py RUN --metrics lpips_vs_fp --reference results/cache/reference/<key>

Samples are read from the run's sample store (``RUN/samples/``: store.json + shards; a legacy
``samples/samples.npz`` also works) a batch at a time, so memory does not grow with the sample count.
Metrics default to the run's ``eval.metrics`` (with their options); ``--metrics`` picks a subset or adds new ones,
``--set name.option=value`` (YAML values) overrides options. Metrics that compare with the fp model read the cached
fp reference samples (the store ``<cache_dir>/reference/<key>/``, the key recomputed from the run's config; a legacy
``<key>.npz`` also works) or ``--reference`` (a store directory or .npz). Features, VBench videos and GenEval images
are cached inside the sample store (``features/``, ``vbench/``, ``geneval/``), so a second re-score is cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orbitquant.harness.factory import build_adapter, build_metrics, metric_contexts, metric_specs
from orbitquant.harness.generate import reference_key, run_reference_key
from orbitquant.harness.metrics.base import SampleSource, open_samples
from orbitquant.harness.rundir import atomic_write_json
from orbitquant.harness.samplestore import StoreError


def metric_plan(stored_spec, names: list[str] | None, sets: list[str]) -> list[tuple[str, dict]]:
    specs = dict(metric_specs(stored_spec))
    plan = [(n, dict(specs.get(n, {}))) for n in (names or list(specs))]
    for s in sets:
        key, _, value = s.partition("=")
        name, _, opt = key.partition(".")
        if not opt or not _:
            raise SystemExit(f"error: --set wants name.option=value, got {s!r}")
        for n, opts in plan:
            if n == name:
                opts[opt] = yaml.safe_load(value)
                break
        else:
            raise SystemExit(f"error: --set {s!r}: metric {name!r} is not being scored")
    return plan


def fp_reference_path(run: Path, results: dict, explicit: Path | None) -> Path | None:
    """The fp reference samples of the run: ``explicit``, else the sweep cache's store for the run's config
    (``<cache_dir>/reference/<key>/``, keyed as ``stages.reference_store``), else a legacy ``<key>.npz`` from before
    sample stores; None when the key cannot be computed here (the adapter does not build)."""
    if explicit is not None:
        return explicit
    c = results["config"]
    try:
        fingerprint = build_adapter(c["model"]).fingerprint()
    except Exception:  # noqa: BLE001 - no adapter here (missing optional deps): only --reference can help
        return None
    cache = Path(c.get("cache_dir", "results/cache")) / "reference"
    store = cache / run_reference_key(c, fingerprint)
    protocol = {**c["eval"]["protocol"], "dtype": c["dtype"], "device": c["device"]}  # the key before stores
    legacy = cache / f"{reference_key(c['model'], protocol, c['seed'], fingerprint)}.npz"
    return legacy if not store.exists() and legacy.exists() else store


def load_run_samples(path: Path, sampling: dict) -> SampleSource:
    """A sample store (or legacy .npz) with the run's sampling metadata (prompts) filled in where the store's own
    metadata lacks it."""
    try:
        samples = open_samples(path)
    except (FileNotFoundError, StoreError) as e:
        raise SystemExit(f"error: {e}") from None
    samples.meta = {**sampling, **samples.meta}
    return samples


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory (results.json + the sample store samples/)")
    ap.add_argument("--metrics", help="comma-separated metric names (default: the run's eval.metrics)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.OPTION=VALUE", help="metric option override")
    ap.add_argument("--reference", type=Path, help="the fp reference samples: a store directory or .npz (default: "
                    "the run's cached one)")
    ap.add_argument("--no-reference-metrics", action="store_true", help="do not re-score the fp reference itself")
    args = ap.parse_args(argv)

    results_path = args.run / "results.json"
    if not results_path.exists():
        raise SystemExit(f"error: {results_path} not found (not a finished run directory)")
    results = json.loads(results_path.read_text())
    samples = load_run_samples(args.run / "samples", results.get("sampling", {}))

    plan = metric_plan(results["config"]["eval"]["metrics"], args.metrics.split(",") if args.metrics else None,
                       args.set)
    metrics = build_metrics([{n: o} for n, o in plan])
    for m in metrics:
        try:
            m.check()
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    reference = None
    ref_path = fp_reference_path(args.run, results, args.reference)
    if ref_path is not None and ref_path.exists():
        reference = load_run_samples(ref_path, results.get("sampling", {}))
    elif any(m.needs_reference for m in metrics):
        raise SystemExit(f"error: the fp reference samples are needed but not found at {ref_path}; give --reference")

    t0 = time.perf_counter()
    ctx = metric_contexts(metrics)
    scores = {m.name: m.compute(samples, reference, ctx.get(m.context_cls)).to_dict() for m in metrics}
    ref_scores = {}
    if reference is not None and not args.no_reference_metrics:
        ref_scores = {m.name: m.compute(reference, reference, ctx.get(m.context_cls)).to_dict() for m in metrics}
    results.setdefault("metrics", {}).update(scores)
    results.setdefault("reference_metrics", {}).update(ref_scores)
    results.setdefault("rescored", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": list(scores),
                                               "options": {n: {k: str(v) for k, v in o.items()} for n, o in plan},
                                               "seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_json(results_path, results)
    for name, s in scores.items():
        ref = ref_scores.get(name, {}).get("value")
        print(f"{name:<28} {s['value']:>12.4f}" + ("" if ref is None else f"   (fp {ref:.4f})") + f"   n={s['n']}")
    print(f"updated {results_path}")


if __name__ == "__main__":
    main()
