"""scripts/score.py: re-score a run directory from its saved samples and the fp reference, updating results.json."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _score_module():
    spec = importlib.util.spec_from_file_location("score_script", ROOT / "scripts" / "score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    q = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    labels = np.arange(6) % 2
    np.savez(run / "samples" / "samples.npz", images=q.numpy(), labels=labels)
    np.savez(tmp_path / "ref.npz", images=ref.numpy(), labels=labels)
    config = {"model": {"adapter": "digits", "name": "digits"}, "eval": {"name": "x", "protocol": {"n_per_class": 3},
              "metrics": ["psnr_vs_fp"]}, "dtype": "float32", "device": "cpu", "seed": 0,
              "cache_dir": str(tmp_path / "cache")}
    (run / "results.json").write_text(json.dumps({"config": config, "metrics": {"old": {"value": 1.0}},
                                                  "reference_metrics": {}, "sampling": {"prompts": ["a", "b"]}}))
    return run, q, ref


def test_score_script_rescores_and_updates_results_atomically(tmp_path, capsys):
    score = _score_module()
    run, q, ref = _run_dir(tmp_path)
    score.main([str(run), "--reference", str(tmp_path / "ref.npz"), "--metrics", "psnr_vs_fp,ssim_vs_fp"])
    res = json.loads((run / "results.json").read_text())
    assert res["metrics"]["old"] == {"value": 1.0}  # other entries are kept
    mse = ((q - ref) ** 2).flatten(1).mean(1)
    expect = (10 * torch.log10(4 / mse)).tolist()
    assert res["metrics"]["psnr_vs_fp"]["per_sample"] == pytest.approx(expect, rel=1e-4)
    assert res["reference_metrics"]["ssim_vs_fp"]["value"] == pytest.approx(1.0)
    assert res["rescored"][-1]["metrics"] == ["psnr_vs_fp", "ssim_vs_fp"]
    assert "updated" in capsys.readouterr().out
    assert not [p for p in run.iterdir() if p.name.startswith(".results.json")]  # no temp file left


def test_score_script_errors_name_the_fix(tmp_path):
    score = _score_module()
    run, _, _ = _run_dir(tmp_path)
    with pytest.raises(SystemExit, match="fp reference samples are needed"):
        score.main([str(run)])  # the cached reference for this config does not exist
    with pytest.raises(SystemExit, match=r"InceptionV3 weights \(torch-fidelity\) .*w.pth \(not found\)"):
        score.main([str(run), "--metrics", "sfid", "--set", "sfid.reference=" + str(tmp_path / "missing_ref"),
                    "--set", "sfid.inception_weights=" + str(tmp_path / "w.pth")])
    with pytest.raises(SystemExit, match="not being scored"):
        score.main([str(run), "--set", "fid.reference=x"])


def _store(path, images, labels, meta=None):
    from orbitquant.harness.samplestore import SampleSet, StoreWriter

    w = StoreWriter(path, "k", len(images), "float32")
    for a, b in ((0, 4), (4, len(images))):
        w.write(a, b, images[a:b], labels[a:b])
    w.finish(meta or {})
    w.close()
    return SampleSet.open(path)


def _store_run(tmp_path, n=6):
    """A run as runs are written now: ``samples/`` is a sample store, and the fp reference is a store in the
    sweep cache at the key of the run's config."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    q = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    labels = torch.arange(n) % 2
    run = tmp_path / "run"
    _store(run / "samples", q, labels, {"prompts": ["a", "b"]})
    config = {"model": {"adapter": "digits", "name": "digits"}, "eval": {"name": "x", "protocol": {"n_per_class": 3},
              "metrics": ["psnr_vs_fp"], "store": "float32"}, "dtype": "float32", "device": "cpu", "seed": 0,
              "cache_dir": str(tmp_path / "cache")}
    (run / "results.json").write_text(json.dumps({"config": config, "metrics": {}, "reference_metrics": {},
                                                  "sampling": {"prompts": ["a", "b"]}}))
    return run, q, ref, labels, config


def test_score_script_reads_sample_stores_and_the_cached_reference_store(tmp_path):
    from orbitquant.harness.factory import build_adapter
    from orbitquant.harness.generate import reference_key

    score = _score_module()
    run, q, ref, labels, c = _store_run(tmp_path)
    key = reference_key(c["model"], {**c["eval"]["protocol"], "dtype": "float32", "device": "cpu", "store": "float32"},
                        0, build_adapter(c["model"]).fingerprint())
    path = score.fp_reference_path(run, json.loads((run / "results.json").read_text()), None)
    assert path == tmp_path / "cache" / "reference" / key  # the store stages.reference_store writes
    with pytest.raises(SystemExit, match="fp reference samples are needed"):
        score.main([str(run)])
    _store(path, ref, labels)
    score.main([str(run), "--metrics", "psnr_vs_fp"])
    res = json.loads((run / "results.json").read_text())
    mse = ((q - ref) ** 2).flatten(1).mean(1)
    assert res["metrics"]["psnr_vs_fp"]["per_sample"] == pytest.approx((10 * torch.log10(4 / mse)).tolist(), rel=1e-5)
    assert float(res["reference_metrics"]["psnr_vs_fp"]["value"]) == math.inf  # the reference against itself

    # a legacy <key>.npz reference (before sample stores; its key had no "store") is still found
    run2, _, ref2, labels2, c2 = _store_run(tmp_path / "legacy")
    old_key = reference_key(c2["model"], {**c2["eval"]["protocol"], "dtype": "float32", "device": "cpu"}, 0,
                            build_adapter(c2["model"]).fingerprint())
    (tmp_path / "legacy" / "cache" / "reference").mkdir(parents=True)
    np.savez(tmp_path / "legacy" / "cache" / "reference" / f"{old_key}.npz", images=ref2.numpy(), labels=labels2.numpy())
    score.main([str(run2), "--metrics", "psnr_vs_fp", "--no-reference-metrics"])
    res2 = json.loads((run2 / "results.json").read_text())
    assert res2["metrics"]["psnr_vs_fp"]["value"] == res["metrics"]["psnr_vs_fp"]["value"]


def test_score_script_names_a_missing_or_unfinished_sample_store(tmp_path):
    score = _score_module()
    run, *_ = _store_run(tmp_path)
    next((run / "samples").glob("shard-000004-*.json")).unlink()  # an unfinished store: items 4.. missing
    with pytest.raises(SystemExit, match="missing samples from item 4"):
        score.main([str(run), "--reference", str(tmp_path / "x")])
    (run / "samples" / "store.json").unlink()
    with pytest.raises(SystemExit, match="no samples at"):
        score.main([str(run), "--reference", str(tmp_path / "x")])


def test_compare_samples_reads_the_first_samples_of_stores(tmp_path, monkeypatch):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("compare_samples", ROOT / "scripts" / "compare_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = []
    for i, method in enumerate(("fp", "rtn")):
        run = tmp_path / method
        x = torch.full((25, 1, 8, 8), -1.0 + i)  # fp all black, rtn all grey (0 -> 128)
        _store(run / "samples", x, torch.arange(25) % 10)
        (run / "results.json").write_text(json.dumps({"config": {"quant": {"method": method, "tag": "w4a4"}},
                                                      "metrics": {"psnr_vs_fp": {"value": 20.0 + i}}}))
        runs.append(str(run))
    out = tmp_path / "cmp.png"
    monkeypatch.setattr("sys.argv", ["compare_samples.py", *runs, "--rows", "2", "--scale", "1", "--out", str(out)])
    mod.main()
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 8 + 14 + 16, 2 * 10 * 8 + 3 * 8)
    assert img[8 + 14 + 4, 8 + 4] == 0 and img[8 + 14 + 4, 8 + 80 + 8 + 4] == 128  # each panel shows its own run


def test_wandb_sample_table_reads_the_first_samples_of_the_store(tmp_path):
    from orbitquant.harness.wandb_log import _log_samples

    x = torch.rand(12, 3, 4, 4) * 2 - 1
    _store(tmp_path / "samples", x, torch.arange(12) % 3)
    logged = {}

    class Table:
        def __init__(self, columns):
            self.rows = []

        def add_data(self, *row):
            self.rows.append(row)

    fake = type("wandb", (), {"Table": Table, "Image": staticmethod(lambda a: a), "Video": staticmethod(lambda p: p)})
    run = type("run", (), {"log": staticmethod(logged.update)})
    _log_samples(fake, run, {"sampling": {"prompts": ["p0", "p1", "p2"]}}, tmp_path, max_images=5)
    rows = logged["samples"].rows
    assert [r[:3] for r in rows] == [(i, i % 3, f"p{i % 3}") for i in range(5)]
    want = ((x[:5].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(r[3], w) for r, w in zip(rows, want, strict=True))
    _log_samples(fake, run, {}, tmp_path / "nothing", max_images=5)  # no samples on disk: no table, no error
