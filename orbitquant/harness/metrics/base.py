"""The metric contract -- a named computation over samples (and the fp reference), with a direction -- and the
streaming helpers every metric reads samples through.

A sample set is anything with the :class:`SampleSource` interface: ``types.Samples`` (in memory: calibration, tests,
small sets) and ``samplestore.SampleSet`` (a run's samples on disk, paper scale). Metrics never touch ``.images``:
they read :meth:`SampleSource.batches`, so a metric holds one batch of images at a time (plus features, per-sample
values and running statistics) whatever the sample count. Batch sizes count *images* -- video frames for videos --
because that is what a feature network sees and what fills memory; a video longer than the batch is read alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from orbitquant.harness.types import MetricResult, Samples


@runtime_checkable
class SampleSource(Protocol):
    """What metrics read: ``types.Samples`` and ``samplestore.SampleSet`` both provide it."""

    labels: torch.Tensor  # (N,) int64, all in memory
    meta: dict  # sampler metadata: prompts under "prompts"; "source" = where the samples live on disk, if anywhere

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, uint8: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` in sample order: float32 in [-1, 1] (or uint8 rounded like a saved PNG),
        (B, C, H, W) or videos (B, F, C, H, W)."""
        ...

    def fingerprint(self) -> str:
        """Identifies the sample values (keys feature caches and evaluator work folders)."""
        ...


class Metric:
    """``compute(samples, reference, ctx)``; ``reference`` is the fp model's samples under the same noise."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    needs_reference: ClassVar[bool] = False
    context_cls: ClassVar[type | None] = None  # shared lazy resources (feature nets, real data), one per run

    def needs(self) -> list:
        """Everything this metric needs to run besides its options, as ``preflight.Need`` items (weights with their
        published hashes, reference files and their keys, evaluator environments, CUDA). Checked before the model
        loads, so a run never samples for hours and then fails at scoring; ``run.py preflight=true`` prints them.
        Raises ValueError for a bad option (a config error, not a missing piece)."""
        return []

    def check(self) -> None:
        """Raise FileNotFoundError naming every missing need and its fix (ValueError for a bad option)."""
        from orbitquant.harness.preflight import raise_missing

        raise_missing(self.needs(), f"metric {self.name}")

    def compute(self, samples: SampleSource, reference: SampleSource | None, ctx: Any) -> MetricResult:
        raise NotImplementedError

    def result(self, value: float, n: int, **extra: float) -> MetricResult:
        return MetricResult(self.name, float(value), self.higher_is_better, n, extra)


# ---------------------------------------------------------------------------------------------- reading in batches
#: the default read batch of metrics without a network batch size (PSNR, SSIM, the digits metrics): as many images
#: as fill this many bytes of float32 -- 4 256² images, one 1024² image (at least one sample is read), or a whole
#: digits protocol (500 8x8 images: one batch, so the numbers are those of scoring it at once). Small on purpose:
#: SSIM's windowed statistics take ~30x the batch, and a run's peak must not depend on how many samples it scores
#: (measured, SSIM on 256² float32 stores: 64 MiB batches peaked +2.1 GB higher at 64 samples than at 8; 8 MiB, +110
#: MB at 128; 3 MiB, +9 MB; scripts/bench_memory.py for whole runs)
READ_BYTES = 3 * 2**20


def item_shape(samples: SampleSource) -> tuple[int, ...]:
    """One sample's shape, (C, H, W) or (F, C, H, W), read from the first sample: a store records no shapes, and the
    read batch must be sized before the first read (for a store this reads its first shard once more)."""
    for x, _ in samples.batches(1, uint8=True):
        return tuple(x.shape[1:])
    return ()


def frames_per_item(samples: SampleSource) -> int:
    """Frames per sample (1 for images)."""
    shape = item_shape(samples)
    return shape[0] if len(shape) == 4 else 1


def items_per_read(samples: SampleSource, images: int | None) -> int:
    """How many samples make about ``images`` images (video frames) -- the read batch of a metric whose batch size
    counts images; ``None``: as many as fill :data:`READ_BYTES` as float32. At least one sample."""
    if images is not None and images < 1:
        raise ValueError(f"batch_size must be at least 1, got {images}")
    shape = item_shape(samples)
    frames = shape[0] if len(shape) == 4 else 1
    if images is None:
        images = max(1, READ_BYTES // (4 * math.prod(shape[-3:]))) if shape else 1
    return max(1, images // frames)


def item_batches(samples: SampleSource, images: int | None, *, uint8: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``samples.batches`` with the batch sized in images (see :func:`items_per_read`)."""
    if len(samples) == 0:
        raise ValueError("the sample set is empty: nothing to score")
    return samples.batches(items_per_read(samples, images), uint8=uint8)


def paired_batches(samples: SampleSource, reference: SampleSource | None, images: int | None, *, uint8: bool = False
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(sample batch, reference batch, labels)`` of the samples and the fp reference, item by item in step (item
    k of both was drawn under the same noise and conditioning). Raises ValueError if there is no reference or the
    two sets come from different protocols (count, labels, image shape) -- checked on the labels before any image
    is read, and on every batch's shape."""
    if reference is None:
        raise ValueError("this metric compares with the fp reference samples, but none were given")
    if len(samples) != len(reference) or not torch.equal(samples.labels, reference.labels):
        raise ValueError("samples and fp reference differ in shape or labels; they must come from the same protocol")
    return _in_step(samples, reference, items_per_read(samples, images), uint8)


def _in_step(samples: SampleSource, reference: SampleSource, per: int, uint8: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    a_it, b_it = samples.batches(per, uint8=uint8), reference.batches(per, uint8=uint8)
    for (a, la), (b, lb) in zip(a_it, b_it, strict=True):
        if a.shape != b.shape or not torch.equal(la, lb):
            raise ValueError("samples and fp reference differ in shape or labels; they must come from the same "
                             "protocol")
        yield a, b, la


def frames(x: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) videos -> (B * F, C, H, W) frames; images pass through."""
    return x.flatten(0, 1) if x.ndim == 5 else x


def rebatch(chunks: Iterable[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Regroup a stream of row-aligned tensor tuples into tuples of exactly ``size`` rows (the last may be smaller).

    A network then sees the same batches -- rows ``[0, size)``, ``[size, 2 size)``, ... of the whole set -- however
    the samples were read (store shards, video lengths, read batch), so its outputs are bit-identical to running it
    on the whole set in ``size`` chunks, as the metrics did before they streamed. Holds under ``size`` pending rows
    besides the incoming chunk.
    """
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    pending: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk[0])
        while count >= size:
            out, pending = _split(pending, size)
            count -= size
            yield out
    if count:
        yield tuple(torch.cat(parts) for parts in zip(*pending, strict=True))


def _split(pending: list[tuple[torch.Tensor, ...]], k: int) -> tuple[tuple[torch.Tensor, ...], list]:
    """The first ``k`` rows of ``pending`` (concatenated) and what remains."""
    taken, rest, need = [], list(pending), k
    while need:
        head = rest.pop(0)
        n = len(head[0])
        if n > need:
            taken.append(tuple(t[:need] for t in head))
            rest.insert(0, tuple(t[need:] for t in head))
            need = 0
        else:
            taken.append(head)
            need -= n
    out = taken[0] if len(taken) == 1 else tuple(torch.cat(parts) for parts in zip(*taken, strict=True))
    return out, rest


def cat_or_empty(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    if not parts:
        raise ValueError(f"no {what}: the sample set is empty")
    return torch.cat(parts)


def head(samples: SampleSource, k: int) -> torch.Tensor:
    """The first ``k`` samples (float32 in [-1, 1]) -- previews, never a whole set."""
    for x, _ in samples.batches(max(1, min(k, len(samples)))):
        return x
    return torch.empty(0)


def work_dir(samples: SampleSource, name: str) -> Path | None:
    """Where a metric keeps derived files of samples loaded from disk (features, evaluator images/videos):
    ``<store>/<name>`` for a sample store (its shards are untouched), ``<folder of the file>/<name>`` for a legacy
    ``samples.npz``; None for samples that live only in memory."""
    src = samples.meta.get("source")
    if not src:
        return None
    src = Path(src)
    return (src if src.is_dir() else src.parent) / name


# ---------------------------------------------------------------------------------------------- opening run samples
def open_samples(path: str | Path) -> SampleSource:
    """A run's (or the fp reference's) samples from disk: a sample store directory (``store.json`` + shards, what
    runs write now) opened as ``samplestore.SampleSet`` -- streamed, never loaded whole -- or a legacy
    ``samples.npz`` (``images``, ``labels``; also found as ``<dir>/samples.npz``) loaded into ``types.Samples``.
    ``meta['source']`` names what was opened (derived files are cached next to it, see :func:`work_dir`)."""
    from orbitquant.harness.samplestore import STORE_FILE, SampleSet

    path = Path(path)
    if path.is_dir() and (path / STORE_FILE).exists():
        return SampleSet.open(path)
    npz = path / "samples.npz" if path.is_dir() else path
    if npz.suffix == ".npz" and npz.is_file():
        with np.load(npz) as data:
            images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
        return Samples(images=images, labels=labels, meta={"source": str(npz)})
    raise FileNotFoundError(f"no samples at {path}: expected a sample store directory ({STORE_FILE} + shard files) "
                            "or a samples.npz")
