"""``model.init=random``: true-size denoisers of the real families with random weights and small stand-ins.

The full-size builds are checked on the meta device (same code path, no memory): their modules are exactly the
shipped configs' (``inventory.build_meta``). The stand-in wiring runs end to end on scaled-down configs passed
through the same ``build_random``; ``load()`` is checked to take that path and never the tiny or download one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orbitquant.harness.adapters import diffusers_base
from orbitquant.harness.adapters.random_init import shipped_config
from orbitquant.harness.factory import build_adapter
from orbitquant.harness.inventory import build_meta, meta_inventory, role_tables
from orbitquant.quant.registry import MODELS

CONF = Path(__file__).resolve().parent.parent / "conf"

ADAPTER = {"flux1_dev": "flux", "flux1_schnell": "flux", "wan21": "wan", "wan21_14b": "wan",
           "cogvideox_2b": "cogvideox", "cogvideox_5b": "cogvideox", "zimage_turbo": "zimage", "dit_xl_2": "dit"}

# scaled-down configs: the shipped JSON with narrow/shallow overrides (channels, compression and text lengths kept)
SMALL = {
    "wan21": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=48, freq_dim=32),
    "cogvideox_2b": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16,
                         text_embed_dim=48),
    "flux1_dev": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                      axes_dims_rope=[4, 6, 6], joint_attention_dim=48, pooled_projection_dim=40),
    "zimage_turbo": dict(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=48,
                         axes_dims=[8, 12, 12]),
    "dit_xl_2": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8),
}
# one pipeline call per family: (call kwargs, expected output shape of one sample)
CALL = {
    "wan21": (dict(height=16, width=16, num_frames=9, guidance_scale=5.0), (9, 3, 16, 16)),
    "cogvideox_2b": (dict(height=16, width=16, num_frames=9, guidance_scale=6.0), (9, 3, 16, 16)),
    "flux1_dev": (dict(height=32, width=32, guidance_scale=3.5), (3, 32, 32)),
    "zimage_turbo": (dict(height=32, width=32, guidance_scale=0.0), (3, 32, 32)),
    "dit_xl_2": (dict(guidance_scale=1.5), (3, 64, 64)),
}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _small(name: str) -> dict:
    return {**shipped_config(name), **SMALL[name]}


def _adapter(name: str, **kw):
    return MODELS.get(ADAPTER[name])(name=name, init="random", **kw)


def _run_once(adapter, pipe, name: str) -> torch.Tensor:
    kw, _ = CALL[name]
    g = [torch.Generator().manual_seed(0)]
    if name == "dit_xl_2":
        out = pipe(class_labels=[207], generator=g, num_inference_steps=2, output_type="pt", **kw)
    else:
        out = pipe(["a red car on the sea"], generator=g, num_inference_steps=2, output_type="pt", **kw,
                   **adapter._call_kwargs(pipe))
    return out.frames if adapter.modality == "video" else out.images


@pytest.mark.parametrize("name", sorted(ADAPTER))
def test_true_size_build_is_the_shipped_architecture(name):
    pipe = _adapter(name).build_random(0, torch.bfloat16, device="meta")
    den, ref = pipe.transformer, build_meta(name)
    assert [(n, tuple(p.shape)) for n, p in den.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert [(n, type(m)) for n, m in den.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    cfg = shipped_config(name)
    assert type(den).__name__ == cfg.pop("_class_name")
    assert {k: _plain(den.config[k]) for k in cfg} == {k: _plain(v) for k, v in cfg.items()}
    inv = meta_inventory(name)
    assert len(role_tables()[name].refs(den)) == inv["total"]
    assert sum(p.numel() for p in den.parameters()) == inv["params"]
    keep = set(type(den)._keep_in_fp32_modules or [])  # from_pretrained's rule: these stay fp32 in a bf16 load
    assert {n: p.dtype for n, p in den.named_parameters()} == \
        {n: torch.float32 if set(n.split(".")) & keep else torch.bfloat16 for n, _ in den.named_parameters()}


@pytest.mark.parametrize("name", ["flux1_dev", "flux1_schnell", "wan21", "cogvideox_5b", "zimage_turbo"])
def test_true_size_standins_match_the_denoiser_widths(name):
    pipe = _adapter(name).build_random(0, torch.bfloat16, device="meta")
    cfg = pipe.transformer.config
    enc = {"flux": [("text_encoder", cfg.get("pooled_projection_dim")), ("text_encoder_2", cfg.get("joint_attention_dim"))],
           "wan": [("text_encoder", cfg.get("text_dim"))], "cogvideox": [("text_encoder", cfg.get("text_embed_dim"))],
           "zimage": [("text_encoder", cfg.get("cap_feat_dim"))]}[ADAPTER[name]]
    for comp, width in enc:
        te = pipe.components[comp]
        assert te.config.hidden_size == width
        assert sum(p.numel() for p in te.parameters()) < 30e6  # a stand-in, not the real multi-billion encoder


@pytest.mark.parametrize("name", sorted(SMALL))
def test_scaled_build_runs_the_pipeline_end_to_end(name):
    adapter = _adapter(name)
    pipe = adapter.build_random(0, torch.float32, config=_small(name))
    x = _run_once(adapter, pipe, name)
    assert x.shape[1:] == CALL[name][1] and torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_probe_runs_at_the_checkpoint_probe_size(name):
    # the adapter's probe (quantization error probe) at its real-checkpoint resolution, on a scaled denoiser
    adapter = _adapter(name)
    adapter.probe(adapter.build_random(0, torch.float32, config=_small(name)))


def test_bf16_build_keeps_the_checkpoints_fp32_modules_and_is_seeded():
    a = _adapter("wan21")
    p1 = a.build_random(3, torch.bfloat16, config=_small("wan21")).transformer
    p2 = a.build_random(3, torch.bfloat16, config=_small("wan21")).transformer
    p3 = a.build_random(4, torch.bfloat16, config=_small("wan21")).transformer
    # from_pretrained keeps Wan's _keep_in_fp32_modules (norms, time embedder, scale_shift_table) in fp32
    assert p1.blocks[0].scale_shift_table.dtype == torch.float32
    assert p1.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert p1.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert p1.rope.freqs_cos.dtype == torch.float32  # non-persistent table: as built, like from_pretrained
    s1, s2, s3 = p1.state_dict(), p2.state_dict(), p3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["blocks.0.attn1.to_q.weight"], s3["blocks.0.attn1.to_q.weight"])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_build_initialises_the_tensors_it_keeps(name):
    # parameters are cast at registration, before the modules' in-place init: the init must land on the kept bf16
    # tensor (a stale fp32 one would leave torch.empty garbage), so every tensor has the fp32 build's distribution
    a = _adapter(name)
    b16 = a.build_random(0, torch.bfloat16, config=_small(name)).transformer.state_dict()
    f32 = a.build_random(0, torch.float32, config=_small(name)).transformer.state_dict()
    for k, ref in f32.items():
        got = b16[k].float()
        if ref.numel() == 1 or ref.std() < 1e-6:  # constants: norm weights, zero-init projections
            assert torch.allclose(got, ref, atol=1e-2, rtol=1e-2), k
        elif ref.numel() < 256:  # too few values for tight moments: same range, not constant
            assert got.std() > 0 and got.abs().max() <= 1.1 * ref.abs().max() + 1e-2, k
        else:  # same distribution (the draws differ between dtypes): moments within ~4.5 standard errors
            n = ref.numel() ** 0.5
            assert abs(float(got.std() / ref.std()) - 1) < 3.2 / n + 0.02, k
            assert abs(float(got.mean() - ref.mean())) < 4.5 * float(ref.std()) / n, k


@pytest.mark.parametrize("name", ["wan21", "dit_xl_2"])
def test_load_takes_the_random_path_never_tiny_or_download(name, monkeypatch):
    cls = MODELS.get(ADAPTER[name])

    def refuse(*_a, **_k):
        raise AssertionError("init=random must not fall back to the tiny build or to a checkpoint")

    monkeypatch.setattr(diffusers_base, "resolve_checkpoint", refuse)
    monkeypatch.setattr(cls, "build_tiny", refuse)
    monkeypatch.setattr(sys.modules[cls.__module__], "shipped_config", lambda n: _small(n))
    adapter = _adapter(name)
    pipe = adapter.load(torch.float32)
    assert pipe.transformer.config.num_layers == SMALL[name]["num_layers"] == 2
    assert adapter.fingerprint() == f"random-{name}-0" != _adapter(name, init_seed=1).fingerprint()
    assert torch.isfinite(_run_once(adapter, pipe, name)).all()


def test_bad_init_values_fail_with_the_fix():
    with pytest.raises(ValueError, match="valid: pretrained .*random"):
        MODELS.get("wan")(init="randm")
    with pytest.raises(ValueError, match="drop one of them"):
        MODELS.get("wan")(init="random", tiny=True)
    with pytest.raises(ValueError, match="drop model.path"):
        MODELS.get("wan")(init="random", path="/some/ckpt")
    with pytest.raises(ValueError, match="shipped: .*wan21"):
        MODELS.get("wan")(name="my_wan", init="random").build_random(0, torch.float32, device="meta")


@pytest.mark.parametrize("model", sorted(ADAPTER))
def test_model_configs_default_to_pretrained_and_take_init_random(model):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose(config_name="config", overrides=[f"model={model}"])
        rnd = compose(config_name="config", overrides=[f"model={model}", "model.init=random"])
    assert base.model.init == "pretrained"
    a = build_adapter(OmegaConf.to_container(rnd.model, resolve=True))
    assert a.init == "random" and a.fingerprint() == f"random-{model}-0"


def test_tiny_model_with_init_random_is_a_config_error():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny_wan", "+model.init=random"])
    with pytest.raises(ValueError, match="model.tiny=true"):
        build_adapter(OmegaConf.to_container(cfg.model, resolve=True))
