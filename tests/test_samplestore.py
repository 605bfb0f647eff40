"""Sample stores: shards written atomically with checksums, read back in batches, resumed after a kill, and every
bad state (another config's samples, a half-written or corrupted shard, a missing item, a full disk) either
repaired by re-sampling or reported in one line -- never silently used."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from orbitquant.harness.samplestore import (
    DiskFull,
    MemorySink,
    SampleSet,
    StoreError,
    StoreWriter,
    atomic_write,
    from_stored,
    to_stored,
)
from orbitquant.harness.types import Samples


def _images(n: int, seed: int = 0, shape=(3, 5, 4)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _fill(path, images, labels, bounds, fmt="float32", key="k"):
    w = StoreWriter(path, key, len(images), fmt)
    for a, b in bounds:
        if not w.has(a, b):
            w.write(a, b, images[a:b], labels[a:b], forwards=2 * (b - a))
    w.finish({"seed": 3})
    w.close()
    return w


BOUNDS = [(0, 4), (4, 8), (8, 11)]


@pytest.mark.parametrize("fmt", ["float32", "uint8"])
def test_round_trip_in_batches_that_do_not_divide_the_shards(tmp_path, fmt):
    x, lab = _images(11), torch.arange(11) % 3
    _fill(tmp_path / "s", x, lab, BOUNDS, fmt)
    s = SampleSet.open(tmp_path / "s")
    assert len(s) == 11 and torch.equal(s.labels, lab)
    assert s.meta["seed"] == 3 and s.meta["denoiser_forwards"] == 22
    for bs in (1, 3, 5, 11, 64):
        got = list(s.batches(bs))
        assert [len(b) for b, _ in got][:-1] == [bs] * (len(got) - 1)
        imgs = torch.cat([b for b, _ in got])
        want = x if fmt == "float32" else from_stored(to_stored(x, "uint8"))
        assert torch.equal(imgs, want)  # float32: the sampler's exact values
        assert torch.equal(torch.cat([lb for _, lb in got]), lab)
    u8 = torch.cat([b for b, _ in s.batches(4, uint8=True)])
    assert u8.dtype == torch.uint8 and torch.equal(u8, torch.from_numpy(to_stored(x, "uint8")))
    # the in-memory Samples gives the same batches
    mem = Samples(images=x if fmt == "float32" else from_stored(to_stored(x, "uint8")), labels=lab)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(mem.batches(3), s.batches(3)))


def test_uint8_storage_is_exactly_png_rounding():
    u = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_stored(from_stored(u), "uint8"), u)
    x = torch.tensor([-1.0, -0.99999, 0.0, 0.00196, 1.0, 1.5])
    assert to_stored(x, "uint8").tolist() == [0, 0, 128, 128, 255, 255]  # round(255 * (x + 1) / 2), clamped


def test_a_second_writer_skips_finished_shards_and_repairs_broken_ones(tmp_path):
    x, lab = _images(11), torch.arange(11)
    path = tmp_path / "s"
    _fill(path, x, lab, BOUNDS[:2])
    # a kill between the .npz and its record, a truncated shard, and a temp file of a killed writer
    (path / "shard-000008-000011.npz").write_bytes(b"partial")
    data = (path / "shard-000004-000008.npz").read_bytes()
    (path / "shard-000004-000008.npz").write_bytes(data[: len(data) // 2])
    (path / ".shard-000008-000011.npz.abc.tmp").write_bytes(b"x")
    w = StoreWriter(path, "k", 11, "float32")
    assert set(w.finished) == {(0, 4)}  # only the intact shard counts
    assert not (path / "shard-000008-000011.npz").exists() and not list(path.glob(".shard-*"))
    assert not (path / "shard-000004-000008.npz").exists()
    w.close()
    _fill(path, x, lab, BOUNDS)
    assert torch.equal(torch.cat([b for b, _ in SampleSet.open(path).batches(5)]), x)


def test_reading_a_shard_changed_on_disk_is_an_error_not_wrong_numbers(tmp_path):
    x, lab = _images(11), torch.arange(11)
    _fill(tmp_path / "s", x, lab, BOUNDS)
    s = SampleSet.open(tmp_path / "s")
    f = tmp_path / "s/shard-000004-000008.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its checksum"):
        list(s.batches(4))


def test_missing_items_are_named_and_another_configs_store_is_refused(tmp_path):
    x, lab = _images(11), torch.arange(11)
    _fill(tmp_path / "s", x, lab, BOUNDS[:2])
    with pytest.raises(StoreError, match="missing samples from item 8 of 11"):
        SampleSet.open(tmp_path / "s")
    with pytest.raises(StoreError, match="another configuration.*key: 'k' -> 'other'.*overwrite=true"):
        StoreWriter(tmp_path / "s", "other", 11, "float32")
    assert (tmp_path / "s/shard-000000-000004.npz").exists()  # refused: nothing deleted
    w = StoreWriter(tmp_path / "s", "other", 11, "float32", overwrite=True)
    assert w.finished == {} and not list((tmp_path / "s").glob("shard-*"))
    w.close()


def test_a_full_disk_keeps_finished_shards_and_says_how_to_resume(tmp_path, monkeypatch):
    x, lab = _images(11), torch.arange(11)
    path = tmp_path / "s"
    w = StoreWriter(path, "k", 11, "float32")
    w.write(0, 4, x[:4], lab[:4])
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=r"no space left.*1 finished shards .* are kept.*run the same command again"):
        w.write(4, 8, x[4:8], lab[4:8])
    monkeypatch.setattr(os, "fsync", real_fsync)
    w.close()
    assert not list(path.glob(".shard-*"))  # no temp file left behind
    assert set(StoreWriter(path, "k", 11, "float32").finished) == {(0, 4)}


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    f = tmp_path / "a.json"
    atomic_write(f, lambda fh: fh.write(b"old"))

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(f, boom)
    assert f.read_bytes() == b"old" and list(tmp_path.iterdir()) == [f]


def test_the_store_lock_keeps_a_second_writer_out_until_the_first_closes(tmp_path):
    w = StoreWriter(tmp_path / "s", "k", 4, "float32")
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'a+');\n"
             "try:\n fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n print('held')")
    run = lambda: subprocess.run([sys.executable, "-c", probe, str(tmp_path / "s/.lock")], capture_output=True, check=False,
                                 text=True).stdout.strip()
    assert run() == "held"
    w.close()
    assert run() == "free"


def test_memory_sink_concatenates_in_order():
    sink = MemorySink()
    x = _images(5)
    sink.write(0, 2, x[:2], [0, 1], forwards=4)
    sink.write(2, 5, x[2:], [2, 3, 4], forwards=6)
    s = sink.finish({"steps": 2})
    assert torch.equal(s.images, x) and s.labels.tolist() == [0, 1, 2, 3, 4]
    assert s.meta == {"steps": 2, "denoiser_forwards": 10}


def test_store_records_are_plain_json_with_checksums(tmp_path):
    _fill(tmp_path / "s", _images(11), torch.arange(11), BOUNDS)
    rec = json.loads((tmp_path / "s/shard-000000-000004.json").read_text())
    assert rec["start"] == 0 and rec["stop"] == 4 and len(rec["sha256"]) == 64 and rec["forwards"] == 8
    assert json.loads((tmp_path / "s/store.json").read_text()) == {"key": "k", "n": 11, "format": "float32"}


def test_mp4_store_keeps_the_file_vbench_reads_and_decodes_its_frames(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from orbitquant.harness.metrics.vbench import write_videos
    from orbitquant.harness.samplestore import encode_mp4

    g = torch.Generator().manual_seed(0)
    clips = (torch.rand(3, 9, 3, 16, 24, generator=g) * 0.2 + torch.linspace(-0.8, 0.8, 24)).clamp(-1, 1)
    w = StoreWriter(tmp_path / "v", "k", 3, "mp4")
    w.write(0, 2, clips[:2], [0, 1])
    w.write(2, 3, clips[2:], [1])
    w.finish({"prompts": ["a cat", "a dog"]})
    w.close()
    s = SampleSet.open(tmp_path / "v")
    files = list(s.encoded())
    assert files == [encode_mp4(c) for c in clips]  # deterministic: the same bytes save_mp4 writes
    got = torch.cat([x for x, _ in s.batches(2)])
    assert got.shape == clips.shape
    err = (got - clips).abs().mean().item()
    assert 0 < err < 0.1  # H.264 at quality 5 on these frames: lossy (0.05), not wrapped bytes (0.85 was a bug)
    with pytest.raises(ValueError, match="store=mp4 stores videos"):
        StoreWriter(tmp_path / "i", "k", 1, "mp4").write(0, 1, torch.zeros(1, 3, 8, 8), [0])
    # the VBench export copies the stored files byte for byte, and equals writing them from the frames
    idx = write_videos(s, tmp_path / "out")
    mem = Samples(images=torch.from_numpy(to_stored(clips, "uint8")).float() / 127.5 - 1, labels=s.labels,
                  meta=s.meta)
    idx2 = write_videos(mem, tmp_path / "out2")
    assert idx == idx2 == {"a cat-0.mp4": 0, "a dog-0.mp4": 1, "a dog-1.mp4": 2}
    for name in idx:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
