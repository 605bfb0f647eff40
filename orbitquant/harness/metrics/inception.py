"""FID, sFID, Inception Score and improved precision/recall on InceptionV3 features (the ImageNet protocol of ADM,
Q-DiT and PTQ4DiT; FID also for COCO / MJHQ folders).

Options (``eval.metrics`` entries, e.g. ``{fid: {reference: /data/VIRTUAL_imagenet256_labeled.npz}}``):

``reference``
    what the samples are compared with: a folder of images (centre-cropped and resized to ``resolution``), an ``.npz``
    (ADM reference batch: ``arr_0`` images + ``mu``/``sigma``/``mu_s``/``sigma_s``; or statistics only), a sample store
    directory (another run's ``samples/``) or legacy harness ``samples.npz``, or ``fp`` (the fp model's samples
    under the same noise).
``inception_weights``
    torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; default ``$ORBITQUANT_INCEPTION_WEIGHTS``, then
    ``$TORCH_HOME/hub/checkpoints/``.
``batch_size`` (images per Inception call, and per read), ``device`` (``auto`` = cuda if available), ``progress``,
``cache_dir`` (feature cache; default: ``features/`` in the sample store when the samples are on disk,
``$ORBITQUANT_FEATURE_CACHE``, else ``~/.cache/orbitquant/features``),
``resolution`` (reference folder images), ``limit`` (use the first N reference images), ``reference_files`` (a
list naming the reference folder's images to use, in order: a ``.jsonl`` with ``file_name`` per record -- the COCO
prompt file, so the references are the images of the captions generated -- or one name per line), ``preprocess``
(``adm`` default | ``clean``: see :data:`PREPROCESS`), ``verify_sha256`` (default true: the weights must be
torch-fidelity's file, checked against its published sha256), ``k`` (precision/recall,
default 3), ``split_size`` (Inception Score, default 5000 as ADM), ``shuffle`` (Inception Score: seed of the
permutation its splits are taken from, default 0; ``null`` keeps sample order -- see ``stats.inception_score``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orbitquant.harness.metrics import stats
from orbitquant.harness.metrics.base import Metric, SampleSource, work_dir
from orbitquant.harness.metrics.features import (
    INCEPTION_SHA256,
    InceptionV3,
    extract,
    find_inception_weights,
    import_torch_fidelity_inception,
    inception_fix,
    resolve_device,
)
from orbitquant.harness.metrics.references import (
    CleanResize,
    RealSet,
    image_folder_need,
    reference_files,
    reference_fix,
)
from orbitquant.harness.samplestore import STORE_FILE
from orbitquant.harness.types import MetricResult
from orbitquant.quant.atomic import atomic_path
from orbitquant.quant.registry import register_metric

#: how images reach the Inception: ``adm`` -- uint8 as they are, resized to 299 inside the network with
#: TF1-bilinear (ADM's evaluator, torch-fidelity; the ImageNet protocol); ``clean`` -- clean-fid's antialiased
#: bicubic resize to 299 first, the same path for samples and reference images (text-to-image protocols)
PREPROCESS = ("adm", "clean")


def default_feature_cache() -> Path:
    env = os.environ.get("ORBITQUANT_FEATURE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orbitquant" / "features"


def per_sample(values: torch.Tensor | np.ndarray, digits: int = 6) -> list[float]:
    """Per-sample values for results.json (paired analyses across methods share seeds, so sample i matches)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).ravel()]


class FeatureContext:
    """Feature extractors and features shared by the metrics of one run (FID, sFID, IS and precision/recall all read
    one Inception pass)."""

    def __init__(self) -> None:
        self._extractors: dict[Any, torch.nn.Module] = {}
        self._features: dict[tuple, dict[str, torch.Tensor]] = {}
        self._reals: dict[tuple, RealSet] = {}
        self._pr: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def extractor(self, metric: InceptionMetric) -> torch.nn.Module:
        base = id(metric.extractor_module) if metric.extractor_module is not None else metric.inception_weights
        if (base, metric.preprocess) not in self._extractors:
            if (base, "adm") not in self._extractors:
                self._extractors[base, "adm"] = metric.extractor_module or InceptionV3(metric.inception_weights)
            if metric.preprocess == "clean":
                self._extractors[base, "clean"] = CleanResize(self._extractors[base, "adm"])
        return self._extractors[base, metric.preprocess]

    def real(self, metric: InceptionMetric) -> RealSet:
        key = (str(metric.reference), metric.resolution, metric.limit, metric.reference_files, metric.preprocess)
        if key not in self._reals:
            files = reference_files(metric.reference_files) if metric.reference_files else None
            self._reals[key] = RealSet(metric.reference, metric.resolution, metric.limit, files,
                                       clean=metric.preprocess == "clean")
        return self._reals[key]

    def sample_features(self, metric: InceptionMetric, samples: SampleSource, desc: str) -> dict[str, torch.Tensor]:
        """Features of a sample set, computed once per (network, sample values) -- shared by FID, sFID, IS and
        precision/recall -- and cached on disk under the set's fingerprint."""
        net = self.extractor(metric)
        key = (net.identity, samples.fingerprint())
        if key not in self._features:
            cache = metric.cache_dir or work_dir(samples, "features") or default_feature_cache()
            self._features[key] = extract(samples, net, batch_size=metric.batch_size, device=metric.device,
                                          progress=metric.progress, desc=desc, cache_dir=cache, key=key[1])
        return self._features[key]

    def real_features(self, metric: InceptionMetric, real: RealSet) -> dict[str, torch.Tensor]:
        """Features of a reference set, cached on disk under the reference's checksum (no image decoding on a hit)."""
        net = self.extractor(metric)
        key = (net.identity, str(real.path), real.size, real.limit, tuple(real.files or ()), real.clean)
        if key not in self._features:
            cache = Path(metric.cache_dir) if metric.cache_dir is not None else default_feature_cache()
            path = cache / f"{net.identity}-ref-{_reference_id(real)}.npz"
            feats = None
            if path.exists():
                with np.load(path) as data:
                    if all(k in data.files for k in net.outputs):
                        feats = {k: torch.from_numpy(data[k]) for k in net.outputs}
            if feats is None:
                feats = extract(real.batches(metric.batch_size), net, batch_size=metric.batch_size,
                                device=metric.device, progress=metric.progress,
                                desc=f"reference features ({real.path.name})")
                with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
                    np.savez(tmp, **{k: v.numpy() for k, v in feats.items()})
            self._features[key] = feats
        return self._features[key]

    def precision_recall(self, metric: InceptionMetric, samples: SampleSource, reference: SampleSource | None):
        fake = self.sample_features(metric, samples, "Inception features")["pool3"]
        real = metric.real_pool3(self, reference)
        key = (id(fake), id(real), metric.k)
        if key not in self._pr:
            self._pr[key] = stats.precision_recall(real, fake, k=metric.k, device=resolve_device(metric.device))
        return self._pr[key]


def _reference_id(real: RealSet) -> str:
    h = hashlib.sha256(f"{real.size}|{real.limit}|{real.clean}".encode())
    if real.files is not None:  # a list (COCO: the images of the captions used): those files, in that order
        for f in real.files[:real.limit]:
            st = (real.path / f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    elif real.is_store:  # its shards' checksums (the folder also holds derived files: features, previews)
        h.update(real.store.fingerprint().encode())
    elif real.path.is_file():
        from orbitquant.harness.metrics.features import file_checksum

        h.update(file_checksum(real.path).encode())
    else:  # a folder: names, sizes and modification times of its images
        for p in sorted(real.path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(real.path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def torch_fidelity_need():
    """torch-fidelity's Inception module importable the way the harness imports it (without torchvision)."""
    from orbitquant.harness.preflight import Need

    what, fix = "torch-fidelity (InceptionV3 code)", "pip install --no-deps torch-fidelity==0.4.0"
    try:
        import_torch_fidelity_inception()
    except Exception as e:  # noqa: BLE001 - not installed, or broken: either way a missing item with its reason
        return Need(what, "python module torch_fidelity", False, fix, f"{type(e).__name__}: {str(e)[:120]}")
    return Need(what, "python module torch_fidelity.feature_extractor_inceptionv3", True, fix)


class InceptionMetric(Metric):
    context_cls = FeatureContext
    feature: str = "pool3"
    uses_real = True

    def __init__(self, reference: str | None = None, inception_weights: str | None = None, batch_size: int = 50,
                 device: str = "auto", progress: bool = True, cache_dir: str | None = None,
                 resolution: int | None = None, limit: int | None = None, k: int = 3, split_size: int = 5000,
                 preprocess: str = "adm", reference_files: str | None = None, verify_sha256: bool = True,
                 extractor: torch.nn.Module | None = None) -> None:
        if preprocess not in PREPROCESS:
            raise ValueError(f"metric {self.name}: preprocess={preprocess!r}; valid: {', '.join(PREPROCESS)}")
        if preprocess == "clean" and resolution is not None:
            raise ValueError(f"metric {self.name}: preprocess=clean resizes every image straight to 299 px "
                             "(clean-fid); drop resolution")
        self.preprocess, self.reference_files, self.verify_sha256 = preprocess, reference_files, verify_sha256
        self.reference = reference
        self.inception_weights = inception_weights
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.cache_dir = cache_dir
        self.resolution, self.limit, self.k, self.split_size = resolution, limit, k, split_size
        self.extractor_module = extractor  # a locally built extractor (tests); default: InceptionV3
        self.needs_reference = self.uses_real and reference == "fp"

    #: the reference keys each metric reads from an ``.npz`` (any one set suffices; images also give statistics)
    npz_keys: tuple[tuple[str, ...], ...] = (("arr_0",), ("images",))

    def needs(self) -> list:
        from orbitquant.harness.preflight import dir_need, file_need, npz_need

        out = []
        if self.extractor_module is None:
            path = find_inception_weights(self.inception_weights, strict=False)
            out.append(file_need("InceptionV3 weights (torch-fidelity)", path, inception_fix(path),
                                 sha256=INCEPTION_SHA256 if self.verify_sha256 else None))
            out.append(torch_fidelity_need())
        if not self.uses_real:
            return out
        if self.reference is None:
            raise ValueError(f"metric {self.name} needs `reference:` (an image folder, an ADM reference batch "
                             f".npz, statistics .npz, or fp); e.g. eval.metrics.{self.name}.reference=/path")
        if self.reference == "fp":
            return out
        ref, fix = Path(self.reference), reference_fix(self.reference)
        if ref.suffix == ".npz":
            keys = self.npz_keys if self.limit is None else _FrechetMetric.npz_keys[-2:]  # a subset needs images
            want = " or ".join("+".join(k) for k in keys)
            out.append(npz_need(f"reference .npz with {want}", ref, keys, fix))
        elif (ref / STORE_FILE).is_file():
            out.append(dir_need("reference sample store", ref, fix, contains=[STORE_FILE]))
        else:
            files = None
            if self.reference_files:
                if not Path(self.reference_files).is_file():
                    return [*out, image_folder_need("reference images", ref, fix),
                            file_need("reference list (the images of the captions used)", self.reference_files,
                                      "the .jsonl of scripts/make_coco_prompts.py (docs/metrics.md, 'Reference sets')")]
                files = reference_files(self.reference_files)
            out.append(image_folder_need("reference images", ref, fix, files=files))
        return out

    # -- helpers
    def real_pool3(self, ctx: FeatureContext, reference: SampleSource | None) -> torch.Tensor:
        return self.real_feats(ctx, reference, "pool3")

    def real_feats(self, ctx: FeatureContext, reference: SampleSource | None, feature: str) -> torch.Tensor:
        if self.reference == "fp":
            if reference is None:
                raise ValueError(f"metric {self.name} with reference=fp needs the fp samples")
            return ctx.sample_features(self, reference, "Inception features (fp)")[feature]
        return ctx.real_features(self, ctx.real(self))[feature]

    def n_real(self, ctx: FeatureContext, reference: SampleSource | None) -> int | None:
        if self.reference == "fp":
            return len(reference) if reference is not None else None
        real = ctx.real(self)
        return len(self.real_feats(ctx, reference, self.feature)) if real.has_images else None


class _FrechetMetric(InceptionMetric):
    higher_is_better = False
    stats_keys = ("mu", "sigma")
    npz_keys = (("mu", "sigma"), ("arr_0",), ("images",))

    def compute(self, samples, reference, ctx: FeatureContext) -> MetricResult:
        fake = ctx.sample_features(self, samples, "Inception features")[self.feature]
        mu1, s1 = stats.gaussian_stats(fake)
        real = None if self.reference == "fp" else ctx.real(self)
        if real is not None and all(k in real.stats for k in self.stats_keys) and self.limit is None:
            mu2, s2 = (real.stats[k] for k in self.stats_keys)  # the reference batch's own statistics (ADM)
            source, n_real = "npz statistics", None
        else:
            feats = self.real_feats(ctx, reference, self.feature)
            (mu2, s2), source, n_real = stats.gaussian_stats(feats), "features", len(feats)
        extra = {"reference": str(self.reference), "reference_stats": source}
        if n_real is not None:
            extra["n_real"] = n_real
        return self.result(stats.frechet_distance(mu1, s1, mu2, s2), len(fake), **extra)


@register_metric
class FID(_FrechetMetric):
    """Fréchet Inception Distance on pool-3 features (2048-d) against ``reference``."""

    name = "fid"


@register_metric
class SFID(_FrechetMetric):
    """Spatial FID (Nash et al. 2021; ADM): Fréchet distance on the first 7 channels of ``mixed_6/conv`` (2023-d)."""

    name, feature, stats_keys = "sfid", "spatial", ("mu_s", "sigma_s")
    npz_keys = (("mu_s", "sigma_s"), ("arr_0",), ("images",))


@register_metric
class InceptionScore(InceptionMetric):
    """Inception Score on the 1008 unbiased ImageNet logits, over splits of ``split_size`` (ADM: 5000); the
    per-sample values are each sample's KL(p(y|x) || p(y)). (``inception_score`` is the digits-classifier analogue.)"""

    name, higher_is_better, feature, uses_real = "isc", True, "logits_unbiased", False

    def __init__(self, *args, shuffle: int | None = 0, **kw) -> None:
        """``shuffle``: the seed of the permutation the splits are taken from (``null``: sample order); see
        ``stats.inception_score``."""
        super().__init__(*args, **kw)
        self.shuffle = shuffle

    def compute(self, samples, reference, ctx: FeatureContext) -> MetricResult:
        logits = ctx.sample_features(self, samples, "Inception features")["logits_unbiased"]
        mean, std, per = stats.inception_score(logits, self.split_size, self.shuffle)
        return self.result(mean, len(logits), split_std=std, shuffle=-1 if self.shuffle is None else self.shuffle,
                           per_sample=per_sample(per))


@register_metric
class Precision(InceptionMetric):
    """Improved precision (Kynkäänniemi et al., k=3): the fraction of samples inside the real k-NN manifold
    (pool-3 features). Per-sample: 1 if that sample is inside."""

    name, higher_is_better = "precision", True

    def compute(self, samples, reference, ctx: FeatureContext) -> MetricResult:
        prec, _ = ctx.precision_recall(self, samples, reference)
        return self.result(prec.double().mean(), len(prec), k=self.k, per_sample=per_sample(prec.double()))


@register_metric
class Recall(InceptionMetric):
    """Improved recall (k=3): the fraction of real images inside the samples' k-NN manifold. Per-real-image values
    (they do not pair with samples, so they are not reported)."""

    name, higher_is_better = "recall", True

    def compute(self, samples, reference, ctx: FeatureContext) -> MetricResult:
        prec, rec = ctx.precision_recall(self, samples, reference)
        return self.result(rec.double().mean(), len(prec), k=self.k, n_real=len(rec))
