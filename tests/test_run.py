"""The Hydra runner: every config composes and builds; an end-to-end run writes a valid results.json;
a re-run is skipped; a multirun sweeps; bad input fails with one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orbitquant.harness.factory import build_adapter, build_metrics, build_quant_config

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("quant", _options("quant"))
@pytest.mark.parametrize("eval_", ["digits"])
def test_every_config_composes_and_builds(model, quant, eval_):
    cfg = _compose([f"model={model}", f"quant={quant}", f"eval={eval_}", "w_bits=3", "a_bits=6"])
    c = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "quant", "eval")}
    build_adapter(c["model"])
    q = build_quant_config(c["quant"])
    if quant != "fp":
        assert (q.w_bits, q.a_bits) == (3, 6)
    assert build_metrics(c["eval"]["metrics"])
    assert cfg.hydra.run.dir.endswith("q0-s0")


@pytest.mark.parametrize("eval_", _options("eval"))
def test_every_eval_composes_and_its_metrics_exist(eval_):
    cfg = _compose([f"eval={eval_}"])
    assert build_metrics(list(cfg.eval.metrics)) and cfg.eval.protocol


def _stored(run_dir: Path, name: str = "samples") -> torch.Tensor:
    """A run's stored samples (its sample store), all of them, as float32."""
    from orbitquant.harness.samplestore import SampleSet

    return torch.cat([x for x, _ in SampleSet.open(run_dir / name).batches(1024)])


def _run(args: list[str], tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = [a for a in args if a.startswith("-")]  # argparse wants Hydra's flags before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, str(ROOT / "run.py"), *flags, f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache",
           "progress=false", *overrides]
    p = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"run.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_end_to_end_run_writes_results_and_rerun_skips(tmp_path):
    p = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8", "logger=wandb", f"logger.dir={tmp_path}/wb"],
             tmp_path)
    run_dir = tmp_path / "runs/digits/orbit/w4a8/smoke/q0-s0"
    assert (run_dir / "layer_error.png").exists()
    assert len(list((tmp_path / "wb/wandb").glob("offline-run-*/run-*.wandb"))) == 1  # offline: no key in tests
    res = json.loads((run_dir / "results.json").read_text())
    assert res["schema_version"] == 1 and res["status"] == "ok"
    assert set(res["metrics"]) == {"psnr_vs_fp", "ssim_vs_fp", "class_acc"}
    for m in res["metrics"].values():
        assert {"value", "higher_is_better", "n"} <= set(m)
    q = res["quant_report"]["summary"]
    assert q["treatments"]["orbit w4a8"] == 48 and q["linear_bytes_quant"] < q["linear_bytes_src"] / 3
    assert res["provenance"]["versions"]["torch"]
    assert (run_dir / "samples/grid.png").exists() and len(_stored(run_dir)) == 20
    assert not (run_dir / ".RUNNING").exists()
    assert "psnr_vs_fp" in p.stdout and "fp reference" in p.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "ok" and status["config_hash"] == res["config_hash"] and status["seconds"] > 0
    mtime = (run_dir / "results.json").stat().st_mtime
    p2 = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8"], tmp_path)
    assert (run_dir / "results.json").stat().st_mtime == mtime
    assert "skipping" in p2.stdout + p2.stderr
    # the same run with another metric list: the stored samples are scored, not sampled again -> scripts/score.py
    p3 = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8", "eval.metrics=[psnr_vs_fp]"], tmp_path, check=False)
    assert p3.returncode != 0 and f"python scripts/score.py {run_dir}" in p3.stderr and "quant.tag" not in p3.stderr
    assert (run_dir / "results.json").stat().st_mtime == mtime


def test_fp_run_is_bit_exact_against_reference(tmp_path):
    _run(["eval=smoke", "quant=fp"], tmp_path)
    res = json.loads((tmp_path / "runs/digits/fp/fp/smoke/q0-s0/results.json").read_text())
    assert res["metrics"]["psnr_vs_fp"]["value"] == "inf"  # identical samples
    assert res["metrics"]["ssim_vs_fp"]["value"] == 1.0


def test_multirun_sweeps_into_the_same_layout(tmp_path):
    _run(["-m", "eval=smoke", "quant=fp,rtn", "w_bits=4", "a_bits=4,8"], tmp_path)
    found = sorted(str(p.parent.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").glob("**/results.json"))
    assert found == ["digits/fp/fp/smoke/q0-s0", "digits/rtn/w4a4/smoke/q0-s0", "digits/rtn/w4a8/smoke/q0-s0"]


#: the "Reliability" table of docs/reliability.md: each bad input and the one clear error it gets (before heavy work)
BAD_INPUTS = [
    (["quant=orbt"], "did you mean quant=orbit"),   # checked before Hydra: the nearest option, then all
    (["model=flux2"], "valid: cogvideox_2b"),
    (["eval=digit"], "did you mean eval=digits"),
    (["-m", "quant=orbit,smothquant"], "did you mean quant=smoothquant"),
    (["quant=fp", "a_bits=4"], "quant=fp runs the unquantized model and ignores a_bits=4"),
    (["w_bits=9"], "w_bits must be an integer in 1..8"),
    (["w_bits=0"], "w_bits must be an integer in 1..8"),
    (["a_bits=four"], "a_bits must be an integer in 1..8"),
    (["quant=smoothquant", "w_bits=1"], "smoothquant uses symmetric RTN"),
    (["quant=rtn", "w_bits=1"], "w_bits=1 needs w_symmetric=false"),
    (["quant=rtn", "+quant.w_granulariti=row"], "valid:"),
    (["quant=qdit", "quant.groups=/nonexistent/groups.json"], "qdit_search.py"),
    (["quant=qdit", "quant.group_size=-1"], "group_size must be >= 0"),
    (["model=tiny_flux", "eval=digits"], "pick an eval protocol made for this model family"),
    (["quant=smoothquant", "calib=t2i_smoke"], "pick a calib protocol made for this model family"),
    (["model=tiny_flux", "eval=t2i_smoke", "quant=smoothquant", "calib=t2i_smoke",
      "calib.protocol.prompts=/nonexistent/prompts.txt"], "prompt file"),
    (["model=tiny_flux", "eval=t2i_smoke", "eval.protocol.prompts=[]"], "is empty"),
    (["model=digits", "+model.path=/nonexistent"], "train_digits.py"),
    (["model=flux1_schnell", "eval=t2i_smoke", "+model.path=/nonexistent"], "point model.path at the downloaded"),
    (["results_dir=/proc/orbitquant"], "No such file or directory"),  # Hydra cannot even create the run dir
    (["quant=smoothquant", "quant_checkpoint=/tmp/ckpt"], "quant_checkpoint supports data-free methods"),
    (["model=tiny_flux", "eval=t2i_smoke", "eval.store=mp4"], "eval.store=mp4 stores videos"),
    (["eval.store=png"], "eval.store='png'; valid: float32, uint8, mp4"),
]


@pytest.mark.parametrize("args, needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_with_a_clear_message(tmp_path, args, needle):
    p = _run(["eval=smoke", *args], tmp_path, check=False)
    assert p.returncode != 0
    assert needle in p.stdout + p.stderr


def test_calibrated_run_writes_and_then_reuses_its_calibration_artifact(tmp_path):
    args = ["eval=smoke", "quant=qdit", "w_bits=4", "a_bits=8", "quant.n_calib=16", "calib.protocol.n_per_class=2"]
    _run(args, tmp_path)
    path = tmp_path / "runs/digits/qdit/w4a8-g128/smoke/q0-s0/results.json"
    first = json.loads(path.read_text())
    cal = first["quant_report"]["summary"]["calibration"]
    assert cal["inputs_recorded"] == 16 and Path(cal["saved"]).is_file()
    _run([*args, "overwrite=true"], tmp_path)
    second = json.loads(path.read_text())
    assert second["quant_report"]["summary"]["calibration"]["cached"] == cal["saved"]
    assert second["metrics"] == first["metrics"]  # same artifact, same samples


@pytest.mark.parametrize("calib", _options("calib"))
def test_every_calib_protocol_fits_some_model_and_loads_its_prompts(calib):
    from orbitquant.quant.registry import MODELS

    protocol = OmegaConf.to_container(_compose([f"calib={calib}"]).calib, resolve=True)["protocol"]
    fits = []
    for model in _options("model"):
        adapter = build_adapter(OmegaConf.to_container(_compose([f"model={model}"]).model, resolve=True))
        try:
            adapter.check_protocol(protocol, f"calib={calib}")
            fits.append(model)
        except ValueError:
            pass
    assert fits, f"calib={calib} fits no model ({', '.join(MODELS.names())})"


def test_calibrated_method_with_a_mismatched_calib_protocol_names_conf_calib(tmp_path):
    p = _run(["eval=smoke", "quant=smoothquant", "calib=t2i_smoke"], tmp_path, check=False)
    assert p.returncode != 0 and "conf/calib/" in p.stdout + p.stderr


def test_a_different_config_in_the_same_run_dir_is_refused_with_the_diff(tmp_path):
    _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8"], tmp_path)
    p = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8", "quant.rotation=haar"], tmp_path, check=False)
    assert p.returncode != 0
    assert "quant.rotation: 'rpbh' -> 'haar'" in p.stderr and "quant.tag=" in p.stderr
    # the stored run is untouched; a non-semantic change (threads, logger) still skips
    p = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=8", "threads=2"], tmp_path)
    assert "skipping" in p.stdout + p.stderr


def test_failed_run_leaves_error_marker_and_failed_status(tmp_path):
    p = _run(["eval=smoke", "quant=qdit", "w_bits=4", "a_bits=8", "calib=digits", "calib.protocol.steps=0"],
             tmp_path, check=False)
    assert p.returncode != 0
    run_dir = tmp_path / "runs/digits/qdit/w4a8-g128/smoke/q0-s0"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "Traceback" in status["error"]
    assert (run_dir / ".ERROR").exists() and not (run_dir / "results.json").exists()


def test_same_config_and_seeds_give_bit_identical_samples_and_metrics(tmp_path):
    args = ["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=4", "seed=3"]
    _run(args, tmp_path)
    run_dir = tmp_path / "runs/digits/orbit/w4a4/smoke/q3-s3"
    first = _stored(run_dir)
    m1 = json.loads((run_dir / "results.json").read_text())["metrics"]
    _run([*args, "overwrite=true", f"cache_dir={tmp_path}/cache2"], tmp_path)  # fresh fp reference too
    assert torch.equal(first, _stored(run_dir))
    assert json.loads((run_dir / "results.json").read_text())["metrics"] == m1


def test_group_check_passes_valid_overrides_and_leaves_hydra_groups_and_sweep_functions_to_hydra():
    from orbitquant.harness.cli import check_group_overrides, fp_bits_error

    ok = ["quant=orbit,rtn", "+experiment=digits", "bits=null", "quant.alpha=0.5", "w_bits=4", "-m",
          "hydra/launcher=joblib", "seed=range(0,3)", "quant=choice(orbit,rtn)"]
    assert check_group_overrides(ok, CONF) is None
    assert "did you mean bits=w4a8" in check_group_overrides(["bits=w4a9"], CONF)
    assert fp_bits_error("fp", ["bits=w4a8"], multirun=True) is None  # sweeps list fp beside quantizers
    assert fp_bits_error("orbit", ["bits=w4a8"], multirun=False) is None
    assert "ignores bits=w4a8" in fp_bits_error("fp", ["bits=w4a8"], multirun=False)


def test_quant_checkpoint_is_written_then_reused_with_identical_results(tmp_path):
    args = ["eval=smoke", "quant=orbit", "w_bits=3", "a_bits=4", f"quant_checkpoint={tmp_path}/ckpt"]
    _run(args, tmp_path)
    path = tmp_path / "runs/digits/orbit/w3a4/smoke/q0-s0/results.json"
    first = json.loads(path.read_text())
    assert first["quant_report"]["summary"]["saved_to"] == f"{tmp_path}/ckpt"
    _run([*args, "overwrite=true", "runtime=compact"], tmp_path)
    second = json.loads(path.read_text())
    assert second["quant_report"]["summary"]["loaded_from"] == f"{tmp_path}/ckpt"
    assert second["metrics"] == first["metrics"]  # same packed weights, same samples, either runtime mode
    p = _run(["eval=smoke", "quant=orbit", "w_bits=4", "a_bits=4", f"quant_checkpoint={tmp_path}/ckpt"], tmp_path,
             check=False)
    assert p.returncode != 0 and "holds another quant config (w_bits: 3 -> 4" in p.stderr


MODEL_DEFAULTS = {  # model -> (eval, calib, dtype) its config selects
    "digits": ("digits", "digits", "float32"), "tiny_flux": ("t2i_smoke", "t2i_smoke", "float32"),
    "tiny_zimage": ("t2i_smoke", "t2i_smoke", "float32"), "tiny_wan": ("t2v_smoke", "t2v_smoke", "float32"),
    "tiny_cogvideox": ("t2v_smoke", "t2v_smoke", "float32"), "tiny_dit": ("c2i_smoke", "c2i_smoke", "float32"),
    "wan21": ("wan21_fidelity", "wan21", "bfloat16"), "wan21_14b": ("wan21_fidelity", "wan21", "bfloat16"),
    "flux1_dev": ("flux_dev_fidelity", "flux1_dev", "bfloat16"),
    "flux1_schnell": ("flux_schnell_fidelity", "flux1_schnell", "bfloat16"),
    "cogvideox_2b": ("cogvideox_fidelity", "cogvideox", "bfloat16"),
    "cogvideox_5b": ("cogvideox_fidelity", "cogvideox", "bfloat16"),
    "zimage_turbo": ("zimage_turbo_fidelity", "zimage_turbo", "bfloat16"),
    "dit_xl_2": ("dit_fidelity", "dit_xl_2", "bfloat16"),
}


def test_every_model_has_its_defaults_listed_here():
    assert sorted(MODEL_DEFAULTS) == [m for m in _options("model") if m != "digits_outliers"]


@pytest.mark.parametrize("model", sorted(MODEL_DEFAULTS))
def test_each_model_brings_its_protocols_and_dtype_and_explicit_choices_win(model):
    ev, cal, dtype = MODEL_DEFAULTS[model]
    cfg = _compose([f"model={model}"])
    assert (cfg.eval.name, cfg.calib.name, cfg.dtype, cfg.device) == (ev, cal, dtype, "auto")
    adapter = build_adapter(OmegaConf.to_container(cfg.model, resolve=True))
    adapter.check_protocol(OmegaConf.to_container(cfg.eval.protocol, resolve=True), ev)
    cfg = _compose([f"model={model}", "eval=smoke", "calib=t2i_smoke", "dtype=float16", "device=cpu"])
    assert (cfg.eval.name, cfg.calib.name, cfg.dtype, cfg.device) == ("smoke", "t2i_smoke", "float16", "cpu")
    exp = _compose(["experiment=wan21_vbench"])  # an experiment's choices win over its model's
    assert (exp.model.name, exp.eval.name, exp.device) == ("wan21", "vbench", "cuda")


@pytest.mark.parametrize("model", ["wan21", "flux1_dev", *(pytest.param(m, marks=pytest.mark.slow)
                                                          for m in ("cogvideox_2b", "zimage_turbo", "dit_xl_2"))])
def test_the_mission_command_reaches_the_weights_check_and_ends_in_one_line(tmp_path, model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, str(ROOT / "run.py"), f"model={model}", "quant=orbit", "w_bits=4", "a_bits=8",
           f"results_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model={model}: ") and "hf download" in err[0], p.stderr
    assert "runs on the CPU" in p.stdout  # the one-line note that a real family on a CPU is slow


def test_a_video_run_stored_as_mp4_is_exact_for_fp_and_keeps_each_video_as_one_file(tmp_path):
    from orbitquant.harness.samplestore import SampleSet

    _run(["model=tiny_wan", "quant=fp", "eval.store=mp4"], tmp_path)
    run = json.loads(next((tmp_path / "runs").glob("tiny_wan/fp/**/results.json")).read_text())
    assert run["metrics"]["psnr_vs_fp"]["value"] == "inf"  # same frames -> same mp4 bytes -> same decoded frames
    assert run["sampling"]["store"] == "mp4"
    s = SampleSet.open(next((tmp_path / "runs").glob("tiny_wan/fp/**/samples")))
    files = list(s.encoded())
    assert len(files) == len(s) == 2 and all(f[4:8] == b"ftyp" for f in files)  # one mp4 file per video


def test_a_tiny_model_alone_runs_with_its_own_protocol(tmp_path):
    _run(["model=tiny_flux", "quant=orbit"], tmp_path)
    res = json.loads(next((tmp_path / "runs").glob("tiny_flux/orbit/w4a8/t2i_smoke/q0-s0/results.json")).read_text())
    assert res["config"]["device"] == "cpu" and res["sampling"]["store"] == "float32"
    assert {"load", "reference", "quantize", "sample", "metrics"} <= set(res["timing"]) <= set(res["memory"]) | {"x"}


def test_each_multirun_keeps_its_own_sweep_record(tmp_path):
    """Hydra's multirun.yaml lands in the shared results root (overwritten by the next -m); every sweep also keeps
    its own under <results_dir>/../sweeps/."""
    import yaml

    for quant in ("fp", "rtn"):
        _run(["-m", "eval=smoke", f"quant={quant}", "w_bits=4", "a_bits=8"], tmp_path)
    records = sorted((tmp_path / "sweeps").glob("*/multirun.yaml"))
    assert len(records) == 2
    tasks = [yaml.safe_load(r.read_text())["hydra"]["overrides"]["task"] for r in records]
    assert sorted("quant=fp" in t for t in tasks) == [False, True] and all("quant=rtn" in t or "quant=fp" in t
                                                                          for t in tasks)
