"""What a sweep needs before it starts, as checklist lines: the model weights (HF cache or model.path, never
downloaded), every metric's ``check()``, and the protocols fitting the model (prompt files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import DIGITS_CONFIG


@dataclass
class Check:
    """One checklist line: what a sweep needs, whether it is there, and the one-line reason (the fix when not)."""

    ok: bool
    what: str
    reason: str


def checklist(cfgs: list[dict]) -> list[Check]:
    """What a sweep needs before it starts: the model weights, every metric's ``check()`` (metrics failing for the
    same reason share a line), and the protocols fitting the model (prompt files). Never raises: a missing piece is
    a failed check with its one-line reason."""
    from ..api import quantizer_for
    from ..factory import build_adapter, build_metrics, build_quant_config

    out: list[Check] = []
    seen: set[tuple] = set()
    for c in cfgs:
        model = c["model"]
        key = ("model", json.dumps(model, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(_check_weights(model))
        groups: dict[tuple[bool, str], list[str]] = {}
        for name, opts in _metric_specs(c["eval"]["metrics"]):
            key = ("metric", name, json.dumps(opts, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            chk = _guard(f"metric {name}", lambda s=name, o=opts: build_metrics([{s: o}])[0].check())
            reason = chk.reason.removeprefix(f"metric {name}: ")
            groups.setdefault((chk.ok, reason), []).append(name)
        for (ok, reason), names in groups.items():
            out.append(Check(ok, f"metric{'s' if len(names) > 1 else ''} {', '.join(names)} (eval={c['eval']['name']})",
                             reason))
        for kind in ("eval", "calib"):
            if kind == "calib":
                try:
                    calibrated = quantizer_for(build_quant_config(c["quant"])).needs_calibration
                except Exception:  # noqa: BLE001 - make_plan has already reported a bad quant config
                    calibrated = False
                if not calibrated:
                    continue
            key = (kind, c[kind]["name"], json.dumps(model, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            label = f"{kind}={c[kind]['name']} fits model={model.get('name')} (prompts present)"
            out.append(_guard(label, lambda k=kind, m=model, cc=c: build_adapter(m).check_protocol(
                cc[k]["protocol"], ("calib=" if k == "calib" else "") + cc[k]["name"])))
    return out


def _metric_specs(spec) -> list[tuple[str, dict]]:
    from ..factory import metric_specs

    return metric_specs(spec)


def _guard(what: str, fn) -> Check:
    try:
        fn()
        return Check(True, what, "ok")
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return Check(False, what, _one_line(e))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if isinstance(e, (FileNotFoundError, ValueError)) else f"{type(e).__name__}: {msg}"


def _check_weights(model: dict) -> Check:
    """Whether the model's weights are on this machine (HF cache or model.path; never downloads)."""
    name = model.get("name", model.get("adapter"))
    what = f"weights of model={name}"
    if model.get("init") == "random":
        return Check(True, what, "model.init=random: true-size denoiser with random weights, no checkpoint needed "
                                 "(timings real, quality numbers meaningless)")
    if model.get("tiny") and not model.get("path"):
        return Check(True, what, "random-init tiny test pipeline (no checkpoint)")
    if model.get("adapter") == "digits":
        path = Path(model.get("path") or DIGITS_CONFIG.parent)
        ok = (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file()
        return Check(ok, what, f"{path}" if ok else f"digits weights not in {path}; `python scripts/train_digits.py` "
                                                    "recreates them")

    def resolve():
        from ..adapters.hf import resolve_checkpoint
        from ..factory import build_adapter

        a = build_adapter(model)
        return resolve_checkpoint(a.name, a.repo_id, a.path, allow_download=False)

    try:
        return Check(True, what, resolve())
    except Exception as e:  # noqa: BLE001 - WeightsNotFound and anything else: a line, not a crash
        return Check(False, what, _one_line(e).removeprefix(f"model={name}: "))
