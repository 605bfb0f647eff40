"""Every committed benchmark table is its record's rendering (issue 21, "Records").

``results/bench/<name>.md`` must be exactly what ``scripts/render_records.py`` renders from ``<name>.json``, and
``results/rotation_study.md`` what it renders from the study's two CSVs and ``rotation_study.meta.json``: a table
edited by hand, or a record changed without re-rendering, fails here. Fix with ``python scripts/render_records.py``
(a remark belongs in the record, e.g. ``"note"`` of the memory benchmark). Only pandas runs: no torch, no measuring.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "results" / "bench"


def _load():
    spec = importlib.util.spec_from_file_location("render_records", ROOT / "scripts" / "render_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rr = _load()
TABLED = sorted(p for p in BENCH.glob("*.json") if p.with_suffix(".md").exists())


def _diff(expected: str, got: str) -> str:
    import difflib

    return "".join(list(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "committed",
                                             "rendered from the record", n=0))[:20])


@pytest.mark.parametrize("record", TABLED, ids=lambda p: p.stem)
def test_bench_table_is_its_records_rendering(record):
    md, text = rr.render_file(record)
    assert md == record.with_suffix(".md")
    committed = md.read_bytes()
    assert committed == text.encode("utf-8"), (
        f"{md.name} is not what {record.name} renders (python scripts/render_records.py):\n"
        + _diff(committed.decode("utf-8", "replace"), text))


def test_rotation_study_is_its_records_rendering():
    paths = rr.rotation_paths(rr.ROTATION_MD)
    assert all(p.exists() for p in paths.values()), paths
    text = rr.render_rotation_study(rr.ROTATION_MD)
    committed = rr.ROTATION_MD.read_bytes()
    assert committed == text.encode("utf-8"), _diff(committed.decode("utf-8", "replace"), text)
    meta = json.loads(paths["meta"].read_text())
    assert {"torch", "seeds", "dims", "rotations", "date"} <= meta.keys()


def test_every_bench_table_has_a_record_and_every_record_renders():
    assert TABLED, "no benchmark tables found"
    orphans = [m.name for m in BENCH.glob("*.md") if not m.with_suffix(".json").exists()]
    assert not orphans, f"tables without a record: {orphans}"
    for record in BENCH.glob("*.json"):  # each record has a renderer (or is a record without a table)
        res = rr.render_file(record)
        if res is None:
            assert not record.with_suffix(".md").exists()
    assert rr.stale(rr.targets()) == []


def test_check_catches_a_hand_edited_table(tmp_path):
    """The check the CI test relies on: a copy of the committed records and tables passes, and fails once a number
    in a table is edited by hand, a table loses its record, or a record changes without re-rendering."""
    bench = tmp_path / "bench"
    shutil.copytree(BENCH, bench)
    rot = tmp_path / "rotation_study.md"
    for p in rr.rotation_paths(rr.ROTATION_MD).values():
        shutil.copy(p, tmp_path / p.name)
    shutil.copy(rr.ROTATION_MD, rot)
    assert rr.stale(rr.targets(bench, rot)) == []

    md = bench / "cpu-1t-intel-xeon-layer-quantize.md"
    edited = md.read_text().replace("|   30.09 |", "|   29.09 |", 1)  # one timing, edited by hand
    assert edited != md.read_text()
    md.write_text(edited)
    assert [p for p in rr.stale(rr.targets(bench, rot)) if md.name in p]
    md.unlink()
    shutil.copy(BENCH / "cpu-1t-intel-xeon-layer-quantize.json", bench / "extra.json")
    (bench / "orphan.md").write_text("# a table without a record\n")
    problems = rr.stale(rr.targets(bench, rot))
    assert any("orphan.md: no record" in p for p in problems)
    assert any(md.name in p and "missing" in p for p in problems)
    assert any("extra.md" in p and "missing" in p for p in problems)

    edited = rot.read_text().replace("| 0.0293 |", "| 0.0294 |", 1)  # a KS value, edited by hand
    assert edited != rot.read_text()
    rot.write_text(edited)
    assert any(rot.name in p for p in rr.stale(rr.targets(bench, rot)))
