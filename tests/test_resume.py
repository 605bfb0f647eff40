"""Resume inside a run: a run SIGKILLed while sampling the fp reference, between a shard's write and its commit
record, and while computing metrics restarts from its last finished shard (or straight at scoring), and its final
samples and metrics are bit-identical to an uninterrupted run. The kills are aimed (``orbitquant.quant.faults``), not
timed, so each one lands where it is meant to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from test_run import ROOT, _stored

ARGS = ["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=4", "eval.protocol.batch_size=4", "progress=false"]
RUN = "digits/orbit/w4a4/smoke/q0-s0"


def _run(tmp_path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ORBITQUANT_KILL_AT", None)
    if kill_at:
        env["ORBITQUANT_KILL_AT"] = kill_at
    cmd = [sys.executable, str(ROOT / "run.py"), f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *ARGS]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _records(store) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.json")}


def test_killed_in_reference_sampling_and_scoring_resumes_bit_identically(tmp_path):
    clean = _run(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    want = json.loads((tmp_path / f"clean/runs/{RUN}/results.json").read_text())

    t = tmp_path / "killed"
    run_dir = t / "runs" / RUN
    # 1. during the fp reference, right after its 2nd of 5 shards is committed
    p = _run(t, "reference:shard:2")
    assert p.returncode == -signal.SIGKILL
    ref_store = next((t / "cache/reference").iterdir())
    kept = _records(ref_store)
    assert len(kept) == 2 and not (run_dir / "results.json").exists()

    # 2. during sampling, between the 3rd shard's .npz and its commit record (aimed at the write)
    p = _run(t, "samples:npz:3")
    assert p.returncode == -signal.SIGKILL
    assert _records(ref_store) | kept == _records(ref_store)  # the reference's finished shards were not redone
    assert len(_records(ref_store)) == 5
    assert len(_records(run_dir / "samples")) == 2 and len(list((run_dir / "samples").glob("shard-*.npz"))) == 3
    sampled = _records(run_dir / "samples")

    # 3. during metric computation: the restart neither loads the model nor samples again
    p = _run(t, "metric:ssim_vs_fp")
    assert p.returncode == -signal.SIGKILL
    assert {k: v for k, v in _records(run_dir / "samples").items() if k in sampled} == sampled
    assert len(_records(run_dir / "samples")) == 5 and not (run_dir / "results.json").exists()

    done = _run(t)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((run_dir / "results.json").read_text())
    assert "load" not in got["timing"] and "metrics" in got["timing"]  # went straight to scoring
    assert got["metrics"] == want["metrics"] and got["reference_metrics"] == want["reference_metrics"]
    assert got["sampling"]["denoiser_forwards"] == want["sampling"]["denoiser_forwards"]
    assert torch.equal(_stored(run_dir), _stored(tmp_path / f"clean/runs/{RUN}"))
    assert torch.equal(_stored(ref_store.parent, ref_store.name),
                       _stored(next((tmp_path / "clean/cache/reference").iterdir()).parent,
                               next((tmp_path / "clean/cache/reference").iterdir()).name))
    assert not list((run_dir / "samples").glob(".shard-*"))  # no temp file survives


def test_a_run_dir_holding_another_configs_unfinished_samples_is_refused_before_loading(tmp_path):
    p = _run(tmp_path, "samples:shard:1")
    assert p.returncode == -signal.SIGKILL
    env_args = ["quant.rotation=haar"]
    cmd = [sys.executable, str(ROOT / "run.py"), f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *ARGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ORBITQUANT_KILL_AT", None)
    p = subprocess.run([*cmd, *env_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode != 0 and "holds unfinished samples of another configuration" in p.stderr
    assert "Traceback" not in p.stderr and "overwrite=true" in p.stderr
    assert len(list((tmp_path / "runs" / RUN / "samples").glob("shard-*.json"))) == 1  # nothing was deleted
