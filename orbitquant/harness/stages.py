"""The named stages of one run -- validate, load, reference, quantize, sample, score, record -- and what they share.

``run.py`` is the recipe; streaming, sharding (torchrun) and resume live here, inside the stages:

* samples and fp reference samples stream to sample stores on disk (``samplestore``) batch by batch, so memory is
  flat in the sample count;
* a killed run restarts from its last finished shard (reference and quantized samples alike); when both sample sets
  and the quantization report are complete, the restart goes straight to scoring without loading the model;
* under torchrun every rank samples its part of the items into the same store; rank 0 scores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from orbitquant.quant import faults

from orbitquant.harness import preflight
from orbitquant.harness.rundir import RunDir, atomic_write_json, config_hash, run_identity
from orbitquant.harness.samplestore import FORMATS, SampleSet, StoreError, StoreWriter, check_owner
from orbitquant.quant.atomic import DiskFull, remove_stale_temps

log = logging.getLogger("orbitquant.run")

QUANT_REPORT = "quant_report.json"  # written after quantization: a restart with finished samples skips the model
#: what ``preflight=true`` jobs of this process have listed and found missing (a sweep's jobs share the process)
PREFLIGHT: dict = {"seen": set(), "missing": 0}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; other values are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device} but no CUDA device is available here; use device=auto or device=cpu")
        return device
    raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")


def _device(device: str) -> tuple[str, list]:
    """The resolved device, and the CUDA device as a preflight need when one is asked for (a run without it stops
    with the rest of the checklist; ``preflight=true`` on a CPU machine still lists everything else)."""
    if re.fullmatch(r"cuda(:\d+)?", device):
        ok = torch.cuda.is_available()
        return device, [preflight.Need("CUDA device", f"device={device}", ok,
                                       "run on a GPU node, or pass device=auto (or device=cpu)",
                                       "" if ok else "no CUDA device here")]
    return resolve_device(device), []


@dataclass
class Run:
    """Everything the stages share about one run: its resolved config, built objects and bookkeeping."""

    cfg: DictConfig
    c: dict  # the resolved config as plain data (device resolved)
    dir: RunDir
    adapter: Any
    qcfg: Any
    metrics: list
    protocol: dict
    needs_calib: bool
    identity: dict
    store_format: str
    rank: int = 0
    world: int = 1
    times: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    @property
    def hash(self) -> str:
        return config_hash(self.identity)

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def lap(self, stage: str) -> None:
        """Seconds since the previous lap, and the process's peak RSS (and peak CUDA memory) so far, per stage."""
        now = time.perf_counter()
        self.times[stage], self._t = round(now - self._t, 3), now
        mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if self.c["device"].startswith("cuda"):
            mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.memory[stage] = mem


# ---------------------------------------------------------------------------------------------- validate
def validate(cfg: DictConfig, hydra_cfg) -> Run | None:
    """Build (and so check) everything before any heavy work: config, metrics' needs (weights, references,
    evaluator environments), protocols, checkpoint, device. Bad input exits with one line; None when the run's
    results already exist."""
    from orbitquant.harness.cli import fp_bits_error
    from orbitquant.harness.data import prompt_file_need
    from orbitquant.harness.factory import build_adapter, build_metrics, build_quant_config
    from orbitquant.quant.api import quantizer_for
    from orbitquant.quant.checkpoint import check_checkpoint

    c = OmegaConf.to_container(cfg, resolve=True)
    try:
        c["device"], needs = _device(str(cfg.device))
        adapter, qcfg = build_adapter(c["model"]), build_quant_config(c["quant"])
        if err := fp_bits_error(qcfg.method, list(hydra_cfg.overrides.task), str(hydra_cfg.mode) == "RunMode.MULTIRUN"):
            sys.exit(err)
        metrics, protocol = build_metrics(c["eval"]["metrics"]), c["eval"]["protocol"]
        store_format = c["eval"].get("store", "float32")
        if store_format not in FORMATS:
            raise ValueError(f"eval.store={store_format!r}; valid: {', '.join(FORMATS)}")
        if store_format == "mp4" and adapter.modality != "video":
            raise ValueError(f"eval.store=mp4 stores videos, but model={adapter.name} makes images; "
                             "use eval.store=uint8")
        needs_calib = quantizer_for(qcfg).needs_calibration
        protocols = {c["eval"]["name"]: (protocol, c["eval"].get("fetch", {}))}
        if needs_calib:
            protocols["calib=" + c["calib"]["name"]] = (c["calib"]["protocol"], c["calib"].get("fetch", {}))
        # weights, references, evaluator environments, prompt files: all checked before the model loads
        needs += preflight.collect(adapter, metrics)
        for label, (proto, fetch) in protocols.items():
            prompts = prompt_file_need(proto.get("prompts"), label, (fetch or {}).get("prompts"))
            needs += [prompts] if prompts else []
            if prompts is None or prompts.ok:
                adapter.check_protocol(proto, label)
        check_checkpoint(cfg.quant_checkpoint, qcfg)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        sys.exit(f"config error: {e}")
    if cfg.get("preflight"):  # the checklist only: print it, load nothing (run.py exits non-zero if any is missing)
        fresh = [n for n in needs if (n.what, n.where) not in PREFLIGHT["seen"]]  # a sweep lists each item once
        PREFLIGHT["seen"].update((n.what, n.where) for n in needs)
        PREFLIGHT["missing"] += len(preflight.missing(needs))
        title = f"preflight {os.path.relpath(hydra_cfg.runtime.output_dir)}"
        print(preflight.render(fresh, title) if fresh else f"{title}: nothing new (listed above)")
        return None
    if c["device"] == "cpu" and getattr(adapter, "heavy", False):
        print(f"note: model={adapter.name} runs on the CPU (no CUDA device here): a real family at its protocol takes "
              "hours per sample on a CPU; run on a GPU node, or try model.init=random with a smoke eval for a dry run")
    if preflight.missing(needs):
        sys.exit(preflight.error_text(needs))
    run = Run(cfg, c, RunDir(Path(hydra_cfg.runtime.output_dir)), adapter, qcfg, metrics, protocol, needs_calib,
              run_identity(c, needs_calib), store_format)
    diff = None if cfg.overwrite else run.dir.stored_config_diff(run.identity)
    if diff == []:
        log.info("results exist, skipping (overwrite=true to redo): %s", run.dir.results_path)
        return None
    if diff and all(d.startswith("eval.metrics") for d in diff):  # same samples, other metrics: score them
        sys.exit(f"error: {run.dir.path} holds this run with other metrics ({'; '.join(diff[:2])}); its samples "
                 f"are stored, so score them instead of sampling again: python scripts/score.py {run.dir.path} "
                 f"--metrics <names> (or overwrite=true to redo the run)")
    if diff:  # same directory, different settings: never overwrite silently, never report stale numbers
        sys.exit(f"error: {run.dir.path} holds results of another config ({'; '.join(diff[:4])}); give this variant "
                 "its own directory with quant.tag=<name>, or pass overwrite=true")
    if not cfg.overwrite:
        try:
            check_owner(run.dir.samples_dir, run.hash)
        except StoreError as e:
            sys.exit(f"error: {e}")
    return run


@contextlib.contextmanager
def claim(run: Run):
    """Join torchrun's process group, check the results directory is writable, take the run's lock and mark it
    in flight (``RunDir.guard``). Yields False (and does nothing) when another live process holds the run."""
    from orbitquant.harness import distributed

    torch.set_num_threads(run.cfg.threads)
    run.rank, run.world = distributed.setup(run.c["device"])
    if run.rank > 0:
        yield True
        return
    if err := run.dir.unwritable():  # fail before hours of work, not when writing results
        sys.exit(f"error: cannot write to the results directory {run.dir.path} ({err}); pick another with "
                 "results_dir=")
    if not run.dir.acquire():  # another live process runs this directory: leave it to that one
        marker = run.dir.path / ".RUNNING"
        log.warning("%s is being run by another process (.RUNNING: %s); skipping it here", run.dir.path,
                    marker.read_text().strip() if marker.exists() else "?")
        yield False
        return
    with run.dir.guard(run.hash):
        # what a killed writer of this run left (the lock rules out live ones): temp files never read, only in the way
        remove_stale_temps(run.dir.path, "results.json", "record.json", "status.json", QUANT_REPORT)
        yield True


# ---------------------------------------------------------------------------------------------- stores
def _n_items(run: Run) -> int:
    return run.adapter.n_items(run.protocol)


def reference_store(run: Run) -> Path:
    from orbitquant.harness.generate import run_reference_key

    return Path(run.c["cache_dir"]) / "reference" / run_reference_key(run.c, run.adapter.fingerprint())


def _open_if_complete(path: Path, n: int) -> SampleSet | None:
    try:
        return SampleSet.open(path, n)
    except StoreError:
        return None


def resumable(run: Run) -> tuple[SampleSet, SampleSet, dict] | None:
    """Finished reference and quantized samples plus the saved quantization report of this very config (a run
    killed while scoring): the restart scores them without loading the model. None otherwise."""
    import json

    report = run.dir.path / QUANT_REPORT
    if run.cfg.overwrite or run.world > 1 or not report.exists():
        return None
    saved = json.loads(report.read_text())
    if saved.get("config_hash") != run.hash:
        return None
    n = _n_items(run)
    ref, samples = _open_if_complete(reference_store(run), n), _open_if_complete(run.dir.samples_dir, n)
    if ref is None or samples is None or samples.key != run.hash:
        return None
    return ref, samples, saved["report"]


def _sample_into(run: Run, pipe, path: Path, key: str, desc: str, name: str,
                 overwrite: bool = False) -> SampleSet | None:
    """Sample this rank's part of the protocol into the store at ``path`` (skipping finished shards); on rank 0
    return the whole set once every rank is done (None on the others)."""
    from orbitquant.harness import distributed

    n = _n_items(run)
    try:
        if run.world > 1 and run.rank > 0:
            distributed.barrier()  # rank 0 prepares the store (checks key, removes broken shards) first
        writer = StoreWriter(path, key, n, run.store_format, overwrite=overwrite and run.rank == 0,
                             clean=run.rank == 0, lock=run.world == 1, name=name)
        if run.world > 1 and run.rank == 0:
            distributed.barrier()
        try:
            if writer.finished:
                log.info("%s: resuming with %d finished shards in %s", desc, len(writer.finished), path)
            run.adapter.generate(pipe, **run.protocol, seed=run.c["seed"],
                                 progress=run.cfg.progress and run.rank == 0, desc=desc, shard=run.shard, sink=writer)
        finally:
            writer.close()
        distributed.barrier()
        return SampleSet.open(path, n) if run.rank == 0 else None
    except (StoreError, DiskFull) as e:  # another config's samples, a full disk: one line; finished shards stay
        sys.exit(f"error: {e}")


# ---------------------------------------------------------------------------------------------- stages
def load(run: Run):
    """The pipeline with its weights; missing weights end the run with the adapter's one-line error."""
    from orbitquant.quant.config import torch_dtype

    try:
        return run.adapter.load(torch_dtype(run.c["dtype"]), run.c["device"])
    except FileNotFoundError as e:  # missing weights: one line that names the fix, no traceback
        sys.exit(f"error: {e}")


def reference(run: Run, pipe) -> tuple[SampleSet | None, bool]:
    """The fp model's samples under the run's noise, shared by every job of a sweep through the cache (built once,
    resumed if a previous job was killed while building it). Returns ``(samples, was_cached)``."""
    path = reference_store(run)
    done = _open_if_complete(path, _n_items(run)) if run.world == 1 else None
    if done is not None:
        return done, True
    return _sample_into(run, pipe, path, path.name, "fp reference", "reference"), False


def quantize(run: Run, pipe) -> dict:
    """Quantize the denoiser (calibrating first when the method needs it; artifacts and checkpoints are cached)."""
    from orbitquant.harness import distributed
    from orbitquant.harness.samplestore import DiscardSink
    from orbitquant.quant.artifacts import calibration_path
    from orbitquant.quant.checkpoint import quantize_or_load

    adapter, c = run.adapter, run.c
    denoiser = adapter.denoiser(pipe)
    calibrate = None
    if run.needs_calib:
        def calibrate():  # the sampler runs for its activations only: no calibration image is kept
            return adapter.generate(pipe, **c["calib"]["protocol"], seed=c["quant_seed"] + 10_000,
                                    progress=run.cfg.progress, desc="calibration", sink=DiscardSink())
    if run.rank > 0:
        distributed.barrier()  # rank 0 calibrates first; the others restore its artifact
    report = quantize_or_load(denoiser, run.qcfg, adapter.layers(denoiser), run.cfg.quant_checkpoint, run.cfg.runtime,
                              meta={"model": c["model"], "fingerprint": adapter.fingerprint()},
                              probe=lambda: adapter.probe(pipe), calibrate=calibrate,
                              calibration_cache=calibration_path(c["cache_dir"], c, adapter.fingerprint()))
    if run.rank == 0:
        atomic_write_json(run.dir.path / QUANT_REPORT, {"config_hash": run.hash, "report": report})
        if run.world > 1:
            distributed.barrier()
    return report


def sample(run: Run, pipe) -> SampleSet | None:
    """The quantized model's samples, streamed into the run's store (None on ranks > 0)."""
    desc = f"{run.c['quant']['method']} {run.c['quant']['tag']}"
    return _sample_into(run, pipe, run.dir.samples_dir, run.hash, desc, "samples", overwrite=bool(run.cfg.overwrite))


def score(run: Run, samples, reference) -> tuple[dict, dict]:
    """Every metric on the samples (against the fp reference where it needs one), and on the reference itself."""
    from orbitquant.harness.factory import metric_contexts

    ctx = metric_contexts(run.metrics)
    scores = {}
    for m in run.metrics:
        faults.point(f"metric:{m.name}")
        scores[m.name] = m.compute(samples, reference, ctx.get(m.context_cls)).to_dict()
    ref_scores = {m.name: m.compute(reference, reference, ctx.get(m.context_cls)).to_dict() for m in run.metrics}
    return scores, ref_scores


def record(run: Run, report: dict, samples, scores: dict, ref_scores: dict) -> dict:
    """Previews, the layer-error plot, record.json and results.json (written last, atomically)."""
    from orbitquant.harness.generate import save_previews
    from orbitquant.harness.records import write_record
    from orbitquant.harness.rundir import provenance
    from orbitquant.harness.viz import plot_layer_errors
    from orbitquant.quant.nn import NONFINITE_EVENTS

    files = save_previews(samples, run.dir.samples_dir)
    title = f"{run.adapter.name} {run.qcfg.method} {run.c['quant']['tag']}"
    if plot_layer_errors(report["layers"], run.dir.path / "layer_error.png", title):
        files["layer_error"] = "layer_error.png"
    meta = {k: v for k, v in samples.meta.items() if k != "source"}
    results = {"config": run.c, "config_hash": run.hash, "metrics": scores, "reference_metrics": ref_scores,
               "quant_report": report, "sampling": {**meta, "n": len(samples), "shards": len(samples.shards),
                                                     "ranks": run.world, "store": run.store_format},
               "timing": run.times, "memory": run.memory, "files": files,
               "nonfinite": {"events": len(NONFINITE_EVENTS), "first": NONFINITE_EVENTS[:20]},
               "provenance": provenance(run.c["device"])}
    write_record(run.dir.path, results)  # the compact, committable trail (orbitquant/harness/records.py)
    run.dir.write_results(results)  # last: a run with results.json is complete
    return results


def report(run: Run, results: dict) -> None:
    """Mirror to W&B (never fails the run) and print the summary table."""
    from orbitquant.harness.tables import format_summary
    from orbitquant.harness.wandb_log import mirror

    mirror(results, run.dir.path, run.c["logger"])
    print(format_summary(results, Path(os.path.relpath(run.dir.results_path))))
