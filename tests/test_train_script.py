"""The training script that produced the shipped weights runs (a few steps) and writes loadable assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orbitquant.harness.adapters.digits import DigitsAdapter
from orbitquant.harness.metrics.digits_net import load_classifier

ROOT = Path(__file__).resolve().parent.parent


def test_train_digits_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts/train_digits.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads((tmp_path / "TRAINING.json").read_text())
    assert info["dit"]["steps"] == 3
    assert 1_000_000 < info["dit"]["params"] < 2_000_000
    pipe = DigitsAdapter(path=str(tmp_path / "digits_dit")).load()
    assert pipe.transformer.config.num_layers == 8
    load_classifier(tmp_path / "digits_classifier.safetensors")


def test_shipped_training_record_matches_shipped_model():
    info = json.loads((ROOT / "orbitquant/assets/TRAINING.json").read_text())
    cfg = DigitsAdapter().load().transformer.config
    for k, v in info["dit"]["kwargs"].items():
        assert cfg[k] == v, k
    assert info["classifier"]["heldout_accuracy"] > 0.97
