"""GenEval: the sample layout, the results.jsonl parser (GenEval's summary arithmetic), and the evaluator call by path
against a stand-in checkout whose ``evaluation/evaluate_images.py`` has GenEval's command line and output format."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from orbitquant.factory import build_metrics, metric_contexts
from orbitquant.metrics.geneval import TAGS, parse_results, write_geneval
from orbitquant.types import Samples

META = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
     "prompt": "a photo of three apples"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "book", "count": 1,
                                                                    "position": ["left of", 0]}],
     "prompt": "a photo of a book left of a cup"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "blue"},
                                      {"class": "vase", "count": 1, "color": "green"}],
     "prompt": "a photo of a blue bus and a green vase"},
]

FAKE_EVALUATOR = '''
import argparse, json, os
ap = argparse.ArgumentParser()
ap.add_argument("imagedir"); ap.add_argument("--outfile", default="results.jsonl"); ap.add_argument("--model-path")
a = ap.parse_args()
assert os.path.isdir(a.model_path)
with open(a.outfile, "w") as out:
    for folder in sorted(os.listdir(a.imagedir)):
        if not folder.isdigit():
            continue
        with open(os.path.join(a.imagedir, folder, "metadata.jsonl")) as f:
            meta = json.loads(f.readline())
        for name in sorted(os.listdir(os.path.join(a.imagedir, folder, "samples"))):
            path = os.path.join(a.imagedir, folder, "samples", name)
            correct = (int(folder) + int(name[:4])) % 2 == 0
            out.write(json.dumps({"filename": path, "tag": meta["tag"], "prompt": meta["prompt"], "correct": correct,
                                  "reason": "", "metadata": json.dumps(meta), "details": {}}) + "\\n")
'''


def _checkout(tmp_path):
    root = tmp_path / "geneval"
    (root / "evaluation").mkdir(parents=True)
    (root / "prompts").mkdir()
    (root / "evaluation/evaluate_images.py").write_text(FAKE_EVALUATOR)
    (root / "prompts/evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in META))
    (tmp_path / "detector").mkdir()
    return root


def _samples(n_per=2):
    prompts = [m["prompt"] for m in META]
    labels = torch.tensor([i for i in range(len(prompts)) for _ in range(n_per)])
    g = torch.Generator().manual_seed(0)
    return Samples(torch.rand(len(labels), 3, 16, 16, generator=g) * 2 - 1, labels, {"prompts": prompts})


def test_layout_and_parser(tmp_path):
    s = _samples()
    index = write_geneval(s, tmp_path / "img", META)
    assert index["00000/samples/0000.png"] == 0 and index["00005/samples/0001.png"] == 11
    assert json.loads((tmp_path / "img/00003/metadata.jsonl").read_text()) == META[3]
    rows = [{"filename": str(tmp_path / "img" / rel), "tag": META[k // 2]["tag"], "correct": k in (0, 1, 2, 5, 6)}
            for rel, k in index.items()]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = parse_results(tmp_path / "results.jsonl", index, 12)
    assert r["single_object"]["score"] == 1.0 and r["two_object"]["score"] == 0.5 and r["counting"]["score"] == 0.5
    assert r["colors"]["score"] == 0.5 and r["position"]["score"] == 0.0 and r["color_attr"]["score"] == 0.0
    assert r["overall"]["score"] == pytest.approx((1 + 0.5 + 0.5 + 0.5) / 6)  # mean over tasks, not over images
    assert r["two_object"]["per_sample"][2:4] == [1.0, 0.0] and r["two_object"]["per_sample"][0] is None
    assert r["overall"]["per_sample"][:4] == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not in GenEval"):
        write_geneval(Samples(s.images[:1], torch.tensor([0]), {"prompts": ["a dragon"]}), tmp_path / "x", META)


def test_geneval_metrics_call_the_evaluator_by_path_once(tmp_path):
    root = _checkout(tmp_path)
    opts = {"geneval_dir": str(root), "python": sys.executable, "detector_dir": str(tmp_path / "detector"),
            "work_dir": str(tmp_path / "work")}
    metrics = build_metrics({f"geneval_{t}": opts for t in (*TAGS, "overall")})
    for m in metrics:
        m.check()
    ctx = metric_contexts(metrics)
    res = {m.name: m.compute(_samples(), None, ctx[m.context_cls]) for m in metrics}
    # the stand-in marks (prompt index + image index) even as correct: image 0 of prompts 0, 2, 4; image 1 of 1, 3, 5
    for t in TAGS:
        assert res[f"geneval_{t}"].value == 0.5 and res[f"geneval_{t}"].n == 2
    assert res["geneval_overall"].value == 0.5 and res["geneval_overall"].n == 12
    assert res["geneval_overall"].extra["per_sample"] == [1.0, 0.0, 0.0, 1.0] * 3
    (root / "evaluation/evaluate_images.py").write_text("raise SystemExit(5)")  # re-score: results are reused
    again = build_metrics([{"geneval_overall": opts}])[0]
    assert again.compute(_samples(), None, metric_contexts([again])[again.context_cls]).value == 0.5


def test_geneval_check_names_what_is_missing(tmp_path, monkeypatch):
    for var in ("ORBITQUANT_GENEVAL_DIR", "ORBITQUANT_GENEVAL_PYTHON", "ORBITQUANT_GENEVAL_DETECTOR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match="djghosh13/geneval"):
        build_metrics(["geneval_overall"])[0].check()
    root = _checkout(tmp_path)
    (root / "prompts/evaluation_metadata.jsonl").unlink()
    m = build_metrics([{"geneval_overall": {"geneval_dir": str(root), "python": sys.executable,
                                            "detector_dir": str(tmp_path / "detector")}}])[0]
    with pytest.raises(FileNotFoundError, match="evaluation_metadata.jsonl"):
        m.check()
