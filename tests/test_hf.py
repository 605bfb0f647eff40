"""Missing real checkpoints fail at once with one line naming the repo id and the fix."""

from __future__ import annotations

import pytest

from orbitquant.harness.adapters.hf import WeightsNotFound, resolve_checkpoint


def test_missing_repo_names_repo_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFound) as e:
        resolve_checkpoint("flux1_schnell", "black-forest-labs/FLUX.1-schnell")
    msg = str(e.value)
    assert "black-forest-labs/FLUX.1-schnell" in msg and "model.path" in msg and "\n" not in msg


def test_local_path_is_used_or_reported(tmp_path):
    assert resolve_checkpoint("wan21", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(tmp_path)) == str(tmp_path)
    with pytest.raises(WeightsNotFound, match="does not exist"):
        resolve_checkpoint("wan21", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(tmp_path / "nope"))
