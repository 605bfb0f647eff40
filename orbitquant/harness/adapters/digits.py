"""The embedded default model: a class-conditional DiT (diffusers ``DiTTransformer2DModel``) on 8x8 digits.

Everything the harness knows about this family lives here: the architecture, where the shipped
weights are, which linear has which role, how to sample, and the function-preserving outlier
variant (``digits_outliers``).

Sampling is rectified flow (``x_t = (1-t) x0 + t eps``, the network predicts ``eps - x0``) with an
Euler solver and classifier-free guidance; label 10 is the null class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from orbitquant.harness.adapters.base import ModelAdapter
from orbitquant.harness.adapters.dit_roles import dit_layer_refs
from orbitquant.harness.adapters.plan_facts import CfgRule, ClassConditionalFacts, Geometry
from orbitquant.harness.distributed import shard_range
from orbitquant.harness.paths import ASSETS
from orbitquant.harness.samplestore import MemorySink
from orbitquant.quant.calib import denoiser_call
from orbitquant.quant.registry import register_model
from orbitquant.quant.types import LayerRef

DIT_DIR = ASSETS / "digits_dit"
NULL_CLASS = 10

#: Hidden width 96 = 3 * 32, FFN width 384 = 3 * 128: RPBH uses 3 blocks of 32 / 128 (non power-of-two dims).
DIT_KWARGS = dict(
    num_attention_heads=3, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=8,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
)
#: Overrides for the random-init test model (hidden 48 = 3 * 16).
TINY_OVERRIDES = dict(num_attention_heads=2, attention_head_dim=24, num_layers=2)


def build_dit(seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised digits DiT (CPU, fp32). Label dropout is disabled: we drop labels ourselves."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**DIT_KWARGS, **overrides})
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0  # keeps its 11th (null) row
    return model


@torch.no_grad()
def inject_outliers(model: nn.Module, channels: int = 4, scale: float = 8.0, seed: int = 0) -> list[list[int]]:
    """Function-preserving outlier injection, in place.

    In every block, ``channels`` hidden channels of the adaLN-modulated attention and FFN inputs are
    multiplied by ``scale`` (through the adaLN shift/scale rows) and the consuming linears' input
    columns are divided by ``scale``. The fp output is unchanged up to rounding, but activations now
    carry the large outlier channels real DiTs have. Returns the chosen channels per block.
    """
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for block in model.transformer_blocks:
        d = block.norm1.linear.in_features
        idx = torch.randperm(d, generator=g)[:channels]
        chosen.append(idx.tolist())
        lin = block.norm1.linear  # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        for shift, scl in ((0, 1), (3, 4)):
            lin.weight[shift * d + idx] *= scale
            lin.bias[shift * d + idx] *= scale
            lin.weight[scl * d + idx] *= scale
            lin.bias[scl * d + idx] = scale * (1 + lin.bias[scl * d + idx]) - 1
        for consumer in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.ff.net[0].proj):
            consumer.weight[:, idx] /= scale
    return chosen


@dataclass
class DigitsPipeline:
    """The digits DiT plus its sampler (the analogue of a diffusers pipeline)."""

    transformer: nn.Module
    image_size: int = 8

    @torch.inference_mode()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        if guidance == 1.0:
            return self.transformer(x, timestep=t * 1000, class_labels=labels).sample
        null = torch.full_like(labels, NULL_CLASS)
        out = self.transformer(
            torch.cat([x, x]), timestep=torch.cat([t, t]) * 1000, class_labels=torch.cat([labels, null])
        ).sample
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    @torch.inference_mode()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor, steps: int, guidance: float,
               progress: tqdm | None = None) -> torch.Tensor:
        """Euler integration of the flow from t=1 (noise) to t=0; deterministic given ``noise``."""
        x = noise.clone()
        halves = ("cond",) if guidance == 1.0 else ("cond", "uncond")  # velocity() batches [cond; uncond]
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t = ts[i].expand(len(x))
            with denoiser_call(i, halves, steps):  # tells calibration collectors the step and CFG layout
                x = x - (ts[i] - ts[i + 1]) * self.velocity(x, t, labels, guidance)
            if progress is not None:
                progress.update(1)
        return x


@register_model("digits")
class DigitsAdapter(ClassConditionalFacts, ModelAdapter):
    """Adapter for the shipped digits DiT; ``outlier_channels > 0`` gives the ``digits_outliers`` variant."""

    modality = "image"
    cfg_rule = CfgRule("guidance != 1", "batch", "adapters/digits.py DigitsPipeline.velocity: guidance == 1.0 runs "
                       "one pass, else torch.cat([x, x]) = [cond; uncond] in one call")
    pipeline_extras = ()  # pixel space: no VAE, no text encoder

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """The shipped config's pixel grid (the protocol has no resolution): no VAE, patches of ``patch_size``."""
        side, p = cfg["sample_size"], cfg["patch_size"]
        return Geometry((side // p) ** 2, 0, (cfg["in_channels"], side, side),
                        f"{side}x{side} px, no VAE, patch {p}: ({side}/{p})^2")

    def __init__(self, name: str = "digits", path: str | None = None, outlier_channels: int = 0,
                 outlier_scale: float = 8.0, outlier_seed: int = 0) -> None:
        if outlier_channels < 0 or outlier_scale <= 0:
            raise ValueError("outlier_channels must be >= 0 and outlier_scale > 0")
        self.name = name
        self.path = Path(path) if path else DIT_DIR
        self.outlier_channels = outlier_channels
        self.outlier_scale = outlier_scale
        self.outlier_seed = outlier_seed

    def needs(self) -> list:
        from orbitquant.harness.preflight import dir_need

        return [dir_need(f"model={self.name}", self.path, "they ship with the repo (orbitquant/assets/digits_dit); "
                         "`python scripts/train_digits.py` recreates them",
                         contains=["config.json", "diffusion_pytorch_model.safetensors"])]

    def load(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DigitsPipeline:
        from diffusers import DiTTransformer2DModel

        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"digits DiT weights not found in {self.path}; they ship with the repo "
                "(orbitquant/assets/digits_dit) and `python scripts/train_digits.py` recreates them"
            )
        model = DiTTransformer2DModel.from_pretrained(str(self.path), torch_dtype=dtype)
        return self._finish(model.to(device))

    def build_tiny(self, seed: int = 0) -> DigitsPipeline:
        return self._finish(build_dit(seed, **TINY_OVERRIDES))

    def _finish(self, model: nn.Module) -> DigitsPipeline:
        model.eval()
        if self.outlier_channels:
            inject_outliers(model, self.outlier_channels, self.outlier_scale, self.outlier_seed)
        return DigitsPipeline(model, image_size=model.config.sample_size)

    def fingerprint(self) -> str:
        weights = self.path / "diffusion_pytorch_model.safetensors"
        return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.exists() else "missing"

    def denoiser(self, pipe: DigitsPipeline) -> nn.Module:
        return pipe.transformer

    def layers(self, denoiser: nn.Module) -> list[LayerRef]:
        return dit_layer_refs(denoiser)

    def probe(self, pipe: DigitsPipeline, n: int = 20, seed: int = 1234) -> None:
        """One guided velocity evaluation on a small batch at a mid timestep (feeds per-layer error probes)."""
        g = torch.Generator().manual_seed(seed)
        size = pipe.image_size
        x = torch.randn(n, 1, size, size, generator=g)
        pipe.velocity(x, torch.full((n,), 0.5), torch.arange(n) % 10, guidance=2.0)

    def n_items(self, protocol: dict) -> int:
        return 10 * protocol["n_per_class"]

    def generate(self, pipe: DigitsPipeline, *, n_per_class: int, steps: int, guidance: float,
                 batch_size: int, seed: int, progress: bool = True, desc: str = "sampling",
                 shard: tuple[int, int] = (0, 1), sink=None):
        """``n_per_class`` samples of each digit, written batch by batch to ``sink`` (default: memory, returning
        :class:`Samples`; see ``samplestore``); batches the sink already has are skipped (resume). The noise
        depends only on ``seed`` and the sample index (``shard = (rank, world)`` samples a contiguous part of them:
        see ``distributed``)."""
        sink = sink if sink is not None else MemorySink()
        size = pipe.image_size
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(10 * n_per_class, 1, size, size, generator=g)  # all of it: sample k's noise is row k
        idx = shard_range(10 * n_per_class, shard)
        calls = [0]
        hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        n_batches = -(-len(idx) // batch_size)
        with hook, tqdm(total=n_batches * steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
            for start in range(idx.start, idx.stop, batch_size):
                stop = min(idx.stop, start + batch_size)
                if sink.has(start, stop):
                    bar.update(steps)
                    continue
                before = calls[0]
                labels = torch.arange(start, stop) % 10
                x = pipe.sample(noise[start:stop], labels, steps, guidance, bar).float().clamp(-1, 1)
                sink.write(start, stop, x, labels, forwards=calls[0] - before)
        return sink.finish({"steps": steps, "guidance": guidance, "seed": seed})
