"""diffusers integration (``orbitquant.hf.quantizer``): quantize at load time == ``quantize_`` on the fp model,
save_pretrained/from_pretrained round trips bit-identically from packed codes, one-line errors, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import orbitquant as oq
import orbitquant.hf.quantizer as oqh
from orbitquant.harness.adapters.digits import DIT_DIR
from orbitquant.hf.quantizer import OrbitQuantDiffusersConfig, align_tensors_, diffusers_layers

WEIGHTS = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------- tiny models
def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32)


def _sd3():  # a family we have no adapter for: every nn.Linear gets role "linear"
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4)


BUILD = {"flux": _flux, "wan": _wan, "sd3": _sd3}


def _inputs(name: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "flux":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 4, 32), pooled_projections=r(1, 32),
                    timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    if name == "wan":
        return dict(hidden_states=r(1, 16, 2, 4, 4), encoder_hidden_states=r(1, 4, 32), timestep=torch.tensor([500]))
    if name == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 5, 32), pooled_projections=r(1, 16),
                    timestep=torch.tensor([3]))
    return dict(hidden_states=r(4, 1, 8, 8), timestep=torch.full((4,), 500.0), class_labels=torch.arange(4))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """fp checkpoint directories: the shipped digits DiT and tiny random-init models saved once."""
    root = tmp_path_factory.mktemp("fp")
    out = {"digits": DIT_DIR}
    for name, build in BUILD.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        out[name] = root / name
    return out


def _cls(name: str):
    import diffusers

    return getattr(diffusers, {"digits": "DiTTransformer2DModel", "flux": "FluxTransformer2DModel",
                               "wan": "WanTransformer3DModel", "sd3": "SD3Transformer2DModel"}[name])


@torch.no_grad()
def _out(model, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(**_inputs(name, dtype)).sample


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------- registration, config
def test_register_is_idempotent_and_the_config_round_trips_as_json():
    from diffusers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        DiffusersAutoQuantizer,
    )

    oqh.register()
    oqh.register()
    assert AUTO_QUANTIZER_MAPPING["orbitquant"] is oqh.OrbitQuantDiffusersQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["orbitquant"] is OrbitQuantDiffusersConfig
    cfg = OrbitQuantDiffusersConfig(w_bits=3, a_bits=4, seed=7, rotation="rpbh_kron", runtime="compact",
                                    modules_to_not_convert=["proj_out"])
    assert cfg.quant_method.value == "orbitquant"  # diffusers reads .value, as of its enum members
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == "orbitquant" and d["method"] == "orbit" and d["seed"] == 7 and d["rotation"] == "rpbh_kron"
    back = DiffusersAutoQuantizer.from_dict(d)
    assert isinstance(back, OrbitQuantDiffusersConfig) and back.to_dict() == cfg.to_dict()
    assert back.quant_config() == oq.OrbitConfig(w_bits=3, a_bits=4, seed=7, rotation="rpbh_kron")
    assert "rpbh_kron" in repr(cfg)
    rtn = OrbitQuantDiffusersConfig(method="rtn")
    assert rtn.quant_config() == oq.RTNConfig() and "seed" not in rtn.to_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=9), r"w_bits must be an integer in 1\.\.8"),
    (dict(a_bits=0), r"a_bits must be an integer in 1\.\.8"),
    (dict(w_bits="4"), r"w_bits must be an integer"),
    (dict(method="smoothquant"), r"needs calibration data.*quantize_\(model, config, layers, calibrate=.*data-free"),
    (dict(method="qdit"), r"'qdit' needs calibration data"),
    (dict(method="orbt"), r"unknown method 'orbt'. Did you mean 'orbit'"),
    (dict(method="rtn", seed=1), r"method 'rtn' has no seed"),
    (dict(rotation="nope"), r"unknown rotation 'nope'"),
    (dict(frobnicate=1), r"unknown option\(s\) \['frobnicate'\] for quant=orbit"),
    (dict(runtime="slow"), r"runtime must be one of"),
    (dict(roles="mine"), r"roles must be one of"),
    (dict(modules_to_not_convert="proj_out"), r"modules_to_not_convert must be a list"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_configs_fail_on_construction_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        OrbitQuantDiffusersConfig(**kwargs)
    assert "\n" not in str(e.value) and str(e.value).startswith("OrbitQuantDiffusersConfig: ")


# ------------------------------------------------------------------------------------------- load time == quantize_
CASES = {
    "digits-orbit-w4a8": ("digits", dict(), None),
    "flux-orbit-w4a4-compact": ("flux", dict(w_bits=4, a_bits=4, seed=3, runtime="compact"), None),
    "flux-orbit-bf16": ("flux", dict(w_bits=3, a_bits=8, rotation="rpbh_kron"), torch.bfloat16),
    "flux-rtn-skip-block": ("flux", dict(method="rtn", modules_to_not_convert=["single_transformer_blocks.1", "to_k"]),
                            None),
    "wan-hadamard_rtn-bf16": ("wan", dict(method="hadamard_rtn", w_bits=4, a_bits=8), torch.bfloat16),
    "flux-fp": ("flux", dict(method="fp"), None),
    "sd3-generic-orbit": ("sd3", dict(w_bits=4, a_bits=8, modules_to_not_convert=["proj_out"]), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_time_quantization_equals_quantize_on_the_fp_model(case, ckpt):
    name, kwargs, dtype = CASES[case]
    cls, cfg = _cls(name), OrbitQuantDiffusersConfig(**kwargs)
    loaded = cls.from_pretrained(ckpt[name], quantization_config=cfg, torch_dtype=dtype)
    ref = cls.from_pretrained(ckpt[name], torch_dtype=dtype)
    layers = diffusers_layers(ref, cfg)
    oq.quantize_(ref, cfg.quant_config(), layers, runtime=cfg.runtime)
    assert _same_state(loaded, ref)  # identical packed codes, norms/scales, biases and untouched tensors
    # the loader leaves no tensor at an mmap offset (see align_tensors_); align the reference the same way, as
    # CPU matmuls round differently at different alignments, then outputs must match bit for bit
    align_tensors_(ref)
    assert torch.equal(_out(loaded, name, dtype or torch.float32), _out(ref, name, dtype or torch.float32))

    quantized = {n for n, m in loaded.named_modules() if isinstance(m, oq.QuantLinear)}
    assert quantized and all(m.runtime == cfg.runtime for m in loaded.modules() if isinstance(m, oq.QuantLinear))
    summary = loaded.orbitquant_report.summary()
    assert summary["n_linear"] == len(layers) and summary["runtime"] == cfg.runtime
    for skipped in cfg.modules_to_not_convert:  # excluded modules stay plain nn.Linear
        assert not any(f".{skipped}." in f".{n}." for n in quantized)
    if name == "sd3":  # no adapter: every nn.Linear but the excluded one, all with the method
        n_linear = sum(isinstance(m, nn.Linear) for m in cls.from_pretrained(ckpt[name]).modules())
        assert len(quantized) == n_linear - 1 and set(summary["treatments"]) == {"orbit w4a8"}
    if name in ("digits", "flux") and kwargs.get("method", "orbit") == "orbit":  # adapter roles: paper's policy
        assert set(summary["treatments"]) >= {"skip", "int4_g64 wo"}


# ------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("name, kwargs, shard", [("digits", dict(), None),
                                                  ("flux", dict(runtime="compact", w_bits=2, a_bits=4), "20KB"),
                                                  ("wan", dict(method="rtn", w_bits=4, a_bits=8), None)])
def test_save_pretrained_round_trip_is_bit_identical_from_packed_codes(name, kwargs, shard, ckpt, tmp_path, monkeypatch):
    cls, cfg = _cls(name), OrbitQuantDiffusersConfig(**kwargs)
    model = cls.from_pretrained(ckpt[name], quantization_config=cfg)
    y = _out(model, name)
    model.save_pretrained(tmp_path / "q", **({"max_shard_size": shard} if shard else {}))

    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved == {**cfg.to_dict(), "quant_method": "orbitquant"}
    files = sorted((tmp_path / "q").glob("*.safetensors"))
    assert len(files) > 1 if shard else len(files) == 1
    keys, codes = set(), 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            manifest = json.loads(h.metadata()["orbitquant"])
            keys |= set(h.keys())
            codes += sum(h.get_slice(k).get_dtype() == "U8" for k in h.keys() if k.endswith("store.codes"))
    quantized = {n for n, m in model.named_modules() if isinstance(m, oq.QuantLinear)}
    assert set(manifest["layers"]) == quantized and codes == len(quantized)
    assert not any(f"{q}.weight" in keys for q in quantized)  # packed codes only: no fp weight of a quantized layer
    fp_bytes = sum(p.stat().st_size for p in ckpt[name].glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) < 0.75 * fp_bytes

    # reloading restores the saved state: nothing is quantized again
    monkeypatch.setattr(oqh, "convert_layer", lambda *a, **k: pytest.fail("reload re-quantized a layer"))
    again = cls.from_pretrained(tmp_path / "q")
    assert isinstance(again.hf_quantizer, oqh.OrbitQuantDiffusersQuantizer) and again.hf_quantizer.pre_quantized
    assert _same_state(again, model)
    assert torch.equal(_out(again, name), y)
    assert {m.runtime for m in again.modules() if isinstance(m, oq.QuantLinear)} == {cfg.runtime}
    # and the reloaded model saves the same checkpoint again
    again.save_pretrained(tmp_path / "q2")
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"] == saved


def test_reload_with_another_torch_dtype_keeps_the_packed_state_as_saved(ckpt, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(ckpt["flux"], quantization_config=OrbitQuantDiffusersConfig())
    model.save_pretrained(tmp_path / "q")
    half = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.float16)
    a, b = model.state_dict(), half.state_dict()
    packed = [k for k in a if ".store." in k]
    assert packed and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in packed)  # bf16 norms not cast
    assert half.x_embedder.weight.dtype == torch.float16  # source-precision layers follow torch_dtype


# ------------------------------------------------------------------------------------------- errors at load time
def _rewrite(src, dst, drop=(), edit=None, metadata=True):
    """Copy a checkpoint directory, dropping or editing tensors of its (single) weights file."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / WEIGHTS), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k not in drop}
        meta = h.metadata()
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / WEIGHTS), metadata=meta if metadata else None)
    return dst


def test_missing_nan_and_wrong_checkpoints_fail_with_one_line_naming_the_fix(ckpt, tmp_path):
    from diffusers import FluxTransformer2DModel

    cfg = OrbitQuantDiffusersConfig()
    bad = _rewrite(ckpt["flux"], tmp_path / "missing", drop={"transformer_blocks.0.attn.to_q.weight"})
    with pytest.raises(ValueError, match=r"lacks the weights of 1 layer.*transformer_blocks\.0\.attn\.to_q\.weight.*"
                                         r"modules_to_not_convert") as e:
        FluxTransformer2DModel.from_pretrained(bad, quantization_config=cfg)
    assert "\n" not in str(e.value)

    def poison(t):
        t["single_transformer_blocks.0.proj_mlp.weight"][0, 0] = float("nan")
    bad = _rewrite(ckpt["flux"], tmp_path / "nan", edit=poison)
    with pytest.raises(ValueError, match=r"'single_transformer_blocks\.0\.proj_mlp' has NaN or Inf weights"):
        FluxTransformer2DModel.from_pretrained(bad, quantization_config=cfg)

    model = FluxTransformer2DModel.from_pretrained(ckpt["flux"], quantization_config=cfg)
    with pytest.raises(ValueError, match="safetensors only.*without safe_serialization=False"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    model.save_pretrained(tmp_path / "q")
    bad = _rewrite(tmp_path / "q", tmp_path / "incomplete", drop={"transformer_blocks.1.ff.net.2.store.norms"})
    with pytest.raises(ValueError, match=r"lacks the packed tensors of 1 layer.*ff\.net\.2\.store\.norms.*save it again"):
        FluxTransformer2DModel.from_pretrained(bad)
    with safe_open(str(tmp_path / "q" / WEIGHTS), framework="pt") as h:
        whole = {k for k in h.keys() if k.startswith("single_transformer_blocks.0.attn.to_v.")}
    bad = _rewrite(tmp_path / "q", tmp_path / "layer_gone", drop=whole)
    with pytest.raises(ValueError, match=r"lacks the packed tensors of 1 layer.*single_transformer_blocks\.0\.attn\.to_v\."):
        FluxTransformer2DModel.from_pretrained(bad)
    bad = _rewrite(tmp_path / "q", tmp_path / "no_manifest", metadata=False)
    with pytest.raises(ValueError, match="no orbitquant layer manifest.*re-save it with save_pretrained"):
        FluxTransformer2DModel.from_pretrained(bad)
    with pytest.raises(ValueError, match="quantizes on one device.*device_map=None"):
        FluxTransformer2DModel.from_pretrained(ckpt["flux"], quantization_config=cfg, device_map="balanced")
    with pytest.raises(ValueError, match="no layer to quantize"):
        FluxTransformer2DModel.from_pretrained(ckpt["flux"], quantization_config=OrbitQuantDiffusersConfig(
            modules_to_not_convert=["transformer_blocks", "single_transformer_blocks"]))


# ------------------------------------------------------------------------------------------- memory
def test_load_time_quantization_holds_one_fp_layer_at_a_time(ckpt, monkeypatch):
    """While weights load, at most one target layer's fp tensors are alive (in the loader's hands or in the model);
    afterwards only packed state remains (compact runtime). Fails if layers were quantized after loading them all."""
    from diffusers import DiTTransformer2DModel

    seen = {"max_fp_layers": 0, "max_fp_bytes": 0, "calls": 0}
    original = oqh.OrbitQuantDiffusersQuantizer.create_quantized_param

    def watched(self, model, *args, **kwargs):
        out = original(self, model, *args, **kwargs)
        live = [m for n, m in model.named_modules() if n in self._expected and type(m) is nn.Linear
                and m.weight.device.type != "meta"]  # target layers holding fp weights in the model
        pending = sum(t.numel() * t.element_size() for p in self._pending.values() for t in p.values())
        seen["max_fp_layers"] = max(seen["max_fp_layers"], len(live) + len(self._pending))
        seen["max_fp_bytes"] = max(seen["max_fp_bytes"], pending + sum(
            p.numel() * p.element_size() for m in live for p in m.parameters()))
        seen["calls"] += 1
        return out

    monkeypatch.setattr(oqh.OrbitQuantDiffusersQuantizer, "create_quantized_param", watched)
    model = DiTTransformer2DModel.from_pretrained(ckpt["digits"], quantization_config=OrbitQuantDiffusersConfig(
        runtime="compact"))
    targets = [m for m in model.modules() if isinstance(m, oq.QuantLinear)]
    fp_bytes = [m.in_features * m.out_features * 4 + m.out_features * 4 for m in targets]  # the fp32 checkpoint's
    assert seen["calls"] >= 2 * len(targets)  # every weight and bias went through the hook
    assert seen["max_fp_layers"] <= 1 and seen["max_fp_bytes"] <= max(fp_bytes)
    assert model.hf_quantizer.peak_pending_bytes <= max(fp_bytes)
    resident = sum(m.resident_bytes for m in targets)
    assert resident == sum(m.nbytes for m in targets) < 0.2 * sum(fp_bytes)  # packed only: ~4.3 bits of 32
    assert not any(m.weight is not None for m in targets)


def test_pipeline_quantization_config_quantizes_the_transformer_and_reloads(tmp_path):
    """diffusers' PipelineQuantizationConfig finds our config class through the AUTO mapping."""
    from diffusers import FluxPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from orbitquant.harness.adapters.flux import FluxAdapter

    FluxAdapter(tiny=True).build_tiny().save_pretrained(tmp_path / "fp")
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": OrbitQuantDiffusersConfig(w_bits=4, a_bits=8)})
    pipe = FluxPipeline.from_pretrained(tmp_path / "fp", quantization_config=pq)
    assert any(isinstance(m, oq.QuantLinear) for m in pipe.transformer.modules())
    assert not any(isinstance(m, oq.QuantLinear) for m in pipe.text_encoder.modules())
    pipe.save_pretrained(tmp_path / "q")
    again = FluxPipeline.from_pretrained(tmp_path / "q")
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16)
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = again("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- every family
def _families():
    from orbitquant.harness.adapters.diffusers_base import diffusers_adapters

    return diffusers_adapters()


@pytest.mark.parametrize("family", sorted(_families()))
def test_every_family_quantizes_at_load_with_its_adapters_role_table(family, tmp_path):
    """Enumerated from the registry: the backend finds each family's role table through its adapter
    (``transformer_cls``), so a new family loads quantized with the paper's policy the moment it is registered."""
    from orbitquant.harness.adapters.diffusers_base import roles_for_class

    cls = _families()[family]
    adapter = cls(tiny=True)
    den = adapter.denoiser(adapter.build_tiny())
    den.save_pretrained(tmp_path)
    tcls = type(den)
    assert roles_for_class(tcls) is cls.roles
    loaded = tcls.from_pretrained(tmp_path, quantization_config=OrbitQuantDiffusersConfig(w_bits=4, a_bits=8))
    refs = cls.roles.refs(tcls.from_pretrained(tmp_path))
    summary = loaded.orbitquant_report.summary()
    assert summary["n_linear"] == len(refs) and "orbit w4a8" in summary["treatments"]
    skipped = {r.fqn for r in refs if r.role in ("embed", "final")}
    assert skipped and all(not isinstance(m, oq.QuantLinear) for n, m in loaded.named_modules() if n in skipped)


# ------------------------------------------------------------------------------------------- registration
def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                    in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=32,
                                    norm_type="ada_norm_single", use_additional_conditions=False)


@pytest.mark.parametrize("build", [_flux, _pixart], ids=["flux", "pixart"])
def test_a_fresh_process_reloads_a_saved_model_after_import_orbitquant(build, tmp_path):
    """As with diffusers' own backends: `import orbitquant` is all a reader of a saved checkpoint needs."""
    import subprocess
    import sys

    torch.manual_seed(0)
    fp = build()
    fp.save_pretrained(tmp_path / "fp")
    q = type(fp).from_pretrained(tmp_path / "fp", quantization_config=OrbitQuantDiffusersConfig(w_bits=4, a_bits=8))
    q.save_pretrained(tmp_path / "q")
    n = sum(isinstance(m, oq.QuantLinear) for m in q.modules())
    code = (f"import orbitquant, diffusers; m = diffusers.{type(fp).__name__}.from_pretrained({str(tmp_path / 'q')!r}); "
            "print(sum(isinstance(x, orbitquant.QuantLinear) for x in m.modules()))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.split()[-1]) == n > 0


def test_pipeline_level_quant_backend_form_quantizes_the_transformer(tmp_path):
    """``PipelineQuantizationConfig(quant_backend="orbitquant", quant_kwargs=..., components_to_quantize=[...])``:
    diffusers checks both libraries' mappings for the backend; the transformer is quantized, the text encoders not."""
    from diffusers import FluxPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from orbitquant.harness.adapters.flux import FluxAdapter

    FluxAdapter(tiny=True).build_tiny().save_pretrained(tmp_path / "fp")
    pq = PipelineQuantizationConfig(quant_backend="orbitquant", quant_kwargs={"w_bits": 4, "a_bits": 8},
                                    components_to_quantize=["transformer"])
    pipe = FluxPipeline.from_pretrained(tmp_path / "fp", quantization_config=pq)
    assert pipe.transformer.orbitquant_report.summary()["treatments"].get("orbit w4a8", 0) > 0
    assert not any(isinstance(m, oq.QuantLinear) for m in pipe.text_encoder.modules())


@pytest.mark.parametrize("method", [m for m in oqh.data_free_methods() if m != "fp"])
def test_dequantize_returns_plain_linears_holding_the_quantized_weights(method, ckpt):
    """``model.dequantize()``: plain ``nn.Linear`` everywhere, and the model equals the weight-only (A16) quantized
    model: the weights are exactly the quantized ones, the activations no longer quantized."""
    cls = _cls("flux")
    kw = {"seed": 3} if "seed" in oqh.OrbitQuantDiffusersConfig(method=method).to_dict() else {}
    model = cls.from_pretrained(ckpt["flux"], quantization_config=OrbitQuantDiffusersConfig(
        method=method, w_bits=4, a_bits=8, **kw))
    w_only = cls.from_pretrained(ckpt["flux"], quantization_config=OrbitQuantDiffusersConfig(
        method=method, w_bits=4, a_bits=16, **kw))
    fp = cls.from_pretrained(ckpt["flux"])
    model.dequantize()
    assert not any(isinstance(m, oq.QuantLinear) for m in model.modules()) and getattr(model, "hf_quantizer", None) is None
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == sum(isinstance(m, nn.Linear) for m in fp.modules())
    a, b, ref = _out(model, "flux"), _out(w_only, "flux"), _out(fp, "flux")
    # the adaLN layers' bf16 activation rounding (part of the paper's policy) is gone too: a tiny difference
    assert (a - b).norm() < 0.02 * (b - ref).norm(), ((a - b).norm(), (b - ref).norm())
    assert (a - ref).norm() > 1e-3 * ref.norm()  # still the quantized weights, not the fp ones
