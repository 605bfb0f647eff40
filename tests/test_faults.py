"""Faults lose nothing: a sweep killed with SIGKILL at random moments (loading, calibrating, sampling,
scoring, writing) is finished by re-running the same command; every finished run stays intact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_run import ROOT

from orbitquant.samplestore import SampleSet

SWEEP = ["-m", "eval=smoke", "quant=fp,rtn,smoothquant", "w_bits=4", "a_bits=8", "calib.protocol.n_per_class=1",
         "progress=false"]


def _cmd(tmp_path):
    return [sys.executable, str(ROOT / "run.py"), *SWEEP[:1], f"results_dir={tmp_path}/runs",
            f"cache_dir={tmp_path}/cache", *SWEEP[1:]]


def _finished(tmp_path) -> dict[str, dict]:
    out = {}
    for p in (tmp_path / "runs").glob("**/results.json"):
        res = json.loads(p.read_text())  # must parse: results.json is written atomically, last
        assert res["status"] == "ok"
        samples = SampleSet.open(p.parent / "samples")  # and its samples are complete
        assert len(samples) == res["metrics"]["psnr_vs_fp"]["n"]
        out[str(p.relative_to(tmp_path))] = res["metrics"]
    return out


def _kill_and_resume(tmp_path, kills: int, seed: int) -> tuple[int, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rng = random.Random(seed)
    survived, before = 0, {}
    for _ in range(kills):
        p = subprocess.Popen(_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(rng.uniform(1.0, 12.0))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        now = _finished(tmp_path)
        for k, v in before.items():  # nothing finished earlier was lost or changed
            assert now[k] == v, k
        before, survived = now, survived + 1
    p = subprocess.run(_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    final = _finished(tmp_path)
    assert len(final) == 3
    for k, v in before.items():
        assert final[k] == v, k  # re-running kept (skipped) every finished run
    return survived, len(final)


def test_sigkill_at_random_points_then_rerun_finishes_the_sweep(tmp_path):
    survived, runs = _kill_and_resume(tmp_path, kills=3, seed=0)
    assert (survived, runs) == (3, 3)


@pytest.mark.slow
def test_sigkill_repeatedly_loses_no_run(tmp_path):
    survived, runs = _kill_and_resume(tmp_path, kills=12, seed=1)
    assert (survived, runs) == (12, 3)
