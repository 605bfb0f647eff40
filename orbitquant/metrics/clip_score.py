"""CLIP score (prompt-image agreement): ``max(100 * cos(E_img, E_txt), 0)`` per sample (videos: mean over frames),
with OpenAI's CLIP from clip-anytorch.

clip-anytorch's package imports torchvision and pkg_resources; its model code (``clip/model.py``) and BPE tokenizer
(``clip/simple_tokenizer.py``, vocab in the wheel) do not, so they are loaded standalone and the preprocess (bicubic
resize of the short side, centre crop, CLIP mean/std) is written with PIL -- bit-identical to clip's torchvision
transform (SCALEOUT_STACK section 4). Install: ``pip install --no-deps clip-anytorch ftfy regex``.

Options: ``model`` (``ViT-B/32`` default, ``ViT-L/14``), ``weights`` (a local file: OpenAI's TorchScript archive or a
state dict; default ``~/.cache/clip/<ViT-B-32.pt|ViT-L-14.pt>``, clip's own download location), ``batch_size``,
``device``, ``progress``. Tests pass ``clip_model=`` / ``tokenizer=`` objects instead.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..registry import register_metric
from ..types import MetricResult, Samples
from .base import Metric
from .features import resolve_device, to_uint8
from .inception import per_sample

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


def preprocess(images_u8: torch.Tensor, n_px: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> CLIP input (N, 3, n_px, n_px): short side to n_px (bicubic, PIL), centre crop, normalize."""
    from PIL import Image

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for arr in images_u8.permute(0, 2, 3, 1).cpu().numpy():
        im = Image.fromarray(arr)
        w, h = im.size
        s = n_px / min(w, h)
        im = im.resize((max(n_px, round(w * s)), max(n_px, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = round((w - n_px) / 2), round((h - n_px) / 2)
        im = im.crop((left, top, left + n_px, top + n_px))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


def find_clip_weights(model: str, weights: str | None = None) -> Path:
    if model not in CLIP_URLS:
        raise ValueError(f"CLIP model {model!r} not supported; choose one of {', '.join(CLIP_URLS)}")
    fname = CLIP_URLS[model].rsplit("/", 1)[1]
    path = Path(weights).expanduser() if weights else Path("~/.cache/clip").expanduser() / fname
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


@register_metric("clip_score")
class CLIPScore(Metric):
    """Mean CLIP score of each sample against its prompt (``samples.meta['prompts'][label]``), 0..100."""

    name, higher_is_better = "clip_score", True

    def __init__(self, model: str = "ViT-B/32", weights: str | None = None, batch_size: int = 32,
                 device: str = "auto", progress: bool = True, clip_model: torch.nn.Module | None = None,
                 tokenizer=None) -> None:
        self.model, self.weights = model, weights
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self._model, self._tokenizer = clip_model, tokenizer

    def check(self) -> None:
        if self._model is None:
            find_clip_weights(self.model, self.weights)
        if self._model is None or self._tokenizer is None:
            try:
                _clip_dir()
            except ModuleNotFoundError as e:
                raise FileNotFoundError(f"metric {self.name}: {e}") from None

    @functools.cached_property
    def net(self) -> torch.nn.Module:
        return self._model if self._model is not None else load_clip(self.model, self.weights)

    @functools.cached_property
    def tokenizer(self):
        return self._tokenizer if self._tokenizer is not None else ClipTokenizer()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-image scores; ``images`` in [-1, 1] (N, C, H, W) or uint8, one prompt per image."""
        from tqdm.auto import tqdm

        dev = resolve_device(self.device)
        net = self.net.to(dev)
        n_px = int(net.visual.input_resolution)
        x = to_uint8(images)
        out = []
        for s in tqdm(range(0, len(x), self.batch_size), desc="CLIP score", disable=not self.progress, leave=False):
            img = net.encode_image(preprocess(x[s:s + self.batch_size], n_px).to(dev)).float()
            txt = net.encode_text(self.tokenizer(prompts[s:s + self.batch_size]).to(dev)).float()
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            out.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return torch.cat(out)

    def compute(self, samples: Samples, reference, ctx) -> MetricResult:
        prompts = sample_prompts(samples)
        imgs = samples.images
        frames = imgs.shape[1] if imgs.ndim == 5 else 1
        per_frame = self.scores(imgs, [p for p in prompts for _ in range(frames)])
        per = per_frame.view(len(samples), frames).double().mean(1)
        return self.result(per.mean(), len(samples), std=per.std().item() if len(per) > 1 else 0.0,
                           model=self.model, per_sample=per_sample(per))


def sample_prompts(samples: Samples) -> list[str]:
    """The prompt of every sample: ``meta['prompts'][label]`` (text-to-image/video adapters)."""
    prompts = samples.meta.get("prompts")
    if not prompts:
        raise ValueError("this metric needs the samples' prompts (samples.meta['prompts']); class-conditional "
                         "samples have none")
    return [prompts[int(i)] for i in samples.labels]
