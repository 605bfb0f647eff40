"""Iso-bit accounting: the bits a quantized layer really spends, measured from its saved state (codes, scales,
zero points, low-rank branches) and its activation quantizer's side information -- not the W/A label."""

from __future__ import annotations

import pytest
import torch

from orbitquant.quant.act import GroupActQuant, NoActQuant, OrbitActQuant, UniformActQuant
from orbitquant.quant.api import QuantReport, quantize_
from orbitquant.quant.config import OrbitConfig, RTNConfig
from orbitquant.quant.nn import LowRankQuantLinear, QuantLinear
from orbitquant.quant.types import LayerRef
from orbitquant.quant.weights import GroupWeight, UniformWeight


def test_activation_side_information_per_element():
    assert UniformActQuant(4, symmetric=True).bits_per_element(128) == 4 + 16 / 128  # fp16 scale per token
    assert UniformActQuant(4, symmetric=False).bits_per_element(128) == 4 + 32 / 128  # + zero point
    assert UniformActQuant(8, True, "tensor").bits_per_element(128) == 8  # one scale for the whole tensor
    assert GroupActQuant(4, group=32, symmetric=False).bits_per_element(128) == 4 + 32 / 32
    assert GroupActQuant(4, group=0).bits_per_element(128) == 4 + 32 / 128  # group <= 0: per token
    from orbitquant.quant.codebook import get_codebook

    assert OrbitActQuant(get_codebook(128, 4)).bits_per_element(128) == 4 + 32 / 128  # the fp32 token norm


def test_every_baseline_activation_quantizer_counts_its_side_information():
    from baselines.ptq4dit.quantizers import StaticAffineActQuant
    from baselines.svdquant import UnsignedGroupActQuant
    from baselines.vidit_q.layers import TokenActQuant

    assert TokenActQuant(4).bits_per_element(96) == 4 + 32 / 96  # per-token asymmetric: scale + zero point
    assert StaticAffineActQuant(4, 0.1, 3).bits_per_element(96) == 4  # static per-tensor: ~0 per element
    assert UnsignedGroupActQuant(4, 64).bits_per_element(128) == 4 + 16 / 64  # fp16 scale per token x group


def _layer(q: QuantLinear, n_in: int, n_out: int) -> LayerRef:
    return LayerRef(fqn="l", role="attn.q", block=0, module=torch.nn.Linear(n_in, n_out))


def test_measured_weight_bits_count_scales_zeros_and_low_rank_branches():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    sym = QuantLinear(UniformWeight(w, 4, symmetric=True), torch.zeros(64), NoActQuant())
    asym = QuantLinear(UniformWeight(w, 4, symmetric=False), torch.zeros(64), NoActQuant())
    g64 = QuantLinear(GroupWeight(w, bits=4, group=64), None, NoActQuant())

    def bits(q):  # what api records: saved state minus bias, per weight
        bias = 0 if q.bias is None else q.bias.numel() * q.bias.element_size()
        return 8 * (q.nbytes - bias) / w.numel()

    assert 4 < bits(sym) < bits(asym) <= 4 + 2 * 32 / 256  # a scale (and a zero point) per output row
    assert 4 + 16 / 64 <= bits(g64) <= 4 + 64 / 64  # per group of 64
    rank = 8
    lr = LowRankQuantLinear(UniformWeight(w, 4, symmetric=True), None, torch.randn(64, rank), torch.randn(rank, 256),
                            act=NoActQuant())
    assert bits(lr) - bits(sym) == pytest.approx(16 * rank * (64 + 256) / w.numel())  # the bf16 branch


def test_report_reads_measured_bits_over_the_methods_layers():
    from orbitquant.harness.adapters.digits import DigitsAdapter

    a = DigitsAdapter()
    out = {}
    for cfg in (OrbitConfig(w_bits=4, a_bits=8), RTNConfig(w_bits=4, a_bits=4), RTNConfig(w_bits=4, a_bits=4,
                                                                                           a_symmetric=True)):
        den = a.denoiser(a.load())
        rep = quantize_(den, cfg, a.layers(den))
        s = rep.summary()
        recs = [r for r in rep.layers if r.treatment not in ("skip", "int4_g64 wo")]
        assert recs and all(r.w_bits_eff > 4 for r in recs)  # the label says 4: scales are on top
        out[(type(cfg).__name__, cfg.a_bits, getattr(cfg, "a_symmetric", None))] = s
    orbit, rtn_asym, rtn_sym = out.values()
    assert 4.0 < orbit["eff_w_bits"] < 4.5 and 8.0 < orbit["eff_a_bits"] < 8.5
    assert rtn_asym["eff_a_bits"] > rtn_sym["eff_a_bits"] > 4.0  # a zero point per token costs bits
    assert QuantReport("x", {}).effective_bits() == {"eff_w_bits": None, "eff_a_bits": None}
