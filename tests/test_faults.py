"""Faults lose nothing: a sweep SIGKILLed at its writes (a run's results.json before its rename, a calibration
artifact being written, a sample shard between its write and its rename...) is finished by re-running the same
command; every finished run stays intact. The kills are aimed (``ORBITQUANT_KILL_AT``, ``orbitquant.quant.faults``) at the
atomic writes' stages, not timed, so each one lands where it is meant to and none is wasted on a moment that writes
nothing. A real SIGKILL runs no cleanup: whatever a killed writer leaves (its temp file) is on disk for the rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_run import ROOT

from orbitquant.harness.samplestore import SampleSet

SWEEP = ["-m", "eval=smoke", "quant=fp,rtn,smoothquant", "w_bits=4", "a_bits=8", "calib.protocol.n_per_class=1",
         "eval.protocol.batch_size=10", "progress=false"]  # jobs in this order; 2 shards per sample store


def _launch(tmp_path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ORBITQUANT_KILL_AT", None)
    if kill_at:
        env["ORBITQUANT_KILL_AT"] = kill_at
    cmd = [sys.executable, str(ROOT / "run.py"), *SWEEP[:1], f"results_dir={tmp_path}/runs",
           f"cache_dir={tmp_path}/cache", *SWEEP[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def _finished(tmp_path) -> dict[str, dict]:
    out = {}
    for p in (tmp_path / "runs").glob("**/results.json"):
        res = json.loads(p.read_text())  # must parse: results.json is written atomically, last
        assert res["status"] == "ok"
        samples = SampleSet.open(p.parent / "samples")  # and its samples are complete
        assert len(samples) == res["metrics"]["psnr_vs_fp"]["n"]
        out[p.parent.relative_to(tmp_path / "runs").parts[1]] = res["metrics"]  # by method
    return out


def _strays(directory) -> list[str]:
    """Temp files of atomic writes (``.<name>.<random><suffix>``) under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*.*")
                  if p.is_file() and ".hydra" not in p.parts)


def _kill_and_resume(tmp_path, kills: list[str], check=None) -> dict[str, dict]:
    """Launch the sweep once per target in ``kills``, each SIGKILLed there (it must land), then once to the end;
    nothing finished before a kill may be lost or changed. ``check(i, tmp_path)`` looks after the i-th kill."""
    before: dict[str, dict] = {}
    for i, target in enumerate(kills):
        p = _launch(tmp_path, target)
        assert p.returncode == -signal.SIGKILL, f"{target} was not reached:\n{p.stderr[-2000:]}"
        now = _finished(tmp_path)
        assert {k: now.get(k) for k in before} == before, target  # nothing finished earlier was lost or changed
        if check:
            check(i, tmp_path)
        before = now
    p = _launch(tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    final = _finished(tmp_path)
    assert set(final) == {"fp", "rtn", "smoothquant"}
    assert {k: final[k] for k in before} == before  # re-running kept (skipped) every finished run
    assert _strays(tmp_path / "runs") == []  # what the killed writers left in the runs was cleared
    return final


def test_sigkill_at_aimed_writes_then_rerun_finishes_the_sweep(tmp_path):
    calib = tmp_path / "cache/calibration"

    def check(i, t):
        runs = t / "runs/digits"
        if i == 0:  # fp finished; rtn killed between its results.json's fsync and rename: no results.json, a temp
            assert set(_finished(t)) == {"fp"}
            (rtn,) = runs.glob("rtn/*/smoke/q0-s0")
            assert not (rtn / "results.json").exists() and [s.split(".")[1] for s in _strays(rtn)] == ["results"]
        elif i == 1:  # rtn finished on the rerun (straight to scoring); smoothquant killed writing its artifact
            assert set(_finished(t)) == {"fp", "rtn"}
            (rtn,) = runs.glob("rtn/*/smoke/q0-s0")
            assert "load" not in json.loads((rtn / "results.json").read_text())["timing"]
            assert not list(calib.glob("*.safetensors"))  # never a partial artifact under its real name
        elif i == 2:  # smoothquant killed before its 2nd sample shard's rename: the 1st is kept
            (sq,) = runs.glob("smoothquant/*/smoke/q0-s0")
            assert [p.name for p in sorted((sq / "samples").glob("shard-*"))] == [
                "shard-000000-000010.json", "shard-000000-000010.npz"]
            assert len(list(calib.glob("*.safetensors"))) == 1

    _kill_and_resume(tmp_path, ["atomic:rename:results.json:2", "atomic:write:*.safetensors",
                                "atomic:rename:shard-*.npz:2"], check)


@pytest.mark.slow
def test_sigkill_at_every_kind_of_write_loses_no_run(tmp_path):
    # each launch resumes the last one's work and is killed at the next write point: every stage of every kind of
    # file the sweep writes (status, reference and sample shards and their records, quant report, record, results,
    # calibration artifact) and between a shard and its record, before scoring
    _kill_and_resume(tmp_path, [
        "atomic:write:status.json", "atomic:rename:shard-*.npz", "reference:npz:2", "atomic:done:shard-*.json",
        "atomic:rename:quant_report.json", "metric:ssim_vs_fp", "atomic:write:record.json",
        "atomic:rename:results.json", "atomic:done:results.json", "atomic:write:*.safetensors",
        "atomic:rename:*.safetensors", "atomic:done:*.safetensors"])
