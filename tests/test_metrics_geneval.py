"""GenEval: the sample layout, the results.jsonl parser (GenEval's summary arithmetic), the evaluator call by path
against a stand-in checkout whose ``evaluation/evaluate_images.py`` has GenEval's command line and output format, the
preflight of its checkout, environment, detector, CLIP weights and CUDA against a stand-in environment, and the work
folder's samples stamp."""

from __future__ import annotations

import hashlib
import json
import stat
import sys

import pytest
import torch

from orbitquant.harness.factory import build_metrics, metric_contexts
from orbitquant.harness.metrics import geneval as G
from orbitquant.harness.metrics.geneval import TAGS, parse_results, write_geneval
from orbitquant.harness.preflight import missing
from orbitquant.harness.types import Samples

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
with open(os.path.join(os.path.dirname(a.outfile), "calls.log"), "a") as log:
    log.write("called\\n")
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


DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"  # evaluate_images.py's default --options model=


def _checkout(tmp_path):
    root = tmp_path / "geneval"
    (root / "evaluation").mkdir(parents=True)
    (root / "prompts").mkdir()
    (root / "evaluation/evaluate_images.py").write_text(FAKE_EVALUATOR)
    (root / "evaluation/object_names.txt").write_text("bench\ncat\n")
    (root / "prompts/evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in META))
    (tmp_path / "detector").mkdir()
    (tmp_path / "detector" / f"{DETECTOR}.pth").write_bytes(b"mask2former")
    return root


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A stand-in GenEval environment: ``make(cuda=..., without=...)`` -> an interpreter wrapper whose site holds
    stub packages of what evaluate_images.py imports (mmdet with mmdetection's configs/ beside it, as a source install
    has; open_clip whose pretrained table points ViT-L-14/openai at a URL naming the sha256 of the stand-in file in
    ~/.cache/clip); the wrapper answers the CUDA probe itself. The detector checkpoint's published prefix is that of
    the stand-in file."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ORBITQUANT_HASH_CACHE", str(tmp_path / "sha256.json"))
    monkeypatch.setattr(G, "DETECTOR_SHA256_PREFIX", hashlib.sha256(b"mask2former").hexdigest()[:8])
    (home / ".cache/clip").mkdir(parents=True)
    (home / ".cache/clip/ViT-L-14.pt").write_bytes(b"clip weights")
    sha = hashlib.sha256(b"clip weights").hexdigest()

    def make(cuda=True, without=(), name="python"):
        site = tmp_path / f"site-{name}"
        for mod in ("mmdet", "mmcv", "open_clip", "clip_benchmark", "pandas"):
            if mod not in without:
                (site / mod).mkdir(parents=True)
                (site / mod / "__init__.py").write_text("")
        if "open_clip" not in without:
            url = f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-L-14.pt"
            (site / "open_clip/pretrained.py").write_text(
                f"def get_pretrained_cfg(model, tag):\n    return {{'url': {url!r}}} if (model, tag) == "
                "('ViT-L-14', 'openai') else {}\n")
        (site / "configs/mask2former").mkdir(parents=True)
        (site / f"configs/mask2former/{DETECTOR}.py").write_text("_base_ = []\n")
        py = tmp_path / name
        py.write_text(f'#!/bin/sh\ncase "$*" in *torch.cuda*) exit {0 if cuda else 1};; esac\n'
                      f'PYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
        py.chmod(py.stat().st_mode | stat.S_IEXEC)
        return py

    return make


def _opts(tmp_path, root, py, **kw):
    return {"geneval_dir": str(root), "python": str(py), "detector_dir": str(tmp_path / "detector"), **kw}


def test_preflight_with_everything_present(tmp_path, env):
    root = _checkout(tmp_path)
    m = build_metrics([{"geneval_overall": _opts(tmp_path, root, env())}])[0]
    needs = m.needs()
    assert not missing(needs), [n.line() for n in missing(needs)]
    where = "\n".join(n.where for n in needs)
    for want in (f"detector/{DETECTOR}.pth", f"configs/mask2former/{DETECTOR}.py", "home/.cache/clip/ViT-L-14.pt",
                 "torch.cuda in", "mmdet in", "mmcv in", "open_clip in", "clip_benchmark in"):
        assert want in where
    m.check()


def test_missing_detector_and_wrong_detector_file(tmp_path, env):
    root = _checkout(tmp_path)
    m = build_metrics([{"geneval_overall": _opts(tmp_path, root, env())}])[0]
    (tmp_path / "detector" / f"{DETECTOR}.pth").unlink()
    (gone,) = missing(m.needs())
    assert gone.where == str(tmp_path / "detector" / f"{DETECTOR}.pth") and "download_models.sh" in gone.fix
    assert "743b7d99.pth" in gone.fix  # the published file download_models.sh fetches
    with pytest.raises(FileNotFoundError, match=f"{DETECTOR}.pth"):
        m.check()
    (tmp_path / "detector" / f"{DETECTOR}.pth").write_bytes(b"half a download")
    (gone,) = missing(m.needs())
    assert "sha256" in gone.problem


def test_no_cuda_in_the_environment_is_missing(tmp_path, env):
    root = _checkout(tmp_path)
    py = env(cuda=False)
    (gone,) = missing(build_metrics([{"geneval_overall": _opts(tmp_path, root, py)}])[0].needs())
    assert "CUDA" in gone.what and str(py) in gone.where


def test_missing_packages_config_and_clip_weights(tmp_path, env):
    root = _checkout(tmp_path)
    py = env(without=("mmdet", "open_clip"))
    gone = {n.what: n for n in missing(build_metrics([{"geneval_overall": _opts(tmp_path, root, py)}])[0].needs())}
    assert any(w.startswith("mmdet ") for w in gone) and any(w.startswith("open_clip ") for w in gone)
    assert "git checkout 2.x" in next(n for w, n in gone.items() if w.startswith("mmdet ")).fix
    assert any("mmdetection config" in w for w in gone)  # looked up beside the mmdet package
    clip = next(n for w, n in gone.items() if "ViT-L-14" in w)
    assert "cannot locate" in clip.problem
    assert "create_model_and_transforms('ViT-L-14', pretrained='openai')" in clip.fix
    # present packages, but the CLIP file is not where open_clip keeps it
    (tmp_path / "home/.cache/clip/ViT-L-14.pt").unlink()
    (gone,) = missing(build_metrics([{"geneval_overall": _opts(tmp_path, root, env(name="py2"))}])[0].needs())
    assert gone.where == str(tmp_path / "home/.cache/clip/ViT-L-14.pt")


def test_changed_samples_are_evaluated_again_not_reused(tmp_path, env):
    root = _checkout(tmp_path)
    opts = _opts(tmp_path, root, env(), work_dir=str(tmp_path / "work"))
    calls = tmp_path / "work/calls.log"

    def score(s):
        m = build_metrics([{"geneval_overall": opts}])[0]
        return m.compute(s, None, metric_contexts([m])[m.context_cls])

    a = _samples()
    score(a)
    score(a)
    assert calls.read_text().count("called") == 1  # the same samples: GenEval's results are reused
    b = Samples(-a.images, a.labels, a.meta)
    score(b)
    assert calls.read_text().count("called") == 2
    assert json.loads((tmp_path / "work" / G.STAMP_FILE).read_text())["fingerprint"] == b.fingerprint()
    # fewer samples of other prompts: the stale image folders of the first set are not scored with them
    c = Samples(a.images[:2], torch.tensor([0, 0]), a.meta)
    r = score(c)
    assert calls.read_text().count("called") == 3 and r.n == 2
    assert sorted(p.name for p in (tmp_path / "work/images").iterdir() if p.is_dir()) == ["00000"]


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


def test_geneval_metrics_call_the_evaluator_by_path_once(tmp_path, env):
    root = _checkout(tmp_path)
    opts = _opts(tmp_path, root, env(), work_dir=str(tmp_path / "work"))
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


def test_geneval_check_names_what_is_missing(tmp_path, monkeypatch, env):
    for var in ("ORBITQUANT_GENEVAL_DIR", "ORBITQUANT_GENEVAL_PYTHON", "ORBITQUANT_GENEVAL_DETECTOR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match="djghosh13/geneval"):
        build_metrics(["geneval_overall"])[0].check()
    root = _checkout(tmp_path)
    (root / "prompts/evaluation_metadata.jsonl").unlink()
    m = build_metrics([{"geneval_overall": _opts(tmp_path, root, env())}])[0]
    with pytest.raises(FileNotFoundError, match="evaluation_metadata.jsonl"):
        m.check()
    (gone,) = missing(m.needs())
    assert "metadata" in gone.what
    unset = missing(build_metrics(["geneval_overall"])[0].needs())
    assert [n.problem for n in unset] == ["not set"] * 4  # checkout, metadata, detector, python: nothing probed
