"""One atomic write (``orbitquant.quant.atomic``), tested directly and at every write point of a real run.

The helper: two writers of one path never share a temp file; a failure at each stage (filling the temp file, between
fsync and rename, after the rename) leaves the old file or the whole new one and no temp file; ENOSPC is DiskFull; the
directory is fsynced after the rename. A real run on the embedded digits model, faulted at each kind of file it
writes (results.json, a calibration artifact, a sample-store shard, a packed checkpoint): finished work stays on disk
and a rerun resumes from it to the same numbers as an uninterrupted run. Faults are aimed through the hook
``atomic._fault`` (which stage, which file), in process, so each lands where it is meant to and the file runs in
seconds; the SIGKILL versions (no cleanup at all) are in test_faults.py.
"""

from __future__ import annotations

import errno
import fnmatch
import importlib.util
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run import ROOT, _stored

import orbitquant as oq
from orbitquant.quant import atomic, faults
from orbitquant.harness.samplestore import SampleSet
from orbitquant.quant.artifacts import load_artifact, save_artifact
from orbitquant.quant.atomic import DiskFull, atomic_path, atomic_write, atomic_write_json
from orbitquant.quant.checkpoint import MANIFEST, WEIGHTS, load_quantized, read_manifest, save_quantized


class Crash(BaseException):
    """An injected fault. A BaseException, like the KeyboardInterrupt of a killed job: no ``except Exception``
    on the way up can swallow it."""


def _aim(monkeypatch, stage: str, pattern: str, nth: int = 1, truncate: bool = False, leave_temp: bool = False):
    """Raise :class:`Crash` at ``stage`` of the ``nth`` atomic write whose target path matches ``pattern`` (shell
    style, on the full path). ``truncate``: cut the temp file in half first (a writer stopped part way);
    ``leave_temp``: leave a copy of the temp file where a SIGKILLed writer would leave it (an exception cleans up,
    a kill does not). Returns the list of temp names seen at every stage (for every file)."""
    seen: list[tuple[str, Path, str]] = []

    def fault(st, path, tmp):
        seen.append((st, Path(path), tmp))
        hits = [p for s, p, _ in seen if s == stage and fnmatch.fnmatch(str(p), pattern)]
        if st == stage and fnmatch.fnmatch(str(path), pattern) and len(hits) == nth:
            if truncate:
                os.truncate(tmp, os.path.getsize(tmp) // 2)
            if leave_temp:
                shutil.copyfile(tmp, Path(path).parent / f".{Path(path).name}.killed{Path(tmp).suffix}")
            raise Crash(f"{stage} {path}")

    monkeypatch.setattr(atomic, "_fault", fault)
    return seen


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*") if p.is_file() and p.name not in (".lock",)
                  and p.parent.name != ".hydra" and p.name not in (".RUNNING", ".ERROR"))


# ---------------------------------------------------------------------------------------------- the helper
WRITERS = {
    "atomic_write": lambda path, value: atomic_write(path, lambda f: f.write(value.encode())),
    "atomic_path": lambda path, value: _savez(path, value),
}


def _savez(path: Path, value: str) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # a writer that takes a name and appends .npz unless it is there
        np.savez(tmp, v=np.frombuffer(value.encode(), dtype=np.uint8))


def _read(path: Path) -> str:
    if path.suffix == ".npz":
        with np.load(path) as d:
            return d["v"].tobytes().decode()
    return path.read_text()


def _target(tmp_path: Path, kind: str) -> Path:
    return tmp_path / ("data.npz" if kind == "atomic_path" else "data.json")


@pytest.mark.parametrize("kind", WRITERS)
def test_two_writers_of_one_path_never_share_a_temp_file(tmp_path, kind, monkeypatch):
    path, write = _target(tmp_path, kind), WRITERS[kind]
    seen = _aim(monkeypatch, "never", "*")
    # interleaved: writer B runs start to finish while writer A has filled its temp file but not yet renamed it
    real = atomic._fault

    def fault(stage, p, tmp):
        real(stage, p, tmp)
        if stage == "write" and len([s for s in seen if s[0] == "write"]) == 1:
            write(path, "B" * 1000)

    monkeypatch.setattr(atomic, "_fault", fault)
    write(path, "A" * 10)
    temps = {tmp for _, _, tmp in seen}
    assert len(temps) == 2, seen  # each writer had its own temp file
    assert _read(path) == "A" * 10  # the last rename wins, whole
    assert _temps(tmp_path) == [] and sorted(os.listdir(tmp_path)) == [path.name]


def test_two_writer_threads_of_one_path_leave_one_whole_file(tmp_path):
    path = tmp_path / "data.json"
    gate = threading.Barrier(2, timeout=30)
    errors = []

    def worker(c):
        try:
            for _ in range(20):
                gate.wait()  # both start each round together
                atomic_write(path, lambda f: [f.write(c.encode()) for _ in range(2000)])
        except threading.BrokenBarrierError:
            pass  # the other thread failed (reported by it)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=worker, args=(c,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in ("a" * 2000, "b" * 2000)
    assert os.listdir(tmp_path) == ["data.json"]


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("stage", ["write", "rename", "done"])
def test_the_old_file_survives_a_fault_at_each_stage(tmp_path, kind, stage, monkeypatch):
    path, write = _target(tmp_path, kind), WRITERS[kind]
    write(path, "old")
    _aim(monkeypatch, stage, str(path), truncate=stage == "write")
    with pytest.raises(Crash):
        write(path, "new" * 1000)
    assert _read(path) == ("new" * 1000 if stage == "done" else "old")  # the old file or the whole new one
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    if stage != "done":
        assert oct(path.stat().st_mode & 0o777) == oct(atomic._FILE_MODE)  # not mkstemp's 0600


def test_a_writer_that_fails_part_way_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "data.json"
    atomic_write_json(path, {"v": 1})

    def write(f):
        f.write(b'{"v": 2, "half')
        raise ValueError("writer failed")

    with pytest.raises(ValueError, match="writer failed"):
        atomic_write(path, write)
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["data.json"]


@pytest.mark.parametrize("where", ["write", "fsync", "safetensors"])
def test_no_space_left_is_disk_full_and_keeps_the_old_file(tmp_path, where, monkeypatch):
    path = tmp_path / "data.json"
    atomic_write_json(path, {"v": 1})

    def write(f):
        f.write(b"x")
        if where == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        if where == "safetensors":  # safetensors' own error type, the OS error in its message
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                               'left on device" })')

    if where == "fsync":  # delayed allocation: the error surfaces when the data is flushed
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(DiskFull, match="no space left on the device writing .*data.json"):
        atomic_write(path, write)
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["data.json"]


def test_the_file_then_the_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_json(tmp_path / "a.json", {"v": 1})
    _savez(tmp_path / "b.npz", "x")
    assert events == ["fsync file", "rename", "fsync dir"] * 2


def test_the_directory_fsync_is_skipped_where_a_directory_cannot_be_opened(tmp_path, monkeypatch):
    real_open = os.open

    def windows_open(name, flags, *a, **k):  # Windows: PermissionError opening a directory
        if os.path.isdir(name):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(name, flags, *a, **k)

    monkeypatch.setattr(os, "open", windows_open)
    atomic_write_json(tmp_path / "a.json", {"v": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}


def test_remove_stale_temps_clears_only_the_named_files_leftovers(tmp_path):
    for name in (".results.json.abc.tmp", ".status.json.x.tmp", ".other.json.y.tmp", "results.json", ".lock"):
        (tmp_path / name).write_text("x")
    gone = atomic.remove_stale_temps(tmp_path, "results.json", "status.json")
    assert sorted(p.name for p in gone) == [".results.json.abc.tmp", ".status.json.x.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".lock", ".other.json.y.tmp", "results.json"]


def test_kill_targets_aim_at_the_kth_matching_point(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(faults, "_counts", faults.Counter())
    monkeypatch.setenv(faults.ENV, "atomic:rename:shard-*.npz:2")
    for name in ("shard-000000-000004.npz", "shard-000000-000004.json", "shard-000004-000008.npz"):
        atomic._fault("write", Path(name), "t")
        atomic._fault("rename", Path(name), "t")
        if name == "shard-000000-000004.npz":
            assert kills == []
    assert len(kills) == 1
    monkeypatch.setattr(faults, "_counts", faults.Counter())
    monkeypatch.setenv(faults.ENV, "metric:ssim_vs_fp")  # no count: the first one
    faults.point("metric:psnr_vs_fp")
    faults.point("metric:ssim_vs_fp")
    assert len(kills) == 2


# ---------------------------------------------------------------------------------------------- the writers
def test_save_artifact_and_feature_caches_write_through_the_one_helper(tmp_path, monkeypatch):
    from orbitquant.harness.metrics.features import extract

    seen = _aim(monkeypatch, "never", "*")
    save_artifact(tmp_path / "a.safetensors", {"w": torch.ones(3)}, {"k": 1})
    assert load_artifact(tmp_path / "a.safetensors")[1] == {"k": 1}

    class Net(torch.nn.Module):
        identity, outputs = "tiny", ("pool",)

        def forward(self, x):
            return {"pool": x.float().flatten(1)[:, :4]}

    feats = extract(torch.rand(6, 3, 4, 4), Net(), batch_size=4, progress=False, cache_dir=tmp_path / "f")
    assert {p.name for s, p, _ in seen if s == "done"} >= {"a.safetensors"}
    (cached,) = [p for s, p, _ in seen if s == "done" and p.suffix == ".npz"]
    with np.load(cached) as d:  # the temp name kept .npz: np.savez wrote the file that was renamed
        assert np.array_equal(d["pool"], feats["pool"].numpy())
    assert _temps(tmp_path) == []


def _mlp(d: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d))


@pytest.mark.parametrize("aim", [(WEIGHTS, "write"), (WEIGHTS, "rename"), (MANIFEST, "write"), (MANIFEST, "rename")])
def test_a_checkpoint_interrupted_while_overwritten_is_never_complete_with_mixed_files(tmp_path, aim, monkeypatch):
    ckpt = tmp_path / "ckpt"
    old, new = _mlp(), _mlp()
    oq.quantize_(old, oq.RTNConfig(w_bits=4, a_bits=8))
    save_quantized(old, ckpt, oq.RTNConfig(w_bits=4, a_bits=8))
    oq.quantize_(new, oq.RTNConfig(w_bits=3, a_bits=8))
    _aim(monkeypatch, aim[1], f"*/{aim[0]}", truncate=aim[1] == "write")
    with pytest.raises(Crash):
        save_quantized(new, ckpt, oq.RTNConfig(w_bits=3, a_bits=8))
    # the old manifest must not vouch for new (or half-written) weights: the directory is incomplete, not wrong
    with pytest.raises(FileNotFoundError, match="is not a quantized checkpoint"):
        read_manifest(ckpt)
    assert _temps(ckpt) == []
    monkeypatch.undo()
    save_quantized(new, ckpt, oq.RTNConfig(w_bits=3, a_bits=8))  # the rerun completes it
    fresh = _mlp()
    load_quantized(fresh, ckpt, oq.RTNConfig(w_bits=3, a_bits=8))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), new(x))


# ---------------------------------------------------------------------------------------------- real runs
_spec = importlib.util.spec_from_file_location("orbitquant_run_script", ROOT / "run.py")
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)


def _run(base: Path, *overrides: str) -> dict:
    """``python run.py results_dir=<base>/runs cache_dir=<base>/cache progress=false <overrides>``, in this process
    (so ``atomic._fault`` can be aimed); returns its results.json."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    args = [f"results_dir={base}/runs", f"cache_dir={base}/cache", "progress=false", "eval=smoke", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args, return_hydra_config=True)
    out = Path(cfg.hydra.run.dir).absolute()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    try:
        _script.main.__wrapped__(task)
    finally:
        HydraConfig.instance().cfg = None
    return json.loads((out / "results.json").read_text())


def _records(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.json")}


RTN = ["quant=rtn", "w_bits=4", "a_bits=8"]
RTN_DIR = "runs/digits/rtn/w4a8/smoke/q0-s0"


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_a_fault_writing_results_json_keeps_the_samples_and_the_rerun_only_scores(tmp_path, stage, monkeypatch):
    want = _run(tmp_path / "clean", *RTN)
    run_dir = tmp_path / "t" / RTN_DIR
    _aim(monkeypatch, stage, "*/results.json", truncate=stage == "write", leave_temp=True)
    with pytest.raises(Crash):
        _run(tmp_path / "t", *RTN)
    monkeypatch.undo()
    assert not (run_dir / "results.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert len(SampleSet.open(run_dir / "samples")) == 20 and (run_dir / "quant_report.json").is_file()
    sampled = _records(run_dir / "samples")
    assert _temps(run_dir) == [".results.json.killed.tmp"]  # what a SIGKILLed writer would leave

    got = _run(tmp_path / "t", *RTN)
    assert "load" not in got["timing"] and "metrics" in got["timing"]  # straight to scoring: nothing redone
    assert _records(run_dir / "samples") == sampled
    assert got["metrics"] == want["metrics"] and got["reference_metrics"] == want["reference_metrics"]
    assert _temps(run_dir) == []  # the leftover was cleared under the run's lock


def test_a_fault_between_write_and_rename_of_a_sample_shard_keeps_the_finished_shards(tmp_path, monkeypatch):
    args = [*RTN, "eval.protocol.batch_size=4"]  # 5 shards of 4
    _run(tmp_path / "clean", *args)
    run_dir = tmp_path / "t" / RTN_DIR
    _aim(monkeypatch, "rename", f"*/{RTN_DIR}/samples/shard-*.npz", nth=3, leave_temp=True)
    with pytest.raises(Crash):
        _run(tmp_path / "t", *args)
    monkeypatch.undo()
    store = run_dir / "samples"
    assert sorted(p.name for p in store.glob("shard-*")) == [
        "shard-000000-000004.json", "shard-000000-000004.npz", "shard-000004-000008.json", "shard-000004-000008.npz"]
    assert _temps(store) == [".shard-000008-000012.npz.killed.tmp"]
    kept = _records(store)
    ref = next((tmp_path / "t/cache/reference").iterdir())
    assert len(SampleSet.open(ref)) == 20  # the fp reference finished before: kept

    got = _run(tmp_path / "t", *args)
    assert "reference_cached" in got["timing"]
    assert {k: v for k, v in _records(store).items() if k in kept} == kept  # resumed after the finished shards
    assert len(_records(store)) == 5 and _temps(run_dir) == []
    assert torch.equal(_stored(run_dir), _stored(tmp_path / "clean" / RTN_DIR))
    want = json.loads((tmp_path / "clean" / RTN_DIR / "results.json").read_text())
    assert got["metrics"] == want["metrics"]


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_a_fault_saving_the_calibration_artifact_keeps_the_reference_and_the_rerun_calibrates(tmp_path, stage,
                                                                                              monkeypatch):
    args = ["quant=smoothquant", "w_bits=4", "a_bits=8", "calib.protocol.n_per_class=1"]
    _aim(monkeypatch, stage, "*/calibration/*.safetensors", truncate=stage == "write")
    with pytest.raises(Crash):
        _run(tmp_path, *args)
    monkeypatch.undo()
    calib = tmp_path / "cache/calibration"
    assert os.listdir(calib) == []  # neither a part of the artifact nor its temp file
    ref = next((tmp_path / "cache/reference").iterdir())
    kept = _records(ref)
    assert len(SampleSet.open(ref)) == 20

    got = _run(tmp_path, *args)
    assert "reference_cached" in got["timing"] and _records(ref) == kept
    assert "saved" in got["quant_report"]["summary"]["calibration"]  # calibrated again, saved whole
    (artifact,) = calib.iterdir()
    assert load_artifact(artifact) is not None  # whole, its checksum verified


@pytest.mark.parametrize("aim", [(WEIGHTS, "rename"), (MANIFEST, "write")])
def test_a_fault_in_save_quantized_leaves_no_complete_looking_checkpoint_and_the_rerun_saves_it(tmp_path, aim,
                                                                                                 monkeypatch):
    ckpt = tmp_path / "ckpt"
    args = [*RTN, f"quant_checkpoint={ckpt}"]
    _aim(monkeypatch, aim[1], f"*/ckpt/{aim[0]}", truncate=aim[1] == "write")
    with pytest.raises(Crash):
        _run(tmp_path / "t", *args)
    monkeypatch.undo()
    assert not (ckpt / MANIFEST).exists() and _temps(ckpt) == []
    assert (ckpt / WEIGHTS).exists() == (aim[0] == MANIFEST)  # the weights first, the manifest last
    assert len(SampleSet.open(next((tmp_path / "t/cache/reference").iterdir()))) == 20

    got = _run(tmp_path / "t", *args)
    assert got["quant_report"]["summary"]["saved_to"] == str(ckpt) and read_manifest(ckpt)
    loaded = _run(tmp_path / "other", *args)  # another results dir: loads the checkpoint instead of quantizing
    assert loaded["quant_report"]["summary"]["loaded_from"] == str(ckpt)
    assert loaded["metrics"] == got["metrics"]
