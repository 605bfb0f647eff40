"""What a sweep needs before it starts, as checklist lines: the same ``preflight.Need`` items ``run.py
preflight=true`` lists -- the model adapter's (weights: HF cache or model.path, never downloaded), every metric's
(``Metric.needs``: feature-net weights with their published hashes, reference files and their keys, evaluator
environments) and the protocols' prompt files -- each item once across the sweep, plus whether each protocol fits
the model."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from orbitquant.harness.preflight import Need


@dataclass
class Check:
    """One checklist line: what a sweep needs, whether it is there, and the one-line reason (the fix when not)."""

    ok: bool
    what: str
    reason: str


def checklist(cfgs: list[dict]) -> list[Check]:
    """What a sweep needs before it starts: the needs of its models and metrics and its prompt files (each item once,
    naming everything that needs it, as ``preflight.collect`` does for one run), and the protocols fitting the model.
    Never raises: a missing piece, a metric with a bad option or a model that does not build is a failed line."""
    from orbitquant.harness.data import prompt_file_need
    from orbitquant.harness.factory import build_adapter, build_quant_config, metric_specs
    from orbitquant.quant.api import quantizer_for

    lines: dict[tuple, Need | Check] = {}  # in order of first appearance; Needs merged by (what, where)
    seen: set[tuple] = set()
    for c in cfgs:
        model = c["model"]
        mkey = json.dumps(model, sort_keys=True)
        if ("model", mkey) not in seen:
            seen.add(("model", mkey))
            _add(lines, model_needs(model), f"model={model.get('name', model.get('adapter'))}")
        failed: dict[str, list[str]] = {}  # reason -> metrics of this eval failing with it
        try:
            specs = metric_specs(c["eval"]["metrics"])
        except ValueError as e:  # make_plan builds these metrics first; a line here all the same, never a crash
            specs, what = [], f"metrics (eval={c['eval']['name']})"
            lines[("failed", what, str(e))] = Check(False, what, _one_line(e))
        for name, opts in specs:
            key = ("metric", name, json.dumps(opts, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            needs, error = _metric_needs(name, opts)
            _add(lines, needs, name)
            if error:
                failed.setdefault(error, []).append(name)
        for reason, names in failed.items():
            what = f"metric{'s' if len(names) > 1 else ''} {', '.join(names)} (eval={c['eval']['name']})"
            lines[("failed", what, reason)] = Check(False, what, reason)
        for kind in ("eval", "calib"):
            if kind == "calib":
                try:
                    calibrated = quantizer_for(build_quant_config(c["quant"])).needs_calibration
                except Exception:  # noqa: BLE001 - make_plan has already reported a bad quant config
                    calibrated = False
                if not calibrated:
                    continue
            key = (kind, c[kind]["name"], mkey)
            if key in seen:
                continue
            seen.add(key)
            label = c[kind]["name"] if kind == "eval" else f"calib={c[kind]['name']}"  # as stages.validate names them
            proto = c[kind]["protocol"]
            prompts = _guard_need(f"prompts of {label}", lambda p=proto, lb=label, f=c[kind].get("fetch") or {}:
                                  prompt_file_need(p.get("prompts"), lb, f.get("prompts")))
            if prompts is not None:
                _add(lines, [prompts], None)
                if not prompts.ok:
                    continue  # the prompt file's line says what to fix; fitting is checked once it is there
            what = f"{kind}={c[kind]['name']} fits model={model.get('name')}"
            lines[("fits", what)] = _guard(what, lambda p=proto, lb=label, m=model: build_adapter(m).check_protocol(
                p, lb))
    return [x if isinstance(x, Check) else need_check(x) for x in lines.values()]


def model_needs(model: dict) -> list[Need]:
    """What loading the model needs (``ModelAdapter.needs``: its weights); a model config that does not build is one
    missing item naming the error."""
    from orbitquant.harness.factory import build_adapter

    try:
        return list(build_adapter(model).needs())
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return [Need(f"model={model.get('name', model.get('adapter'))}", "the model config", False,
                     problem=_one_line(e))]


def need_check(n: Need) -> Check:
    """A preflight item as a checklist line: the same facts as ``Need.line`` (where, problem, fix, who needs it)."""
    who = [b for b in n.by if b != n.what]  # an adapter's item is named after the model already
    what = f"{n.what} [{', '.join(who)}]" if who else n.what
    if n.ok:
        return Check(True, what, n.where)
    return Check(False, what, f"{n.where} ({n.problem or 'missing'}){'; fix: ' + n.fix if n.fix else ''}")


def _add(lines: dict, needs: list[Need], who: str | None) -> None:
    """Merge ``needs`` into ``lines`` as ``preflight.collect`` does: one item per (what, where), ``by`` growing."""
    for n in needs:
        key = ("need", n.what, n.where)
        prev = lines.get(key)
        by = prev.by if prev is not None else ()
        if who is not None and who not in by:
            by = (*by, who)
        lines[key] = replace(prev if prev is not None else n, by=by)


def _metric_needs(name: str, opts: dict) -> tuple[list[Need], str]:
    """One metric's needs, or the one-line reason it cannot run (a bad option or an unknown name; "" if none)."""
    from orbitquant.harness.factory import build_metrics

    try:
        (m,) = build_metrics([{name: opts}])
        return list(m.needs()), ""
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return [], _one_line(e).removeprefix(f"metric {name}: ")


def _guard(what: str, fn) -> Check:
    try:
        fn()
        return Check(True, what, "ok")
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return Check(False, what, _one_line(e))


def _guard_need(what: str, fn) -> Need | None:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a plan reports every failure as a line, it never crashes on one
        return Need(what, "the protocol's prompts", False, problem=_one_line(e))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if isinstance(e, (FileNotFoundError, ValueError)) else f"{type(e).__name__}: {msg}"
