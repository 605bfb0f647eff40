"""Wan 2.1 text-to-video (1.3B, 14B): ``WanPipeline``; roles in ``family_roles.WAN_ROLES``.

Wan has no per-block modulation linear (a ``scale_shift_table`` parameter per block plus the shared
``condition_embedder.time_proj``), so every block linear gets the method and nothing gets INT4 adaLN.
"""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.diffusers_base import DiffusersAdapter
from orbitquant.harness.adapters.family_roles import WAN_ROLES
from orbitquant.harness.adapters.plan_facts import CfgRule, Geometry, attention_inner, video_geometry
from orbitquant.harness.adapters.random_init import build_denoiser, building, finish, shipped_config
from orbitquant.harness.adapters.tiny_parts import t5_encoder, t5_tokenizer
from orbitquant.quant.registry import register_model


@register_model("wan")
class WanAdapter(DiffusersAdapter):
    cfg_layout = "calls"  # CFG runs the conditional forward, then the unconditional one
    modality = "video"
    roles = WAN_ROLES
    transformer_cls = "WanTransformer3DModel"
    tiny_generate_kwargs = {"guidance": 5.0, "height": 16, "width": 16, "num_frames": 5}
    default_name = "wan21"
    pipeline_cls = "WanPipeline"
    default_repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    call_kwargs = {"max_sequence_length": 512}
    tiny_call_kwargs = {"max_sequence_length": 16}
    probe_kwargs = {"height": 240, "width": 416, "num_frames": 5}
    tiny_probe_kwargs = {"height": 16, "width": 16, "num_frames": 5}
    cfg_rule = CfgRule("guidance > 1", "calls", "diffusers pipeline_wan.py: do_classifier_free_guidance = "
                       "guidance_scale > 1, a second transformer call with the negative prompt (adapter "
                       "cfg_layout='calls')")
    # UMT5-XXL encoder: T5-XXL's layers with a 256384-token vocabulary = 24 x (4*4096^2 + 3*4096*10240) +
    # 256384*4096 = 5.68e9; the Wan VAE from its checkpoint size
    pipeline_extras = (("UMT5-XXL encoder", 5.68e9), ("Wan VAE", 1.27e8))

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """The Wan VAE (x4 temporal, x8 spatial), then the config's (t, h, w) patch."""
        return video_geometry(protocol, tuple(cfg["patch_size"]), text_tokens)

    @classmethod
    def plan_linear_rows(cls, stack: str, role: str, media: int, text: int) -> int:
        # cross-attention: queries and output on the video tokens, keys and values on the text
        return text if role in ("ctx.k", "ctx.v") else media

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float:
        # self-attention over the video + cross-attention from the video to the text, in every block
        return 4.0 * stacks["blocks"] * (media * media + media * text) * attention_inner(cfg)

    def build_tiny(self, seed: int = 0):
        """A random-init WanPipeline (2 blocks, hidden 24, tiny UMT5 and Wan VAE); CPU, no hub."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        tok = t5_tokenizer()
        return WanPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, seed=seed, umt5=True),
                           transformer=transformer.eval(), vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu"):
        """The true-size Wan transformer with random weights; small stand-ins: a 2-layer UMT5 of output width
        ``text_dim`` (4096, as UMT5-XXL; inner widths 16/64) and a Wan VAE 8 channels wide with ``z_dim`` =
        the transformer's channels and the real 4x temporal / 8x spatial compression; the tiny build's scheduler."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

        cfg = config or shipped_config(self.name)
        with building(seed, dtype, device):
            transformer = build_denoiser(cfg, dtype)
            tok = t5_tokenizer()
            text = t5_encoder(tok, d_model=cfg["text_dim"], seed=seed, umt5=True, d_ff=64)
            vae = AutoencoderKLWan(base_dim=8, z_dim=cfg["in_channels"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])  # 2**2 temporal, 2**3 spatial: real
        pipe = WanPipeline(tokenizer=tok, text_encoder=text, transformer=transformer, vae=vae.eval(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
        return finish(pipe, dtype)
