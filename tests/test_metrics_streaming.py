"""Metrics read samples in batches: the same numbers on an in-memory ``Samples`` and on a ``SampleSet`` written from
it, the numbers of the pre-streaming whole-tensor formulas, and memory that stays at about one shard plus one batch
however many samples there are.

Exactness: a float32 store returns the sampler's exact values, and both sets are read in the same batches, so every
metric must agree *exactly* between them. Against the whole-tensor formulas the metrics were computed with before
streaming, the networks (LPIPS, CLIP, Inception) are fed the same consecutive batches as before (``base.rebatch``),
so they agree exactly too; PSNR/SSIM and the digits classifier run per read batch instead of on the whole set, and
torch's float32 convolutions and reductions pick their summation order by batch shape, so there the agreement is to
float32 rounding -- and exact with the default batch, which holds a whole digits protocol.
"""

from __future__ import annotations

import gc
import math
import os
import tracemalloc

import numpy as np
import pytest
import torch
from test_metrics_clip import TinyClip, toy_tokenizer
from torch import nn

from orbitquant.harness.factory import build_metrics, metric_contexts
from orbitquant.harness.metrics import base, stats
from orbitquant.harness.metrics.base import open_samples, rebatch
from orbitquant.harness.metrics.features import extract, to_uint8
from orbitquant.harness.metrics.inception import per_sample
from orbitquant.harness.metrics.lpips import build_lpips
from orbitquant.harness.samplestore import SampleSet, StoreWriter
from orbitquant.harness.types import Samples

SIZES = (3, 7, 1, 5)  # uneven shard sizes; no batch size below divides them or the sample counts


def _store(path, samples: Samples, fmt: str = "float32", sizes=SIZES) -> SampleSet:
    """Write ``samples`` into a store at ``path`` in shards of cycling ``sizes`` and open it."""
    n = len(samples)
    w = StoreWriter(path, "t", n, fmt)
    start, i = 0, 0
    while start < n:
        stop = min(n, start + sizes[i % len(sizes)])
        w.write(start, stop, samples.images[start:stop], samples.labels[start:stop])
        start, i = stop, i + 1
    w.finish(samples.meta)
    w.close()
    return SampleSet.open(path)


def _pair(n, shape, seed=0, sigma=0.1):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, *shape, generator=g) * 2 - 1
    q = (ref + sigma * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    return q, ref


class TinyInception(nn.Module):
    """``features.InceptionV3``'s interface: uint8 images -> pool3 / logits_unbiased / spatial."""

    outputs = ("pool3", "logits_unbiased", "spatial")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)
        self.identity = "tiny-inception-stream"
        self.calls = 0

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += len(x)
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x.float() / 127.5 - 1)), 3)
        pool3 = h.mean((2, 3))
        return {"pool3": pool3, "logits_unbiased": self.fc(pool3), "spatial": h[:, :7].permute(0, 2, 3, 1).flatten(1)}


# ---------------------------------------------------------------------------------------------- the interface
def test_float32_store_returns_the_exact_samples_in_any_batching(tmp_path):
    q, _ = _pair(23, (3, 8, 8))
    mem = Samples(q, torch.arange(23) % 4, {"prompts": ["a", "b", "c", "d"]})
    st = _store(tmp_path / "s", mem)
    assert [r["stop"] - r["start"] for r in st.shards] == [3, 7, 1, 5, 3, 4]
    for bs in (1, 4, 6, 23, 50):
        for uint8 in (False, True):
            got = list(st.batches(bs, uint8=uint8))
            want = list(mem.batches(bs, uint8=uint8))
            assert len(got) == len(want) == math.ceil(23 / bs)
            for (a, la), (b, lb) in zip(got, want, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(la, lb)
    assert st.meta["prompts"] == mem.meta["prompts"] and st.meta["source"] == str(tmp_path / "s")


def test_rebatch_regroups_rows_exactly():
    chunks = [(torch.arange(a, b), torch.arange(a, b) * 10) for a, b in ((0, 3), (3, 4), (4, 11), (11, 12))]
    out = list(rebatch(chunks, 5))
    assert [len(x) for x, _ in out] == [5, 5, 2]
    assert torch.equal(torch.cat([x for x, _ in out]), torch.arange(12))
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(12) * 10)
    with pytest.raises(ValueError, match="at least 1"):
        list(rebatch(chunks, 0))


def test_read_batch_counts_images_and_video_frames():
    imgs = Samples(torch.zeros(10, 3, 4, 4), torch.zeros(10, dtype=torch.long))
    vids = Samples(torch.zeros(10, 6, 3, 4, 4), torch.zeros(10, dtype=torch.long))
    assert base.items_per_read(imgs, 7) == 7 and base.items_per_read(vids, 7) == 1 and base.items_per_read(vids, 13) == 2
    assert base.items_per_read(imgs, None) == base.READ_BYTES // (4 * 3 * 4 * 4)
    big = Samples(torch.zeros(2, 3, 1024, 1024), torch.zeros(2, dtype=torch.long))
    assert base.items_per_read(big, None) == 1  # 3 MiB hold less than one float32 1024^2 RGB image: one a read
    mid = Samples(torch.zeros(2, 3, 256, 256), torch.zeros(2, dtype=torch.long))
    assert base.items_per_read(mid, None) == 4


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("video", [False, True])
def test_paired_metrics_are_identical_on_memory_and_store_and_match_the_whole_tensor_formulas(tmp_path, video):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    n, shape = (9, (3, 3, 32, 32)) if video else (23, (3, 32, 32))  # 7-image batches: 2 videos (6 frames) a read
    q, ref = _pair(n, shape)
    labels = torch.arange(n) % 5
    mq, mr = Samples(q, labels), Samples(ref, labels)
    sq, sr = _store(tmp_path / "q", mq), _store(tmp_path / "r", mr, sizes=(5, 2, 9))
    lp = build_lpips("alex", random_backbone=True)
    seen = []

    class Recorder(nn.Module):  # LPIPS as the metric sees it, noting the batch sizes it is called with
        def forward(self, x, y):
            seen.append(len(x))
            return lp(x, y)

    metrics = build_metrics([{"psnr_vs_fp": {"batch_size": 7}}, {"ssim_vs_fp": {"batch_size": 7}},
                             {"lpips_vs_fp": {"lpips_net": Recorder(), "batch_size": 7, "progress": False}}])
    res = {}
    for m in metrics:
        res[m.name] = m.compute(mq, mr, None)
        assert m.compute(sq, sr, None).to_dict() == res[m.name].to_dict(), m.name
        assert m.compute(mq, sr, None).to_dict() == res[m.name].to_dict(), m.name  # a memory set against a store
        assert len(res[m.name].extra["per_sample"]) == n
    total = n * (3 if video else 1)
    assert seen == ([7] * (total // 7) + [total % 7]) * 3  # whole-set batches of frames, for each of the 3 runs

    # the formulas as computed before streaming, on the whole tensors at once
    dims = tuple(range(1, q.ndim))
    psnr = peak_signal_noise_ratio(q, ref, data_range=2.0, dim=dims, reduction="none").double()
    flat = (q.flatten(0, 1), ref.flatten(0, 1)) if video else (q, ref)
    ssim = structural_similarity_index_measure(*flat, data_range=2.0, kernel_size=3, sigma=0.5,
                                               reduction="none").view(n, -1).mean(1).double()
    for name, whole in (("psnr_vs_fp", psnr), ("ssim_vs_fp", ssim)):  # float32 arithmetic per read batch
        got = torch.tensor(res[name].extra["per_sample"], dtype=torch.float64)
        assert torch.allclose(got, whole, rtol=1e-5, atol=0), name  # per_sample keeps 6 significant digits
        assert abs(res[name].value - whole.float().mean().item()) <= 1e-6 * abs(whole.mean().item()), name
    with torch.no_grad():  # LPIPS: the network sees the same 7-frame batches as before streaming -> exact
        a, b = flat
        per = torch.cat([lp(a[s:s + 7].clamp(-1, 1), b[s:s + 7].clamp(-1, 1)).flatten().double()
                         for s in range(0, len(a), 7)]).view(n, -1).mean(1)
    assert res["lpips_vs_fp"].value == float(per.mean()) and per.min() > 0
    assert res["lpips_vs_fp"].extra["std"] == per.std().item()


def test_paired_metrics_check_the_reference_before_and_during_reading(tmp_path):
    q, ref = _pair(9, (3, 8, 8))
    labels = torch.arange(9) % 3
    m = build_metrics([{"psnr_vs_fp": {"batch_size": 4}}])[0]
    st = _store(tmp_path / "q", Samples(q, labels))
    with pytest.raises(ValueError, match="fp reference samples, but none"):
        m.compute(st, None, None)
    with pytest.raises(ValueError, match="shape or labels"):
        m.compute(st, _store(tmp_path / "r1", Samples(ref, labels.flip(0))), None)
    with pytest.raises(ValueError, match="shape or labels"):
        m.compute(st, _store(tmp_path / "r2", Samples(ref[:8], labels[:8])), None)
    other_size = Samples(torch.zeros(9, 3, 4, 4), labels)  # same count and labels: only a batch shows the mismatch
    with pytest.raises(ValueError, match="shape or labels"):
        m.compute(st, _store(tmp_path / "r3", other_size), None)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save all extracted features")
def test_digits_metrics_are_identical_on_memory_and_store_and_match_torchmetrics_on_the_whole_set(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    from orbitquant.harness.data import load_digits_tensor
    from orbitquant.harness.metrics.digits import DigitsContext
    from orbitquant.harness.metrics.digits_net import DigitFeatures, DigitLogits

    ctx = DigitsContext()
    x, y = load_digits_tensor()
    g = torch.Generator().manual_seed(0)
    ref, labels = x[:47], y[:47]
    q = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    mq, mr = Samples(q, labels), Samples(ref, labels)
    sq, sr = _store(tmp_path / "q", mq), _store(tmp_path / "r", mr, sizes=(11, 2))
    names = ("fid_vs_fp", "fid_vs_real", "class_acc", "inception_score")
    small = {n: build_metrics([{n: {"batch_size": 10}}])[0].compute(mq, mr, ctx) for n in names}
    whole = {n: build_metrics([n])[0].compute(mq, mr, ctx) for n in names}  # default batch: all 47 at once
    for n in names:
        assert build_metrics([{n: {"batch_size": 10}}])[0].compute(sq, sr, ctx).to_dict() == small[n].to_dict(), n
        assert build_metrics([n])[0].compute(sq, sr, ctx).to_dict() == whole[n].to_dict(), n

    # before streaming: one torchmetrics update with the whole set
    with torch.inference_mode(False), torch.no_grad():
        fid = FrechetInceptionDistance(feature=DigitFeatures(ctx.net))
        fid.update(ref, real=True)
        fid.update(q, real=False)
        fid_fp = float(fid.compute())
        fid = FrechetInceptionDistance(feature=DigitFeatures(ctx.net))
        fid.update(x, real=True)
        fid.update(q, real=False)
        fid_real = float(fid.compute())
        acc = (ctx.net(q).argmax(1) == labels).float().mean().item()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            isc = InceptionScore(feature=DigitLogits(ctx.net), splits=5)
            isc.update(q)
            is_mean = float(isc.compute()[0])
    assert whole["fid_vs_fp"].value == fid_fp and whole["fid_vs_real"].value == fid_real
    assert whole["class_acc"].value == acc and whole["inception_score"].value == is_mean
    assert 0.3 < fid_fp < 10 < fid_real and acc > 0.9 and is_mean > 5  # sane values, not degenerate ones
    # 10-image batches: the classifier's float32 features round differently per batch shape (oneDNN blocking),
    # which moves FID and IS by a few float32 ulps; accuracy (an argmax) does not move
    assert small["class_acc"].value == acc
    for n, want in (("fid_vs_fp", fid_fp), ("fid_vs_real", fid_real), ("inception_score", is_mean)):
        assert abs(small[n].value - want) <= 1e-5 * want, n


@pytest.mark.parametrize("video", [False, True])
def test_inception_family_is_identical_on_memory_and_store_and_matches_whole_set_features(tmp_path, video):
    net = TinyInception()
    n, shape = (7, (3, 3, 16, 16)) if video else (23, (3, 16, 16))
    q, ref = _pair(n, shape, sigma=0.3)
    labels = torch.zeros(n, dtype=torch.long)
    mq, mr = Samples(q, labels), Samples(ref, labels)
    sq, sr = _store(tmp_path / "q", mq, "uint8"), _store(tmp_path / "r", mr, "uint8", sizes=(4, 9))
    names = ("fid", "sfid", "isc", "precision", "recall")

    def run(samples, reference, cache):
        opts = {"extractor": net, "batch_size": 5, "progress": False, "cache_dir": str(tmp_path / cache), "k": 2}
        ms = build_metrics([{m: {**opts, **({} if m == "isc" else {"reference": "fp"})}} for m in names])
        ctx = metric_contexts(ms)
        return {m.name: m.compute(samples, reference, ctx[m.context_cls]).to_dict() for m in ms}

    calls = net.calls
    mem = run(mq, mr, "c1")
    frames = n * (3 if video else 1)
    assert net.calls - calls == 2 * frames  # one pass over each set, shared by the five metrics
    assert run(sq, sr, "c2") == mem  # the store holds the same uint8 values the metrics would round to

    # before streaming: the uint8 frames of the whole set, through the network in consecutive 5-image batches
    with torch.no_grad():
        def feats(x):
            u = to_uint8(x)
            return {k: torch.cat([net(u[s:s + 5])[k].float() for s in range(0, len(u), 5)]) for k in net.outputs}

        fq, fr = feats(q), feats(ref)
    for name, key in (("fid", "pool3"), ("sfid", "spatial")):
        want = stats.frechet_distance(*stats.gaussian_stats(fq[key]), *stats.gaussian_stats(fr[key]))
        assert mem[name]["value"] == want and want > 0
    is_mean, _, per = stats.inception_score(fq["logits_unbiased"])
    assert mem["isc"]["value"] == is_mean and mem["isc"]["per_sample"] == per_sample(per) and len(per) == frames
    prec, rec = stats.precision_recall(fr["pool3"], fq["pool3"], k=2)
    assert mem["precision"]["value"] == prec.double().mean().item()
    assert mem["recall"]["value"] == rec.double().mean().item()


def test_feature_context_and_disk_cache_key_on_the_sample_values(tmp_path):
    net = TinyInception()
    q, _ = _pair(12, (3, 16, 16))
    labels = torch.zeros(12, dtype=torch.long)
    opts = {"extractor": net, "batch_size": 5, "progress": False}
    (m,) = build_metrics([{"isc": {**opts, "cache_dir": str(tmp_path / "c")}}])
    ctx = metric_contexts([m])[m.context_cls]
    first = m.compute(Samples(q, labels), None, ctx).value
    calls = net.calls
    assert m.compute(Samples(q.clone(), labels), None, ctx).value == first  # another object, same values: no pass
    assert net.calls == calls
    changed = q.clone()
    changed[3] = -changed[3]
    assert m.compute(Samples(changed, labels), None, ctx).value != first and net.calls == calls + 12

    # a store's features go to <store>/features by default and are found there by a fresh context
    st = _store(tmp_path / "s", Samples(q, labels), "uint8")
    (d,) = build_metrics([{"isc": opts}])
    calls = net.calls
    v = d.compute(st, None, metric_contexts([d])[d.context_cls]).value
    assert net.calls == calls + 12 and len(list((tmp_path / "s" / "features").glob("*.npz"))) == 1
    assert d.compute(SampleSet.open(tmp_path / "s"), None, metric_contexts([d])[d.context_cls]).value == v
    assert net.calls == calls + 12  # disk cache hit under the store's fingerprint
    assert SampleSet.open(tmp_path / "s").fingerprint() == st.fingerprint()


def test_extract_reads_iterables_and_sample_sets_in_the_same_batches(tmp_path):
    net = TinyInception()
    video = _pair(5, (3, 3, 16, 16))[0]
    whole = extract(video, net, batch_size=4, progress=False)
    st = _store(tmp_path / "s", Samples(video, torch.zeros(5, dtype=torch.long)), "uint8")
    from_store = extract(st, net, batch_size=4, progress=False)
    chunks = extract((video[i:i + 2] for i in range(0, 5, 2)), net, batch_size=4, progress=False)
    for k in net.outputs:
        assert whole[k].shape[0] == 15 and torch.equal(whole[k], from_store[k]) and torch.equal(whole[k], chunks[k])
    calls = net.calls
    extract(iter([video]), net, batch_size=4, progress=False, cache_dir=tmp_path / "c")  # no key: not cached
    assert not (tmp_path / "c").exists() and net.calls == calls + 15
    extract(st, net, batch_size=4, progress=False, cache_dir=tmp_path / "c")
    (cached,) = (tmp_path / "c").glob("*.npz")
    assert net.calls == calls + 30
    np.savez(cached, **{k: v[:14].numpy() for k, v in whole.items()})  # a stale file under the same key
    again = extract(st, net, batch_size=4, progress=False, cache_dir=tmp_path / "c")
    assert net.calls == calls + 45 and all(torch.equal(again[k], whole[k]) for k in net.outputs)
    assert extract(st, net, batch_size=4, progress=False, cache_dir=tmp_path / "c")["pool3"].shape[0] == 15
    assert net.calls == calls + 45  # the rewritten file is used


def test_fid_against_a_store_reference_equals_fp_reference_and_honours_limit(tmp_path):
    net = TinyInception()
    q, ref = _pair(20, (3, 16, 16), sigma=0.3)
    labels = torch.zeros(20, dtype=torch.long)
    sr = _store(tmp_path / "ref", Samples(ref, labels), "uint8")
    opts = {"extractor": net, "batch_size": 6, "progress": False, "cache_dir": str(tmp_path / "c")}
    fp, folder = build_metrics([{"fid": {**opts, "reference": "fp"}}, {"sfid": {**opts, "reference": str(sr.path)}}])
    folder.check()
    v_fp = fp.compute(Samples(q, labels), sr, metric_contexts([fp])[fp.context_cls])
    (as_ref,) = build_metrics([{"fid": {**opts, "reference": str(sr.path)}}])
    v_ref = as_ref.compute(Samples(q, labels), None, metric_contexts([as_ref])[as_ref.context_cls])
    assert v_ref.value == v_fp.value and v_ref.extra["n_real"] == 20
    (lim,) = build_metrics([{"fid": {**opts, "reference": str(sr.path), "limit": 13}}])
    v_lim = lim.compute(Samples(q, labels), None, metric_contexts([lim])[lim.context_cls])
    f = extract(Samples(ref[:13], labels[:13]), net, batch_size=6, progress=False)["pool3"]
    fq = extract(Samples(q, labels), net, batch_size=6, progress=False)["pool3"]
    want = stats.frechet_distance(*stats.gaussian_stats(fq), *stats.gaussian_stats(f))
    assert v_lim.extra["n_real"] == 13 and v_lim.value == pytest.approx(want, rel=1e-12) and v_lim.value != v_ref.value


@pytest.mark.parametrize("video", [False, True])
def test_clip_score_is_identical_on_memory_and_store_and_matches_whole_set_batches(tmp_path, video):
    clip = TinyClip()
    n, shape = (5, (3, 3, 20, 24)) if video else (11, (3, 20, 24))
    prompts = ["a photo of a cat", "a red car on the sea", "two dogs"]
    q, _ = _pair(n, shape)
    mem = Samples(q, torch.arange(n) % 3, {"prompts": prompts})
    st = _store(tmp_path / "s", mem, "uint8")
    (m,) = build_metrics([{"clip_score": {"clip_model": clip, "tokenizer": toy_tokenizer, "progress": False,
                                          "batch_size": 7}}])  # videos: 2 per read
    r = m.compute(mem, None, None)
    assert m.compute(st, None, None).to_dict() == r.to_dict()
    # before streaming: every frame with its sample's prompt, in consecutive batches of 7
    from orbitquant.harness.metrics.clip_score import preprocess

    u = to_uint8(q)
    f = u.shape[0] // n
    texts = [prompts[int(i)] for i in mem.labels for _ in range(f)]
    with torch.no_grad():
        out = []
        for s in range(0, len(u), 7):
            img = clip.encode_image(preprocess(u[s:s + 7], 16)).float()
            txt = clip.encode_text(toy_tokenizer(texts[s:s + 7])).float()
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            out.append((100 * (img * txt).sum(-1)).clamp(min=0))
    per = torch.cat(out).view(n, f).double().mean(1)
    assert r.value == float(per.mean()) and r.extra["std"] == per.std().item() and per.max() > 0
    with pytest.raises(ValueError, match="names no prompt"):
        m.compute(Samples(q, torch.full((n,), 3)[:n], {"prompts": prompts}), None, None)


def test_geneval_and_vbench_writers_stream_the_same_files(tmp_path, monkeypatch):
    from orbitquant.harness import viz
    from orbitquant.harness.metrics.geneval import write_geneval
    from orbitquant.harness.metrics.vbench import write_videos

    meta = [{"tag": "single_object", "prompt": "a photo of a bench"}, {"tag": "counting", "prompt": "three apples"}]
    prompts = [m["prompt"] for m in meta]
    q, _ = _pair(9, (3, 8, 8))
    mem = Samples(q, torch.arange(9) % 2, {"prompts": prompts})
    st = _store(tmp_path / "s", mem)
    a = write_geneval(mem, tmp_path / "ga", meta, batch_size=4)
    b = write_geneval(st, tmp_path / "gb", meta, batch_size=4)
    assert a == b and len(a) == 9
    from PIL import Image

    u = to_uint8(q).permute(0, 2, 3, 1).numpy()
    for rel, k in a.items():
        assert (tmp_path / "ga" / rel).read_bytes() == (tmp_path / "gb" / rel).read_bytes()
        assert np.array_equal(np.asarray(Image.open(tmp_path / "gb" / rel)), u[k])

    clips = []
    monkeypatch.setattr(viz, "save_mp4", lambda clip, path, fps: (clips.append(clip.clone()), path.touch(), path)[2])
    vq = _pair(4, (2, 3, 8, 8))[0]
    vmem = Samples(vq, torch.tensor([0, 1, 0, 0]), {"prompts": prompts})
    vst = _store(tmp_path / "v", vmem)
    read = []
    batches = vst.batches
    vst.batches = lambda *a, **k: (read.append(len(x)) or (x, lab) for x, lab in batches(*a, **k))
    index = write_videos(vst, tmp_path / "videos", fps=8)
    assert index == {"a photo of a bench-0.mp4": 0, "three apples-0.mp4": 1, "a photo of a bench-1.mp4": 2,
                     "a photo of a bench-2.mp4": 3}
    assert len(clips) == 4 and all(torch.equal(c, v) for c, v in zip(clips, vq, strict=True))
    assert max(read) == 1  # one video at a time
    read.clear()
    assert write_videos(vst, tmp_path / "videos", fps=8) == index and len(clips) == 4  # re-score: nothing rewritten
    assert read == [1]  # and nothing read but the first video's shape
    (tmp_path / "videos" / "a photo of a bench-1.mp4").unlink()
    write_videos(vst, tmp_path / "videos", fps=8)
    assert len(clips) == 5 and torch.equal(clips[-1], vq[2])  # only the missing video is written again
    with pytest.raises(ValueError, match="images"):
        write_videos(st, tmp_path / "x")


# ---------------------------------------------------------------------------------------------- memory
def _peak_traced(fn) -> int:
    """Peak bytes allocated through Python's allocator and numpy (``tracemalloc``) while ``fn`` runs, above what was
    allocated before. A store's shards and batches are numpy arrays (a float32 batch is a view of one), so a metric
    that holds the whole set -- one big batch, or a list of all batches -- shows here."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


@pytest.fixture
def one_thread():
    """The memory checks run hundreds of tiny batches, where torch's thread pool costs more than it gives (and
    stalls when the machine is shared); one thread changes no number here, only the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _memory_case(tmp_path, monkeypatch, kind):
    """``(metrics, [samples, reference, small samples, small reference], bytes of one full set, bound)`` for one
    family of metrics on two stores whose full size is several times the bound: per stream 4 shards and 4 batches
    (a shard is read as bytes and parsed into an array; ``SampleSet.batches`` holds the shard being consumed, its
    predecessor's tail and the batch cut from them), the features of both sets (kept, as allowed: 81 floats per
    image here, read back from the feature cache as numpy), plus 0.5-1 MiB for everything else (per-sample values).
    Measured peaks sit at about half the bound; holding either whole set exceeds it."""
    if kind == "digits":  # 8x8 float32 digits in the classifier's batches
        n, shape, fmt, shard, batch, kept, slack = 8000, (1, 8, 8), "float32", 20, 40, 0, 2**19
        names = [{m: {"batch_size": batch}} for m in ("fid_vs_fp", "fid_vs_real", "class_acc", "inception_score")]
    elif kind == "paired":  # PSNR, SSIM, LPIPS on RGB float32
        n, shape, fmt, shard, batch, kept, slack = 400, (3, 32, 32), "float32", 2, 2, 0, 2**20
        lp = build_lpips("alex", random_backbone=True)
        names = [{"psnr_vs_fp": {"batch_size": batch}}, {"ssim_vs_fp": {"batch_size": batch}},
                 {"lpips_vs_fp": {"lpips_net": lp, "batch_size": batch, "progress": False}}]
    else:  # Inception-family features and CLIP on a uint8 store
        n, shape, fmt, shard, batch, kept, slack = 1200, (3, 64, 64), "uint8", 8, 8, 2 * (8 + 10 + 63) * 4, 2**20
        opts = {"extractor": TinyInception(), "batch_size": batch, "progress": False, "cache_dir": str(tmp_path / "c")}
        names = [{"fid": {**opts, "reference": "fp"}}, {"isc": opts}, {"precision": {**opts, "reference": "fp"}},
                 {"clip_score": {"clip_model": TinyClip(), "tokenizer": toy_tokenizer, "progress": False,
                                 "batch_size": batch}}]
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    sets = []
    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)  # hundreds of shards; their durability is not under test here
        for name, count in (("q", n), ("r", n), ("warm_q", 2 * shard), ("warm_r", 2 * shard)):
            w = StoreWriter(tmp_path / name, "t", count, fmt)
            for s in range(0, count, shard):  # written shard by shard: the test itself never holds a whole set
                x = torch.rand(min(shard, count - s), *shape, generator=g) * 2 - 1
                w.write(s, s + len(x), x, labels[s:s + len(x)])
            w.finish({"prompts": [f"prompt {i}" for i in range(10)]})
            w.close()
            sets.append(SampleSet.open(tmp_path / name))
    item = math.prod(shape) * (4 if fmt == "float32" else 1)
    bound = 2 * (4 * shard + 4 * batch) * item + n * kept + slack
    return build_metrics(names), sets, n * item, bound


def _measure(m, sets) -> int:
    """Peak traced bytes of ``m`` on the big pair of stores, after one run on the small pair (so the modules a
    metric imports on first use, e.g. scipy under torchmetrics' FID, are not counted as sample memory)."""
    sq, sr, wq, wr = sets
    m.compute(wq, wr if m.needs_reference else None, _context(m))
    ctx = _context(m)
    return _peak_traced(lambda: m.compute(sq, sr if m.needs_reference else None, ctx))


def _context(m):
    ctx = metric_contexts([m]).get(m.context_cls)
    if hasattr(ctx, "real_images"):  # the digits data set (the real reference, 1797 images) loads outside the check
        assert len(ctx.real_images) == 1797 and ctx.net is not None
    return ctx


@pytest.mark.parametrize("kind", ["paired", "digits", "features"])
def test_metrics_over_a_store_hold_about_one_shard_and_one_batch(tmp_path, monkeypatch, one_thread, kind):
    metrics, sets, full, bound = _memory_case(tmp_path, monkeypatch, kind)
    assert full > 3 * bound  # the set is much larger than what a metric may hold
    for m in metrics:
        peak = _measure(m, sets)
        assert peak < bound, f"{m.name} held {peak / 2**20:.2f} MiB of a {full / 2**20:.2f} MiB set"


def test_the_memory_check_catches_a_full_load(tmp_path, monkeypatch, one_thread):
    """The check above must fail when a metric holds the whole set: reading it as one batch, or keeping every
    batch (e.g. to concatenate them)."""
    metrics, sets, full, bound = _memory_case(tmp_path, monkeypatch, "paired")
    psnr = metrics[0]
    assert _measure(psnr, sets) < bound
    assert _peak_traced(lambda: torch.cat([x for x, _ in sets[0].batches(2)])) > full > bound
    monkeypatch.setattr(base, "items_per_read", lambda samples, images: len(samples))
    assert _measure(psnr, sets) > full > bound


# ---------------------------------------------------------------------------------------------- opening samples
def test_open_samples_reads_stores_and_legacy_npz(tmp_path):
    q, _ = _pair(6, (1, 4, 4))
    labels = torch.arange(6)
    st = _store(tmp_path / "run" / "samples", Samples(q, labels))
    assert isinstance(open_samples(tmp_path / "run" / "samples"), SampleSet)
    assert open_samples(tmp_path / "run" / "samples").fingerprint() == st.fingerprint()
    legacy = tmp_path / "old" / "samples"
    legacy.mkdir(parents=True)
    np.savez(legacy / "samples.npz", images=q.numpy(), labels=labels.numpy())
    for path in (legacy, legacy / "samples.npz"):
        s = open_samples(path)
        assert isinstance(s, Samples) and torch.equal(s.images, q) and s.meta["source"] == str(legacy / "samples.npz")
    with pytest.raises(FileNotFoundError, match="sample store"):
        open_samples(tmp_path / "nothing")
