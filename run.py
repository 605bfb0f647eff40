"""Quantize a DiT, sample it, and score it against its own fp samples under the same noise.

    python run.py                                        # digits model, OrbitQuant W4A8
    python run.py quant=rtn w_bits=4 a_bits=4 seed=1
    python run.py -m quant=fp,rtn,orbit w_bits=4 a_bits=4,8
    python run.py logger=wandb                           # also mirror to W&B (offline without WANDB_API_KEY)
    python run.py -m experiment=dit_imagenet preflight=true  # what the runs need, present or not; loads nothing
    torchrun --nproc_per_node=2 run.py                   # one run, samples sharded across ranks (rank 0 scores)

Results: results/runs/<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>/results.json, with samples/ (the sample
store: shards on disk, grid.png). The stages and how they stream, shard and resume: orbitquant/harness/stages.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from orbitquant.harness import stages

    run = stages.validate(cfg, HydraConfig.get())  # everything checked before the model loads; None: already done
    if run is None:
        return
    with stages.claim(run) as mine:  # torchrun ranks, results dir writable, the run's lock, .RUNNING / status.json
        if not mine:
            return
        if done := stages.resumable(run):  # killed while scoring: samples and report are on disk
            reference, samples, report = done
        else:
            pipe = stages.load(run)
            run.lap("load")
            reference, cached = stages.reference(run, pipe)  # fp samples, cached across a sweep, resumable
            run.lap("reference_cached" if cached else "reference")
            report = stages.quantize(run, pipe)
            run.lap("quantize")
            samples = stages.sample(run, pipe)  # streamed to disk shard by shard, resumable
            run.lap("sample")
            if run.rank > 0:
                return
        scores = stages.score(run, samples, reference)
        run.lap("metrics")
        results = stages.record(run, report, samples, *scores)
    stages.report(run, results)


if __name__ == "__main__":
    from orbitquant.harness.cli import check_group_overrides

    if err := check_group_overrides(sys.argv[1:], Path(__file__).resolve().parent / "conf"):
        sys.exit(err)  # before Hydra: one line with the nearest option instead of Hydra's search-path dump
    main()
    from orbitquant.harness.stages import PREFLIGHT

    if PREFLIGHT["missing"]:  # preflight=true found something missing (in any job of a sweep)
        sys.exit(1)
