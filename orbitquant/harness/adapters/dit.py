"""DiT-XL/2 (class-conditional ImageNet 256): ``DiTPipeline``; roles in ``dit_roles.DIT_ROLES``.

DiT gives every block its own timestep embedder (role ``embed``, kept in source precision) and an
adaLN-zero ``norm1.linear`` (INT4 g64 under the paper's policy). The Q-DiT protocol samples with
DDIM (50 or 100 steps) and CFG 1.5, so ``scheduler: ddim`` swaps the checkpoint's scheduler.
"""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.diffusers_base import DiffusersAdapter
from orbitquant.harness.adapters.dit_roles import DIT_ROLES
from orbitquant.harness.adapters.plan_facts import KL_VAE_PARAMS, CfgRule, ClassConditionalFacts, Geometry
from orbitquant.harness.adapters.random_init import build_denoiser, building, finish, shipped_config, standin_kl_vae
from orbitquant.harness.adapters.tiny_parts import tiny_kl_vae
from orbitquant.harness.samplestore import MemorySink
from orbitquant.quant.registry import register_model

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


@register_model("dit")
class DiTAdapter(ClassConditionalFacts, DiffusersAdapter):
    roles = DIT_ROLES
    transformer_cls = "DiTTransformer2DModel"
    tiny_generate_kwargs = {"guidance": 1.5}
    default_name = "dit_xl_2"
    pipeline_cls = "DiTPipeline"
    default_repo = "facebook/DiT-XL-2-256"
    cfg_rule = CfgRule("guidance > 1", "batch", "diffusers pipeline_dit.py: torch.cat([latents] * 2) if "
                       "guidance_scale > 1 (one call, doubled batch)")
    pipeline_extras = (("VAE (sd-vae-ft-ema)", KL_VAE_PARAMS),)

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """The checkpoint's latent grid (class-conditional: the label enters through adaLN, not as tokens)."""
        lat, p = cfg["sample_size"], cfg["patch_size"]
        return Geometry((lat // p) ** 2, 0, (3, lat * 8, lat * 8),
                        f"{lat * 8}^2 px -> {lat}^2 latent (VAE x8) -> patch {p}: {lat // p}^2")

    def __init__(self, scheduler: str | None = "ddim", **kw) -> None:
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)} "
                             "(or null to keep the shipped one)")
        super().__init__(**kw)
        self.scheduler = scheduler

    def load(self, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        pipe = super().load(dtype, device)
        if self.scheduler:
            import diffusers

            pipe.scheduler = getattr(diffusers, SCHEDULERS[self.scheduler]).from_config(pipe.scheduler.config)
        return pipe

    def build_tiny(self, seed: int = 0):
        """A random-init DiTPipeline (2 blocks, hidden 16, 8x8 latents, tiny VAE); CPU, no hub."""
        from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
        vae = tiny_kl_vae(4)
        return DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDIMScheduler(),
                           id2label={i: f"class{i}" for i in range(1000)})

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu"):
        """The true-size DiT transformer with random weights; small stand-in: a KL VAE 8-16 channels wide with the
        transformer's latent channels, 8x compression (32x32 latents -> 256x256 images) and SD's latent scale;
        ``num_embeds_ada_norm`` class labels; DDIM (``load`` swaps in the configured scheduler)."""
        from diffusers import DDIMScheduler, DiTPipeline

        cfg = config or shipped_config(self.name)
        with building(seed, dtype, device):
            transformer = build_denoiser(cfg, dtype)
            vae = standin_kl_vae(cfg["in_channels"], scaling_factor=0.18215)
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(),
                           id2label={i: f"class{i}" for i in range(cfg["num_embeds_ada_norm"])})
        return finish(pipe, dtype)

    def generate(self, pipe, *, classes: list[int], n_per_class: int = 1, steps: int, guidance: float,
                 batch_size: int, seed: int, progress: bool = True, desc: str = "sampling",
                 shard: tuple[int, int] = (0, 1), sink=None, **_: object):
        """``n_per_class`` images of every class id, written batch by batch to ``sink`` (default: memory)."""
        labels = [c for c in classes for _ in range(n_per_class)]
        sink = sink if sink is not None else MemorySink()

        def call(start, stop, gens):
            return pipe(class_labels=labels[start:stop], guidance_scale=guidance, generator=gens,
                        num_inference_steps=steps, output_type="pt")

        self._sample_batches(pipe, labels, batch_size, seed, call, progress, desc, steps, shard, sink)
        return sink.finish({"classes": classes, "steps": steps, "guidance": guidance, "seed": seed,
                            "scheduler": type(pipe.scheduler).__name__})

    def n_items(self, protocol: dict) -> int:
        return len(protocol["classes"]) * protocol.get("n_per_class", 1)

    def probe(self, pipe) -> None:
        pipe(class_labels=[207, 360], guidance_scale=1.5, generator=[torch.Generator().manual_seed(1234)] * 2,
             num_inference_steps=1, output_type="pt")
