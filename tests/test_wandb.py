"""W&B mirror (logger=wandb): offline by default without a key, everything under logger.dir, never fails a run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from orbitquant.harness.wandb_log import mirror, resolve_mode, run_names

pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _isolated_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc or settings can leak in


def _results(tmp_path):
    cfg = {"model": {"name": "digits"}, "quant": {"method": "orbit", "tag": "w4a8"}, "eval": {"name": "smoke"},
           "seed": 1, "quant_seed": 2}
    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    np.savez(run_dir / "samples/samples.npz", images=np.zeros((12, 1, 8, 8), np.float32), labels=np.arange(12) % 10)
    res = {"config": cfg, "metrics": {"psnr_vs_fp": {"value": 29.5, "higher_is_better": True, "n": 12}},
           "reference_metrics": {"psnr_vs_fp": {"value": "inf", "higher_is_better": True, "n": 12}},
           "quant_report": {"summary": {"mean_rel_err": 0.08, "seconds": 0.3}}, "timing": {"sample": 1.0}}
    (run_dir / "results.json").write_text(json.dumps(res))
    return res, run_dir


def test_names_group_seeds_together_and_auto_mode_needs_a_key(monkeypatch):
    cfg = {"model": {"name": "digits"}, "quant": {"method": "qdit", "tag": "w4a4-g128"}, "eval": {"name": "digits"},
           "seed": 1, "quant_seed": 1}
    group, name = run_names(cfg)
    assert group == "digits/qdit/w4a4-g128/digits" and name == group + "/q1-s1"
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="auto|online"):
        resolve_mode("dryrun-ish")


def test_auto_mode_follows_wandb_mode_and_a_stored_login(monkeypatch, tmp_path):
    """W&B's own rules: WANDB_MODE first, then a key in the environment or stored by `wandb login` (netrc)."""
    assert resolve_mode("auto") == "offline"
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == "online"  # `wandb login` stored it; no WANDB_API_KEY
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_mode("auto") == "offline"  # a key for another host does not count
    monkeypatch.delenv("WANDB_BASE_URL")
    for env, mode in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_mode("auto") == mode
    assert resolve_mode("offline") == "offline"  # an explicit logger.mode wins
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_mode("auto")


def test_offline_mirror_logs_summary_samples_plot_and_artifact_under_logger_dir(tmp_path):
    import wandb

    res, run_dir = _results(tmp_path)
    from orbitquant.harness.viz import plot_layer_errors

    plot_layer_errors([{"role": "attn.q", "treatment": "orbit w4a8", "rel_err": 0.1}], run_dir / "layer_error.png")
    out = mirror(res, run_dir, {"name": "wandb", "mode": "auto", "dir": str(tmp_path / "wb"), "max_images": 5})
    assert out is not None
    runs = list((tmp_path / "wb/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    table = json.loads(next(runs[0].glob("files/media/table/samples_*.table.json")).read_text())
    assert table["columns"] == ["index", "label", "prompt", "sample"] and len(table["data"]) == 5
    assert list(runs[0].glob("files/media/images/layer_error_*.png"))
    wandb.teardown()  # the transaction log is written by the wandb-core process: wait for it to flush and exit
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needle in (b"metrics/psnr_vs_fp", b"digits/orbit/w4a8/smoke", b"quant/mean_rel_err"):
        assert needle in log
    assert not (tmp_path / "home/.local/share/wandb").exists()  # staging stayed under logger.dir


def test_a_failing_wandb_never_fails_the_run(tmp_path, monkeypatch, caplog):
    import wandb

    res, run_dir = _results(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("server unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    monkeypatch.setattr("orbitquant.harness.wandb_log._warned", set())
    with caplog.at_level(logging.WARNING):
        assert mirror(res, run_dir, {"name": "wandb", "mode": "offline", "dir": str(tmp_path / "wb")}) is None
    assert "results.json is complete on disk" in caplog.text
    assert mirror(res, run_dir, {"name": "none"}) is None
