"""CogVideoX text-to-video (2B, 5B): ``CogVideoXPipeline``; roles in ``family_roles.COGVIDEOX_ROLES``.

Joint attention over concatenated text+video tokens (one ``attn1``); two adaLN linears per block.
"""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.diffusers_base import DiffusersAdapter
from orbitquant.harness.adapters.family_roles import COGVIDEOX_ROLES
from orbitquant.harness.adapters.plan_facts import (
    T5_XXL_ENCODER,
    CfgRule,
    Geometry,
    self_attention_flops,
    video_geometry,
)
from orbitquant.harness.adapters.random_init import build_denoiser, building, finish, shipped_config
from orbitquant.harness.adapters.tiny_parts import t5_encoder, t5_tokenizer
from orbitquant.quant.registry import register_model


@register_model("cogvideox")
class CogVideoXAdapter(DiffusersAdapter):
    cfg_layout = "uncond_first"  # CFG concatenates [uncond; cond]
    modality = "video"
    roles = COGVIDEOX_ROLES
    transformer_cls = "CogVideoXTransformer3DModel"
    tiny_generate_kwargs = {"guidance": 6.0, "height": 16, "width": 16, "num_frames": 9}
    default_name = "cogvideox_2b"
    pipeline_cls = "CogVideoXPipeline"
    default_repo = "THUDM/CogVideoX-2b"
    call_kwargs = {"max_sequence_length": 226}
    tiny_call_kwargs = {"max_sequence_length": 16}
    # sizes must be multiples of 16 (8x VAE x 2x2 patches): 240x360 gave 45 latent columns, which the transformer
    # patchifies to 44 and the scheduler step then rejects (found by the init=random dry run)
    probe_kwargs = {"height": 240, "width": 352, "num_frames": 9}
    tiny_probe_kwargs = {"height": 16, "width": 16, "num_frames": 9}
    cfg_rule = CfgRule("guidance > 1", "batch", "diffusers pipeline_cogvideox.py: torch.cat([latents] * 2) if "
                       "guidance_scale > 1 (adapter cfg_layout='uncond_first')")
    pipeline_extras = (T5_XXL_ENCODER, ("CogVideoX VAE", 2.16e8))  # the VAE from its checkpoint size

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """The CogVideoX VAE (x4 temporal, x8 spatial), then ``patch_size_t`` (1 when absent: CogVideoX 1.0) x
        ``patch_size`` x ``patch_size``."""
        p = cfg["patch_size"]
        return video_geometry(protocol, (cfg.get("patch_size_t") or 1, p, p), text_tokens)

    @classmethod
    def plan_linear_rows(cls, stack: str, role: str, media: int, text: int) -> int:
        return media + text  # text and video concatenated through attention and FFN

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float:
        return self_attention_flops(cfg, stacks["transformer_blocks"], media + text)

    def build_tiny(self, seed: int = 0):
        """A random-init CogVideoXPipeline (2 blocks, hidden 32, tiny T5 and 3-D VAE); CPU, no hub."""
        from diffusers import (
            AutoencoderKLCogVideoX,
            CogVideoXDDIMScheduler,
            CogVideoXPipeline,
            CogVideoXTransformer3DModel,
        )

        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16)
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4)
        tok = t5_tokenizer()
        return CogVideoXPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, seed=seed), vae=vae,
                                 transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler())

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu"):
        """The true-size CogVideoX transformer with random weights; small stand-ins: a 2-layer T5 of output width
        ``text_embed_dim`` (4096, as T5-XXL; inner widths 16/64) and a 3-D VAE 8 channels wide with the
        transformer's latent channels, 8x spatial and its ``temporal_compression_ratio``; the tiny build's
        scheduler."""
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

        cfg = config or shipped_config(self.name)
        with building(seed, dtype, device):
            transformer = build_denoiser(cfg, dtype)
            tok = t5_tokenizer()
            text = t5_encoder(tok, d_model=cfg["text_embed_dim"], seed=seed, d_ff=64)
            vae = AutoencoderKLCogVideoX(  # four levels: 2**3 spatial, as the pipeline reads it
                down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                block_out_channels=(8, 8, 8, 8), latent_channels=cfg["in_channels"], layers_per_block=1,
                norm_num_groups=2, temporal_compression_ratio=cfg["temporal_compression_ratio"])
        pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=text, vae=vae.eval(), transformer=transformer,
                                 scheduler=CogVideoXDDIMScheduler())
        return finish(pipe, dtype)
