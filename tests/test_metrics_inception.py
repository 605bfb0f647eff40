"""FID / sFID / IS / precision-recall: our arithmetic against independent scipy/numpy computations, and the metric
paths (references, feature cache, check) with a small locally built Inception-shaped extractor."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from orbitquant.harness.factory import build_metrics, metric_contexts
from orbitquant.harness.metrics import stats
from orbitquant.harness.metrics.features import INCEPTION_FILE, INCEPTION_URL, extract, to_uint8
from orbitquant.harness.types import Samples


class TinyInception(nn.Module):
    """Same interface as ``features.InceptionV3``: uint8 images -> pool3 / logits_unbiased / spatial."""

    outputs = ("pool3", "logits_unbiased", "spatial")

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)
        self.identity = f"tiny-inception-{seed}"
        self.calls = 0

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += len(x)
        h = torch.relu(self.conv(x.float() / 127.5 - 1))
        h = nn.functional.adaptive_avg_pool2d(h, 3)
        pool3 = h.mean((2, 3))
        return {"pool3": pool3, "logits_unbiased": self.fc(pool3), "spatial": h[:, :7].permute(0, 2, 3, 1).flatten(1)}


def _images(n, seed, shift=0.0, size=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def _scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """ADM evaluator / pytorch-fid style: np.cov + scipy sqrtm."""
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,n,shift", [(16, 500, 0.0), (64, 800, 0.5), (128, 2000, 1.0)])
def test_frechet_distance_matches_scipy(d, n, shift):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    b = rng.standard_normal((n + 37, d)) + shift
    ours = stats.frechet_distance(*stats.gaussian_stats(torch.from_numpy(a)), *stats.gaussian_stats(torch.from_numpy(b)))
    ref = _scipy_frechet(a, b)
    assert abs(ours - ref) / ref < 1e-10
    mu, s = stats.gaussian_stats(torch.from_numpy(a))
    assert np.allclose(mu, a.mean(0)) and np.allclose(s, np.cov(a, rowvar=False))
    assert stats.frechet_distance(mu, s, mu, s) < 1e-8


def _numpy_pr(real: np.ndarray, fake: np.ndarray, k: int):
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(sq(real, real), axis=1)[:, k]
    r_fake = np.sort(sq(fake, fake), axis=1)[:, k]
    prec = (sq(fake, real) <= r_real[None]).any(1)
    rec = (sq(real, fake) <= r_fake[None]).any(1)
    return prec, rec


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_numpy_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((300, 12))
    fake = np.concatenate([rng.standard_normal((150, 12)) * 0.8, rng.standard_normal((110, 12)) * 0.5 + 2.5])
    prec, rec = stats.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch=64)
    p_ref, r_ref = _numpy_pr(real, fake, k)
    assert np.array_equal(prec.numpy(), p_ref) and np.array_equal(rec.numpy(), r_ref)
    assert 0.3 < prec.double().mean() < 0.8  # the shifted cluster is outside the real manifold
    with pytest.raises(ValueError, match="needs more than"):
        stats.knn_radii(torch.zeros(3, 2), k=3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inception_score_matches_torchmetrics_and_its_definition():
    from torchmetrics.image.inception import InceptionScore

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g) * 3

    class Identity(nn.Module):
        num_features = 10

        def forward(self, x):
            return x

    tm = InceptionScore(feature=Identity(), splits=1)
    tm.update(logits)
    mean, std, per = stats.inception_score(logits, split_size=10_000)
    assert abs(mean - tm.compute()[0].item()) < 1e-5
    assert math.isclose(mean, math.exp(per.mean().item()), rel_tol=1e-12) and std == 0
    m2, s2, _ = stats.inception_score(logits, split_size=100, shuffle=None)  # consecutive splits, in sample order
    halves = [stats.inception_score(logits[i:i + 100], 10_000)[0] for i in (0, 100)]
    assert math.isclose(m2, np.mean(halves)) and math.isclose(s2, np.std(halves))
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))  # the default: splits of a seeded shuffle
    m3, s3, per3 = stats.inception_score(logits, split_size=100)
    halves = [stats.inception_score(logits[order[i:i + 100]], 10_000)[0] for i in (0, 100)]
    assert math.isclose(m3, np.mean(halves)) and math.isclose(s3, np.std(halves)) and not math.isclose(m3, m2)
    assert torch.allclose(per3[order[:100]], stats.inception_score(logits[order[:100]], 10_000)[2])  # sample order
    one_class = torch.zeros(50, 10)
    one_class[:, 3] = 20
    assert stats.inception_score(one_class)[0] < 1.001


def test_inception_score_does_not_depend_on_the_class_order_of_the_samples():
    """The ImageNet protocol generates class by class (10 x 1000); consecutive splits of 5000 would each see 500
    classes. Perfect one-hot predictions score ~1000 in ADM's random label order; the class-sorted order must too
    (it read 500 before the splits were shuffled)."""
    labels = torch.arange(1000).repeat_interleave(10)  # dit.py's order: class by class
    perfect = torch.full((10_000, 1008), -30.0)
    perfect[torch.arange(10_000), labels] = 30.0
    in_order = stats.inception_score(perfect, 5000, shuffle=None)[0]
    assert 499 < in_order < 501  # the bias: each split sees 500 classes
    shuffled = stats.inception_score(perfect, 5000)[0]
    adm = stats.inception_score(perfect[torch.randperm(10_000, generator=torch.Generator().manual_seed(7))], 5000,
                                shuffle=None)[0]  # ADM: labels drawn at random, splits in file order
    assert shuffled > 900 and abs(shuffled - adm) / adm < 0.01
    # a softer case (the synthetic: ~216 in random order): class-sorted and shuffled agree with ADM's order
    g = torch.Generator().manual_seed(1)
    soft = torch.randn(10_000, 1008, generator=g) * 2
    soft[torch.arange(10_000), labels] += 9.0
    adm = stats.inception_score(soft[torch.randperm(10_000, generator=g)], 5000, shuffle=None)[0]
    assert abs(stats.inception_score(soft, 5000)[0] - adm) / adm < 0.01
    assert stats.inception_score(soft, 5000, shuffle=None)[0] < 0.9 * adm  # 49.5 vs 56.0


def _save_pngs(images: torch.Tensor, folder):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, im in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:04d}.png")


def test_t2i_fid_has_one_preprocessing_path_and_the_references_of_the_captions_used(tmp_path):
    """Two faults of the text-to-image FID: reference images were centre-cropped and bicubic-resized to
    ``resolution`` while samples went straight into the network's own resize; and the COCO reference was the first N
    files by name, not the images of the captions generated. With ``preprocess: clean`` and ``reference_files``, a
    reference folder holding exactly the sampled images (PNG, among decoys that sort first) scores FID 0."""
    import json

    from PIL import Image

    gen = _images(6, 3, size=48)
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i, im in enumerate(to_uint8(_images(4, 9, shift=0.7, size=64)).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im[:, 8:56]).save(folder / f"a_decoy_{i}.png")  # non-square, sorts first
    for i, im in enumerate(to_uint8(gen).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"img_{i}.png")
    listing = tmp_path / "prompts.jsonl"
    listing.write_text("".join(json.dumps({"caption": f"caption {i}", "file_name": f"img_{i}.png"}) + "\n"
                               for i in range(6)))
    samples = Samples(images=gen, labels=torch.arange(6), meta={})
    net = TinyInception()

    def fid(**opts):
        (m,) = build_metrics([{"fid": {"reference": str(folder), "extractor": net, "progress": False, **opts}}])
        return m.compute(samples, None, metric_contexts([m])[m.context_cls]).value

    assert fid(preprocess="clean", reference_files=str(listing)) < 1e-6
    assert fid(resolution=32, limit=6) > 1e-3  # before: first 6 files by name, resized to 32 on one side only
    assert fid(resolution=48, reference_files=str(listing)) < 1e-6  # the same images at the sample size agree ...
    assert fid(preprocess="clean") > 1e-3  # ... and the whole folder (decoys) does not
    with pytest.raises(ValueError, match="drop resolution"):
        build_metrics([{"fid": {"reference": str(folder), "preprocess": "clean", "resolution": 512}}])
    (m,) = build_metrics([{"fid": {"reference": str(folder), "extractor": net, "reference_files": str(listing)}}])
    (listed,) = m.needs()
    assert listed.ok and "6 listed images" in listed.where
    (folder / "img_4.png").unlink()
    (missing,) = m.needs()
    assert not missing.ok and "img_4.png" in missing.problem


def test_clean_resize_is_clean_fids_resize_rounded():
    """``references.clean_resize`` = clean-fid's "clean" resize (float PIL bicubic per channel, clipped), rounded to
    uint8 for torch-fidelity's Inception; non-square images are centre-cropped first."""
    from orbitquant.harness.metrics.references import clean_resize

    cleanfid_resize = pytest.importorskip("cleanfid.resize", reason="clean-fid: pip install --no-deps clean-fid")
    g = np.random.default_rng(0)
    square = g.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    theirs = cleanfid_resize.make_resizer("PIL", False, "bicubic", (299, 299))(square)
    assert theirs.dtype == np.float32 and np.array_equal(clean_resize(square), np.rint(theirs).astype(np.uint8))
    wide = g.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    assert np.array_equal(clean_resize(wide), clean_resize(wide[:, 100:400]))  # centre square crop first
    assert np.abs(clean_resize(square).astype(float) - theirs).max() <= 0.5


def test_fid_family_on_folder_npz_and_fp_references(tmp_path):
    net = TinyInception()
    real_imgs, fake_imgs = _images(60, 1), _images(40, 2, shift=0.3)
    _save_pngs(real_imgs, tmp_path / "real")
    samples = Samples(images=fake_imgs, labels=torch.zeros(40, dtype=torch.long))
    opts = {"extractor": net, "cache_dir": str(tmp_path / "cache"), "progress": False, "batch_size": 16}
    metrics = build_metrics([{n: {"reference": str(tmp_path / "real"), **opts}} for n in ("fid", "sfid", "precision",
                                                                                              "recall")]
                            + [{"isc": {**opts}}])
    for m in metrics:
        m.check()
    ctx = metric_contexts(metrics)
    res = {m.name: m.compute(samples, None, ctx[m.context_cls]) for m in metrics}

    calls = net.calls
    with torch.no_grad():
        f_fake, f_real = net(to_uint8(fake_imgs)), net(to_uint8(real_imgs))
    net.calls = calls
    for name, key in (("fid", "pool3"), ("sfid", "spatial")):
        ref = _scipy_frechet(f_real[key].double().numpy(), f_fake[key].double().numpy())
        assert abs(res[name].value - ref) <= 1e-6 * max(ref, 1e-3), name
        assert res[name].higher_is_better is False and res[name].extra["n_real"] == 60
    p_ref, r_ref = _numpy_pr(f_real["pool3"].double().numpy(), f_fake["pool3"].double().numpy(), 3)
    assert res["precision"].value == pytest.approx(p_ref.mean()) and res["recall"].value == pytest.approx(r_ref.mean())
    assert res["precision"].extra["per_sample"] == [float(v) for v in p_ref]
    assert len(res["isc"].extra["per_sample"]) == 40 and res["isc"].value >= 1.0
    assert net.calls == 100  # one pass over samples and reference, shared by all five metrics

    # a fresh context re-reads the cached features: no extractor calls
    ctx2 = metric_contexts(metrics)
    again = {m.name: m.compute(samples, None, ctx2[m.context_cls]).value for m in metrics}
    assert net.calls == 100 and again == {k: v.value for k, v in res.items()}
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    # ADM-style reference batch: arr_0 (uint8 NHWC) + statistics; the statistics are used as given
    mu, sigma = stats.gaussian_stats(f_real["pool3"])
    mu_s, sigma_s = stats.gaussian_stats(f_real["spatial"])
    np.savez(tmp_path / "ref_batch.npz", arr_0=to_uint8(real_imgs).permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma,
             mu_s=mu_s, sigma_s=sigma_s)
    adm = build_metrics({n: {"reference": str(tmp_path / "ref_batch.npz"), **opts} for n in ("fid", "sfid", "precision")})
    ctx3 = metric_contexts(adm)
    out = {m.name: m.compute(samples, None, ctx3[m.context_cls]) for m in adm}
    assert out["fid"].extra["reference_stats"] == "npz statistics"
    assert out["fid"].value == pytest.approx(res["fid"].value, rel=1e-9)
    assert out["sfid"].value == pytest.approx(res["sfid"].value, rel=1e-9)
    assert out["precision"].value == pytest.approx(res["precision"].value)  # features from arr_0

    # against the fp samples under the same noise
    fp = build_metrics([{"fid": {"reference": "fp", **opts}}])[0]
    assert fp.needs_reference
    assert fp.compute(samples, samples, metric_contexts([fp])[fp.context_cls]).value < 1e-6


def test_features_are_batched_cached_and_video_frames_flattened(tmp_path):
    net = TinyInception()
    video = _images(6, 3).view(2, 3, 3, 16, 16)  # (N, F, C, H, W)
    a = extract(video, net, batch_size=4, progress=False, cache_dir=tmp_path)
    b = extract(video.flatten(0, 1), net, batch_size=6, progress=False)
    assert a["pool3"].shape == (6, 8) and torch.allclose(a["pool3"], b["pool3"], atol=1e-6)
    grey = extract(torch.zeros(2, 1, 16, 16), net, progress=False)
    assert torch.allclose(grey["pool3"], extract(torch.zeros(2, 3, 16, 16), net, progress=False)["pool3"])
    calls = net.calls
    extract(video, net, batch_size=4, progress=False, cache_dir=tmp_path)
    assert net.calls == calls  # cache hit


def test_check_names_missing_weights_and_references(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("ORBITQUANT_INCEPTION_WEIGHTS", raising=False)
    (m,) = build_metrics([{"fid": {"reference": str(tmp_path)}}])
    with pytest.raises(FileNotFoundError) as e:
        m.check()
    assert INCEPTION_FILE in str(e.value) and INCEPTION_URL in str(e.value) and "torch_home" in str(e.value)
    (m,) = build_metrics([{"fid": {"inception_weights": str(tmp_path / "nope.pth"), "reference": str(tmp_path)}}])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        m.check()
    with pytest.raises(ValueError, match="needs `reference:`"):
        build_metrics([{"fid": {"extractor": TinyInception()}}])[0].check()
    with pytest.raises(FileNotFoundError, match="missing_ref"):
        build_metrics([{"sfid": {"extractor": TinyInception(), "reference": str(tmp_path / "missing_ref")}}])[0].check()
    with pytest.raises(TypeError, match="bad options"):
        build_metrics([{"fid": {"refrence": "x"}}])


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                    reason="optional: torch-fidelity's real InceptionV3 architecture (pip install --no-deps torch-fidelity)")
def test_torch_fidelity_inception_architecture_with_random_weights(tmp_path):
    """The production extractor: torch-fidelity's network loaded from a weights file (Kaiming-random here; default
    init gives ~0 features), with the sFID hook on Mixed_6d.branch1x1."""
    from orbitquant.harness.metrics.features import InceptionV3, write_random_inception_weights

    path = write_random_inception_weights(tmp_path / INCEPTION_FILE)
    inc = InceptionV3(path)
    x = to_uint8(_images(3, 5, size=32))
    with torch.no_grad():
        out = inc(x)
    assert out["pool3"].shape == (3, 2048) and out["logits_unbiased"].shape == (3, 1008)
    assert out["spatial"].shape == (3, 17 * 17 * 7) and out["pool3"].abs().max() > 1e-3
    assert inc.identity.startswith("inception2015-")
