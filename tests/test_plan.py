"""The sweep planner (orbitquant/harness/plan/, scripts/plan.py): counts from the configs, CFG forwards checked against the
real pipelines, tokens and FLOPs against the shipped configs and a published number, timing sources, the checklist."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orbitquant.harness import plan as P
from orbitquant.harness.plan.checklist import model_needs
from orbitquant.harness.plan.sweep import _axis_writes, _Composer, _overlap
from orbitquant.quant.registry import METHODS

ROOT = Path(__file__).resolve().parent.parent
LABEL = "projection (FLOPs at 40% of measured 679.4 TFLOP/s bf16 GEMM ceiling"


def _yaml(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.fixture(scope="module")
def digits_plan() -> P.Plan:
    return P.make_plan(["experiment=digits"])


# ---------------------------------------------------------------------------------------------- digits: exact counts
def test_digits_run_count_follows_the_experiment_yaml(digits_plan):
    sweep = _yaml("conf/experiment/digits.yaml")["hydra"]["sweeper"]["params"]
    methods, bits, seeds = (sweep[k].split(",") for k in ("quant", "bits", "seed"))
    assert len(digits_plan.jobs) == len(methods) * len(bits) * len(seeds)
    # quant=fp ignores the bit widths: its jobs of every bit pair share one run directory per seed
    assert "fp" in methods
    assert len(digits_plan.runs) == (len(methods) - 1) * len(bits) * len(seeds) + len(seeds)
    fp_jobs = [j for j in digits_plan.jobs if j.method == "fp"]
    assert sum(j.duplicate_of is None for j in fp_jobs) == len(seeds)
    assert {j.seed for j in digits_plan.runs} == {int(s) for s in seeds}
    assert len(digits_plan.references) == len(seeds)  # one fp reference per seed, cached


def test_digits_forwards_and_disk(digits_plan):
    ev = _yaml("conf/eval/digits.yaml")["protocol"]
    cal = _yaml("conf/calib/digits.yaml")["protocol"]
    p = digits_plan.protocols[digits_plan.runs[0].eval_cost]
    assert p.n_samples == 10 * ev["n_per_class"] == 500
    # DigitsPipeline.velocity batches [cond; uncond] when guidance != 1: two rows per Euler step
    assert ev["guidance"] != 1 and p.forwards_per_sample == ev["steps"] * 2 == 64
    assert p.calls == math.ceil(500 / ev["batch_size"]) * ev["steps"]
    assert p.store == "float32" and p.bytes_per_sample == 1 * 8 * 8 * 4 + 8  # 8x8 grey float32 + int64 label
    calibrated = [j for j in digits_plan.runs if j.needs_calibration]
    assert len(digits_plan.calibrations) == len(calibrated)  # method config incl. bits and quant_seed: one each
    methods = {j.method for j in calibrated}
    data_free = {n for n, cls in METHODS.items() if not cls(cls.config_cls()).needs_calibration}
    assert methods == set(METHODS.names()) - data_free  # every calibrated method of the sweep calibrates, no other
    assert data_free >= {"fp", "rtn"}
    vq = {j.tag: j.needs_calibration for j in digits_plan.runs if j.method == "vidit_q"}
    assert vq["w8a8"] is False and vq["w4a8"] is True  # plan=auto: W8A8 is the dynamic (calibration-free) plan
    n_cal = 10 * cal["n_per_class"] * cal["steps"] * 2
    t = digits_plan.totals()
    stores = len(digits_plan.runs) + len(digits_plan.references)
    assert t["forwards"] == stores * 500 * 64 + len(calibrated) * n_cal
    assert t["disk_bytes"] == stores * 500 * 264
    assert t["gpu_seconds"] > 0


def test_digits_checklist_is_all_green(digits_plan):
    assert digits_plan.checklist and all(c.ok for c in digits_plan.checklist), digits_plan.checklist


# ---------------------------------------------------------------------------------------------- forwards per family
def _diffusers_families() -> list[str]:
    from orbitquant.harness.adapters.diffusers_base import diffusers_adapters

    return sorted(diffusers_adapters())


#: guidance values either side of every CFG threshold a rule can name (> 1, > 0, != 1)
GUIDANCES = (0.0, 1.0, 1.5)


@pytest.mark.parametrize("family", _diffusers_families())
def test_cfg_rule_matches_the_real_pipeline(family):
    """The plan's rows and calls per step are what the diffusers pipeline really runs (counted on a tiny one, at a
    guidance on each side of the rule's threshold). Every registered diffusers family, its tiny pipeline called with
    the adapter's tiny resolution / frames and call kwargs; class-conditional pipelines (no ``prompt``) get a label."""
    import inspect

    from orbitquant.quant.registry import MODELS

    cls = MODELS.get(family)
    pipe = cls(tiny=True).build_tiny(0)
    pipe.set_progress_bar_config(disable=True)
    cond = {"prompt": ["a cat"]} if "prompt" in inspect.signature(pipe.__call__).parameters else {"class_labels": [1]}
    size = {k: v for k, v in cls.tiny_generate_kwargs.items() if k in ("height", "width", "num_frames")}
    kwargs = {**cond, **size, **cls.tiny_call_kwargs}
    rule = P.cfg_rule(family)
    if rule.mode != "never":  # the guidances exercise both branches of the rule
        assert {rule.is_active(g) for g in GUIDANCES} == {True, False}, (family, rule)
    seen = {"rows": 0, "calls": 0}

    def hook(_mod, args, kw):
        x = args[0] if args else kw.get("hidden_states", kw.get("x"))
        seen["rows"] += len(x) if isinstance(x, (list, tuple)) else x.shape[0]
        seen["calls"] += 1

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    for g in GUIDANCES:
        seen.update(rows=0, calls=0)
        # "latent" skips the VAE decode where the pipeline can (DiT decodes anyway and returns numpy)
        pipe(**kwargs, num_inference_steps=1, guidance_scale=g, generator=torch.Generator().manual_seed(0),
             output_type="latent")
        assert (seen["rows"], seen["calls"]) == P.forwards_per_step(family, g), (family, g, seen)


def test_digits_cfg_rule_matches_its_sampler():
    """The digits family samples with its own pipeline (not diffusers): its rule counted the same way."""
    from orbitquant.quant.registry import MODELS

    pipe = MODELS.get("digits")().build_tiny(0)
    seen = {"rows": 0, "calls": 0}

    def hook(_mod, args, kw):
        seen["rows"] += args[0].shape[0]
        seen["calls"] += 1

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    for g in GUIDANCES:
        seen.update(rows=0, calls=0)
        pipe.sample(torch.zeros(1, 1, pipe.image_size, pipe.image_size), torch.tensor([3]), 1, g)
        assert (seen["rows"], seen["calls"]) == P.forwards_per_step("digits", g), (g, seen)


def test_cfg_rules_agree_with_adapter_layouts(monkeypatch):
    from orbitquant.quant.registry import MODELS

    rules = P.cfg_rules()
    assert set(rules) == set(MODELS.names()), "every registered family declares its cfg_rule"
    assert P.CFG_RULES == rules  # the derived mapping older code reads
    for family, rule in rules.items():
        assert rule.evidence, family
        layout = getattr(MODELS.get(family), "cfg_layout", None)
        if rule.mode == "calls":
            assert layout == "calls", family
        elif rule.mode == "batch" and layout is not None:
            assert layout in ("cond_first", "uncond_first"), family
    assert P.forwards_per_step("flux", 3.5) == (1, 1)  # FLUX.1-dev: guidance-distilled
    assert P.forwards_per_step("zimage", 0.0) == (1, 1)  # Turbo at guidance 0
    assert P.forwards_per_step("wan", 5.0) == (2, 2)
    with pytest.raises(P.PlanError, match="unknown model 'nosuch'"):
        P.forwards_per_step("nosuch", 2.0)
    # a family without the planner's facts: the error names the adapter attribute to add, and where
    cls = MODELS.get("wan")
    for attr in ("cfg_rule", "plan_geometry", "plan_attention_flops"):
        monkeypatch.setattr(cls, attr, None if attr == "cfg_rule" else classmethod(lambda *_: None))
    with pytest.raises(P.PlanError, match=r"add `cfg_rule = CfgRule\(\.\.\.\)` to orbitquant\.harness\.adapters\.wan"):
        P.forwards_per_step("wan", 5.0)
    protocol = {"height": 480, "width": 832, "num_frames": 81}
    with pytest.raises(P.PlanError, match="`plan_geometry` classmethod to orbitquant.harness.adapters.wan.WanAdapter"):
        P.geometry("wan", "wan21", protocol, 512)
    from orbitquant.harness.plan.denoiser import Geometry

    geo = Geometry(1, 1, (1, 3, 8, 8), "")
    with pytest.raises(P.PlanError, match="`plan_attention_flops` classmethod"):
        P.forward_flops("wan", "wan21", geo)


# ---------------------------------------------------------------------------------------------- tokens and FLOPs
def test_wan21_tokens_from_its_shipped_config():
    cfg = json.loads((ROOT / "orbitquant/assets/configs/wan21.json").read_text())
    pt, ph, pw = cfg["patch_size"]
    latent_frames, lh, lw = (81 - 1) // 4 + 1, 480 // 8, 832 // 8
    assert (latent_frames, lh, lw) == (21, 60, 104)
    geo = P.geometry("wan", "wan21", {"height": 480, "width": 832, "num_frames": 81}, 512)
    assert geo.media_tokens == latent_frames * lh * lw // (pt * ph * pw) == 32760
    assert geo.text_tokens == 512 and geo.sample_shape == (81, 3, 480, 832)


def test_token_counts_of_the_other_families():
    assert P.geometry("flux", "flux1_dev", {"height": 1024, "width": 1024}, 512).media_tokens == 64 * 64
    assert P.geometry("zimage", "zimage_turbo", {"height": 1024, "width": 1024}, 512).media_tokens == 64 * 64
    cog = P.geometry("cogvideox", "cogvideox_2b", {"height": 480, "width": 720, "num_frames": 49}, 226)
    assert cog.media_tokens == 13 * 30 * 45
    dit = P.geometry("dit", "dit_xl_2", {}, 0)
    assert dit.media_tokens == 256 and dit.sample_shape == (3, 256, 256)
    assert P.geometry("wan", "tiny_wan", {}, 0) is None  # no shipped config: not projected


def test_dit_xl_2_flops_match_the_published_count():
    """DiT-XL/2 at 256^2: 118.6 GFLOPs in the DiT paper (Peebles & Xie 2023, Table 4), counted as multiply-adds;
    our 2 x MACs must land within 1 %."""
    fl = P.forward_flops("dit", "dit_xl_2", P.geometry("dit", "dit_xl_2", {}, 0))
    assert fl.total == pytest.approx(2 * 118.6e9, rel=0.01)


def test_wan_flops_by_hand():
    geo = P.geometry("wan", "wan21", {"height": 480, "width": 832, "num_frames": 81}, 512)
    fl = P.forward_flops("wan", "wan21", geo)
    d, ffn, layers, v, t = 1536, 8960, 30, 32760, 512
    video = layers * (6 * d * d + 2 * d * ffn)  # self q/k/v/o, cross q/o, FFN up/down on video tokens
    text = layers * 2 * d * d  # cross k/v on the text
    assert fl.linear == pytest.approx(2 * (video * v + text * t), rel=1e-9)
    assert fl.attention == pytest.approx(4 * layers * (v * v + v * t) * d, rel=1e-9)


# ---------------------------------------------------------------------------------------------- paper experiments
@pytest.mark.parametrize("argv", [["experiment=wan21_vbench"], ["experiment=flux1_dev_geneval"],
                                  ["experiment=dit_imagenet", "quant=fp,orbit", "seed=0"]])
def test_paper_experiments_give_finite_labelled_projections(argv):
    plan = P.make_plan(argv, check=False)
    t = plan.totals()
    assert t["runs"] > 0 and t["forwards"] > 0
    assert math.isfinite(t["gpu_seconds"]) and t["gpu_seconds"] > 0 and t["disk_bytes"] > 0
    for p in plan.protocols.values():
        assert p.timing.kind == "projection" and p.timing.label.startswith(LABEL)
        assert p.flops.total > 0 and p.geometry.tokens > 0
    text = P.render(plan)
    assert LABEL in text and "not counted" in text
    json.dumps(P.to_json(plan))  # serialisable


def test_wan21_vbench_sweep_shape():
    plan = P.make_plan(["experiment=wan21_vbench"], check=False)
    sweep = _yaml("conf/experiment/wan21_vbench.yaml")["hydra"]["sweeper"]["params"]
    methods, bits, seeds = (sweep[k].split(",") for k in ("quant", "bits", "seed"))
    assert len(plan.jobs) == len(methods) * len(bits) * len(seeds)
    assert len(plan.runs) == (len(methods) - 1) * len(bits) * len(seeds) + len(seeds)
    p = plan.protocols[plan.runs[0].eval_cost]
    assert p.forwards_per_sample == 50 * 2  # CFG 5 on Wan: a second call per step
    assert p.bytes_per_sample == 81 * 480 * 832 * 3 + 8  # uint8 video + label


def test_command_line_overrides_win_over_the_sweep():
    plan = P.make_plan(["experiment=wan21_vbench", "seed=0", "quant=orbit", "bits=w4a4"], check=False)
    assert [(j.method, j.tag, j.seed) for j in plan.jobs] == [("orbit", "w4a4", 0)]
    plan = P.make_plan(["model=wan21", "quant=orbit,rtn", "bits=w4a8"], check=False)
    assert [(j.method, j.tag, j.eval) for j in plan.jobs] == [("orbit", "w4a8", "wan21_fidelity"),
                                                              ("rtn", "w4a8", "wan21_fidelity")]


def test_fast_path_equals_full_composition():
    """Seeds set on a composed config, and group axes assembled from single-axis compositions, give exactly what
    Hydra composes with all the job's overrides."""
    from hydra import compose, initialize_config_dir

    jobs = P.expand_sweep({"quant": "orbit,qdit,vidit_q", "bits": "w4a8,w8a8", "seed": "0,2"}, ["experiment=digits"])
    with initialize_config_dir(config_dir=str(P.CONF), version_base="1.3"):
        comp = _Composer(P.CONF)
        for job in jobs:
            fast, subdir = comp.compose(job, {"quant", "bits", "seed"})
            full = compose(config_name="config", overrides=job, return_hydra_config=True)
            assert fast == P.plain_config(full), job
            assert subdir == str(full.hydra.sweep.subdir)
    assert len(jobs) == 12 and subdir.endswith("vidit_q/w8a8/digits/q2-s2")
    # 1 base + 2 other quant options + 1 other bit pair composed by Hydra; the 2 mixed combinations assembled
    assert (comp.composed, comp.assembled) == (4, 2)


def test_axes_writing_the_same_key_are_composed_by_hydra(tmp_path):
    """Group axes whose options write the same key depend on Hydra's merge order (here b1 masks a2's key in the
    single-axis compositions, but a2 shows through with b2): they are composed, not assembled."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "config.yaml").write_text("defaults:\n  - a: a1\n  - b: b1\n  - _self_\n"
                                          "hydra:\n  sweep:\n    subdir: ${name}\nname: x\n")
    contents = {"a1": "other: 1\n", "a2": "shared: a2\n", "b1": "shared: b1\n", "b2": "more: 2\n"}
    for opt, body in contents.items():
        (tmp_path / opt[0]).mkdir(exist_ok=True)
        (tmp_path / opt[0] / f"{opt}.yaml").write_text("# @package _global_\n" + body)
    assert _axis_writes(tmp_path, "a=a2", "a=a1") == {"shared", "other"}
    assert _overlap({("shared",)}, {("shared", "x")}) and not _overlap({("a",)}, {("b",)})
    jobs = P.expand_sweep({}, ["a=a1,a2", "b=b1,b2"])
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        comp = _Composer(tmp_path)
        for job in jobs:
            fast, _ = comp.compose(job, {"a", "b"})
            assert fast == P.plain_config(compose(config_name="config", overrides=job, return_hydra_config=True))
    assert fast["shared"] == "a2" and (comp.composed, comp.assembled) == (4, 0)


# ---------------------------------------------------------------------------------------------- timings
def _timing(**kw) -> dict:
    return {"schema": P.TIMING_SCHEMA, "model": "wan21", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
            "height": 480, "width": 832, "num_frames": 81, "method": "fp", "seconds_per_forward": 0.5, **kw}


def test_a_measured_timing_file_replaces_the_projection(tmp_path):
    (tmp_path / "wan21-dryrun.json").write_text(json.dumps({"timings": [_timing(vae_decode_seconds_per_sample=2.0)]}))
    (tmp_path / "unrelated.json").write_text(json.dumps({"meta": {}, "rows": []}))
    plan = P.make_plan(["model=wan21", "eval=vbench_quick", "quant=orbit", "bits=w4a4"], bench_dir=tmp_path,
                       check=False)
    p = plan.protocols[plan.runs[0].eval_cost]
    assert p.timing.kind == "measured" and "wan21-dryrun.json" in p.timing.label and "fp timing" in p.timing.label
    assert p.gpu_seconds == pytest.approx(p.forwards * 0.5 + p.n_samples * 2.0)
    # another geometry: no record, so the projection
    plan = P.make_plan(["model=wan21", "eval=t2v_smoke", "quant=orbit"], bench_dir=tmp_path, check=False)
    assert plan.protocols[plan.runs[0].eval_cost].timing.kind == "projection"


def test_timing_from_a_finished_run(tmp_path):
    """A dry run's results.json becomes a timing record the planner then uses (sample stage / denoiser rows)."""
    run = tmp_path / "results.json"
    run.write_text(json.dumps({
        "config": {"model": {"adapter": "dit", "name": "dit_xl_2"}, "dtype": "bfloat16", "quant": {"method": "fp"},
                   "eval": {"protocol": {"classes": [1, 2], "n_per_class": 4, "steps": 50, "guidance": 1.5,
                                         "batch_size": 8}}},
        "timing": {"load": 3.0, "sample": 16.0}, "sampling": {"n": 8, "ranks": 2},
        "provenance": {"device_name": "NVIDIA H100 80GB HBM3"}}))
    rec = P.timing_from_results(run)
    assert rec["seconds_per_forward"] == pytest.approx(16.0 * 2 / (8 * 50 * 2))  # CFG 1.5: two rows per step
    assert (rec["height"], rec["width"], rec["num_frames"]) == (256, 256, None) and "upper bound" in rec["source"]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "dit-dryrun.json").write_text(json.dumps(rec))
    plan = P.make_plan(["model=dit_xl_2", "quant=fp"], bench_dir=tmp_path / "bench", check=False)
    t = plan.protocols[plan.runs[0].eval_cost].timing
    assert t.kind == "measured" and t.seconds == rec["seconds_per_forward"]
    with pytest.raises(ValueError, match=r"timing\.sample"):
        (tmp_path / "bad.json").write_text("{}")
        P.timing_from_results(tmp_path / "bad.json")


def test_a_bad_timing_record_names_the_missing_field(tmp_path):
    rec = _timing()
    del rec["seconds_per_forward"]
    (tmp_path / "x.json").write_text(json.dumps(rec))
    with pytest.raises(P.PlanError, match="seconds_per_forward"):
        P.load_timings(tmp_path)


def test_ceiling_and_measured_quant_overhead_come_from_the_bench_file():
    c = P.load_ceiling(P.DEFAULT_CEILING)
    data = json.loads(P.DEFAULT_CEILING.read_text())
    assert c.bf16_tflops == data["meta"]["ceilings"]["bf16_matmul_TFLOPs"]
    lo, med, hi = c.quant_linear_ratio
    assert 1 < lo <= med <= hi
    assert P.load_ceiling(ROOT / "nonexistent.json") is None
    plan = P.make_plan(["model=wan21", "eval=vbench_quick", "quant=orbit"], ceiling_file=None, check=False)
    assert plan.totals()["gpu_seconds"] is None and any("not projected" in n for n in plan.notes)


# ---------------------------------------------------------------------------------------------- checklist and CLI
def test_missing_weights_are_a_failed_check_not_a_crash():
    plan = P.make_plan(["experiment=wan21_vbench", "model.path=/nonexistent/wan", "quant=orbit", "bits=w4a4",
                        "seed=0"])
    weights = [c for c in plan.checklist if c.what == "model=wan21"]  # the adapter's need, worded as preflight's
    assert len(weights) == 1 and not weights[0].ok and "/nonexistent/wan" in weights[0].reason
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in weights[0].reason  # the fix
    assert any("vbench_" in c.what and not c.ok for c in plan.checklist)
    assert "✗ model=wan21: weights path /nonexistent/wan (not found); fix: " in P.render(plan)


def test_random_init_needs_no_weights():
    needs = model_needs({"adapter": "wan", "name": "wan21", "init": "random"})
    assert needs and all(n.ok for n in needs) and "random weights" in needs[0].where
    (bad,) = model_needs({"adapter": "nosuch", "name": "x"})  # a model that does not build: a line, not a crash
    assert not bad.ok and bad.what == "model=x"


def test_checklist_is_the_preflight_of_every_job_each_item_once(tmp_path, monkeypatch):
    """The plan lists the same items as ``run.py preflight=true`` (preflight.collect + prompt files), once across a
    sweep, naming the metrics that need them: a mu/sigma-only .npz fails sFID's key check; a metric with a bad option
    is a failed line, not a crash."""
    import numpy as np
    from hydra import compose, initialize_config_dir

    from orbitquant.harness import preflight
    from orbitquant.harness.data import prompt_file_need
    from orbitquant.harness.factory import build_adapter, build_metrics

    monkeypatch.setenv("ORBITQUANT_HASH_CACHE", str(tmp_path / "sha256.json"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2), sigma=np.eye(2))
    fid = [f"eval.metrics.fid.reference={ref}", "++eval.metrics.fid.limit=null", f"+eval.metrics.sfid.reference={ref}"]
    plan = P.make_plan(["model=flux1_dev", "eval=coco_fid_clip", "quant=orbit,rtn", "bits=w4a8,w4a4", *fid,
                        "+eval.metrics.isc={}", "+eval.metrics.precision={}"])
    assert len(plan.jobs) == 4
    items = [(c.what.split(" [")[0], c.reason) for c in plan.checklist]
    assert len(items) == len(set(items)), items  # four jobs, each item once
    lines = {c.what: c for c in plan.checklist}
    with initialize_config_dir(config_dir=str(P.CONF), version_base="1.3"):
        cfg = P.plain_config(compose(config_name="config", overrides=["model=flux1_dev", "eval=coco_fid_clip",
                                                                      "quant=rtn", *fid], return_hydra_config=True))
    run = preflight.collect(build_adapter(cfg["model"]), build_metrics(cfg["eval"]["metrics"]))
    run.append(prompt_file_need(cfg["eval"]["protocol"]["prompts"], "coco_fid_clip"))
    for n in run:
        (line,) = [c for w, c in lines.items() if w.split(" [")[0] == n.what and c.reason.startswith(n.where)]
        assert line.ok == n.ok, (line, n)
    (npz,) = [c for c in plan.checklist if c.what.startswith("reference .npz with mu_s+sigma_s")]
    assert not npz.ok and "has mu, sigma" in npz.reason and "[sfid]" in npz.what
    assert any(c.what.startswith("reference .npz with mu+sigma") and c.ok for c in plan.checklist)
    (inc,) = [c for c in plan.checklist if c.what.startswith("InceptionV3 weights")]
    assert inc.what.endswith("[fid, sfid, isc]")  # one line for every metric that needs the file
    (bad,) = [c for c in plan.checklist if c.what.startswith("metric precision")]
    assert bad.what == "metric precision (eval=coco_fid_clip)" and not bad.ok and "needs `reference:`" in bad.reason


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/plan.py"), *args], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_exits_0_with_failed_checks_and_2_on_bad_input():
    p = _cli("experiment=wan21_vbench", "quant=orbit", "bits=w4a4", "seed=0", "model.path=/nonexistent", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["totals"]["runs"] == 1 and any(not c["ok"] for c in data["checklist"])
    bad = _cli("experiment=wan21_vbnch")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "did you mean experiment=wan21_vbench" in bad.stderr
    assert "valid: digits" in bad.stderr


def test_scale_doc_rows_are_current():
    """docs/scale.md holds what scale_table computes now (one row checked here; regenerate with
    `python scripts/plan.py --scale-doc > docs/scale.md`)."""
    doc = (ROOT / "docs/scale.md").read_text()
    plan = P.make_plan(["model=wan21", "eval=vbench", "quant=orbit"], check=False)
    p = plan.protocols[plan.runs[0].eval_cost]
    row = (f"| vbench | wan21 | {p.n_samples:,} | {p.steps} / {p.guidance:g} | {p.forwards_per_sample:,} | "
           f"{p.forwards:,} |")
    assert row in doc, "docs/scale.md is stale: python scripts/plan.py --scale-doc > docs/scale.md"
    assert f" {P.fmt_sig(p.gpu_seconds / 3600)} " in doc.split(row, 1)[1].splitlines()[0]


def test_expand_sweep_is_hydras_cartesian_product():
    jobs = P.expand_sweep({"quant": "a,b", "seed": "0,1"}, ["seed=5", "bits=w4a8,w2a4"])
    assert jobs == [list(x) for x in itertools.product(["quant=a", "quant=b"], ["seed=5"],
                                                       ["bits=w4a8", "bits=w2a4"])]
