"""Every registered method, enumerated from the registry (a new method is tested the moment it registers): its
Hydra YAML names it, it quantizes a tiny DiT with an error inside its bit-width envelope, and a data-free one
also quantizes at load through the diffusers backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import orbitquant as oq
from orbitquant.quant.registry import METHODS

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"
NAMES = METHODS.names()


def _yaml_method(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text()) or {}
    if "method" in data:
        return data["method"]
    for d in data.get("defaults", []):  # a variant: defaults: [<base method yaml>, _self_]
        if isinstance(d, str) and d != "_self_" and (CONF / f"{d}.yaml").is_file():
            return _yaml_method(CONF / f"{d}.yaml")
    return None


def test_every_yaml_names_a_registered_method_and_every_method_has_its_yaml():
    yamls = {p.stem: _yaml_method(p) for p in CONF.glob("*.yaml")}
    for stem, method in yamls.items():
        assert method in NAMES, f"conf/quant/{stem}.yaml: method {method!r} is not registered ({NAMES})"
        assert stem == method or stem.startswith(method + "_"), (
            f"conf/quant/{stem}.yaml configures {method!r}: name it {method}.yaml or {method}_<variant>.yaml")
    for name in NAMES:
        assert yamls.get(name) == name, f"method {name!r} has no conf/quant/{name}.yaml with method: {name}"
        assert METHODS.get(name).config_cls.method == name  # the registry key is the config's method


@pytest.fixture(scope="module")
def tiny_dit():
    from orbitquant.quant.registry import MODELS

    adapter = MODELS.get("dit")(tiny=True)
    return adapter, adapter.load(torch.float32)


def _config(name: str):
    cls = METHODS.get(name).config_cls
    return cls() if name == "fp" else cls(w_bits=4, a_bits=8)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_quantizes_a_tiny_dit_inside_its_envelope(name, tiny_dit):
    """fp is exact; every other method leaves a W4A8 error above a floor (not a no-op) and below 0.6 (not noise)."""
    adapter, _ = tiny_dit
    pipe = adapter.load(torch.float32)
    den = adapter.denoiser(pipe)
    cfg = _config(name)
    quantizer = METHODS.get(name)(cfg)

    def calibrate():
        adapter.generate(pipe, classes=[1, 2], steps=2, batch_size=2, seed=0, progress=False, guidance=1.5)

    report = oq.quantize_(den, cfg, adapter.layers(den), probe=lambda: adapter.probe(pipe),
                          calibrate=calibrate if quantizer.needs_calibration else None)
    err = report.summary()["mean_rel_err"]
    if name == "fp":
        assert err == 0.0
    else:
        assert 0.005 < err < 0.6, f"{name} W4A8 mean layer error {err:.4g} outside (0.005, 0.6)"
        assert any(isinstance(m, oq.QuantLinear) for m in den.modules())


DATA_FREE = [n for n in NAMES if not METHODS.get(n)(_config(n)).needs_calibration]


@pytest.mark.parametrize("name", DATA_FREE)
def test_every_data_free_method_quantizes_at_load_through_diffusers(name, tmp_path):
    """The backend asks the method class (``needs_calibration``), so a new data-free method loads with no list
    to edit; load-time quantization equals ``quantize_`` on the fp model."""
    from diffusers import DiTTransformer2DModel

    from orbitquant.harness.adapters.digits import DIT_DIR
    from orbitquant.hf.quantizer import OrbitQuantDiffusersConfig, align_tensors_, data_free_methods, diffusers_layers

    assert name in data_free_methods()
    kw = {} if name == "fp" else {"w_bits": 4, "a_bits": 8}
    cfg = OrbitQuantDiffusersConfig(method=name, **kw)
    loaded = DiTTransformer2DModel.from_pretrained(DIT_DIR, quantization_config=cfg)
    ref = DiTTransformer2DModel.from_pretrained(DIT_DIR)
    oq.quantize_(ref, cfg.quant_config(), diffusers_layers(ref, cfg), runtime=cfg.runtime)
    align_tensors_(ref)
    x = dict(hidden_states=torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
             timestep=torch.full((2,), 500.0), class_labels=torch.arange(2))
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, ref(**x).sample)
