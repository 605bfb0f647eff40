"""Q-DiT (baselines/qdit): packed group weights, per-token x group activations, block-sequential GPTQ from
quantized inputs, per-layer group maps, and its sanity envelope on the digits model."""

from __future__ import annotations

import json

import pytest
import torch

import orbitquant as oq
from baselines.qdit import QDiTConfig, QDiTQuantizer
from baselines.qdit.gptq import gptq_quantize, hessian, rtn_groups
from orbitquant.harness.adapters.digits import DigitsAdapter
from orbitquant.quant.act import GroupActQuant
from orbitquant.quant.primitives import fake_quant_groups, fake_quant_uniform
from orbitquant.quant.weights import GroupUniformWeight


def test_group_activation_quant_is_per_token_per_group_with_a_ragged_tail():
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(0))
    y = fake_quant_groups(x, 4, False, 32)
    for g0 in range(0, 100, 32):  # groups 0-31, 32-63, 64-95, and the 4-wide tail 96-99
        torch.testing.assert_close(y[..., g0:g0 + 32], fake_quant_uniform(x[..., g0:g0 + 32], 4, False, (-1,)))
    torch.testing.assert_close(fake_quant_groups(x, 4, False, 0), fake_quant_uniform(x, 4, False, (-1,)))
    # each (token, group) uses at most 2^b levels
    assert all(len(torch.unique(y[0, 0, g0:g0 + 32])) <= 16 for g0 in range(0, 96, 32))
    assert GroupActQuant(8, 32)(x).shape == x.shape


def test_zero_clamp_reproduces_the_official_clipping_of_one_sign_groups():
    # Q-DiT's quantize_tensor clamps the zero point to [0, 2^b - 1]: an all-positive group keeps [0, max - min]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0]])
    free = fake_quant_groups(x, 8, False, 4)
    clamped = fake_quant_groups(x, 8, False, 4, zero_clamp=True)
    torch.testing.assert_close(free, x, atol=0.01, rtol=0)  # 8 bits: [min, max] kept, near exact
    assert clamped[0, :4].max().item() == pytest.approx(3.0, abs=0.01)  # 4 clipped to max - min = 3
    torch.testing.assert_close(clamped[0, 4:], free[0, 4:])  # a group that straddles 0: the clamp is inert
    act = GroupActQuant(8, 4, zero_clamp=True)
    torch.testing.assert_close(act(x), clamped)
    assert "zero_clamp=True" in repr(act)
    assert QDiTConfig(w_bits=4, a_bits=4).a_zero_clamp is False  # off by default (see UPSTREAM.md)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (3, 48, True), (2, 64, False), (8, 128, False)])
def test_group_weight_store_packs_exactly_what_the_solver_chose(bits, group, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 100, generator=g)
    x = torch.randn(300, 100, generator=g)
    q = gptq_quantize(w, hessian(x), bits, group, symmetric)
    store = GroupUniformWeight(q)
    torch.testing.assert_close(store.dequantize(), q.dequantize())
    state_bytes = store.nbytes
    n_groups = -(-100 // group)
    assert state_bytes == -(-24 * 100 * bits // 8) + 24 * n_groups * 2 + (0 if symmetric else 24 * n_groups)
    # the fp16 scales GPTQ compensated for are the stored ones: dequantizing from the store is exact
    assert torch.equal(store.dequantize(), q.dequantize())


def test_gptq_quantized_inputs_change_the_later_blocks_hessians():
    """Block i's Hessian comes from the model with blocks < i already quantized (Q-DiT's sequential GPTQ)."""
    a = DigitsAdapter()
    pipe = a.build_tiny()
    model = a.denoiser(pipe)
    calib = dict(n_per_class=2, steps=8, guidance=2.0, batch_size=10, seed=5, progress=False)
    q = QDiTQuantizer(QDiTConfig(w_bits=2, a_bits=3, n_calib=20, group_size=16))
    layers = [r for r in a.layers(model) if r.role in ("attn.q", "attn.k", "attn.v", "attn.out", "ff.up", "ff.down")]
    q.prepare(layers, model)
    a.generate(pipe, **calib)
    assert q.finish_calibration()["inputs_recorded"] == 20
    last = [r for r in layers if r.block == 1]
    q._collect_block(1)
    h_fp = {r.fqn: q._hessians.pop(r.fqn) for r in last}
    for ref in (r for r in layers if r.block == 0):  # quantize block 0 in place, as quantize_ does
        parent, _, child = ref.fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, q.quantize_layer(ref))
    q._collect_block(1)
    for r in last:
        rel = (q._hessians[r.fqn] - h_fp[r.fqn]).norm() / h_fp[r.fqn].norm()
        assert rel > 1e-3, (r.fqn, float(rel))  # W2A3 in block 0 visibly moves block 1's inputs


def test_gptq_hessians_come_from_the_blocks_own_quantized_activations():
    """Official Q-DiT inserts every activation quantizer before GPTQ and hooks the linears behind them: block i's
    Hessians are of its layers' *quantized* inputs (weights still fp), and later layers of the block see the
    quantized-activation outputs of earlier ones. Old behaviour (fp inputs within the block) fails this."""
    a = DigitsAdapter()
    pipe = a.build_tiny()
    model = a.denoiser(pipe)
    cfg = QDiTConfig(w_bits=4, a_bits=3, n_calib=20, group_size=16)
    assert cfg.hessian_act_quant  # the official setting is the default
    q = QDiTQuantizer(cfg)
    layers = [r for r in a.layers(model) if r.role in ("attn.q", "attn.k", "attn.v", "attn.out", "ff.up", "ff.down")]
    q.prepare(layers, model)
    a.generate(pipe, n_per_class=2, steps=8, guidance=2.0, batch_size=10, seed=5, progress=False)
    q.finish_calibration()
    block0 = [r for r in layers if r.block == 0]
    to_q = next(r for r in block0 if r.role == "attn.q")
    xs = []
    h = to_q.module.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))  # runs before Q-DiT's
    try:
        q._collect_block(0)  # default: quantized activations
        h_on = {r.fqn: q._hessians.pop(r.fqn) for r in block0}
        q.config = QDiTConfig(w_bits=4, a_bits=3, n_calib=20, group_size=16, hessian_act_quant=False)
        q._collect_block(0)
    finally:
        h.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[:len(xs) // 2]])
    assert torch.equal(x, torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[len(xs) // 2:]]))  # same fp input
    # the first layer's Hessian is exactly that of its group-quantized input (old: of the fp input)
    torch.testing.assert_close(h_on[to_q.fqn], hessian(GroupActQuant(3, 16)(x)), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q._hessians[to_q.fqn], hessian(x), rtol=1e-6, atol=1e-9)
    for r in block0:  # every layer of the block, including those behind the attention / FFN activations
        rel = (h_on[r.fqn] - q._hessians[r.fqn]).norm() / q._hessians[r.fqn].norm()
        assert rel > 1e-3, (r.fqn, float(rel))


def test_search_genome_has_one_gene_per_input_tensor_so_qkv_share_one():
    """The official genome is 4 genes per block (fused qkv, proj, fc1, fc2): split q/k/v read one tensor and get
    one gene, and the mean-group constraint counts that gene once."""
    from baselines.qdit.search import expand, shared_input_genes

    a = DigitsAdapter()
    pipe = a.build_tiny()
    model = a.denoiser(pipe)
    refs = [r for r in a.layers(model) if r.role in ("attn.q", "attn.k", "attn.v", "attn.out", "ff.up", "ff.down")]
    genes = shared_input_genes(model, refs, lambda: a.probe(pipe))
    n_blocks = len({r.block for r in refs})
    assert len(genes) == 4 * n_blocks
    role = {r.fqn: r.role for r in refs}
    for b in range(n_blocks):
        assert [[role[f] for f in gene] for gene in genes[4 * b:4 * b + 4]] == [
            ["attn.q", "attn.k", "attn.v"], ["attn.out"], ["ff.up"], ["ff.down"]]
    genome = (32, 288, 64, 192) * n_blocks  # mean gene 144 >= 128; per layer (q/k/v thrice) it would be 112
    groups = expand(genome, genes)
    assert len(groups) == len(refs)
    for gene, g in zip(genes, genome):
        assert {groups[f] for f in gene} == {g}
    with pytest.raises(ValueError, match="genes"):
        expand(genome[:-1], genes)


def test_gptq_group_scales_come_from_the_weights_at_the_block_start():
    """Official GPTQ computes a group's scale/zero from ``W[:, col:col+g]``, which the lazy batch update refreshes
    only at block boundaries: inside the first block every group's scale is that of the original weights (RTN's),
    not of the error-updated ones. At g = blocksize the two readings coincide."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 128, generator=g)
    x = torch.randn(400, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated: large feedback
    h = hessian(x)
    q = gptq_quantize(w, h, 3, 32, blocksize=128)
    ref = rtn_groups(w, 3, 32)
    assert torch.equal(q.scales, ref.scales) and torch.equal(q.zeros, ref.zeros)
    upd = gptq_quantize(w, h, 3, 32, blocksize=128, scales_from="updated")
    assert torch.equal(upd.scales[:, 0], ref.scales[:, 0]) and not torch.equal(upd.scales[:, 1:], ref.scales[:, 1:])
    # g = blocksize: every group starts a block, both readings are the same
    a, b = gptq_quantize(w, h, 3, 64, blocksize=64), gptq_quantize(w, h, 3, 64, blocksize=64, scales_from="updated")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="scales_from"):
        gptq_quantize(w, h, 3, 32, scales_from="nope")


def test_qdit_gptq_beats_group_rtn_and_w8a8_is_near_lossless():
    a = DigitsAdapter()
    errs = {}
    for name, cfg in {"gptq": QDiTConfig(w_bits=3, a_bits=16, n_calib=40, group_size=32),
                      "rtn": QDiTConfig(w_bits=3, a_bits=16, weights="rtn", group_size=32),
                      "w8a8": QDiTConfig(w_bits=8, a_bits=8, n_calib=40)}.items():
        pipe = a.build_tiny()
        model = a.denoiser(pipe)
        rep = oq.quantize_(model, cfg, a.layers(model), probe=lambda p=pipe: a.probe(p),
                           calibrate=lambda p=pipe: a.generate(p, n_per_class=4, steps=8, guidance=2.0,
                                                               batch_size=10, seed=9, progress=False))
        errs[name] = rep.summary()["mean_rel_err"]
        if name == "rtn":
            assert rep.calibration == {}  # calibration-free variant
    assert errs["gptq"] < 0.85 * errs["rtn"], errs
    assert errs["w8a8"] < 0.02, errs


def test_per_layer_group_map_and_config_errors(tmp_path):
    a = DigitsAdapter()
    pipe = a.build_tiny()
    model = a.denoiser(pipe)
    refs = a.layers(model)
    q_ref = next(r for r in refs if r.role == "attn.q")
    f = tmp_path / "groups.json"
    f.write_text(json.dumps({"groups": {q_ref.fqn: 16}}))
    rep = oq.quantize_(model, QDiTConfig(w_bits=4, a_bits=8, weights="rtn", groups=str(f)), refs)
    by_fqn = {r.fqn: r.treatment for r in rep.layers}
    assert by_fqn[q_ref.fqn] == "qdit w4a8 g16"
    assert by_fqn[q_ref.fqn.replace("to_q", "to_k")] == "qdit w4a8 g48"  # group 128 > d = 48: per row
    with pytest.raises(ValueError, match="qdit_search.py"):
        QDiTConfig(groups=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="group_size"):
        QDiTConfig(group_size=-1)
    f.write_text(json.dumps({"groups": {"not.a.layer": 32}}))
    model = a.denoiser(a.build_tiny())
    with pytest.raises(ValueError, match="another model"):
        oq.quantize_(model, QDiTConfig(weights="rtn", groups=str(f)), a.layers(model))


def test_rtn_groups_matches_uniform_fake_quant_per_group():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    q = rtn_groups(w, 4, 32, symmetric=True).dequantize()
    for g0 in (0, 32):
        grp = w[:, g0:g0 + 32]
        scale = (grp.abs().amax(1, keepdim=True) / 7).half().float()
        torch.testing.assert_close(q[:, g0:g0 + 32], torch.clamp(torch.round(grp / scale), -8, 7) * scale)


def test_evolutionary_search_improves_on_the_preset_within_budget_and_constraint():
    from baselines.qdit.search import SearchConfig, evolve

    target = (32, 288, 64, 192, 288, 128, 32, 288)  # mean 164: legal

    def fitness(g):
        return sum(abs(a - b) for a, b in zip(g, target))

    cfg = SearchConfig(population=12, select=4, mutations=6, crossovers=6, epochs=8, seed=1)
    res = evolve(len(target), fitness, cfg, progress=False)
    assert res.history[0] == ((128,) * 8, fitness((128,) * 8))  # the all-128 preset is evaluated first
    assert res.best_fitness < 0.5 * res.history[0][1]
    assert all(sum(g) / len(g) >= 128 for g, _ in res.history)  # the mean-group constraint always holds
    assert len({g for g, _ in res.history}) == len(res.history)  # no genome is scored twice
    assert evolve(len(target), fitness, cfg, progress=False).history == res.history  # seeded
    capped = evolve(len(target), fitness, SearchConfig(budget=5, seed=1), progress=False)
    assert len(capped.history) == 5
    with pytest.raises(ValueError, match="min_mean_group"):
        SearchConfig(space=(32, 64), min_mean_group=128)


def test_search_script_writes_a_group_map_that_run_py_accepts(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "scripts/qdit_search.py", "search.budget=3", "search.population=2",
                        "search.protocol.n_per_class=1", "search.protocol.steps=4", f"cache_dir={tmp_path}",
                        "progress=false"], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "qdit_search/digits-w4a8-q0"
    data = json.loads((out / "groups.json").read_text())
    assert data["evaluations"] == 3 and len(data["groups"]) == 48 and (out / "search.png").is_file()
    assert len(data["genes"]) == 32 and all(len(h["genome"]) == 32 for h in data["history"])  # q/k/v: one gene
    for gene in data["genes"]:
        assert len({data["groups"][f] for f in gene}) == 1
    assert data["fitness_noise_seed"] == 20_000  # disjoint from the eval noise (seed 0) and calibration (10000)
    assert data["fitness"] == min(h["fitness"] for h in data["history"])
    assert f"quant.groups={out / 'groups.json'}" in p.stdout
    QDiTConfig(groups=str(out / "groups.json"))  # loads
