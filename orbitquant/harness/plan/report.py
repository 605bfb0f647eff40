"""The plan as a text or GitHub-markdown report (``render``) and as plain data (``to_json``, ``--json``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from orbitquant.harness.plan.fmt import fmt_bytes, fmt_hours
from orbitquant.harness.plan.planner import Job, Plan, sum_or_none
from orbitquant.harness.plan.protocol import ProtocolCost


def run_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per (model, eval, method, tag): seeds, runs, per-run and total cost; then the fp reference cache."""
    groups: dict[tuple, list[Job]] = {}
    for j in plan.runs:
        groups.setdefault((j.model, j.eval, j.method, j.tag), []).append(j)
    rows = []
    for (model, ev, method, tag), js in groups.items():
        p = plan.protocols[js[0].eval_cost]
        new_cal = [j for j in js if j.calibration == "new"]
        cal = plan.protocols[js[0].calib_cost] if js[0].calib_cost else None
        per_fw = p.forwards + (cal.forwards if cal is not None else 0)
        secs = [p.gpu_seconds] + ([cal.gpu_seconds] if cal is not None else [])
        per_s = sum_or_none(secs)
        total_s = None if per_s is None else (p.gpu_seconds * len(js)
                                              + (cal.gpu_seconds * len(new_cal) if cal is not None else 0))
        dups = sum(1 for j in plan.jobs if j.duplicate_of is not None and j.duplicate_of in {x.subdir for x in js})
        rows.append({
            "model": model, "eval": ev, "method": method, "tag": tag,
            "seeds": ",".join(str(j.seed) for j in js), "runs": len(js),
            "skipped_jobs": dups,
            "calibration": (f"{cal.name}: {cal.n_samples:,} samples, {cal.forwards:,} fw" if cal is not None else "-"),
            "samples_per_run": p.n_samples, "forwards_per_run": per_fw,
            "gpu_h_per_run": per_s, "gpu_h_total": total_s, "disk_per_run": p.disk_bytes,
        })
    refs: dict[str, int] = {}
    for k in plan.references.values():
        refs[k] = refs.get(k, 0) + 1
    for k, count in refs.items():
        p = plan.protocols[k]
        rows.append({"model": p.model, "eval": p.name, "method": "fp reference", "tag": "(cache)",
                     "seeds": "", "runs": count, "skipped_jobs": 0, "calibration": "-",
                     "samples_per_run": p.n_samples, "forwards_per_run": p.forwards, "gpu_h_per_run": p.gpu_seconds,
                     "gpu_h_total": None if p.gpu_seconds is None else p.gpu_seconds * count,
                     "disk_per_run": p.disk_bytes})
    return rows


def render(plan: Plan, markdown: bool = False) -> str:
    """The plan as text (or GitHub markdown): header, per-protocol costs, the run table, memory, notes, checklist."""
    from tabulate import tabulate

    fmt, h2 = ("github", "## ") if markdown else ("simple", "")
    t = plan.totals()
    out = []
    title = f"experiment={plan.experiment}" if plan.experiment else "runs"
    extra = " ".join(a for a in plan.argv if not a.startswith("experiment="))
    out.append(("# " if markdown else "") + f"Plan: {title}" + (f" {extra}" if extra else "")
               + f"  (device {plan.device}, dtype {plan.dtype})")
    out.append("")
    out.append(f"{t['jobs']} sweep jobs -> {t['runs']} runs ({t['jobs'] - t['runs']} of the jobs share a run "
               f"directory with an earlier one and skip), {t['references']} fp reference sets (cached), "
               f"{t['calibrations']} calibrations (cached)")
    out.append("")
    for p in plan.protocols.values():
        out.append(h2 + f"{p.kind}={p.name} on model={p.model}")
        rows = [
            ["samples", f"{p.n_samples:,}", p.n_source],
            ["steps / guidance", f"{p.steps} / {p.guidance:g}", p.cfg_note],
            ["denoiser forwards / sample", f"{p.forwards_per_sample:,}",
             (f"{p.steps} steps x {p.rows_per_step} row{'s' if p.rows_per_step > 1 else ''}; {p.calls:,} denoiser "
             f"calls at batch {p.batch_size}")],
            ["denoiser forwards (protocol)", f"{p.forwards:,}", "samples x forwards / sample"],
        ]
        if p.geometry is not None:
            rows.append(["tokens / forward", f"{p.geometry.tokens:,}", p.geometry.detail])
            rows.append(["text tokens", f"{p.geometry.text_tokens:,}", p.text_note])
        if p.flops is not None:
            rows.append(["TFLOPs / forward", f"{p.flops.total / 1e12:,.4g}",
                         (f"linear {p.flops.linear / 1e12:,.4g} + attention {p.flops.attention / 1e12:,.4g} "
                         f"({p.flops.detail})")])
        if p.timing is not None:
            rows.append(["seconds / forward", f"{p.timing.seconds:.4g}", p.timing.label])
            rows.append(["GPU-h (protocol)", fmt_hours(p.gpu_seconds),
                         "forwards x seconds / forward" + (" + VAE decode" if p.timing.vae_decode_seconds else "")])
        else:
            rows.append(["seconds / forward", "n/a", "no shipped config / timing file / ceiling for this model"])
        if p.kind == "eval":
            rows.append(["disk / sample set", fmt_bytes(p.disk_bytes),
                         f"{p.n_samples:,} x {p.bytes_per_sample or 0:,} B raw "
                         + ("uint8 frames: an upper bound of the mp4 store" if p.store == "mp4" else p.store)
                         + " (compression not counted)"])
        out.append(tabulate(rows, headers=["", "value", "from"], tablefmt=fmt))
        out.append("")
    rows = run_rows(plan)
    table = [[r["model"], r["eval"], r["method"], r["tag"], r["seeds"], r["runs"], r["calibration"],
              f"{r['samples_per_run']:,}", f"{r['forwards_per_run']:,}", fmt_hours(r["gpu_h_per_run"]),
              fmt_hours(r["gpu_h_total"]), fmt_bytes(r["disk_per_run"])] for r in rows]
    table.append(["total", "", "", "", "", f"{t['runs']} + {t['references']} ref", f"{t['calibrations']} new", "",
                  f"{t['forwards']:,}", "", fmt_hours(t["gpu_seconds"]), fmt_bytes(t["disk_bytes"])])
    out.append(h2 + "Runs")
    out.append(tabulate(table, headers=["model", "eval", "method", "tag", "seeds", "runs", "calibration", "samples/run",
                                        "forwards/run", "GPU-h/run", "GPU-h", "disk/run"], tablefmt=fmt,
                        disable_numparse=True))
    out.append("")
    for key, mem in plan.memory.items():
        p = plan.protocols[key]
        out.append(h2 + f"Host memory per run: {p.name} on {p.model} (outline)")
        out.append(tabulate([
            ["load", fmt_bytes(mem.load), mem.load_detail],
            ["one batch", fmt_bytes(mem.batch), mem.batch_detail],
            ["metric state", fmt_bytes(mem.metrics), mem.metrics_detail],
            ["first run only", fmt_bytes(mem.first_run_extra), mem.first_run_detail],
            ["peak", fmt_bytes(mem.peak), ("max(load, batch + metric state + first-run decode); flat in the sample "
             "count apart from the metric state")],
        ], headers=["stage", "bytes", "from"], tablefmt=fmt))
        out.append("")
    out.append(h2 + "Notes")
    out += [f"- {n}" for n in plan.notes]
    if plan.checklist:
        out.append("")
        out.append(h2 + "Checklist")
        out += [f"{'- ' if markdown else ''}{'✓' if c.ok else '✗'} {c.what}: {c.reason}" for c in plan.checklist]
    return "\n".join(out)


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (``--json``)."""

    def prot(p: ProtocolCost) -> dict:
        d = dataclasses.asdict(p)
        d.update(forwards_per_sample=p.forwards_per_sample, forwards=p.forwards, calls=p.calls,
                 gpu_seconds=p.gpu_seconds, disk_bytes=p.disk_bytes)
        if p.flops is not None:
            d["flops"]["total"] = p.flops.total
        if p.geometry is not None:
            d["geometry"]["tokens"] = p.geometry.tokens
        return d

    keys = {k: f"{p.kind}:{p.name}:{p.model}:{i}" for i, (k, p) in enumerate(plan.protocols.items())}
    return {
        "argv": plan.argv, "experiment": plan.experiment, "device": plan.device, "dtype": plan.dtype,
        "totals": plan.totals(), "quantized_upper_gpu_seconds": plan.quantized_upper(),
        "mfu": plan.mfu, "ceiling": dataclasses.asdict(plan.ceiling) if plan.ceiling else None,
        "protocols": {keys[k]: prot(p) for k, p in plan.protocols.items()},
        "jobs": [{**dataclasses.asdict(j), "eval_cost": keys[j.eval_cost],
                  "calib_cost": keys[j.calib_cost] if j.calib_cost else None} for j in plan.jobs],
        "references": [keys[k] for k in plan.references.values()],
        "calibrations": [keys[k] for k in plan.calibrations.values()],
        "runs_table": run_rows(plan),
        "memory": {keys[k]: {**dataclasses.asdict(m), "peak": m.peak} for k, m in plan.memory.items()},
        "notes": plan.notes,
        "checklist": [dataclasses.asdict(c) for c in plan.checklist],
    }
