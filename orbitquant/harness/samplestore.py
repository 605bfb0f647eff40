"""Samples on disk, streamed: written shard by shard as they are generated, read back batch by batch.

A paper protocol is thousands of 1024² images or hundreds of videos (63 GB of float32 for COCO-5k at 1024²), so a
run never holds a whole sample set in memory: the sampler writes each finished batch as one shard, and metrics read
the shards back in batches (only features and running statistics stay in memory). Shards are also the unit of
resume: a run killed at any point restarts from the last finished shard, and because sample k's noise depends only
on (seed, k) and the batches are the same, the final samples are bit-identical to an uninterrupted run.

A store is a directory::

    store.json                         {"key": what wrote it, "n": items, "format": "uint8" | "float32"}
    shard-<start:06d>-<stop:06d>.npz   images (uint8 or float32 in [-1, 1]), labels (int64)
    shard-<start:06d>-<stop:06d>.json  {"start", "stop", "sha256" of the .npz, "bytes", "forwards", "labels"}: after
                                       the .npz, so a shard counts as finished only when its record exists
    meta.json                          the sampler's metadata (prompts, steps, guidance, seed)

Every write goes to a unique temp file, is fsynced and renamed into place (``atomic_write``), and every read checks
the shard's SHA-256: a half-written, truncated or corrupted shard is never used -- the writer deletes it and samples
it again. ``uint8`` is how images are saved anyway (PNG rounding, ``features.to_uint8``) and what FID, CLIP, GenEval
and VBench read; ``float32`` keeps the exact sampler output (the digits protocols, where PSNR against the fp model
is measured on floats and the arrays are tiny); ``mp4`` keeps each video as the H.264 file a video pipeline's
``export_to_video`` writes (``viz.save_mp4``, quality 5, ``MP4_FPS``) -- the file VBench reads, so the VBench
metric copies it as is, and a compressed video instead of raw uint8 frames (97 MB per 81-frame 832x480 video);
other metrics read its decoded frames.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from orbitquant.quant import faults
from orbitquant.harness.types import Samples
from orbitquant.harness.viz import decode_mp4, encode_mp4
from orbitquant.quant.atomic import DiskFull, atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMATS = ("float32", "uint8", "mp4")
#: frame rate written into stored mp4 videos (Wan 2.1's 16 fps; VBench's default); metrics read the frames
MP4_FPS = 16
STORE_FILE, META_FILE = "store.json", "meta.json"


class StoreError(RuntimeError):
    """A sample store cannot be used as asked (another run's samples, missing shards, a full disk)."""


# ---------------------------------------------------------------------------------------------- conversion
def to_stored(images: torch.Tensor, fmt: str) -> np.ndarray:
    """Sampler output in [-1, 1] -> the stored array (``uint8``: rounded like a saved PNG)."""
    if fmt == "uint8":
        return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return images.detach().float().cpu().numpy()


def from_stored(arr: np.ndarray) -> torch.Tensor:
    """A stored array -> float32 in [-1, 1]. For uint8, ``u / 127.5 - 1`` rounds back to exactly ``u``."""
    x = torch.from_numpy(arr)
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------------------------------------- sinks
class MemorySink:
    """Collects batches in memory (calibration, tests, small protocols): ``finish`` returns :class:`Samples`."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.forwards = 0

    def has(self, start: int, stop: int) -> bool:
        return False

    def write(self, start: int, stop: int, images: torch.Tensor, labels, forwards: int = 0) -> None:
        self.chunks.append(images.detach().float().cpu())
        self.labels.append(torch.as_tensor(labels, dtype=torch.int64))
        self.forwards += forwards

    def finish(self, meta: dict) -> Samples:
        images = torch.cat(self.chunks) if self.chunks else torch.empty(0)
        labels = torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.int64)
        return Samples(images=images, labels=labels, meta={**meta, "denoiser_forwards": self.forwards})


class DiscardSink(MemorySink):
    """Runs the sampler for its side effects only (calibration collectors): nothing is kept but the forward count."""

    def write(self, start: int, stop: int, images: torch.Tensor, labels, forwards: int = 0) -> None:
        self.forwards += forwards


def _shard_name(start: int, stop: int) -> str:
    return f"shard-{start:06d}-{stop:06d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
        return rec if {"start", "stop", "sha256"} <= set(rec) else None
    except (OSError, ValueError):
        return None


class StoreWriter:
    """Writes one sample set into ``path`` shard by shard and skips the shards a previous attempt finished.

    ``key`` identifies what produces the samples (the run's config hash, or the fp reference's cache key): a store
    written under another key is refused with :class:`StoreError` (stale samples are never mixed into a run), unless
    ``overwrite`` discards it. ``n`` is the protocol's item count; ``fmt`` the stored dtype (``FORMATS``).

    ``lock`` holds an exclusive ``flock`` on the store until :meth:`close`, so two jobs of a sweep that need the
    same fp reference do not sample it twice at once (the second waits, then finds every shard finished; the OS
    drops the lock of a killed holder). Ranks of one torchrun run share a store without it: each writes only its
    own items, and only the rank with ``clean`` checks the key, removes broken shards and writes ``store.json``
    (before the others open the store).
    """

    def __init__(self, path: str | Path, key: str, n: int, fmt: str = "uint8", overwrite: bool = False,
                 clean: bool = True, lock: bool = True, name: str = "store") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown sample format {fmt!r}; valid: {', '.join(FORMATS)}")
        self.path, self.key, self.n, self.fmt, self.name = Path(path), key, n, fmt, name
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = None
        if lock:
            import fcntl

            self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until close()
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        if clean:
            self._claim({"key": key, "n": n, "format": fmt}, overwrite)
        self.finished = self._verified_records(clean)

    def _claim(self, want: dict, overwrite: bool) -> None:
        """Refuse (or with ``overwrite`` discard) another configuration's samples; drop temp files of a killed
        writer; record what this store holds."""
        have = None
        if (self.path / STORE_FILE).exists():
            try:
                have = json.loads((self.path / STORE_FILE).read_text())
            except ValueError:
                have = None
        if have is not None and have != want and not overwrite:
            self.close()
            diff = ", ".join(f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v)
            raise StoreError(f"{self.path} holds unfinished samples of another configuration ({diff}); pass "
                             "overwrite=true to discard them, or give this run its own directory")
        if overwrite or (have is not None and have != want):
            clear(self.path)
        for stray in self.path.glob(".shard-*"):
            stray.unlink(missing_ok=True)
        atomic_write_json(self.path / STORE_FILE, want)

    def close(self) -> None:
        """Release the store's lock (if held)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _verified_records(self, clean: bool) -> dict[tuple[int, int], dict]:
        """Finished shards whose bytes match their record; with ``clean`` any other shard file is removed (it will
        be sampled again)."""
        out = {}
        for rec_path in sorted(self.path.glob("shard-*.json")):
            rec = _read_record(rec_path)
            npz = rec_path.with_suffix(".npz")
            ok = rec is not None and npz.is_file() and _sha256(npz.read_bytes()) == rec["sha256"]
            if ok:
                out[(rec["start"], rec["stop"])] = rec
            elif clean:
                log.warning("sample shard %s is incomplete or corrupted; it will be sampled again", npz)
                rec_path.unlink(missing_ok=True)
                npz.unlink(missing_ok=True)
        for npz in self.path.glob("shard-*.npz") if clean else ():  # its record never written (killed in between)
            if not npz.with_suffix(".json").exists():
                npz.unlink(missing_ok=True)
        return out

    def has(self, start: int, stop: int) -> bool:
        return (start, stop) in self.finished

    def write(self, start: int, stop: int, images: torch.Tensor, labels, forwards: int = 0) -> None:
        """Store items ``[start, stop)``: the .npz first, then its record (the commit point)."""
        if len(images) != stop - start:
            raise ValueError(f"shard [{start}, {stop}) got {len(images)} samples")
        buf = io.BytesIO()
        arrays = {"labels": np.asarray(labels, dtype=np.int64)}
        if self.fmt == "mp4":
            if images.ndim != 5:
                raise ValueError("eval.store=mp4 stores videos (N, F, C, H, W); store images as uint8 or float32")
            arrays.update({f"mp4_{i}": np.frombuffer(encode_mp4(v, MP4_FPS), dtype=np.uint8)
                           for i, v in enumerate(images)})
        else:
            arrays["images"] = to_stored(images, self.fmt)
        (np.savez_compressed if self.fmt == "uint8" else np.savez)(buf, **arrays)
        data = buf.getvalue()
        name = _shard_name(start, stop)
        rec = {"start": start, "stop": stop, "sha256": _sha256(data), "bytes": len(data), "forwards": int(forwards),
               "labels": arrays["labels"].tolist()}  # opening a store reads labels here, not every shard
        try:
            atomic_write(self.path / f"{name}.npz", lambda f: f.write(data))
            faults.point(f"{self.name}:npz")
            atomic_write_json(self.path / f"{name}.json", rec)
        except DiskFull as e:
            raise DiskFull(f"{e} ({len(self.finished)} finished shards of {self.path} are kept); free space and run "
                           "the same command again to resume from them") from None
        self.finished[(start, stop)] = rec
        faults.point(f"{self.name}:shard")

    def finish(self, meta: dict) -> None:
        """Record the sampler's metadata (identical on every rank of a sharded run)."""
        atomic_write_json(self.path / META_FILE, {k: v for k, v in meta.items() if k != "denoiser_forwards"})


def cached_samples(path: str | Path, key: str, n: int, fmt: str, generate) -> tuple[SampleSet, bool]:
    """The finished store at ``path`` if there is one, else ``generate(sink=writer)`` into it (resuming any
    finished shards) -- one process, e.g. a script's fp reference. Returns ``(samples, was_cached)``."""
    try:
        return SampleSet.open(path, n), True
    except StoreError:
        pass
    writer = StoreWriter(path, key, n, fmt)
    try:
        generate(sink=writer)
    finally:
        writer.close()
    return SampleSet.open(path, n), False


def check_owner(path: str | Path, key: str) -> None:
    """Raise :class:`StoreError` if ``path`` holds samples written under another key (checked before a run loads
    its model, so a mismatch costs a second, not a model load)."""
    f = Path(path) / STORE_FILE
    try:
        have = json.loads(f.read_text()).get("key")
    except (OSError, ValueError):
        return
    if have != key:
        raise StoreError(f"{Path(path)} holds unfinished samples of another configuration (key {have!r}, this run "
                         f"{key!r}); pass overwrite=true to discard them, or give this run its own directory")


def clear(path: Path) -> None:
    """Remove a store's files (shards, records, metadata) but nothing else in the directory."""
    if not path.is_dir():
        return
    for p in list(path.glob("shard-*")) + list(path.glob(".shard-*")) + [path / STORE_FILE, path / META_FILE]:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class SampleSet:
    """A finished sample set on disk: the labels and metadata in memory, the images read shard by shard.

    Use :meth:`batches`; ``images`` is deliberately absent, so no metric can load a paper-size set at once.
    """

    path: Path
    shards: list[dict]
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)
    fmt: str = "uint8"
    key: str = ""  # what wrote it (StoreWriter's key)

    @classmethod
    def open(cls, path: str | Path, n: int | None = None) -> SampleSet:
        """The store at ``path``; raises :class:`StoreError` naming the first missing item if the shards do not
        cover ``0..n`` (``n`` defaults to the store's own count)."""
        path = Path(path)
        try:
            spec = json.loads((path / STORE_FILE).read_text())
        except (OSError, ValueError):
            raise StoreError(f"{path} is not a sample store (no readable {STORE_FILE})") from None
        n = spec["n"] if n is None else n
        by_start: dict[int, dict] = {}  # the longest shard at each start (a resume with another world size)
        for rec_path in path.glob("shard-*.json"):
            rec = _read_record(rec_path)
            best = by_start.get(rec["start"]) if rec is not None else None
            if rec is not None and rec_path.with_suffix(".npz").is_file() and (
                    best is None or rec["stop"] > best["stop"]):
                by_start[rec["start"]] = rec
        chain, pos = [], 0
        while pos < n:
            if pos not in by_start:
                raise StoreError(f"{path} is missing samples from item {pos} of {n}; run the same command again to "
                                 "sample them (finished shards are kept)")
            chain.append(by_start[pos])
            pos = by_start[pos]["stop"]
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        meta["denoiser_forwards"] = sum(r.get("forwards", 0) for r in chain)
        labels = [np.asarray(r["labels"], dtype=np.int64) if "labels" in r else cls._load(path, r)["labels"]
                  for r in chain]
        lab = torch.from_numpy(np.concatenate(labels)) if labels else torch.empty(0, dtype=torch.int64)
        return cls(path, chain, lab, {**meta, "source": str(path)}, spec.get("format", "uint8"), spec.get("key", ""))

    @staticmethod
    def _load(path: Path, rec: dict, decode: bool = True) -> dict:
        npz = path / f"{_shard_name(rec['start'], rec['stop'])}.npz"
        data = npz.read_bytes()
        if _sha256(data) != rec["sha256"]:
            raise StoreError(f"sample shard {npz} fails its checksum (changed or corrupted on disk); delete it and "
                             "run the same command again to re-sample it")
        with np.load(io.BytesIO(data)) as z:
            out = {k: z[k] for k in z.files}
        mp4 = sorted((k for k in out if k.startswith("mp4_")), key=lambda k: int(k[4:]))
        if mp4:
            out["mp4"] = [out.pop(k).tobytes() for k in mp4]
            if decode:
                out["images"] = np.stack([decode_mp4(b) for b in out["mp4"]])
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """Identifies the sample values (the shards' checksums): keys feature caches."""
        return _sha256("|".join(r["sha256"] for r in self.shards).encode())

    def batches(self, batch_size: int, *, uint8: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` in order, ``batch_size`` at a time (the last may be smaller): float32 in [-1, 1],
        or with ``uint8=True`` the stored uint8 values (as ``features.to_uint8`` would give). At most one shard and
        one batch are in memory."""
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        count = 0
        for rec in self.shards:
            z = self._load(self.path, rec)
            pending.append((z["images"], z["labels"]))
            count += len(z["labels"])
            while count >= batch_size:
                yield self._take(pending, batch_size, uint8)
                count -= batch_size
        if count:
            yield self._take(pending, count, uint8)

    @staticmethod
    def _take(pending: list, k: int, uint8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labs, need = [], [], k
        while need:
            a, b = pending[0]
            imgs.append(a[:need])
            labs.append(b[:need])
            if len(a) > need:
                pending[0] = (a[need:], b[need:])
                need = 0
            else:
                pending.pop(0)
                need -= len(a)
        arr = np.concatenate(imgs)
        if uint8:
            x = torch.from_numpy(arr if arr.dtype == np.uint8 else to_stored(torch.from_numpy(arr), "uint8"))
        else:
            x = from_stored(arr)
        return x, torch.from_numpy(np.concatenate(labs))

    def encoded(self) -> Iterator[bytes]:
        """Each sample's stored mp4 file, in order (``mp4`` stores only): what the VBench metric copies as is."""
        if self.fmt != "mp4":
            raise ValueError(f"{self.path} stores {self.fmt} arrays, not mp4 files")
        for rec in self.shards:
            yield from self._load(self.path, rec, decode=False)["mp4"]
