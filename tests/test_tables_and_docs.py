"""Tables aggregate results.json files by seed; CI runs exactly the README's test command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orbitquant.harness.rundir import RunDir
from orbitquant.harness.tables import format_summary, load_results, mean_std_table, to_latex

ROOT = Path(__file__).resolve().parent.parent


def _fake_result(root: Path, method: str, seed: int, psnr: float) -> None:
    cfg = {"model": {"name": "digits"}, "quant": {"method": method, "tag": "w4a4", "w_bits": 4, "a_bits": 4},
           "eval": {"name": "digits"},
           "seed": seed, "quant_seed": seed}
    metrics = {"psnr_vs_fp": {"value": psnr, "higher_is_better": True, "n": 500}}
    ref = {"psnr_vs_fp": {"value": float("inf"), "higher_is_better": True, "n": 500}}
    run = RunDir(root / "digits" / method / "w4a4" / "digits" / f"q{seed}-s{seed}")
    run.write_results({"config": cfg, "metrics": metrics, "reference_metrics": ref,
                       "quant_report": {"summary": {"treatments": {"x": 1}, "n_linear": 1, "linear_bytes_src": 4,
                                                    "linear_bytes_quant": 1, "mean_rel_err": 0.1}}})


def test_mean_std_over_seeds(tmp_path):
    for seed, v in enumerate([20.0, 22.0, 24.0]):
        _fake_result(tmp_path, "orbit", seed, v)
    _fake_result(tmp_path, "rtn", 0, 15.0)
    df = load_results(tmp_path)
    assert len(df) == 4 and df["reference"].iloc[0] == float("inf")
    table = mean_std_table(df, ["psnr_vs_fp"], by=("model", "method", "tag"))
    assert table.loc[("digits", "orbit", "w4a4"), "psnr_vs_fp"] == "22.000 ± 2.000"
    assert table.loc[("digits", "orbit", "w4a4"), "runs"] == 3
    assert table.loc[("digits", "rtn", "w4a4"), "psnr_vs_fp"] == "15.000 ± 0.000"
    # by bits (the default): the best quantized mean of each (model, bits) is bold, by the metric's direction
    table = mean_std_table(df, ["psnr_vs_fp"])
    assert table.loc[("digits", "W4A4", "orbit", "w4a4"), "psnr_vs_fp"] == "**22.000 ± 2.000**"
    assert table.loc[("digits", "W4A4", "rtn", "w4a4"), "psnr_vs_fp"] == "15.000 ± 0.000"
    tex = to_latex(table)
    assert "\\textbf{22.000 $\\pm$ 2.000}" in tex and "\\toprule" in tex


def test_results_json_is_strict_json_and_summary_prints(tmp_path):
    _fake_result(tmp_path, "orbit", 0, 21.5)
    path = next(tmp_path.glob("**/results.json"))
    text = path.read_text()
    assert "Infinity" not in text  # strict JSON: non-finite values are written as strings
    res = json.loads(text)
    assert res["schema_version"] == 1
    out = format_summary(res, path)
    assert "psnr_vs_fp" in out and "21.5000" in out and "inf" in out


def test_ci_runs_the_readme_test_command_exactly():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_cmd = next(b for b in blocks if "pytest" in b and "pip install" in b).strip()
    main_cmd = next(b for b in blocks if "run.py" in b and "pip install" in b).strip()
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert test_cmd in ci
    assert main_cmd.endswith("run.py")


def test_rundir_guard_leaves_error_marker(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(RuntimeError), run.guard():
        assert (tmp_path / "r/.RUNNING").exists()
        raise RuntimeError("boom")
    assert "boom" in (tmp_path / "r/.ERROR").read_text()
    assert not (tmp_path / "r/.RUNNING").exists() and not run.done()


def test_cost_table_puts_calibration_beside_quantization_time(tmp_path):
    import json

    from orbitquant.harness.tables import cost_table, load_costs

    def write(method, tag, seed, seconds, cal):
        d = tmp_path / f"digits/{method}/{tag}/digits/q{seed}-s{seed}"
        d.mkdir(parents=True)
        cfg = {"model": {"name": "digits"}, "quant": {"method": method, "tag": tag}, "eval": {"name": "digits"},
               "calib": {"name": "digits"}, "seed": seed, "quant_seed": seed}
        (d / "results.json").write_text(json.dumps({"config": cfg, "quant_report": {
            "summary": {"seconds": seconds, "calibration": cal}}}))

    write("orbit", "w4a4", 0, 0.3, {})
    write("qdit", "w4a4-g128", 0, 20.0, {"inputs_recorded": 256, "seconds": 17.0})
    write("qdit", "w4a4-g128", 1, 4.0, {"inputs_recorded": 256, "seconds": 0.1, "seconds_when_fitted": 19.0,
                                        "cached": "x"})
    t = cost_table(load_costs(tmp_path)).reset_index().set_index("method")
    assert t.loc["orbit", "calibration s"] == 0 and t.loc["orbit", "calibration data"] == "-"
    assert t.loc["qdit", "calibration s"] == 18.0  # a cached run reports what fitting cost, not the load
    assert t.loc["qdit", "quantize s (incl. calibration)"] == 12.0 and t.loc["qdit", "runs"] == 2
    assert t.loc["qdit", "calibration data"] == "256 denoiser inputs"


def test_make_tables_refuses_to_mix_eval_protocols_and_writes_md_csv_tex(tmp_path):
    import subprocess
    import sys

    for seed, v in enumerate([20.0, 22.0]):
        _fake_result(tmp_path, "orbit", seed, v)
    other = json.loads(next(tmp_path.glob("**/results.json")).read_text())
    other["config"]["eval"]["name"] = "smoke"
    RunDir(tmp_path / "digits/orbit/w4a4/smoke/q0-s0").write_results(other)
    script = [sys.executable, str(ROOT / "scripts/make_tables.py"), "--root", str(tmp_path)]
    p = subprocess.run(script, capture_output=True, text=True)
    assert p.returncode != 0 and "mix eval protocols" in p.stderr
    out = tmp_path / "t.md"
    p = subprocess.run([*script, "--eval", "digits", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "21.000 ± 1.414" in out.read_text() and out.with_suffix(".csv").exists() and out.with_suffix(".tex").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml")))
def test_every_experiment_composes_and_its_table_spec_is_valid(name):
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from orbitquant.harness.factory import build_adapter, build_metrics
    from orbitquant.quant.registry import METHODS

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
    t = cfg.table
    assert cfg.model.name in t.models and cfg.eval.name == t.eval
    protocol = OmegaConf.to_container(cfg.eval.protocol, resolve=True)
    if isinstance(protocol.get("prompts"), str) and not Path(protocol["prompts"]).exists():
        # external prompt lists (VBench, GenEval checkouts) are absent here; a real run checks the file first
        protocol["prompts"] = ["a red bicycle leaning on a wall"]
    build_adapter(OmegaConf.to_container(cfg.model, resolve=True)).check_protocol(protocol, name)
    build_metrics(list(t.metrics))
    params = cfg.hydra.sweeper.params
    for option in params.quant.split(","):  # a quant config (conf/quant/<option>.yaml) of a registered method
        qcfg = OmegaConf.load(ROOT / "conf/quant" / f"{option}.yaml")
        while "method" not in qcfg:  # a preset on top of another (defaults: [ptq4dit, _self_])
            qcfg = OmegaConf.load(ROOT / "conf/quant" / f"{qcfg.defaults[0]}.yaml")
        assert qcfg.method in METHODS.names()
    for bits in params.bits.split(","):
        assert (ROOT / "conf/bits" / f"{bits}.yaml").exists()
    if t.paper:
        paper = pd.read_csv(ROOT / t.paper, dtype={"bits": str})
        assert {"method", "paper_name", "bits"} <= set(paper.columns) and len(paper) > 1
        assert "fp" in set(paper["bits"])


def test_paper_columns_sit_beside_ours_joined_on_method_and_bits(tmp_path):
    from orbitquant.harness.tables import with_paper

    for seed, v in enumerate([20.0, 22.0]):
        _fake_result(tmp_path, "orbit", seed, v)
    paper = tmp_path / "p.csv"
    paper.write_text("method,paper_name,bits,overall\nfp,FP16,fp,0.667\norbit,OrbitQuant,W4A4,0.633\n"
                     "svdquant,SVDQuant,W4A4,0.573\n")
    t = with_paper(mean_std_table(load_results(tmp_path), ["psnr_vs_fp"]), paper)
    assert t.loc[("W4A4", "orbit"), "paper: overall"] == 0.633
    assert t.loc[("W4A4", "orbit"), "psnr_vs_fp"] == "21.000 ± 1.414"
    assert t.loc[("W4A4", "svdquant"), "psnr_vs_fp"] == "—"  # a method we do not have: paper only
    assert list(t.index.get_level_values("bits"))[0] == "fp"


def test_metric_vs_bits_plot_is_written(tmp_path):
    from orbitquant.harness.viz import plot_metric_vs_bits

    for seed, v in enumerate([20.0, 22.0]):
        _fake_result(tmp_path, "orbit", seed, v)
    _fake_result(tmp_path, "rtn", 0, 15.0)
    df = load_results(tmp_path)
    assert plot_metric_vs_bits(df, "psnr_vs_fp", tmp_path / "p.png").stat().st_size > 1000
    assert plot_metric_vs_bits(df, "no_such_metric", tmp_path / "q.png") is None
