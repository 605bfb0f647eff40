"""FLUX.1 (dev, schnell): ``FluxPipeline``; roles in ``family_roles.FLUX_ROLES``."""

from __future__ import annotations

import torch

from ..registry import register_model
from .diffusers_base import DiffusersAdapter
from .family_roles import FLUX_ROLES
from .tiny_text import clip_text_model, clip_tokenizer, t5_encoder, t5_tokenizer


@register_model("flux")
class FluxAdapter(DiffusersAdapter):
    cfg_layout = "calls"  # true CFG (negative prompt, true_cfg_scale > 1) runs a separate forward after the conditional one
    roles = FLUX_ROLES
    default_name = "flux1_schnell"
    pipeline_cls = "FluxPipeline"
    default_repo = "black-forest-labs/FLUX.1-schnell"
    call_kwargs = {"max_sequence_length": 256}
    tiny_call_kwargs = {"max_sequence_length": 16}

    def __init__(self, max_sequence_length: int | None = None, **kw) -> None:
        super().__init__(**kw)
        if max_sequence_length:
            self.call_kwargs = {"max_sequence_length": max_sequence_length}

    def build_tiny(self, seed: int = 0):
        """A random-init FluxPipeline (2 dual + 2 single blocks, hidden 32, tiny CLIP/T5/VAE); CPU, no hub."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
        ct, tt = clip_tokenizer(), t5_tokenizer()
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_text_model(ct, seed=seed),
                            tokenizer=ct, text_encoder_2=t5_encoder(tt, seed=seed), tokenizer_2=tt,
                            transformer=transformer.eval())
