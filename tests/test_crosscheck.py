"""The CPU part of the metric cross-check (scripts/crosscheck_metrics.py --cpu): our whole Inception-metric path --
a sample store on disk, uint8 reads, batching, the feature cache, the adm and clean preprocessings -- agrees with
the reference arithmetic that runs here (torchmetrics' FID and IS, clean-fid's resize, ADM's k-NN manifolds) on
torch-fidelity's real InceptionV3 architecture with seeded random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_cpu_crosscheck_agrees_with_the_reference_implementations(tmp_path):
    from orbitquant.harness.metrics.features import prepare_torch_fidelity

    if not prepare_torch_fidelity():  # its package imports torchvision: registered without running it, as in use
        pytest.skip("torch-fidelity: pip install --no-deps torch-fidelity (the README's test install has it)")
    pytest.importorskip("cleanfid.resize", reason="clean-fid: pip install --no-deps clean-fid (README)")
    sys.path.insert(0, str(REPO / "scripts"))
    from crosscheck_metrics import Row, cpu_check, render

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # ~32 Inception forwards at 299 px: the one test here that profits from both cores
    try:
        rows = cpu_check(tmp_path, scipy_rows=False)  # scipy's 2048-d sqrtm: 28 s, compared elsewhere
    finally:
        torch.set_num_threads(threads)
    # subset: the Inception metrics the script cross-checks, and clean-fid's FID
    assert {r.metric for r in rows} == {"fid", "sfid", "isc", "precision", "recall", "fid (clean)"}
    assert all(r.theirs is not None for r in rows), render(rows, "cross-check", [])
    assert all(r.agree for r in rows), render(rows, "cross-check", [])
    by = {r.metric: r for r in rows}
    assert by["fid"].ours > 1.0 and by["sfid"].ours > 0.1  # not a degenerate agreement of zeros
    assert by["fid (clean)"].ours != pytest.approx(by["fid"].ours, rel=1e-3)  # the two preprocessings differ
    assert not Row("fid", 1.0, "x", 1.01, 1e-3).agree and Row("fid", 1.0, "x", 1.0 + 1e-7, 1e-6).agree
