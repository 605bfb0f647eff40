"""Scale-out through existing engines: Hydra's joblib and submitit launchers (local executor in CI), the Slurm
launcher config, and the per-job status files that report what launchers do not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_run import ROOT, _compose, _run, _stored

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


@pytest.mark.parametrize("launcher", [["hydra/launcher=local"],
                                      ["hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=2"]],
                         ids=["joblib", "submitit_local"])
def test_launchers_run_each_job_in_its_own_process_with_status_files(tmp_path, launcher):
    _run(["-m", *launcher, "eval=smoke", "quant=fp,rtn", "w_bits=4", "a_bits=8"], tmp_path)
    runs = sorted((tmp_path / "runs").glob("**/status.json"))
    assert len(runs) == 2
    statuses = [json.loads(p.read_text()) for p in runs]
    assert all(s["status"] == "ok" for s in statuses)
    assert len({s["pid"] for s in statuses}) == 2  # separate worker processes: no state leaks between runs
    assert all((p.parent / "results.json").exists() for p in runs)


def test_slurm_launcher_config_composes_with_partition_and_array_settings():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert (lc.partition, lc.gpus_per_node, lc.timeout_min, lc.array_parallelism) == ("gpu", 2, 240, 16)


def test_sweep_status_lists_failures_and_exits_nonzero(tmp_path):
    from orbitquant.harness.rundir import RunDir

    ok, bad = RunDir(tmp_path / "a/q0-s0"), RunDir(tmp_path / "b/q0-s0")
    with ok.guard("h1"):
        ok.write_results({"config": {}})
    with pytest.raises(RuntimeError), bad.guard("h2"):
        raise RuntimeError("out of memory at step 3")
    p = subprocess.run([sys.executable, str(ROOT / "scripts/sweep_status.py"), "--root", str(tmp_path), "--failed"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert "failed: 1, ok: 1" in p.stdout and "RuntimeError: out of memory at step 3" in p.stdout
    assert "a/q0-s0" not in p.stdout


def test_torchrun_shards_samples_across_two_gloo_ranks_resumes_after_a_kill_and_matches_one_process(tmp_path):
    import os

    import torch

    from orbitquant.harness.samplestore import SampleSet

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["eval=smoke", "quant=smoothquant", "w_bits=4", "a_bits=8", "calib.protocol.n_per_class=2",
              "eval.protocol.batch_size=2", "progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "run.py"), f"results_dir={tmp_path}/tr", f"cache_dir={tmp_path}/cache_tr", *common]
    a = tmp_path / "tr/digits/smoothquant/w4a8/smoke/q0-s0"
    # both ranks are killed right after committing their 2nd shard of the quantized samples
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                       env={**env, "ORBITQUANT_KILL_AT": "samples:shard:2"})
    assert p.returncode != 0 and not (a / "results.json").exists()
    kept = {f.name: f.stat().st_mtime_ns for f in (a / "samples").glob("shard-*.json")}
    assert len(kept) == 4  # ranks' items 0-9 and 10-19 in batches of 2: two shards each were finished
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {f.name: f.stat().st_mtime_ns for f in (a / "samples").glob("shard-*.json") if f.name in kept} == kept
    _run(common, tmp_path)  # the same run in one process
    b = tmp_path / "runs/digits/smoothquant/w4a8/smoke/q0-s0"
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["sampling"]["ranks"] == 2 and rb["sampling"]["ranks"] == 1
    # both ranks wrote their items into one store, in batches of 2 as the one process did: the same batch
    # composition (with batches of 4 the ranks' last batch [8,10) differs from [8,12); batched fp32 GEMMs then round
    # differently, and a quantizer can turn one rounding flip into a whole step: 0.04 on the Intel dev machine)
    assert ra["sampling"]["shards"] == 10 and rb["sampling"]["shards"] == 10
    sa, sb = SampleSet.open(a / "samples"), SampleSet.open(b / "samples")
    assert torch.equal(sa.labels, sb.labels)
    torch.testing.assert_close(_stored(a), _stored(b), atol=1e-5, rtol=0)
    for m in ra["metrics"]:
        assert abs(float(ra["metrics"][m]["value"]) - float(rb["metrics"][m]["value"])) < 1e-3, m


def test_shard_ranges_partition_the_items_in_order():
    from orbitquant.harness.distributed import shard_range

    for n in (0, 1, 7, 10, 501):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, (r, world)) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, (2, 2))


def test_a_second_process_on_a_held_run_dir_skips_it_and_the_lock_dies_with_its_holder(tmp_path):
    import time

    from orbitquant.harness.rundir import RunDir, RunLocked

    run_dir = tmp_path / "runs/digits/orbit/w4a8/smoke/q0-s0"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from orbitquant.harness.rundir import RunDir; r = RunDir(Path(sys.argv[2])); assert r.acquire(); "
        "(r.path / '.RUNNING').write_text('pid holder'); print('held', flush=True); time.sleep(60)"),
        str(ROOT), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8"], tmp_path)
        assert "being run by another process" in p.stdout + p.stderr and not (run_dir / "results.json").exists()
        with pytest.raises(RunLocked), RunDir(run_dir).guard():
            pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    assert RunDir(run_dir).acquire()  # the killed holder's lock is gone


def test_unwritable_results_dir_is_reported_before_any_work(tmp_path):
    from orbitquant.harness.rundir import RunDir

    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert "NotADirectoryError" in RunDir(blocker / "run").unwritable()
    assert RunDir(tmp_path / "ok").unwritable() is None
    ro = "/proc/orbitquant-results"  # a read-only filesystem, even for root
    assert RunDir(__import__("pathlib").Path(ro)).unwritable() is not None
