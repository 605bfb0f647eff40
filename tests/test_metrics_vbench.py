"""VBench: the naming contract, the results parser on a file of VBench's format, and the subprocess path end to end
against a stand-in ``vbench`` package (same ``VBench(device, full_info, output).evaluate(...)`` API and output)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch

from orbitquant.factory import build_metrics, metric_contexts
from orbitquant.metrics.vbench import INDEX_FILE, PAPER_DIMENSIONS, parse_results, write_videos
from orbitquant.types import Samples

PROMPTS = ["a cat dozing on a sofa", "a red car on the sea"]


def _videos():
    g = torch.Generator().manual_seed(0)
    return Samples(images=torch.rand(3, 4, 3, 16, 16, generator=g) * 2 - 1, labels=torch.tensor([0, 0, 1]),
                   meta={"prompts": PROMPTS})


def _real_format(videos_dir):
    """What VBench's evaluate() saves (tuples become lists): {dim: [score, [{video_path, video_results}]]}."""
    def p(name):
        return os.path.join(str(videos_dir), name)

    return {
        "imaging_quality": [0.6125, [{"video_path": p(f"{PROMPTS[0]}-0.mp4"), "video_results": 60.0},
                                     {"video_path": p(f"{PROMPTS[0]}-1.mp4"), "video_results": 62.5}]],
        "dynamic_degree": [0.5, [{"video_path": p(f"{PROMPTS[0]}-0.mp4"), "video_results": True},
                                 {"video_path": p(f"{PROMPTS[1]}-0.mp4"), "video_results": False}]],
        "subject_consistency": [0.95, [{"video_path": p(f"{PROMPTS[1]}-0.mp4"), "video_results": 0.95}]],
        "scene": [0.25, [{"video_path": p(f"{PROMPTS[1]}-0.mp4"), "video_results": 0.25}]],
    }


def test_writer_follows_vbench_naming_contract(tmp_path):
    index = write_videos(_videos(), tmp_path, fps=8)
    assert index == {f"{PROMPTS[0]}-0.mp4": 0, f"{PROMPTS[0]}-1.mp4": 1, f"{PROMPTS[1]}-0.mp4": 2}
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == sorted(index)
    assert json.loads((tmp_path / INDEX_FILE).read_text()) == index
    with pytest.raises(ValueError, match="images"):
        write_videos(Samples(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), {"prompts": ["x"]}), tmp_path)


def test_parser_reads_vbench_results_into_percent_and_per_sample(tmp_path):
    f = tmp_path / "x_eval_results.json"
    f.write_text(json.dumps(_real_format("/somewhere/videos")))
    index = {f"{PROMPTS[0]}-0.mp4": 0, f"{PROMPTS[0]}-1.mp4": 1, f"{PROMPTS[1]}-0.mp4": 2}
    r = parse_results(f, index, 3)
    assert r["imaging_quality"]["score"] == pytest.approx(61.25)
    assert r["imaging_quality"]["per_sample"] == [60.0, 62.5, None]  # MUSIQ per video is already 0..100
    assert r["dynamic_degree"]["per_sample"] == [100.0, None, 0.0]
    assert r["subject_consistency"]["per_sample"] == [None, None, pytest.approx(95.0)]
    assert r["scene"]["score"] == pytest.approx(25.0)
    f.write_text(json.dumps({"scene": 0.3}))
    with pytest.raises(ValueError, match="not \\[score"):
        parse_results(f)


FAKE_VBENCH = '''
import json, os
class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.output_path = output_path
        os.makedirs(output_path, exist_ok=True)
        assert os.path.basename(full_info_dir) == "VBench_full_info.json"
    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, mode="vbench_standard"):
        vids = sorted(f for f in os.listdir(videos_path) if f.endswith(".mp4"))
        res = {}
        for k, d in enumerate(dimension_list):
            per = [{"video_path": os.path.join(videos_path, v), "video_results": (k + i) / 10} for i, v in enumerate(vids)]
            res[d] = [sum(p["video_results"] for p in per) / len(per), per]
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(res, f)
'''


def _fake_env(tmp_path):
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VBENCH)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return py


def test_vbench_metrics_run_once_in_their_environment_and_rescore_from_results(tmp_path):
    py = _fake_env(tmp_path)
    names = [f"vbench_{d}" for d in PAPER_DIMENSIONS]
    metrics = build_metrics({n: {"python": str(py), "work_dir": str(tmp_path / "work"), "fps": 8} for n in names})
    for m in metrics:
        m.check()
    s = _videos()
    ctx = metric_contexts(metrics)
    res = {m.name: m.compute(s, None, ctx[m.context_cls]) for m in metrics}
    out = json.loads((tmp_path / "work/results/orbitquant_eval_results.json").read_text())
    assert list(out) == list(PAPER_DIMENSIONS)  # one VBench call for all eight
    vids = sorted(f"{p}-{i}.mp4" for p, i in ((PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0)))
    for k, d in enumerate(PAPER_DIMENSIONS):
        r = res[f"vbench_{d}"]
        scale = 1 if d == "imaging_quality" else 100
        expect = {v: (k + i) / 10 * scale for i, v in enumerate(vids)}
        index = json.loads((tmp_path / "work/videos" / INDEX_FILE).read_text())
        assert r.extra["per_sample"] == pytest.approx([expect[v] for v in sorted(index, key=index.get)])
        assert r.value == pytest.approx(100 * (k + 1) / 10) and r.higher_is_better and r.n == 3
    # re-scoring reads the stored results: a broken environment is never called
    (tmp_path / "site/vbench/__init__.py").write_text("raise SystemExit(3)")
    again = build_metrics([{"vbench_scene": {"python": str(py), "work_dir": str(tmp_path / "work")}}])[0]
    assert again.compute(s, None, metric_contexts([again])[again.context_cls]).value == res["vbench_scene"].value


def test_vbench_failure_and_check_messages(tmp_path):
    missing = build_metrics([{"vbench_scene": {"python": str(tmp_path / "nope/python")}}])[0]
    with pytest.raises(FileNotFoundError, match="setup_vbench_env.sh"):
        missing.check()
    no_vbench = build_metrics([{"vbench_scene": {"python": sys.executable}}])[0]
    if __import__("importlib").util.find_spec("vbench") is None:
        with pytest.raises(FileNotFoundError, match="no vbench package"):
            no_vbench.check()
    py = _fake_env(tmp_path)
    (tmp_path / "site/vbench/__init__.py").write_text("raise RuntimeError('weights missing: raft-things.pth')")
    m = build_metrics([{"vbench_scene": {"python": str(py), "work_dir": str(tmp_path / "w")}}])[0]
    with pytest.raises(RuntimeError, match="raft-things.pth"):
        m.compute(_videos(), None, metric_contexts([m])[m.context_cls])
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        build_metrics([{"vbench_scene": {"dimensions": ["sharpness"]}}])
