"""CLIP score: the scoring path with a locally built CLIP-shaped model (always), and clip-anytorch's real architecture
and tokenizer with random weights loaded from a local file (when clip-anytorch is installed)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from orbitquant.harness.factory import build_metrics
from orbitquant.harness.metrics.clip_score import CLIP_URLS, CLIPScore, preprocess
from orbitquant.harness.metrics.features import to_uint8
from orbitquant.harness.types import Samples

HAS_CLIP = importlib.util.find_spec("clip") is not None and importlib.util.find_spec("ftfy") is not None


class TinyClip(nn.Module):
    """encode_image / encode_text / visual.input_resolution, like clip.model.CLIP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Linear(3 * 16 * 16, 8)
        self.visual.input_resolution = 16
        self.tok = nn.Embedding(128, 8)

    def encode_image(self, x):
        return self.visual(x.flatten(1))

    def encode_text(self, ids):
        return self.tok(ids).sum(1)


def toy_tokenizer(texts):
    out = torch.zeros(len(texts), 12, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [ord(c) % 128 for c in t[:12]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _samples(video=False):
    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 3, 20, 24) if video else (4, 3, 20, 24)
    return Samples(images=torch.rand(shape, generator=g) * 2 - 1, labels=torch.tensor([0, 1, 1, 0]),
                   meta={"prompts": ["a photo of a cat", "a red car on the sea"]})


def test_clip_score_is_clamped_cosine_per_sample_with_prompts_from_labels():
    net = TinyClip()
    (m,) = build_metrics([{"clip_score": {"clip_model": net, "tokenizer": toy_tokenizer, "progress": False,
                                          "batch_size": 3}}])
    m.check()  # nothing to load
    s = _samples()
    r = m.compute(s, None, None)
    prompts = [s.meta["prompts"][i] for i in s.labels]
    with torch.no_grad():
        img = net.encode_image(preprocess(to_uint8(s.images), 16))
        txt = net.encode_text(toy_tokenizer(prompts))
    expect = (100 * torch.cosine_similarity(img, txt, dim=-1)).clamp(min=0).double()
    assert r.extra["per_sample"] == pytest.approx(expect.tolist(), rel=1e-5, abs=1e-5)
    assert r.value == pytest.approx(expect.mean().item(), rel=1e-5, abs=1e-5) and r.higher_is_better and r.n == 4
    # videos: each sample's score is the mean over its frames
    v = _samples(video=True)
    rv = m.compute(v, None, None)
    frames = [m.scores(v.images[:, f], prompts) for f in range(2)]
    assert rv.extra["per_sample"] == pytest.approx(((frames[0] + frames[1]) / 2).tolist(), rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        m.compute(Samples(images=s.images, labels=s.labels), None, None)


def test_preprocess_resizes_short_side_and_centre_crops():
    x = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    x[..., 10:30] = 255  # a bright centre band survives the centre crop
    y = preprocess(x, 16)
    assert y.shape == (1, 3, 16, 16)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(y[0, :, 8, 8], white, atol=1e-5)


def test_preprocess_is_torchvisions_transform_to_the_pixel():
    """clip's ``_transform(224)`` on a 1360x768 frame: torchvision's Resize(224) truncates the long side,
    int(224 * 1360 / 768) = 396 (rounding gave 397, and every pixel moved); CenterCrop(224) then starts at
    int(round((396 - 224) / 2)) = 86. The expected tensor is those torchvision sizes applied with PIL calls."""
    from PIL import Image

    from orbitquant.harness.metrics.clip_score import MEAN, STD, resized_size

    assert resized_size(1360, 768, 224) == (396, 224) and resized_size(768, 1360, 224) == (224, 396)
    assert resized_size(224, 224, 224) == (224, 224) and resized_size(300, 225, 224) == (298, 224)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 768, 1360), dtype=torch.uint8, generator=g)
    im = Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((396, 224), Image.BICUBIC).crop((86, 0, 310, 224))
    want = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    want = (want - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.equal(preprocess(x, 224)[0], want)
    square = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=g)  # already the size: untouched
    assert torch.equal(preprocess(square, 224)[0], (square[0].float() / 255 - torch.tensor(MEAN).view(3, 1, 1))
                       / torch.tensor(STD).view(3, 1, 1))


def test_check_names_missing_clip_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for model, fname in (("ViT-B/32", "ViT-B-32.pt"), ("ViT-L/14", "ViT-L-14.pt")):
        with pytest.raises(FileNotFoundError) as e:
            CLIPScore(model=model).check()
        assert fname in str(e.value) and CLIP_URLS[model] in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        CLIPScore(weights=str(tmp_path / "nope.pt")).check()
    with pytest.raises(ValueError, match="not supported"):
        CLIPScore(model="RN50").check()


@pytest.mark.skipif(not HAS_CLIP, reason="optional: clip-anytorch's real CLIP code (pip install --no-deps "
                                         "clip-anytorch ftfy regex)")
def test_clip_anytorch_architecture_and_tokenizer_random_weights(tmp_path):
    from orbitquant.harness.metrics.clip_score import ClipTokenizer, clip_model_module

    ids = ClipTokenizer()(["a photo of a cat"])
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    torch.manual_seed(0)
    tiny = clip_model_module().CLIP(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
                                    vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=64,
                                    transformer_heads=1, transformer_layers=2)
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(FileNotFoundError, match="sha256 .* is not the published 40d36571"):
        CLIPScore(weights=str(path)).check()  # not OpenAI's file: refused unless told so
    m = CLIPScore(weights=str(path), progress=False, verify_sha256=False)
    m.check()
    r = m.compute(_samples(), None, None)
    assert len(r.extra["per_sample"]) == 4 and all(0 <= v <= 100 for v in r.extra["per_sample"])
    assert m.net.visual.input_resolution == 32 and next(m.net.parameters()).dtype == torch.float32
