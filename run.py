"""Quantize a DiT, sample it, and score it against its own fp samples under the same noise.

    python run.py                                        # digits model, OrbitQuant W4A8
    python run.py quant=rtn w_bits=4 a_bits=4 seed=1
    python run.py -m quant=fp,rtn,orbit w_bits=4 a_bits=4,8
    python run.py logger=wandb                           # also mirror to W&B (offline without WANDB_API_KEY)
    torchrun --nproc_per_node=2 run.py                   # one run, samples sharded across ranks (rank 0 scores)

Results: results/runs/<model>/<method>/<tag>/<eval>/q<quant_seed>-s<seed>/results.json (+ samples/grid.png).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("orbitquant.run")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig

    from orbitquant import distributed
    from orbitquant.api import quantizer_for
    from orbitquant.artifacts import calibration_path
    from orbitquant.checkpoint import check_checkpoint, quantize_or_load
    from orbitquant.cli import fp_bits_error
    from orbitquant.config import torch_dtype
    from orbitquant.factory import build_adapter, build_metrics, build_quant_config, metric_contexts
    from orbitquant.generate import reference_key, reference_samples, save_samples
    from orbitquant.nn import NONFINITE_EVENTS
    from orbitquant.rundir import RunDir, config_hash, provenance, run_identity
    from orbitquant.tables import format_summary
    from orbitquant.viz import plot_layer_errors
    from orbitquant.wandb_log import mirror

    run = RunDir(Path(HydraConfig.get().runtime.output_dir))
    c = OmegaConf.to_container(cfg, resolve=True)
    try:  # build (and so validate) everything before any heavy work; bad config -> one line, no traceback
        adapter, qcfg = build_adapter(c["model"]), build_quant_config(c["quant"])
        hc = HydraConfig.get()
        if err := fp_bits_error(qcfg.method, list(hc.overrides.task), str(hc.mode) == "RunMode.MULTIRUN"):
            sys.exit(err)
        metrics, protocol = build_metrics(c["eval"]["metrics"]), c["eval"]["protocol"]
        for m in metrics:
            m.check()  # feature-net weights present: fail now, not after sampling
        adapter.check_protocol(protocol, c["eval"]["name"])
        check_checkpoint(cfg.quant_checkpoint, qcfg)
        needs_calib = quantizer_for(qcfg).needs_calibration
        if needs_calib:
            adapter.check_protocol(c["calib"]["protocol"], "calib=" + c["calib"]["name"])
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    identity = run_identity(c, needs_calib)
    diff = None if cfg.overwrite else run.stored_config_diff(identity)
    if diff == []:
        log.info("results exist, skipping (overwrite=true to redo): %s", run.results_path)
        return
    if diff:  # same directory, different settings: never overwrite silently, never report stale numbers
        sys.exit(f"error: {run.path} holds results of another config ({'; '.join(diff[:4])}); give this variant "
                 "its own directory with quant.tag=<name>, or pass overwrite=true")
    torch.set_num_threads(cfg.threads)
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        times[stage], t = round(time.perf_counter() - t, 3), time.perf_counter()

    rank, world = distributed.setup(cfg.device)  # torchrun: samples are sharded across ranks (rank 0 scores)
    shard = (rank, world)
    if rank == 0 and (err := run.unwritable()):  # fail before hours of work, not when writing results
        sys.exit(f"error: cannot write to the results directory {run.path} ({err}); pick another with results_dir=")
    if rank == 0 and not run.acquire():  # another live process runs this directory: leave it to that one
        log.warning("%s is being run by another process (.RUNNING: %s); skipping it here", run.path,
                    (run.path / ".RUNNING").read_text().strip() if (run.path / ".RUNNING").exists() else "?")
        return
    with run.guard(config_hash(identity)) if rank == 0 else contextlib.nullcontext():
        try:
            pipe = adapter.load(torch_dtype(cfg.dtype), cfg.device)
        except FileNotFoundError as e:  # missing weights: one line that names the fix, no traceback
            sys.exit(f"error: {e}")
        lap("load")

        def sample(desc: str, name: str):  # this rank's shard, merged on rank 0 (None on the others)
            part = adapter.generate(pipe, **protocol, seed=cfg.seed, progress=cfg.progress and rank == 0, desc=desc,
                                    shard=shard)
            return distributed.gather(part, run.samples_dir, shard, name)

        key = reference_key(c["model"], {**protocol, "dtype": cfg.dtype, "device": cfg.device}, cfg.seed,
                            adapter.fingerprint())
        reference, cached = reference_samples(lambda: sample("fp reference", "reference"),
                                              Path(cfg.cache_dir) / "reference", key)
        lap("reference_cached" if cached else "reference")
        denoiser = adapter.denoiser(pipe)
        calibrate = (lambda: adapter.generate(pipe, **c["calib"]["protocol"], seed=cfg.quant_seed + 10_000,
                                              progress=cfg.progress, desc="calibration")) if needs_calib else None
        if rank > 0:
            distributed.barrier()  # rank 0 calibrates first; the others restore its artifact
        qr = quantize_or_load(denoiser, qcfg, adapter.layers(denoiser), cfg.quant_checkpoint, cfg.runtime,
                              meta={"model": c["model"], "fingerprint": adapter.fingerprint()},
                              probe=lambda: adapter.probe(pipe), calibrate=calibrate,
                              calibration_cache=calibration_path(cfg.cache_dir, c, adapter.fingerprint()))
        if rank == 0 and world > 1:
            distributed.barrier()
        lap("quantize")
        samples = sample(f"{c['quant']['method']} {c['quant']['tag']}", "samples")
        if rank > 0:
            return
        files = save_samples(samples, run.samples_dir)
        lap("sample")
        ctx = metric_contexts(metrics)
        scores = {m.name: m.compute(samples, reference, ctx.get(m.context_cls)).to_dict() for m in metrics}
        ref_scores = {m.name: m.compute(reference, reference, ctx.get(m.context_cls)).to_dict() for m in metrics}
        lap("metrics")
        title = f"{adapter.name} {qcfg.method} {c['quant']['tag']}"
        if plot_layer_errors(qr["layers"], run.path / "layer_error.png", title):
            files["layer_error"] = "layer_error.png"
        results = {"config": c, "config_hash": config_hash(identity), "metrics": scores, "reference_metrics": ref_scores,
                   "quant_report": qr, "sampling": samples.meta, "timing": times, "files": files,
                   "nonfinite": {"events": len(NONFINITE_EVENTS), "first": NONFINITE_EVENTS[:20]},
                   "provenance": provenance(cfg.device)}
        run.write_results(results)
    mirror(results, run.path, c["logger"])  # W&B (logger=wandb); never fails the run
    print(format_summary(results, Path(os.path.relpath(run.results_path))))


if __name__ == "__main__":
    from orbitquant.cli import check_group_overrides

    if err := check_group_overrides(sys.argv[1:], Path(__file__).resolve().parent / "conf"):
        sys.exit(err)  # before Hydra: one line with the nearest option instead of Hydra's search-path dump
    main()
