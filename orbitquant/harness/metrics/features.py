"""Shared feature extraction for the image metrics: uint8 conversion, batched extraction on the run's device with a
progress bar, an on-disk feature cache, and the InceptionV3 of torch-fidelity (the FID/IS/sFID/precision-recall
backbone) with its weight lookup. Reference sets and the preprocessing paths live in ``references.py``.

Extraction streams: images are read one batch at a time (from a sample store, an image folder, or any iterable of
batches) and only the features stay in memory.

A feature extractor is any ``nn.Module`` with

* ``identity: str`` -- names the network *and its weights* (a checksum); it keys the feature cache;
* ``outputs: tuple[str, ...]`` -- the feature names it returns;
* ``forward(x: uint8 (N, 3, H, W)) -> dict[str, Tensor (N, D)]``.

Tests pass small locally built extractors of this shape; real runs use :class:`InceptionV3`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orbitquant.harness.metrics.base import SampleSource, frames_per_item, rebatch
from orbitquant.quant.atomic import atomic_path

#: the file torch-fidelity (and torchmetrics' FID/IS/KID) downloads: TF's 2015-12-05 Inception graph, converted
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
#: its sha256 (95,628,359 bytes; the torch.hub name carries the prefix). torch-fidelity does not check it; we do
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_ENV = "ORBITQUANT_INCEPTION_WEIGHTS"
FEATURE_CACHE_ENV = "ORBITQUANT_FEATURE_CACHE"


# ---------------------------------------------------------------------------------------------- images
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1], (N, C, H, W) or videos (N, F, C, H, W) -> uint8 (M, 3, H, W) (frames flattened, grey
    repeated to RGB), rounded like a saved PNG (diffusers' ``numpy_to_pil``: ``round(255 * (x + 1) / 2)``)."""
    if images.dtype == torch.uint8:
        x = images
    else:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.ndim == 5:
        x = x.flatten(0, 1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W) or videos (N, F, 1|3, H, W), got {tuple(images.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def file_checksum(path: str | Path) -> str:
    """The file's sha256 (``preflight.file_sha256``: hashed once per path, size and mtime, the digest remembered)."""
    from orbitquant.harness.preflight import file_sha256

    return file_sha256(path)


def tensor_checksum(x: torch.Tensor) -> str:
    h = hashlib.sha256(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- extraction
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_cache_dir() -> Path | None:
    env = os.environ.get(FEATURE_CACHE_ENV)
    return Path(env) if env else None


@torch.no_grad()
def extract(images: torch.Tensor | SampleSource | Iterable[torch.Tensor], extractor: nn.Module, *,
            batch_size: int = 64, device: str | None = "auto", progress: bool = True, desc: str = "features",
            cache_dir: str | Path | None = None, key: str | None = None) -> dict[str, torch.Tensor]:
    """``extractor``'s features of every image, float32 (M, D) on the CPU, in order (video frames flattened).

    ``images`` is a sample set (``Samples`` / ``SampleSet``: read ``batch_size`` frames at a time as uint8), an
    iterable of image batches, or one tensor holding every image; batches go through :func:`to_uint8` and are
    regrouped so the extractor always sees the same consecutive ``batch_size`` images (``base.rebatch``): features
    do not depend on how the images were read. Only one batch of images is in memory at a time (besides a tensor
    passed whole).

    With ``cache_dir`` the features are stored there as ``<extractor identity>-<hash of identity and key>.npz`` and
    reused on the next call (a re-score of a run, or the fp reference shared by every run of a sweep). ``key``
    identifies the images: by default a sample set's ``fingerprint()`` or a tensor's checksum; an iterable of
    batches is cached only under an explicit ``key``.
    """
    from tqdm.auto import tqdm

    total: int | None = None
    if isinstance(images, torch.Tensor):
        whole = to_uint8(images)
        key, total, chunks = key or tensor_checksum(whole), len(whole), iter([whole])
    elif isinstance(images, SampleSource):
        n_frames = frames_per_item(images)
        key, total = key or images.fingerprint(), len(images) * n_frames
        chunks = (x for x, _ in images.batches(max(1, batch_size // n_frames), uint8=True))
    else:
        chunks = iter(images)
    path = None
    if cache_dir is not None and key is not None:
        digest = hashlib.sha256(f"{extractor.identity}|{key}".encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"{_safe(extractor.identity)}-{digest}.npz"
        if path.exists():
            try:
                with np.load(path) as data:
                    cached = {k: torch.from_numpy(data[k]) for k in extractor.outputs}
                if len({len(v) for v in cached.values()}) == 1 and total in (None, len(next(iter(cached.values())))):
                    return cached
            except (OSError, KeyError, ValueError):
                pass  # unreadable or stale: recompute and overwrite
    dev = resolve_device(device)
    extractor = extractor.to(dev).eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in extractor.outputs}
    with torch.inference_mode(False), tqdm(total=total, desc=desc, unit="img", disable=not progress,
                                           leave=False) as bar:
        for (x,) in rebatch(((to_uint8(c),) for c in chunks), batch_size):
            out = extractor(x.to(dev))
            for k in extractor.outputs:
                parts[k].append(out[k].detach().float().flatten(1).cpu())
            bar.update(len(x))
    if not parts[extractor.outputs[0]]:
        raise ValueError(f"{desc}: no images to extract features from")
    feats = {k: torch.cat(v) for k, v in parts.items()}
    if path is not None:
        with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
            np.savez(tmp, **{k: v.numpy() for k, v in feats.items()})
    return feats


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:60]


# ---------------------------------------------------------------------------------------------- InceptionV3
def _torchvision_importable() -> bool:
    if "torchvision" in sys.modules:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001 - e.g. "operator torchvision::nms does not exist" beside a CPU torch wheel
        return False


def prepare_torch_fidelity() -> bool:
    """Make ``torch_fidelity`` importable without torchvision (False if it is not installed). Call before importing
    ``torchmetrics.image.fid``: torchmetrics imports torch-fidelity whenever it is installed."""
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    if not _torchvision_importable():
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__version__ = spec, "stub"
        sys.modules["torch_fidelity"] = pkg
    return True


def import_torch_fidelity_inception():
    """torch-fidelity's ``FeatureExtractorInceptionV3``. torch-fidelity's ``__init__`` imports torchvision; where
    torchvision cannot be imported (the CPU torch wheel) the package is registered without running it, and the
    Inception module (plain torch) imports normally -- features are identical (SCALEOUT_STACK section 5)."""
    if not prepare_torch_fidelity():
        raise ModuleNotFoundError("InceptionV3 features need torch-fidelity: `pip install --no-deps torch-fidelity` "
                                  "(or `pip install -e '.[metrics]'` where torchvision works)")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def find_inception_weights(path: str | Path | None = None, strict: bool = True) -> Path:
    """The torch-fidelity Inception weights: ``path`` (a metric option), else ``$ORBITQUANT_INCEPTION_WEIGHTS``, else
    torch.hub's cache (``$TORCH_HOME/hub/checkpoints/``, where torch-fidelity and torchmetrics download it). Raises
    one FileNotFoundError naming the file and where it comes from; ``strict=False`` returns where it is looked for
    instead (preflight reports it)."""
    candidates = [Path(p).expanduser() for p in (path, os.environ.get(INCEPTION_ENV)) if p]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    for c in candidates or [hub]:
        if c.is_file():
            return c
    if not strict:
        return (candidates or [hub])[0]
    where = ", ".join(str(c) for c in candidates) if candidates else str(hub)
    raise FileNotFoundError(f"InceptionV3 weights not found at {where}. {inception_fix(hub)} (the FID Inception of "
                            f"torch-fidelity / torchmetrics), or point `inception_weights:` (or ${INCEPTION_ENV}) at "
                            "the file")


def inception_fix(path: str | Path) -> str:
    return f"wget {INCEPTION_URL} -O {path}"


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A weights file for torch-fidelity's InceptionV3 with seeded Kaiming-random convolutions (the default init gives
    ~0 features): the real architecture and code path without the real weights -- CPU cross-checks
    (``scripts/crosscheck_metrics.py --cpu``) and tests. Its features mean nothing; agreement between
    implementations on them does."""
    cls = import_torch_fidelity_inception()
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    real_load, real_sd = fe.torch.load, cls.load_state_dict
    fe.torch.load, cls.load_state_dict = (lambda *a, **k: {}), (lambda self, sd, *a, **k: None)
    try:  # build once without loading anything, to get the exact modules and keys
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        fe.torch.load, cls.load_state_dict = real_load, real_sd
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.data = torch.randn(mod.weight.shape, generator=g) * (2 / fan_in) ** 0.5
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class InceptionV3(nn.Module):
    """torch-fidelity's TF-exact InceptionV3 (TF bilinear resize to 299) returning ``pool3`` (2048, FID and
    precision/recall), ``logits_unbiased`` (1008, Inception Score) and ``spatial`` (2023 = the first 7 channels of
    ``mixed_6/conv`` = ``Mixed_6d.branch1x1``, 17x17, flattened HWC as in ADM's evaluator: sFID)."""

    outputs = ("pool3", "logits_unbiased", "spatial")

    def __init__(self, weights: str | Path | None = None, net: nn.Module | None = None) -> None:
        super().__init__()
        if net is None:
            path = find_inception_weights(weights)
            cls = import_torch_fidelity_inception()
            net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
            self.identity = f"inception2015-{file_checksum(path)[:12]}"
        else:  # a locally built network of the same class (tests)
            self.identity = "inception2015-" + hashlib.sha256(
                b"".join(t.detach().cpu().numpy().tobytes() for t in net.state_dict().values())).hexdigest()[:12]
        self.net = net
        self._spatial: torch.Tensor | None = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, _mod, _inp, out) -> None:
        self._spatial = out[:, :7].permute(0, 2, 3, 1).flatten(1)  # NHWC like TF, 17*17*7 = 2023

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pool3, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return {"pool3": pool3, "logits_unbiased": logits, "spatial": spatial}
