"""Cost plan of a sweep before it runs (runs, samples, denoiser forwards, tokens, disk, host memory, GPU-hours) and
a checklist of what it needs (weights, metric references, evaluator environments, prompt files).

    python scripts/plan.py experiment=wan21_vbench                # the plan of `python run.py -m experiment=...`
    python scripts/plan.py experiment=wan21_vbench seed=0         # command-line overrides win over the sweep's
    python scripts/plan.py model=wan21 quant=orbit,rtn bits=w4a8  # no experiment: a plain (multi)run
    python scripts/plan.py experiment=digits --json               # machine-readable
    python scripts/plan.py experiment=flux1_dev_geneval --markdown
    python scripts/plan.py --scale-doc > docs/scale.md            # regenerate docs/scale.md
    python scripts/plan.py --timing-from results/runs/.../results.json > results/bench/wan21-dryrun.json
                                                                  # a measured timing from a (dry) run

Exit status 0 even when the checklist has failures (it is a plan); 2 for bad input (unknown option, a config that
does not compose). Library: orbitquant/harness/plan/ (formulas, assumptions; the timing-file schema in timing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plan never downloads; resolve_checkpoint reads the cache only
    from orbitquant.harness.plan import (
        BENCH,
        DEFAULT_CEILING,
        DEFAULT_MFU,
        PlanError,
        make_plan,
        render,
        scale_doc,
        to_json,
    )

    head, tail = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=head, epilog=tail, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides as for run.py -m (experiment=..., quant=a,b, seed=0)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    out.add_argument("--markdown", action="store_true", help="print the plan as GitHub markdown")
    out.add_argument("--scale-doc", action="store_true", help="print docs/scale.md (every paper protocol, one run)")
    out.add_argument("--timing-from", type=Path, metavar="RESULTS_JSON",
                     help="print a forward-timing record (for results/bench/) from a finished run's results.json")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                    help=f"assumed fraction of the measured bf16 GEMM ceiling a forward sustains ({DEFAULT_MFU})")
    ap.add_argument("--ceiling", type=Path, default=DEFAULT_CEILING,
                    help="GPU bench JSON with meta.ceilings.bf16_matmul_TFLOPs (default: %(default)s)")
    ap.add_argument("--bench-dir", type=Path, default=BENCH,
                    help="folder scanned for forward-timing files (schema in orbitquant/harness/plan/timing.py; default: %(default)s)")
    ap.add_argument("--no-check", action="store_true", help="skip the checklist (weights, metrics, prompt files)")
    args = ap.parse_args(argv)
    try:
        if args.timing_from:
            from orbitquant.harness.plan import timing_from_results

            print(json.dumps(timing_from_results(args.timing_from), indent=1))
            return 0
        if args.scale_doc:
            if args.overrides:
                ap.error("--scale-doc takes no overrides")
            print(scale_doc(args.mfu, args.ceiling, args.bench_dir), end="")
            return 0
        plan = make_plan(args.overrides, bench_dir=args.bench_dir, ceiling_file=args.ceiling, mfu=args.mfu,
                         check=not args.no_check)
    except (PlanError, ValueError) as e:
        print(str(e) if str(e).startswith("config error") else f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(plan), indent=1, default=str))
    else:
        print(render(plan, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
