"""Calibration artifacts: a second run restores what the first fitted (bit-identical layers, no sampler
call), keys separate what differs, and a corrupted file is detected by its checksum and recomputed."""

from __future__ import annotations

import pytest
import torch

import orbitquant as oq
from baselines.qdit import QDiTConfig
from baselines.smoothquant import SmoothQuantConfig
from orbitquant.harness.adapters.digits import DigitsAdapter
from orbitquant.quant.artifacts import cache_key, calibration_path, load_artifact, save_artifact


def _quantize(cfg, cache):
    a = DigitsAdapter()
    pipe = a.build_tiny()
    model = a.denoiser(pipe)
    calls = []

    def calibrate():
        calls.append(1)
        a.generate(pipe, n_per_class=2, steps=4, guidance=2.0, batch_size=10, seed=3, progress=False)

    rep = oq.quantize_(model, cfg, a.layers(model), calibrate=calibrate, calibration_cache=cache)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(x, timestep=torch.full((4,), 500.0), class_labels=torch.arange(4)).sample
    return rep, out, len(calls)


@pytest.mark.parametrize("cfg", [SmoothQuantConfig(w_bits=4, a_bits=6), QDiTConfig(w_bits=3, a_bits=6, n_calib=20)],
                         ids=["smoothquant", "qdit"])
def test_second_run_restores_the_artifact_bit_exactly(tmp_path, cfg):
    path = tmp_path / "art.safetensors"
    rep1, out1, n1 = _quantize(cfg, path)
    assert n1 == 1 and path.is_file() and rep1.calibration["saved"] == str(path)
    rep2, out2, n2 = _quantize(cfg, path)
    assert n2 == 0 and rep2.calibration["cached"] == str(path)
    assert rep2.calibration["seconds_when_fitted"] == rep1.calibration["seconds"]
    assert torch.equal(out1, out2)


def test_corrupted_artifact_is_detected_and_recomputed(tmp_path, caplog):
    path = tmp_path / "art.safetensors"
    cfg = SmoothQuantConfig(w_bits=4, a_bits=6)
    _, out1, _ = _quantize(cfg, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: the header still parses
    path.write_bytes(bytes(data))
    assert load_artifact(path) is None and "checksum" in caplog.text
    _, out2, n = _quantize(cfg, path)
    assert n == 1 and torch.equal(out1, out2) and load_artifact(path) is not None  # recalibrated and rewritten
    path.write_bytes(b"not a safetensors file")
    assert load_artifact(path) is None


def test_artifact_roundtrip_and_keys():
    assert cache_key(x=1, y=[1, 2]) == cache_key(y=[1, 2], x=1) != cache_key(x=2, y=[1, 2])
    cfg = {"model": {"name": "digits"}, "quant": {"method": "qdit", "w_bits": 4}, "calib": {"name": "digits"},
           "quant_seed": 0, "dtype": "float32", "device": "cpu"}
    p0 = calibration_path("c", cfg, "fp")
    assert p0.name.startswith("digits-qdit-") and p0 != calibration_path("c", {**cfg, "quant_seed": 1}, "fp")
    assert p0 != calibration_path("c", {**cfg, "quant": {"method": "qdit", "w_bits": 3}}, "fp")
    assert p0 != calibration_path("c", cfg, "other-weights")


def test_save_and_load(tmp_path):
    t = {"a": torch.arange(5, dtype=torch.uint8), "b": torch.randn(2, 3).half()}
    save_artifact(tmp_path / "x.safetensors", t, {"alpha": 0.5})
    tensors, info = load_artifact(tmp_path / "x.safetensors")
    assert info == {"alpha": 0.5} and all(torch.equal(tensors[k], t[k]) for k in t)
    assert not list(tmp_path.glob(".*tmp"))
