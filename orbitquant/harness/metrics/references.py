"""Reference sets of the Inception metrics and the image preprocessing both sides of a comparison share: image
folders (all of them, or the files a list names -- COCO: the images of the captions used), ADM ``.npz`` batches,
sample stores; the reference-folder resize and clean-fid's resize (:func:`clean_resize`, :class:`CleanResize`); and
the preflight items and fixes of reference sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orbitquant.harness.metrics.base import items_per_read
from orbitquant.harness.metrics.features import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _center_crop_resize(im, size: int | None):
    from PIL import Image

    im = _center_square(im.convert("RGB"))
    if size is None:
        return im
    return im.resize((size, size), Image.BICUBIC) if im.size[0] != size else im


def _center_square(im):
    w, h = im.size
    s = min(w, h)
    return im if w == h else im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


#: clean-fid's input size: images are resized to it outside the network (its "clean" mode)
CLEAN_SIZE = 299


def clean_resize(im, size: int = CLEAN_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize (Parmar et al. 2022; ``cleanfid.resize.make_resizer("PIL", False, "bicubic",
    (299, 299))``): each channel resized as a float32 image with PIL's antialiased bicubic filter, clipped to
    [0, 255] -- here after a centre square crop (non-square references; generated images are square), and rounded
    to uint8 because torch-fidelity's Inception takes uint8 (at 299 px its own resize is the identity, so the only
    difference from clean-fid's input is that rounding, at most half a grey level). ``im``: a PIL image or an HWC
    uint8 array; returns (size, size, 3) uint8. Written here because clean-fid's package imports torchvision; the
    tests compare it with ``cleanfid.resize`` where clean-fid is installed."""
    from PIL import Image

    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    arr = np.asarray(_center_square(im.convert("RGB")), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F").resize((size, size),
                                                                                          Image.BICUBIC))
             for c in range(3)]
    return np.rint(np.stack(chans, axis=-1).clip(0, 255)).astype(np.uint8)


class CleanResize(nn.Module):
    """An extractor that first puts every image through :func:`clean_resize` -- the one preprocessing path of both
    sides of a text-to-image FID (samples here, reference images in :func:`iter_image_folder`)."""

    def __init__(self, net: nn.Module, size: int = CLEAN_SIZE) -> None:
        super().__init__()
        self.net, self.size = net, size
        self.identity, self.outputs = f"{net.identity}-clean{size}", net.outputs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2:] != (self.size, self.size):  # references arrive resized already (clean_resize is idempotent)
            arrs = [clean_resize(a, self.size) for a in x.permute(0, 2, 3, 1).cpu().numpy()]
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().to(x.device)
        return self.net(x)


def reference_files(src: str | Path) -> list[str]:
    """The reference image files named by a list: a ``.jsonl`` of records with ``file_name`` (the COCO prompt
    files of ``scripts/make_coco_prompts.py``: the image of each caption) or a text file with one name per line;
    in order, each once."""
    import json

    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"reference list {path} not found")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if path.suffix == ".jsonl":
        rows = [json.loads(ln) for ln in lines]
        if not all(isinstance(r, dict) and r.get("file_name") for r in rows):
            raise ValueError(f"{path}: every record needs a file_name (the image of its caption)")
        lines = [r["file_name"] for r in rows]
    return list(dict.fromkeys(lines))


def iter_image_folder(path: str | Path, size: int | None = None, limit: int | None = None,
                      batch_size: int = 64, files: list[str] | None = None,
                      clean: bool = False) -> Iterator[torch.Tensor]:
    """The images under ``path`` (sorted, recursive; or exactly ``files``, relative paths, in their order) as uint8
    (B, 3, H, W) batches: centre square crop, then bicubic resize to ``size`` (the usual COCO / MJHQ reference
    preparation), or with ``clean`` clean-fid's resize to 299 (:func:`clean_resize`). ``size=None`` keeps sizes
    (they must then all agree). One batch of decoded images in memory at a time."""
    from PIL import Image

    if files is not None:
        found = [Path(path) / f for f in files]
        absent = [f for f in found if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} listed reference images are missing under {path} (first: "
                                    f"{absent[0].name})")
    else:
        found = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = found[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    first = None
    for start in range(0, len(files), batch_size):
        arrs = []
        for f in files[start:start + batch_size]:
            with Image.open(f) as im:
                arrs.append(clean_resize(im) if clean else np.asarray(_center_crop_resize(im, size), dtype=np.uint8))
            first = first or (arrs[-1].shape, f)
            if arrs[-1].shape != first[0]:
                raise ValueError(f"images under {path} differ in size ({first[1].name}: {first[0]}, {f.name}: "
                                 f"{arrs[-1].shape}); give a resolution to resize to")
        yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(path: str | Path, size: int | None = None, limit: int | None = None) -> torch.Tensor:
    """All images of :func:`iter_image_folder` as one uint8 (N, 3, H, W) tensor (small folders only)."""
    return torch.cat(list(iter_image_folder(path, size, limit)))


class RealSet:
    """A reference set: images (uint8, for features) and/or precomputed Fréchet statistics.

    Sources: a folder of images; a sample store directory (``store.json`` + shards, e.g. another run's
    ``samples/``); an ``.npz`` -- the ADM reference batch (``arr_0`` uint8 NHWC images, ``mu``/``sigma`` pool-3 and
    ``mu_s``/``sigma_s`` spatial statistics, e.g. ``VIRTUAL_imagenet256_labeled.npz``), a stats-only file
    (``mu``/``sigma``), or a legacy harness ``samples.npz`` (``images`` in [-1, 1]). Folders and stores are read a
    batch at a time; an ``.npz`` is loaded whole (numpy cannot read part of a compressed array).
    """

    def __init__(self, path: str | Path, size: int | None = None, limit: int | None = None,
                 files: list[str] | None = None, clean: bool = False) -> None:
        self.path, self.size, self.limit, self.files, self.clean = Path(path), size, limit, files, clean
        self.stats: dict[str, np.ndarray] = {}
        self._store = None
        self.is_store = False
        if self.path.suffix == ".npz":
            with np.load(self.path) as data:
                self.stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data.files}
                self._has_images = "arr_0" in data.files or "images" in data.files
        else:
            from orbitquant.harness.samplestore import STORE_FILE

            self.is_store = (self.path / STORE_FILE).is_file()
            self._has_images = True

    def check(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"reference {self.path} not found")

    @property
    def has_images(self) -> bool:
        return self._has_images

    @property
    def store(self):
        """The reference as a ``samplestore.SampleSet`` (a store directory only)."""
        if self._store is None:
            from orbitquant.harness.samplestore import SampleSet

            self._store = SampleSet.open(self.path)
        return self._store

    def batches(self, batch_size: int = 64) -> Iterator[torch.Tensor]:
        """The reference images as uint8 (B, 3, H, W) batches (video frames flattened), at most ``limit`` items."""
        if self.path.suffix == ".npz":
            yield from self._npz_images().split(batch_size)
        elif self.is_store:
            left = len(self.store) if self.limit is None else self.limit
            for x, _ in self.store.batches(items_per_read(self.store, batch_size), uint8=True):
                if left <= 0:
                    break
                yield to_uint8(x[:left])
                left -= len(x)
        else:
            yield from iter_image_folder(self.path, self.size, self.limit, batch_size, self.files, self.clean)

    def _npz_images(self) -> torch.Tensor:
        with np.load(self.path) as data:
            if "arr_0" in data.files:  # ADM: uint8 (N, H, W, 3)
                return torch.from_numpy(data["arr_0"][: self.limit]).permute(0, 3, 1, 2).contiguous()
            if "images" in data.files:  # a legacy harness samples.npz
                return to_uint8(torch.from_numpy(data["images"][: self.limit]))
        raise ValueError(f"{self.path} holds statistics only ({', '.join(self.stats)}), no images (arr_0); "
                         "precision/recall need the reference images")

    @property
    def images(self) -> torch.Tensor:
        """Every reference image at once (small sets, tests); metrics read :meth:`batches`."""
        return torch.cat(list(self.batches()))


#: where the published reference sets come from (ADM's reference batches); others are named in docs/metrics.md
KNOWN_REFERENCES = {
    "VIRTUAL_imagenet256_labeled.npz": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                                       "imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    "VIRTUAL_imagenet512.npz": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                               "imagenet/512/VIRTUAL_imagenet512.npz",
}


def reference_fix(path: str | Path) -> str:
    """How to get a reference set: the download command of a published one, else the docs section."""
    url = KNOWN_REFERENCES.get(Path(path).name)
    if url:
        return f"wget {url} -O {path}"
    if Path(path).name == "val2014":  # COCO 2014 validation images
        return f"wget http://images.cocodataset.org/zips/val2014.zip && unzip val2014.zip -d {Path(path).parent}"
    return "prepare it as docs/metrics.md (section 'Reference sets') describes, or point the metric's reference: at it"


def image_folder_need(what: str, path: str | Path, fix: str, files: list[str] | None = None):
    """A folder of reference images: at least one image, or every one of ``files`` (relative paths) when the
    reference is a list (COCO: the images of the captions used)."""
    from orbitquant.harness.preflight import Need

    p = Path(path).expanduser()
    if not p.is_dir():
        return Need(what, str(p), False, fix, "not found" if not p.exists() else "not a folder")
    if files is not None:
        absent = [f for f in files if not (p / f).is_file()]
        if absent:
            return Need(what, str(p), False, fix, f"{len(absent)} of its {len(files)} listed images are missing "
                                                  f"(first: {absent[0]})")
        return Need(what, f"{p} ({len(files)} listed images)", True, fix)
    if next((q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES), None) is None:
        return Need(what, str(p), False, fix, f"no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    return Need(what, str(p), True, fix)


