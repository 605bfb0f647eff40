"""Run records: compact, committed, and enough to rebuild every committed table byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orbitquant.harness.records import RECORD, collect, compact, iter_results, record_name, write_record

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "results/tables"
RECORDS = ROOT / "results/records"


def _results(model="digits", method="orbit", tag="w4a4", eval_="digits", seed=0, value=27.5):
    return {"status": "ok", "schema_version": 3, "config_hash": "abc",
            "config": {"model": {"name": model}, "quant": {"method": method, "tag": tag, "w_bits": 4, "a_bits": 4},
                       "eval": {"name": eval_}, "calib": {"name": "digits"}, "seed": seed, "quant_seed": seed},
            "metrics": {"psnr_vs_fp": {"value": value, "higher_is_better": True, "n": 3, "per_sample": [1, 2, 3]}},
            "reference_metrics": {"psnr_vs_fp": {"value": "inf", "higher_is_better": True, "n": 3}},
            "quant_report": {"summary": {"eff_w_bits": 4.1, "seconds": 0.3}, "layers": [{"rel_err": 0.1}] * 50},
            "files": {"samples": "samples"}, "timing": {"sample": 1.0}, "provenance": {"git_sha": "x"},
            "nonfinite": {"events": 2, "first": [{"layer": "a"}] * 2}}


def test_a_record_keeps_what_tables_and_audits_need_and_drops_arrays():
    rec = compact(_results())
    assert rec["config"]["quant"]["tag"] == "w4a4" and rec["config_hash"] == "abc" and rec["provenance"]
    assert rec["metrics"]["psnr_vs_fp"] == {"value": 27.5, "higher_is_better": True, "n": 3}
    assert rec["quant_report"] == {"summary": {"eff_w_bits": 4.1, "seconds": 0.3}}
    assert rec["nonfinite"] == {"events": 2} and "files" not in rec
    assert record_name(rec["config"]) == "digits__orbit__w4a4__digits__q0-s0.json"


def test_collect_takes_the_experiments_finished_runs_only(tmp_path):
    runs = tmp_path / "runs"
    for i, kw in enumerate([{}, {"seed": 1}, {"model": "other"}, {"eval_": "smoke"}]):
        d = runs / f"r{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_results(**kw)))
    write_record(runs / "r1", _results(seed=1, value=30.0))  # the runner's own record wins over a re-compaction
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / RECORD).write_text(json.dumps(compact(_results(seed=2))))  # no results.json: not done
    out = collect(runs, tmp_path / "records", ["digits"], "digits")
    assert sorted(p.name for p in out) == ["digits__orbit__w4a4__digits__q0-s0.json",
                                          "digits__orbit__w4a4__digits__q1-s1.json"]
    values = {p.name: r["metrics"]["psnr_vs_fp"]["value"] for p, r in iter_results(tmp_path / "records")}
    assert values["digits__orbit__w4a4__digits__q1-s1.json"] == 30.0


def _experiments_with_tables() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.md") if not p.stem.endswith(("_cost", "_headline")))


def test_every_committed_table_has_committed_records():
    names = _experiments_with_tables()
    assert names, "no committed tables under results/tables"
    missing = [n for n in names if not any((RECORDS / n).glob("*.json"))]
    assert not missing, f"tables without records (python scripts/make_tables.py <name> --collect): {missing}"


@pytest.mark.parametrize("name", _experiments_with_tables())
def test_committed_tables_and_figures_rebuild_identically_from_records(name, tmp_path):
    out = tmp_path / "tables" / f"{name}.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), name, "--out", str(out),
                           "--figures", str(tmp_path / "figures"), "--plots"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    suffixes = [".md", ".csv", ".tex", "_cost.md"] + (["_headline.md"] if (TABLES / f"{name}_headline.md").exists() else [])
    for suffix in suffixes:
        fresh, committed = out.with_name(name + suffix), TABLES / (name + suffix)
        assert fresh.read_text() == committed.read_text(), f"{committed.relative_to(ROOT)} differs from its records"
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert figures
    from matplotlib.image import imread

    for fig in figures:  # pixels, not bytes: the PNG encoder's zlib may differ between machines
        committed = ROOT / "results/figures" / fig.name
        assert committed.exists(), f"{fig.name} is built from records but not committed"
        a, b = imread(fig), imread(committed)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1e-3, f"{committed.relative_to(ROOT)} differs"
