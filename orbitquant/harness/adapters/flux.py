"""FLUX.1 (dev, schnell): ``FluxPipeline``; roles in ``family_roles.FLUX_ROLES``."""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.diffusers_base import DiffusersAdapter
from orbitquant.harness.adapters.family_roles import FLUX_ROLES
from orbitquant.harness.adapters.plan_facts import (
    KL_VAE_PARAMS,
    T5_XXL_ENCODER,
    CfgRule,
    Geometry,
    image_geometry,
    self_attention_flops,
)
from orbitquant.harness.adapters.random_init import build_denoiser, building, finish, shipped_config, standin_kl_vae
from orbitquant.harness.adapters.tiny_parts import (
    clip_text_model,
    clip_tokenizer,
    t5_encoder,
    t5_tokenizer,
    tiny_kl_vae,
)
from orbitquant.quant.registry import register_model


@register_model("flux")
class FluxAdapter(DiffusersAdapter):
    # true CFG (negative prompt, true_cfg_scale > 1) runs a separate forward after the conditional one
    cfg_layout = "calls"
    roles = FLUX_ROLES
    transformer_cls = "FluxTransformer2DModel"
    tiny_generate_kwargs = {"guidance": 0.0, "height": 32, "width": 32}
    default_name = "flux1_schnell"
    pipeline_cls = "FluxPipeline"
    default_repo = "black-forest-labs/FLUX.1-schnell"
    call_kwargs = {"max_sequence_length": 256}
    tiny_call_kwargs = {"max_sequence_length": 16}
    cfg_rule = CfgRule("never", "never", "FLUX.1-dev is guidance-distilled (guidance_embeds: guidance enters as an "
                       "embedding), schnell has no guidance input; pipeline_flux.py runs a second call only for true "
                       "CFG (true_cfg_scale > 1 and a negative prompt), which the adapter never passes")
    # CLIP ViT-L/14 text tower: 1.23e8
    pipeline_extras = (T5_XXL_ENCODER, ("CLIP-L text encoder", 1.23e8), ("VAE", KL_VAE_PARAMS))

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """VAE x8, then 2x2 latent packing (in_channels 64 = 16 x 2 x 2; the config's patch_size is 1)."""
        return image_geometry(protocol, 2, "2x2 packing", text_tokens)

    @classmethod
    def plan_linear_rows(cls, stack: str, role: str, media: int, text: int) -> int:
        # dual blocks: an image stream and a text stream (ctx.*); single blocks: the concatenation
        if stack == "single_transformer_blocks":
            return media + text
        return text if role.startswith("ctx.") else media

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float:
        return self_attention_flops(cfg, sum(stacks.values()), media + text)  # joint attention in every block

    def __init__(self, max_sequence_length: int | None = None, **kw) -> None:
        super().__init__(**kw)
        if max_sequence_length:
            self.call_kwargs = {"max_sequence_length": max_sequence_length}

    def build_tiny(self, seed: int = 0):
        """A random-init FluxPipeline (2 dual + 2 single blocks, hidden 32, tiny CLIP/T5/VAE); CPU, no hub."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))
        vae = tiny_kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
        ct, tt = clip_tokenizer(), t5_tokenizer()
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=clip_text_model(ct, seed=seed), tokenizer=ct,
                            text_encoder_2=t5_encoder(tt, seed=seed), tokenizer_2=tt,
                            transformer=transformer.eval())

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu"):
        """The true-size FLUX transformer with random weights; small stand-ins: a 2-layer CLIP of width
        ``pooled_projection_dim`` (768, as CLIP-L's pooled output), a 2-layer T5 of output width
        ``joint_attention_dim`` (4096, as T5-XXL; inner widths 16/64), and a KL VAE 8-16 channels wide with
        ``in_channels / 4`` latent channels (2x2 packing), 8x compression and FLUX's latent scale/shift."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        cfg = config or shipped_config(self.name)
        with building(seed, dtype, device):
            transformer = build_denoiser(cfg, dtype)
            ct, tt = clip_tokenizer(), t5_tokenizer()
            clip = clip_text_model(ct, hidden=cfg["pooled_projection_dim"], seed=seed)
            t5 = t5_encoder(tt, d_model=cfg["joint_attention_dim"], seed=seed, d_ff=64)
            vae = standin_kl_vae(cfg["in_channels"] // 4, scaling_factor=0.3611, shift_factor=0.1159)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=ct,
                            text_encoder_2=t5, tokenizer_2=tt, transformer=transformer)
        return finish(pipe, dtype)
