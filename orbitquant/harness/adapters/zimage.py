"""Z-Image-Turbo: ``ZImagePipeline`` (Qwen3 text encoder); roles in ``family_roles.ZIMAGE_ROLES``.

Sampling takes ``steps`` scheduler steps; with guidance 0 (Turbo) each step is one transformer
forward, which ``forward_count`` records for the protocol.
"""

from __future__ import annotations

import torch

from orbitquant.harness.adapters.diffusers_base import DiffusersAdapter
from orbitquant.harness.adapters.family_roles import ZIMAGE_ROLES
from orbitquant.harness.adapters.plan_facts import KL_VAE_PARAMS, CfgRule, Geometry, image_geometry
from orbitquant.harness.adapters.random_init import build_denoiser, building, finish, shipped_config, standin_kl_vae
from orbitquant.harness.adapters.tiny_parts import chat_tokenizer, qwen3_model, tiny_kl_vae
from orbitquant.quant.registry import register_model


@register_model("zimage")
class ZImageAdapter(DiffusersAdapter):
    roles = ZIMAGE_ROLES
    transformer_cls = "ZImageTransformer2DModel"
    tiny_generate_kwargs = {"guidance": 0.0, "height": 32, "width": 32}
    default_name = "zimage_turbo"
    pipeline_cls = "ZImagePipeline"
    default_repo = "Tongyi-MAI/Z-Image-Turbo"
    call_kwargs = {"max_sequence_length": 512}
    tiny_call_kwargs = {"max_sequence_length": 16}
    cfg_rule = CfgRule("guidance > 0", "batch", "diffusers pipeline_z_image.py: do_classifier_free_guidance = "
                       "guidance_scale > 0, latents.repeat(2, ...) in one call; Turbo's guidance 0 = one row")
    # Qwen3-4B = 36 x (2*2560*4096 + 2*2560*1024 + 3*2560*9728) + 151936*2560 = 4.02e9
    pipeline_extras = (("Qwen3-4B text encoder", 4.02e9), ("VAE", KL_VAE_PARAMS))

    @classmethod
    def plan_geometry(cls, cfg: dict, protocol: dict, text_tokens: int) -> Geometry:
        """VAE x8, then the config's first ``all_patch_size``."""
        p = cfg["all_patch_size"][0]
        return image_geometry(protocol, p, f"patch {p}", text_tokens)

    def plan_text_tokens(self) -> tuple[int, str]:
        n = int(self.call_kwargs.get("max_sequence_length", 0))
        return n, f"<= {n} (Z-Image keeps the prompt's real tokens; max_sequence_length as an upper bound)"

    @classmethod
    def plan_linear_rows(cls, stack: str, role: str, media: int, text: int) -> int:
        # the refiners run on their own stream, the main layers on image + text
        return {"noise_refiner": media, "context_refiner": text}.get(stack, media + text)

    @classmethod
    def plan_attention_flops(cls, cfg: dict, stacks: dict[str, int], media: int, text: int) -> float:
        # refiners attend within their own stream, the main layers over both; the width is the model's dim
        return 4.0 * cfg["dim"] * (stacks["noise_refiner"] * media * media + stacks["context_refiner"] * text * text
                                   + stacks["layers"] * (media + text) ** 2)

    def build_tiny(self, seed: int = 0):
        """A random-init ZImagePipeline (1+1 refiner and 2 main layers, dim 32, tiny Qwen3 and VAE); CPU, no hub."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        vae = tiny_kl_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
        tok = chat_tokenizer()
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                              text_encoder=qwen3_model(tok, seed=seed), tokenizer=tok, transformer=transformer.eval())

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu"):
        """The true-size Z-Image transformer with random weights; small stand-ins: a 2-layer Qwen3 of width
        ``cap_feat_dim`` (2560, as Qwen3-4B; head 16, MLP 64, 512 positions) and a KL VAE 8-16 channels wide with
        the transformer's latent channels, 8x compression and the FLUX VAE's latent scale/shift."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        cfg = config or shipped_config(self.name)
        with building(seed, dtype, device):
            transformer = build_denoiser(cfg, dtype)
            tok = chat_tokenizer(max_length=512)
            text = qwen3_model(tok, hidden=cfg["cap_feat_dim"], seed=seed, head_dim=16, intermediate=64,
                               max_positions=512)
            vae = standin_kl_vae(cfg["in_channels"], scaling_factor=0.3611, shift_factor=0.1159)
        pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text, tokenizer=tok,
                              transformer=transformer)
        return finish(pipe, dtype)
