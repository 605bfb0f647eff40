"""Host memory of one run by stage (load, one batch, metric state, a first run's reference decode): an outline from
the shipped configs, nominal pipeline sizes and the metrics' state, flat in the sample count except the metric
state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orbitquant.harness.plan.denoiser import adapter_class, denoiser_params
from orbitquant.harness.plan.protocol import ProtocolCost

#: Reference-set sizes for Inception metrics when the reference is not on this machine (the metric's ``limit`` wins).
NOMINAL_REAL_SET: dict[str, tuple[int, int, str]] = {  # eval name -> (images, side in px, source)
    "imagenet": (10_000, 256, "ADM VIRTUAL_imagenet256_labeled.npz arr_0: 10,000 256^2 images"),
    "coco_fid_clip": (5_000, 299, "the 5,000 COCO 2014 val images of the captions used, clean-resized to 299"),
    "mjhq": (30_000, 299, "MJHQ-30K: 30,000 images, clean-resized to 299"),
}
#: Inception features kept per image by the FID/sFID/IS/precision/recall context: pool3 2048 + logits 1008 +
#: spatial 2023 float32 (orbitquant/harness/metrics/features.py InceptionV3.outputs).
INCEPTION_FEATURE_BYTES = (2048 + 1008 + 2023) * 4

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryOutline:
    """Peak host memory by stage of one run (flat in the sample count except the metric state), in bytes."""

    load: int  # the pipeline's weights in the run's dtype (from_pretrained materialises them on the host first)
    load_detail: str
    batch: int  # one batch of sampler output: float32 on the CPU (+ its uint8 copy for a uint8 store)
    batch_detail: str
    metrics: int  # metric state at scoring
    metrics_detail: str
    first_run_extra: int  # decoding a real reference image set once (features cached afterwards)
    first_run_detail: str

    @property
    def peak(self) -> int:
        return max(self.load, self.batch + self.metrics + self.first_run_extra)


def memory_outline(cost: ProtocolCost, metrics: list, dtype: str, eval_name: str) -> MemoryOutline:
    """Host memory outline of one run of ``cost`` scored by ``metrics`` (built metric objects)."""
    from orbitquant.harness.metrics.inception import InceptionMetric

    nb = DTYPE_BYTES.get(dtype, 4)
    denoiser = denoiser_params(cost.model)
    # the pipeline parts besides the denoiser: nominal sizes the family's adapter declares (``pipeline_extras``)
    extras = adapter_class(cost.adapter).pipeline_extras
    load = (denoiser + sum(p for _, p in extras)) * nb
    load_detail = (f"denoiser {denoiser / 1e9:.3g} B params (shipped config)" if denoiser else "denoiser: no shipped "
                   "config (tiny test pipeline, negligible)") + "".join(f" + {n} {p / 1e9:.3g} B (nominal)"
                                                                       for n, p in extras) + f", x {nb} B ({dtype})"
    elems = (cost.bytes_per_sample - 8) // (4 if cost.store == "float32" else 1) if cost.bytes_per_sample else 0
    batch = cost.batch_size * elems * (4 + (0 if cost.store == "float32" else 1))
    batch_detail = f"{cost.batch_size} x {elems:,} values x (4 B float32 output" + (
        ")" if cost.store == "float32" else f" + 1 B {cost.store} shard)")
    n = cost.n_samples
    inc = [m for m in metrics if isinstance(m, InceptionMetric)]
    others = [m for m in metrics if not isinstance(m, InceptionMetric)]
    state, parts, extra, extra_detail = 0, [], 0, "none"
    if inc:
        real_n, side, real_src = _real_set(inc, eval_name)
        sets = 2 * n + real_n
        state += sets * INCEPTION_FEATURE_BYTES
        parts.append(f"Inception features (2048+1008+2023 float32 = {INCEPTION_FEATURE_BYTES:,} B/image) of samples, "
                     f"fp reference and real set: (2 x {n:,} + {real_n:,}) images [{real_src}]")
        if real_n and side:
            extra, extra_detail = _reference_decode(inc, real_n, side)
    if others:
        state += 2 * n * 8 * len(others)
        parts.append(f"{len(others)} per-sample metrics: 2 x {n:,} x 8 B each"
                     + (" (GenEval/VBench evaluate in their own environment: not counted)"
                        if any(type(m).__module__.endswith(("geneval", "vbench")) for m in others) else ""))
    return MemoryOutline(load, load_detail, batch, batch_detail, state, "; ".join(parts) or "none", extra,
                         extra_detail)


def _reference_decode(metrics: list, n: int, side: int) -> tuple[int, str]:
    """Host bytes the first feature extraction of a real reference set holds as decoded images: an ``.npz`` batch's
    ``arr_0`` is one array (``np.load`` reads it whole); a folder is decoded one batch at a time where
    ``metrics.references`` streams folders (``iter_image_folder``), else whole. Later runs read cached features."""
    from orbitquant.harness.metrics import references

    whole = n * 3 * side * side
    if any(str(m.reference).endswith(".npz") for m in metrics):
        return whole, (f"first scoring against this reference loads its {n:,} x 3 x {side}^2 uint8 images (npz arr_0 "
                       "is read whole); later runs read the cached features")
    if hasattr(references, "iter_image_folder"):
        bs = max(int(getattr(m, "batch_size", 50) or 50) for m in metrics)
        return bs * 3 * side * side, (f"first scoring decodes the reference folder {bs} images at a time "
                                      f"({bs} x 3 x {side}^2 uint8); later runs read the cached features")
    return whole, (f"first scoring against this reference decodes its {n:,} x 3 x {side}^2 uint8 images at once; "
                   "later runs read the cached features")


def _real_set(metrics: list, eval_name: str) -> tuple[int, int, str]:
    """(images, side, source) of the Inception metrics' real reference set ((0, 0, ...) when it is the fp set)."""
    refs = {(str(m.reference), m.limit, m.resolution) for m in metrics if getattr(m, "uses_real", True)
            and m.reference not in (None, "fp")}
    if not refs:
        return 0, 0, "no real set"
    ref, limit, res = min(refs, key=str)
    n, side, src = _count_real(Path(ref))
    if n is None:
        n, side, src = NOMINAL_REAL_SET.get(eval_name, (0, 0, f"{ref} not found, size unknown"))
        src = f"nominal: {src}; {ref} not found here"
    if limit:
        n = min(n, int(limit)) if n else int(limit)
    return n, int(res or side or 0), src


def _count_real(path: Path) -> tuple[int | None, int, str]:
    """Image count and side of a real reference on disk (npz header or folder listing), without loading it."""
    import zipfile

    import numpy as np

    if path.suffix == ".npz" and path.is_file():
        with zipfile.ZipFile(path) as z:
            for key in ("arr_0.npy", "images.npy"):
                if key in z.namelist():
                    with z.open(key) as f:
                        version = np.lib.format.read_magic(f)
                        shape = np.lib.format._read_array_header(f, version)[0]
                    return int(shape[0]), int(shape[1] if key == "arr_0.npy" else shape[-1]), f"{path} header"
        return 0, 0, f"{path}: statistics only"
    if path.is_dir():
        n = sum(1 for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        return n, 0, f"{n} files in {path}"
    return None, 0, ""
