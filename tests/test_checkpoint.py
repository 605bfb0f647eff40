"""Packed checkpoints: bit-identical outputs after a round trip, b_w + 16/d bits per weight on disk, and
clear errors for the wrong checkpoint, config or method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orbitquant as oq
from orbitquant.harness.adapters.digits import DigitsAdapter
from orbitquant.quant.checkpoint import MANIFEST, WEIGHTS, load_quantized, read_manifest, save_quantized


def _mlp(seed: int = 0, d: int = 384) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


@pytest.mark.parametrize("cfg", [oq.OrbitConfig(w_bits=4, a_bits=8, seed=3), oq.OrbitConfig(w_bits=3, a_bits=4),
                                 oq.OrbitConfig(w_bits=2, a_bits=4, rotation="rpbh_kron"),
                                 oq.RTNConfig(w_bits=4, a_bits=8)], ids=["orbit-w4a8", "orbit-w3a4", "kron-w2a4", "rtn"])
@pytest.mark.parametrize("runtime", ["fast", "compact"])
def test_round_trip_is_bit_identical(tmp_path, cfg, runtime):
    model = _mlp()
    oq.quantize_(model, cfg)
    x = torch.randn(17, 384)
    y = model(x)
    save_quantized(model, tmp_path / "ckpt", cfg)
    fresh = _mlp(seed=99)  # different fp weights: everything must come from the checkpoint
    manifest = load_quantized(fresh, tmp_path / "ckpt", cfg, runtime=runtime)
    assert set(manifest["layers"]) == {"0", "2"}
    assert torch.equal(fresh(x), y)
    assert all(m.runtime == runtime for m in fresh.modules() if isinstance(m, oq.QuantLinear))


def test_digits_denoiser_round_trip_with_roles_and_adaln(tmp_path):
    adapter = DigitsAdapter()
    pipe = adapter.load()
    den = adapter.denoiser(pipe)
    cfg = oq.OrbitConfig(w_bits=4, a_bits=8)
    layers = adapter.layers(den)
    oq.quantize_(den, cfg, layers)
    save_quantized(den, tmp_path / "c", cfg, layers, meta={"model": adapter.name})
    m = read_manifest(tmp_path / "c")
    assert {r["treatment"] for r in m["layers"].values()} == {"orbit w4a8", "int4_g64 wo"}
    assert {r["role"] for r in m["layers"].values()} >= {"attn.q", "ff.up", "adaln"}
    pipe2 = DigitsAdapter().load()
    den2 = adapter.denoiser(pipe2)
    load_quantized(den2, tmp_path / "c", cfg)
    torch.manual_seed(0)
    a = adapter.generate(pipe, n_per_class=1, steps=4, guidance=2.0, batch_size=10, seed=0, progress=False)
    b = adapter.generate(pipe2, n_per_class=1, steps=4, guidance=2.0, batch_size=10, seed=0, progress=False)
    assert torch.equal(a.images, b.images)


def test_size_on_disk_is_bw_plus_16_over_d_bits_per_weight(tmp_path):
    d = 3072
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    cfg = oq.OrbitConfig(w_bits=4, a_bits=4, probe_tokens=0)
    oq.quantize_(model, cfg)
    save_quantized(model, tmp_path / "c", cfg)
    size = (tmp_path / "c" / WEIGHTS).stat().st_size  # includes the safetensors JSON header
    ideal = d * d * (4 + 16 / d) / 8
    assert ideal <= size <= 1.01 * ideal
    assert math.isclose(size, ideal, rel_tol=1e-3)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a quantized checkpoint"):
        load_quantized(_mlp(), tmp_path / "nothing")
    model = _mlp()
    cfg = oq.OrbitConfig(w_bits=4, a_bits=8)
    oq.quantize_(model, cfg)
    save_quantized(model, tmp_path / "c", cfg)
    with pytest.raises(ValueError, match="another quant config.*w_bits"):
        load_quantized(_mlp(), tmp_path / "c", oq.OrbitConfig(w_bits=3, a_bits=8))
    with pytest.raises(ValueError, match="linear '2' that this model lacks"):
        load_quantized(nn.Sequential(nn.Linear(384, 768)), tmp_path / "c")  # no layer "2" here
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(_mlp(), tmp_path / "d", cfg)
    assert (tmp_path / "c" / MANIFEST).is_file()
