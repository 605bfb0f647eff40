"""One sampling protocol (eval or calibration) on one model, priced: samples, denoiser forwards and calls, tokens,
FLOPs, seconds per forward and bytes per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orbitquant.harness.plan.base import PlanError
from orbitquant.harness.plan.denoiser import (
    Flops,
    Geometry,
    cfg_rule,
    forward_flops,
    forwards_per_step,
    geometry,
    text_tokens,
)
from orbitquant.harness.plan.timing import Ceiling, Timing, timing_for

#: Prompt counts the conf/eval YAML comments document, used only when the prompt file is not on this machine.
NOMINAL_PROMPTS: dict[str, tuple[int, str]] = {
    "geneval": (553, "GenEval prompts/generation_prompts.txt (conf/eval/geneval.yaml)"),
    "vbench": (946, "VBench standard suite all_dimension.txt (conf/eval/vbench.yaml)"),
    "vbench_quick": (32, "<= 4 prompts x 8 dimensions, quick.txt (conf/eval/vbench_quick.yaml)"),
    "coco_fid_clip": (5000, "5000 COCO 2014 val images, one caption each (scripts/make_coco_prompts.py)"),
    "mjhq": (5000, "5000 MJHQ-30K prompts (conf/eval/mjhq.yaml)"),
}


@dataclass
class ProtocolCost:
    """One sampling protocol (an eval or calibration protocol) on one model, priced per sample and in total."""

    kind: str  # "eval" | "calib"
    name: str
    model: str
    adapter: str
    n_samples: int
    n_source: str
    steps: int
    guidance: float
    batch_size: int
    rows_per_step: int
    calls_per_step: int
    cfg_note: str
    geometry: Geometry | None
    text_note: str
    flops: Flops | None
    timing: Timing | None
    store: str
    bytes_per_sample: int | None  # raw image/video bytes + 8 B label

    @property
    def forwards_per_sample(self) -> int:
        return self.steps * self.rows_per_step

    @property
    def forwards(self) -> int:
        return self.n_samples * self.forwards_per_sample

    @property
    def calls(self) -> int:
        """Denoiser calls (what results.json's ``denoiser_forwards`` counts)."""
        return -(-self.n_samples // self.batch_size) * self.steps * self.calls_per_step

    @property
    def gpu_seconds(self) -> float | None:
        if self.timing is None:
            return None
        vae = self.timing.vae_decode_seconds or 0.0
        return self.forwards * self.timing.seconds + (self.n_samples * vae if self.kind == "eval" else 0.0)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.bytes_per_sample is None else self.n_samples * self.bytes_per_sample


def count_samples(adapter_obj: Any, adapter: str, protocol: dict, eval_name: str) -> tuple[int, str]:
    """Samples a protocol makes: the adapter's ``n_items`` (what sizes its sample stores) when it can count them,
    with the breakdown; for a prompt file that is not on this machine, the protocol's documented nominal prompt
    count (labelled)."""
    from orbitquant.harness.data import load_prompts

    if "prompts" in protocol:
        per = int(protocol.get("n_per_prompt", 1))
        try:
            n = len(load_prompts(protocol["prompts"]))
        except ValueError:
            if eval_name not in NOMINAL_PROMPTS:
                raise PlanError(f"eval={eval_name}: prompt file {protocol['prompts']!r} not found and no nominal count "
                                "known; create it or add the count to orbitquant.harness.plan.protocol.NOMINAL_PROMPTS") from None
            n, where = NOMINAL_PROMPTS[eval_name]
            return n * per, f"{n} prompts x {per} (nominal: {where}; file {protocol['prompts']} not found here)"
        src = "inline list" if not isinstance(protocol["prompts"], str) else f"prompt file {protocol['prompts']}"
        own, how = n * per, f"{n} prompts x {per} ({src})"
    elif adapter == "digits":
        per = int(protocol["n_per_class"])
        own, how = 10 * per, f"10 classes x {per}"
    else:
        classes, per = list(protocol["classes"]), int(protocol.get("n_per_class", 1))
        own, how = len(classes) * per, f"{len(classes)} classes x {per}"
    n_items = getattr(adapter_obj, "n_items", None)
    if n_items is None:
        return own, how
    n = int(n_items(protocol))
    return n, how if n == own else f"{n} (adapter.n_items; the protocol reads {how})"


def protocol_cost(kind: str, name: str, protocol: dict, model_cfg: dict, store: str, method: str,
                  timings: list[dict], ceiling: Ceiling | None, mfu: float) -> ProtocolCost:
    """Price ``protocol`` on the model of ``model_cfg`` (a resolved ``model:`` config)."""
    from orbitquant.harness.factory import build_adapter

    adapter = model_cfg["adapter"]
    obj = build_adapter(model_cfg)
    model_name = model_cfg.get("name", adapter)
    n, n_src = count_samples(obj, adapter, protocol, name)
    guidance = float(protocol.get("guidance", 1.0))
    rows, calls = forwards_per_step(adapter, guidance)
    rule = cfg_rule(adapter)
    if rule.active == "never":
        cfg_note = f"1 row per step: no CFG pass ({adapter}: guidance-distilled, guidance enters as an input)"
    elif rows == 2:
        cfg_note = f"CFG at guidance {guidance:g} ({rule.active}): 2 rows per step, " + (
            "one call with the batch doubled" if rule.mode == "batch" else "a second call")
    else:
        cfg_note = f"1 row per step: no CFG at guidance {guidance:g} (CFG when {rule.active})"
    cfg_note += f" [{rule.evidence}]" if kind == "eval" else ""
    real = not (model_cfg.get("tiny") and not model_cfg.get("path"))
    tt, tnote = text_tokens(obj, adapter)
    geo = geometry(adapter, model_name, protocol, tt) if real else None
    fl = forward_flops(adapter, model_name, geo) if geo is not None else None
    shape = geo.sample_shape if geo is not None else _shape_from_protocol(protocol)
    tm = timing_for(model_name, protocol, shape, fl, method, timings, ceiling, mfu) if real else None
    bps = None
    if shape is not None:
        # mp4 stores hold compressed video, whose size depends on the content: priced at its raw uint8 frames, an
        # upper bound (labelled where shown)
        bps = math.prod(shape) * (4 if store == "float32" else 1) + 8
    return ProtocolCost(kind, name, model_name, adapter, n, n_src, int(protocol["steps"]), guidance,
                        int(protocol.get("batch_size", 1)), rows, calls, cfg_note, geo, tnote, fl, tm, store, bps)


def _shape_from_protocol(protocol: dict) -> tuple[int, ...] | None:
    if "height" not in protocol:
        return None
    hw = (3, int(protocol["height"]), int(protocol["width"]))
    return (int(protocol["num_frames"]), *hw) if protocol.get("num_frames") else hw
