"""Run records: the compact, committed trail behind every published table.

A run directory (``results/runs/...``) holds samples, previews and a full ``results.json`` with per-layer reports;
it is git-ignored. Its *record* is what a table needs and a reviewer wants to audit -- config, config hash, seeds,
metrics (and the fp reference's), the quantization report's summary (measured bits, errors, calibration cost),
timing, memory and provenance (git SHA, library versions, host) -- a few KB, no sample arrays, no per-layer lists.
The runner writes ``record.json`` beside ``results.json``; ``python scripts/make_tables.py <experiment> --collect``
copies the records of an experiment's runs into ``results/records/<experiment>/`` (committed), and every table,
figure and cost table of that experiment is built from those files alone (:func:`iter_results`, read by
``orbitquant.harness.tables``).
"""

from __future__ import annotations

import json
from pathlib import Path

from orbitquant.harness.rundir import atomic_write_json  # non-finite floats as strings, as in results.json

RECORD = "record.json"
RECORDS_DIR = "results/records"
SCHEMA = 1

#: top-level results.json keys a record keeps whole (``quant_report`` keeps only its summary)
_KEEP = ("status", "config", "config_hash", "metrics", "reference_metrics", "sampling", "timing", "memory",
         "nonfinite", "provenance")


def compact(results: dict) -> dict:
    """The record of one finished run's ``results.json`` (a dict): everything but sample files, per-sample metric
    values and per-layer rows. ``nonfinite`` keeps its count only."""
    rec = {"record_schema": SCHEMA, "status": results.get("status", "ok")}
    rec |= {k: results[k] for k in _KEEP if k in results and k != "status"}
    if "nonfinite" in rec:
        rec["nonfinite"] = {"events": rec["nonfinite"].get("events", 0)}
    for k in ("metrics", "reference_metrics"):  # per-sample values stay in results.json
        if k in rec:
            rec[k] = {name: {f: v for f, v in m.items() if f != "per_sample"} for name, m in rec[k].items()}
    rec["quant_report"] = {"summary": results.get("quant_report", {}).get("summary", {})}
    return rec


def record_name(config: dict) -> str:
    """``<model>__<method>__<tag>__<eval>__q<quant_seed>-s<seed>.json``: one file per run, stable across machines."""
    c = config
    return (f"{c['model']['name']}__{c['quant']['method']}__{c['quant']['tag']}__{c['eval']['name']}"
            f"__q{c['quant_seed']}-s{c['seed']}.json")


def write_record(run_dir: Path, results: dict) -> Path:
    """Write the run's ``record.json`` (atomically) beside its ``results.json``."""
    path = Path(run_dir) / RECORD
    atomic_write_json(path, compact(results))
    return path


def iter_results(root: str | Path):
    """(path, dict) of every run under ``root``: a records folder (``*.json`` records) or a runs tree
    (``**/results.json``). Accepting both keeps one table code path for committed records and fresh runs."""
    root = Path(root)
    paths = sorted(root.glob("**/results.json"))
    if not paths:
        paths = sorted(p for p in root.glob("*.json"))
    for p in paths:
        yield p, json.loads(p.read_text())


def collect(runs_root: str | Path, out_dir: str | Path, models: list[str], eval_name: str) -> list[Path]:
    """Copy the record of every finished run under ``runs_root`` whose model is in ``models`` and whose eval is
    ``eval_name`` into ``out_dir`` (a run's ``record.json`` if it wrote one, else one compacted from its
    ``results.json``). Records already there for other runs are kept; a record for the same run is replaced.
    Returns the written paths."""
    out_dir = Path(out_dir)
    written = []
    for p in sorted(Path(runs_root).glob("**/results.json")):
        rec_path = p.with_name(RECORD)
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else compact(json.loads(p.read_text()))
        c = rec["config"]
        if c["model"]["name"] not in models or c["eval"]["name"] != eval_name or rec.get("status", "ok") != "ok":
            continue
        dest = out_dir / record_name(c)
        atomic_write_json(dest, rec)
        written.append(dest)
    return written
