"""CLIP score (prompt-image agreement): ``max(100 * cos(E_img, E_txt), 0)`` per sample (videos: mean over frames),
with OpenAI's CLIP from clip-anytorch.

clip-anytorch's package imports torchvision and pkg_resources; its model code (``clip/model.py``) and BPE tokenizer
(``clip/simple_tokenizer.py``, vocab in the wheel) do not, so they are loaded standalone and the preprocess (bicubic
resize of the short side, centre crop, CLIP mean/std) is written with PIL, with torchvision's output sizes and crop
offsets (:func:`preprocess`). Install: ``pip install --no-deps clip-anytorch ftfy regex``.

Options: ``model`` (``ViT-B/32`` default, ``ViT-L/14``), ``weights`` (a local file: OpenAI's TorchScript archive or a
state dict; default ``~/.cache/clip/<ViT-B-32.pt|ViT-L-14.pt>``, clip's own download location), ``batch_size``,
``device``, ``progress``, ``verify_sha256`` (default true: the weights must be OpenAI's file, checked against the
sha256 in its URL). Tests pass ``clip_model=`` / ``tokenizer=`` objects instead.

Samples are read ``batch_size`` images (video frames) at a time; CLIP sees the frames in consecutive groups of
``batch_size`` as before streaming (``base.rebatch``), so the scores are the same.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from orbitquant.harness.metrics.base import Metric, SampleSource, cat_or_empty, item_batches, rebatch
from orbitquant.harness.metrics.features import resolve_device, to_uint8
from orbitquant.harness.metrics.inception import per_sample
from orbitquant.harness.types import MetricResult
from orbitquant.quant.registry import register_metric

CLIP_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _clip_dir() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "model.py").exists():
        raise ModuleNotFoundError("CLIP score needs clip-anytorch's model code: `pip install --no-deps clip-anytorch "
                                  "ftfy regex` (it imports without torchvision this way)")
    return Path(spec.origin).parent


def _standalone(name: str, fname: str):
    """Load one file of the clip package without running ``clip/__init__`` (torchvision, pkg_resources)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _clip_dir() / fname)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def clip_model_module():
    """clip-anytorch's ``clip/model.py`` (``CLIP``, ``build_model``)."""
    return _standalone("orbitquant_clip_model", "model.py")


class ClipTokenizer:
    """``clip.tokenize(texts, truncate=True)`` without importing the clip package."""

    def __init__(self, context_length: int = 77) -> None:
        self.tok = _standalone("orbitquant_clip_tokenizer", "simple_tokenizer.py").SimpleTokenizer()
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        sot, eot = self.tok.encoder["<|startoftext|>"], self.tok.encoder["<|endoftext|>"]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sot] + self.tok.encode(t)[: self.context_length - 2] + [eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def resized_size(w: int, h: int, n_px: int) -> tuple[int, int]:
    """torchvision ``Resize(n_px)``'s output size: the short side becomes ``n_px``, the long side
    ``int(n_px * long / short)`` -- truncated, not rounded (``_compute_resized_output_size``): 1360x768 -> 396x224."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(n_px * long / short)
    return (n_px, new_long) if w <= h else (new_long, n_px)


def preprocess(images_u8: torch.Tensor, n_px: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> CLIP input (N, 3, n_px, n_px): clip's own transform -- ``Resize(n_px, BICUBIC)`` (PIL),
    ``CenterCrop(n_px)`` (offsets ``int(round((size - n_px) / 2))``), RGB, ``ToTensor``, ``Normalize`` -- written
    with PIL because torchvision does not import beside the CPU torch wheel (tested to the pixel against the same
    PIL calls with torchvision's sizes)."""
    from PIL import Image

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for arr in images_u8.permute(0, 2, 3, 1).cpu().numpy():
        im = Image.fromarray(arr)
        size = resized_size(*im.size, n_px)
        if size != im.size:  # torchvision returns the image unchanged when it already has the size
            im = im.resize(size, Image.BICUBIC)
        w, h = im.size
        left, top = int(round((w - n_px) / 2.0)), int(round((h - n_px) / 2.0))
        im = im.crop((left, top, left + n_px, top + n_px)).convert("RGB")
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


def clip_weights_path(model: str, weights: str | None = None) -> Path:
    """Where the weights of ``model`` are looked for: ``weights``, else clip's own download location."""
    if model not in CLIP_URLS:
        raise ValueError(f"CLIP model {model!r} not supported; choose one of {', '.join(CLIP_URLS)}")
    fname = CLIP_URLS[model].rsplit("/", 1)[1]
    return Path(weights).expanduser() if weights else Path("~/.cache/clip").expanduser() / fname


def clip_sha256(model: str) -> str:
    """OpenAI's published sha256 of a CLIP file: the folder of its URL (clip's ``_download`` checks the same)."""
    return url_sha256(CLIP_URLS[model])


def url_sha256(url: str) -> str:
    """The sha256 an OpenAI CLIP URL carries as the folder of its file."""
    return url.rsplit("/", 2)[1]


def find_clip_weights(model: str, weights: str | None = None) -> Path:
    path = clip_weights_path(model, weights)
    fname = path.name
    if not path.is_file():
        raise FileNotFoundError(f"CLIP {model} weights not found at {path}. Download {CLIP_URLS[model]} (OpenAI's "
                                f"file) to ~/.cache/clip/{fname}, or point `weights:` at a local copy")
    return path


def load_clip(model: str = "ViT-B/32", weights: str | None = None) -> torch.nn.Module:
    """OpenAI CLIP in fp32 from a local file (TorchScript archive as distributed, or a plain state dict)."""
    path = find_clip_weights(model, weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated": OpenAI's files are jit
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return clip_model_module().build_model(sd).float().eval()  # build_model converts to fp16


@register_metric
class CLIPScore(Metric):
    """Mean CLIP score of each sample against its prompt (``samples.meta['prompts'][label]``), 0..100."""

    name, higher_is_better = "clip_score", True

    def __init__(self, model: str = "ViT-B/32", weights: str | None = None, batch_size: int = 32,
                 device: str = "auto", progress: bool = True, clip_model: torch.nn.Module | None = None,
                 tokenizer=None, verify_sha256: bool = True) -> None:
        """``verify_sha256``: check the weights against OpenAI's published digest (preflight); false for a file of
        your own (a converted state dict, random weights in tests)."""
        self.model, self.weights, self.verify_sha256 = model, weights, verify_sha256
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self._model, self._tokenizer = clip_model, tokenizer

    def needs(self) -> list:
        from orbitquant.harness.preflight import file_need, module_need

        out = []
        if self._model is None:
            path = clip_weights_path(self.model, self.weights)
            out.append(file_need(f"CLIP {self.model} weights (OpenAI)", path, f"wget {CLIP_URLS[self.model]} -O {path}",
                                 sha256=clip_sha256(self.model) if self.verify_sha256 else None))
        if self._model is None or self._tokenizer is None:
            out.append(module_need("clip-anytorch (CLIP model code, tokenizer)", "clip",
                                   "pip install --no-deps clip-anytorch==2.6.0 ftfy regex"))
        return out

    @functools.cached_property
    def net(self) -> torch.nn.Module:
        return self._model if self._model is not None else load_clip(self.model, self.weights)

    @functools.cached_property
    def tokenizer(self):
        return self._tokenizer if self._tokenizer is not None else ClipTokenizer()

    @torch.no_grad()
    def _score_batch(self, images_u8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of one batch of uint8 (B, 3, H, W) images against one prompt each."""
        dev = resolve_device(self.device)
        net = self.net.to(dev)
        img = net.encode_image(preprocess(images_u8, int(net.visual.input_resolution)).to(dev)).float()
        txt = net.encode_text(self.tokenizer(prompts).to(dev)).float()
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).clamp(min=0).cpu()

    def _stream(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], prompts: list[str],
                total: int | None) -> torch.Tensor:
        """Per-image scores of ``(uint8 images, prompt index)`` chunks, regrouped into batches of ``batch_size``."""
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=total, desc="CLIP score", unit="img", disable=not self.progress, leave=False) as bar:
            for x, idx in rebatch(chunks, self.batch_size):
                out.append(self._score_batch(x, [prompts[int(i)] for i in idx]))
                bar.update(len(x))
        return cat_or_empty(out, "images")

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-image scores; ``images`` in [-1, 1] (N, C, H, W) or uint8, one prompt per image."""
        x = to_uint8(images)
        return self._stream([(x, torch.arange(len(x)))], prompts, len(x))

    def compute(self, samples: SampleSource, reference, ctx) -> MetricResult:
        prompts = _prompt_list(samples)
        for i in samples.labels.unique().tolist():  # every label names a prompt: fail before reading images
            _prompt(prompts, i)
        n_frames = 1

        def frames():
            nonlocal n_frames
            for x, labels in item_batches(samples, self.batch_size, uint8=True):
                n_frames = x.shape[1] if x.ndim == 5 else 1
                yield to_uint8(x), labels.repeat_interleave(n_frames)  # each frame is scored against its prompt

        per = self._stream(frames(), prompts, None).view(len(samples), n_frames).double().mean(1)
        return self.result(per.mean(), len(samples), std=per.std().item() if len(per) > 1 else 0.0,
                           model=self.model, per_sample=per_sample(per))


def _prompt_list(samples: SampleSource) -> list[str]:
    prompts = samples.meta.get("prompts")
    if not prompts:
        raise ValueError("this metric needs the samples' prompts (samples.meta['prompts']); class-conditional "
                         "samples have none")
    return prompts


def _prompt(prompts: list[str], label: int) -> str:
    if not 0 <= label < len(prompts):
        raise ValueError(f"sample label {label} names no prompt (samples.meta['prompts'] has {len(prompts)})")
    return prompts[label]


def sample_prompts(samples: SampleSource) -> list[str]:
    """The prompt of every sample: ``meta['prompts'][label]`` (text-to-image/video adapters)."""
    prompts = _prompt_list(samples)
    return [_prompt(prompts, int(i)) for i in samples.labels]
