"""Adapters: every linear exactly once with a role; the outlier variant preserves the fp function."""

from __future__ import annotations

import torch
from torch import nn

import orbitquant as oq
from orbitquant.harness.adapters.digits import DigitsAdapter, inject_outliers
from orbitquant.quant.registry import MODELS
from orbitquant.quant.types import ROLES


def test_every_registered_adapter_covers_every_linear_once():
    for name, cls in MODELS.items():
        adapter = cls()
        pipe = adapter.build_tiny(seed=0)
        den = adapter.denoiser(pipe)
        refs = adapter.layers(den)
        linears = {n for n, m in den.named_modules() if isinstance(m, nn.Linear)}
        fqns = [r.fqn for r in refs]
        assert len(fqns) == len(set(fqns)), f"{name}: duplicate layers"
        assert set(fqns) == linears, f"{name}: layers() misses {linears - set(fqns)}"
        assert all(r.role in ROLES for r in refs)
        assert all(den.get_submodule(r.fqn) is r.module for r in refs)


def test_digits_roles_match_dit_structure():
    adapter = DigitsAdapter()
    den = adapter.denoiser(adapter.build_tiny())
    roles = {}
    for r in adapter.layers(den):
        roles.setdefault(r.role, 0)
        roles[r.role] += 1
    n_blocks = len(den.transformer_blocks)
    for role in ("attn.q", "attn.k", "attn.v", "attn.out", "ff.up", "ff.down", "adaln"):
        assert roles[role] == n_blocks, role
    assert roles["embed"] == 2 * n_blocks  # per-block timestep MLPs
    assert roles["final"] == 2


def test_outlier_injection_preserves_function_and_creates_outliers():
    adapter = DigitsAdapter()
    base = adapter.build_tiny(seed=3).transformer
    hacked = adapter.build_tiny(seed=3).transformer
    chosen = inject_outliers(hacked, channels=4, scale=32.0, seed=0)
    assert all(len(c) == 4 for c in chosen)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    t, y = torch.rand(6, generator=g) * 1000, torch.arange(6) % 10
    captured = {}

    def keep(key):
        def hook(_mod, args, _out):  # returns None: a forward hook's return value would replace the output
            captured.setdefault(key, args[0])
        return hook

    hacked.transformer_blocks[0].attn1.to_q.register_forward_hook(keep("h"))
    base.transformer_blocks[0].attn1.to_q.register_forward_hook(keep("b"))
    with torch.no_grad():
        ya, yb = base(x, timestep=t, class_labels=y).sample, hacked(x, timestep=t, class_labels=y).sample
    assert (ya - yb).abs().max() < 1e-5 * max(1.0, ya.abs().max().item())
    # the injected channels dominate the activation absmax
    assert captured["h"].abs().amax() > 10 * captured["b"].abs().amax()


def test_quantize_with_adapter_applies_role_policy():
    adapter = DigitsAdapter()
    pipe = adapter.build_tiny()
    den = adapter.denoiser(pipe)
    report = oq.quantize_(den, oq.OrbitConfig(w_bits=4, a_bits=8), adapter.layers(den), probe=lambda: adapter.probe(pipe))
    by_role = report.by_role()
    assert by_role["embed"]["treatment"] == {"skip": by_role["embed"]["count"]}
    assert by_role["final"]["treatment"] == {"skip": 2}
    assert by_role["adaln"]["treatment"] == {"int4_g64 wo": by_role["adaln"]["count"]}
    assert by_role["attn.q"]["treatment"] == {"orbit w4a8": by_role["attn.q"]["count"]}
    assert report.probe == "model"
    assert all(r.rel_err is not None for r in report.layers if r.treatment != "skip")
    assert isinstance(den.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1, nn.Linear)


def test_generate_is_deterministic_and_batch_size_independent():
    adapter = DigitsAdapter()
    pipe = adapter.build_tiny()
    a = adapter.generate(pipe, n_per_class=1, steps=2, guidance=2.0, batch_size=10, seed=5, progress=False)
    b = adapter.generate(pipe, n_per_class=1, steps=2, guidance=2.0, batch_size=3, seed=5, progress=False)
    c = adapter.generate(pipe, n_per_class=1, steps=2, guidance=2.0, batch_size=10, seed=6, progress=False)
    assert a.images.shape == (10, 1, 8, 8)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert not torch.allclose(a.images, c.images)
    assert a.labels.tolist() == list(range(10))


def test_shipped_weights_load_and_missing_weights_error(tmp_path):
    pipe = DigitsAdapter().load()
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 1_000_000
    try:
        DigitsAdapter(path=str(tmp_path)).load()
    except FileNotFoundError as e:
        assert "train_digits.py" in str(e)
    else:
        raise AssertionError("missing weights must raise")


def test_prompt_files_load_and_bad_ones_fail_with_the_fix(tmp_path):
    import pytest

    from orbitquant.harness.data import load_prompts

    shipped = load_prompts("orbitquant/assets/prompts/calib_coco_style.txt")
    assert len(shipped) == 64 and all(p.endswith(".") for p in shipped)
    (tmp_path / "p.txt").write_text("# comment\n\na cat\n  a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text('["x", "y"]')
    assert load_prompts(str(tmp_path / "p.json")) == ["x", "y"]
    for content, name, needle in (("# only comments\n", "e.txt", "is empty"), ("{bad", "b.json", "not valid JSON"),
                                  ('["ok", ""]', "c.json", "empty or non-string")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=needle):
            load_prompts(str(tmp_path / name))
    with pytest.raises(ValueError, match="not found"):
        load_prompts("nope.txt")
