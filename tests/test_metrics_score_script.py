"""scripts/score.py: re-score a run directory from its saved samples and the fp reference, updating results.json."""

from __future__ import annotations

import importlib.util
import json
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
    with pytest.raises(SystemExit, match="InceptionV3 weights not found at .*w.pth"):
        score.main([str(run), "--metrics", "sfid", "--set", "sfid.reference=" + str(tmp_path / "missing_ref"),
                    "--set", "sfid.inception_weights=" + str(tmp_path / "w.pth")])
    with pytest.raises(SystemExit, match="not being scored"):
        score.main([str(run), "--set", "fid.reference=x"])
