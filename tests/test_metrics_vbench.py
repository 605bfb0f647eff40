"""VBench: the naming contract, the results parser on a file of VBench's format, the subprocess path end to end
against a stand-in ``vbench`` package (same ``VBench(device, full_info, output).evaluate(...)`` API and output), the
preflight of each dimension's checkpoints in fake caches, and the work folder's samples stamp."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys

import pytest
import torch

from orbitquant.harness.factory import build_metrics, metric_contexts
from orbitquant.harness.metrics import vbench as V
from orbitquant.harness.metrics.vbench import INDEX_FILE, PAPER_DIMENSIONS, parse_results, write_videos
from orbitquant.harness.preflight import missing
from orbitquant.harness.types import Samples

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
        with open(os.path.join(self.output_path, "..", "calls.log"), "a") as log:
            log.write(os.environ.get("VBENCH_CACHE_DIR", "") + "\\n")
        vids = sorted(f for f in os.listdir(videos_path) if f.endswith(".mp4"))
        res = {}
        for k, d in enumerate(dimension_list):
            per = [{"video_path": os.path.join(videos_path, v), "video_results": (k + i) / 10}
                   for i, v in enumerate(vids)]
            res[d] = [sum(p["video_results"] for p in per) / len(per), per]
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(res, f)
'''


def _fake_env(tmp_path, cuda=None, name="python"):
    """A stand-in vbench environment: an interpreter wrapper with the fake package. ``cuda=True`` / ``False``: the
    wrapper answers preflight's CUDA probe (any code that asks torch.cuda) with exit 0 / 1 itself."""
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(FAKE_VBENCH)
    py = tmp_path / name
    probe = "" if cuda is None else f'case "$*" in *torch.cuda*) exit {0 if cuda else 1};; esac\n'
    py.write_text(f'#!/bin/sh\n{probe}PYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return py


#: where VBench 0.1.5 reads each paper dimension's checkpoints (vbench/utils.py init_submodules and the dimension
#: modules; local=False): under HOME/.cache -- vbench/ (VBench's cache), clip/ (clip.load), torch/hub/ (torch.hub.load),
#: huggingface/hub/ (transformers). Written out here, not taken from the module under test.
PAPER_FILES = {
    "imaging_quality": ["vbench/pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"],
    "aesthetic_quality": ["vbench/aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "clip/ViT-L-14.pt"],
    "motion_smoothness": ["vbench/amt_model/amt-s.pth"],
    "dynamic_degree": ["vbench/raft_model/models/raft-things.pth"],
    "background_consistency": ["clip/ViT-B-32.pt"],
    "subject_consistency": ["torch/hub/facebookresearch_dino_main/hubconf.py",
                            "torch/hub/checkpoints/dino_vitbase16_pretrain.pth"],
    "scene": ["vbench/caption_model/tag2text_swin_14m.pth",
              "huggingface/hub/models--bert-base-uncased/snapshots/c0ffee/vocab.txt",
              "huggingface/hub/models--bert-base-uncased/snapshots/c0ffee/model.safetensors"],
    "overall_consistency": ["vbench/ViCLIP/ViClip-InternVid-10M-FLT.pth", "vbench/ViCLIP/bpe_simple_vocab_16e6.txt.gz"],
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fake HOME whose caches hold every paper dimension's checkpoints (CLIP files with the digest their URL
    names); the environment variables that would move a cache are cleared."""
    h = tmp_path / "home"
    monkeypatch.setenv("HOME", str(h))
    for var in ("VBENCH_CACHE_DIR", "TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "TRANSFORMERS_CACHE", "ORBITQUANT_VBENCH_PYTHON"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ORBITQUANT_HASH_CACHE", str(tmp_path / "sha256.json"))
    for rels in PAPER_FILES.values():
        for rel in rels:
            f = h / ".cache" / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(rel.encode())
    (h / ".cache/huggingface/hub/models--bert-base-uncased/refs").mkdir(parents=True)
    (h / ".cache/huggingface/hub/models--bert-base-uncased/refs/main").write_text("c0ffee")
    for name in ("ViT-B/32", "ViT-L/14"):  # the published digest of these stand-in files
        fname = name.replace("/", "-") + ".pt"
        sha = hashlib.sha256(f"clip/{fname}".encode()).hexdigest()
        monkeypatch.setitem(V.CLIP_URLS, name, f"https://openaipublic.azureedge.net/clip/models/{sha}/{fname}")
    return h


def _metric(py, **opts):
    return build_metrics([{"vbench_scene": {"python": str(py), **opts}}])[0]


def test_all_checkpoints_present_means_nothing_missing(tmp_path, home):
    m = _metric(_fake_env(tmp_path))
    needs = m.needs()
    assert not missing(needs), [n.line() for n in missing(needs)]
    where = "\n".join(n.where for n in needs)
    for rels in PAPER_FILES.values():  # every file the eight dimensions read is declared
        for rel in rels:
            assert rel.split("/snapshots/")[0].removesuffix("/hubconf.py") in where
    assert not any("CUDA" in n.what for n in needs)  # device auto: VBench runs on CPU too
    m.check()


@pytest.mark.parametrize("dim, rel, url", [
    ("dynamic_degree", "vbench/raft_model/models/raft-things.pth",
     "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip"),
    ("imaging_quality", "vbench/pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
     "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),
    ("overall_consistency", "vbench/ViCLIP/ViClip-InternVid-10M-FLT.pth",
     "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth"),
    ("aesthetic_quality", "vbench/aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
     "https://raw.githubusercontent.com/LAION-AI/aesthetic-predictor/main/sa_0_4_vit_l_14_linear.pth"),
])
def test_a_missing_checkpoint_is_listed_with_its_download(tmp_path, home, dim, rel, url):
    (home / ".cache" / rel).unlink()
    m = _metric(_fake_env(tmp_path))
    (gone,) = missing(m.needs())
    assert gone.where == str(home / ".cache" / rel) and dim in gone.what and url in gone.fix
    with pytest.raises(FileNotFoundError, match=os.path.basename(rel)):
        m.check()
    if "raft" in rel:  # VBench fetches RAFT as a zip and unzips it into raft_model/
        assert "unzip" in gone.fix and str(home / ".cache/vbench/raft_model") in gone.fix


def test_clip_and_hub_caches_are_checked(tmp_path, home):
    (home / ".cache/clip/ViT-L-14.pt").write_bytes(b"truncated")  # clip would re-download it: its digest is wrong
    (home / ".cache/torch/hub/checkpoints/dino_vitbase16_pretrain.pth").unlink()
    (home / ".cache/huggingface/hub/models--bert-base-uncased/snapshots/c0ffee/model.safetensors").unlink()
    py = _fake_env(tmp_path)
    gone = {n.where: n for n in missing(_metric(py).needs())}
    assert set(gone) == {str(home / ".cache/clip/ViT-L-14.pt"),
                         str(home / ".cache/torch/hub/checkpoints/dino_vitbase16_pretrain.pth"),
                         str(home / ".cache/huggingface/hub/models--bert-base-uncased/snapshots/c0ffee")}
    clip = gone[str(home / ".cache/clip/ViT-L-14.pt")]
    assert "sha256" in clip.problem and "aesthetic_quality" in clip.what and V.CLIP_URLS["ViT-L/14"] in clip.fix
    assert "torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')" in \
        gone[str(home / ".cache/torch/hub/checkpoints/dino_vitbase16_pretrain.pth")].fix
    bert = gone[str(home / ".cache/huggingface/hub/models--bert-base-uncased/snapshots/c0ffee")]
    assert "model.safetensors or pytorch_model.bin" in bert.problem and "BertModel.from_pretrained" in bert.fix
    # pytorch_model.bin is as good (transformers falls back to it)
    (home / ".cache/huggingface/hub/models--bert-base-uncased/snapshots/c0ffee/pytorch_model.bin").write_bytes(b"w")
    assert len(missing(_metric(py).needs())) == 2


def test_only_requested_dimensions_need_their_checkpoints(tmp_path, home):
    for rel in PAPER_FILES["dynamic_degree"] + PAPER_FILES["overall_consistency"] + PAPER_FILES["scene"]:
        (home / ".cache" / rel).unlink()
    py = _fake_env(tmp_path)
    m = build_metrics([{"vbench_imaging_quality": {"python": str(py), "dimensions": ["imaging_quality"]}}])[0]
    needs = m.needs()
    assert not missing(needs)
    assert not any(s in n.where for n in needs for s in ("raft", "ViCLIP", "caption_model", "clip/", "bert"))
    # GRiT's dimensions: its checkpoint, detectron2 in the environment, the bert tokenizer
    m = build_metrics([{"vbench_color": {"python": str(py), "dimensions": ["color"]}}])[0]
    gone = {n.what: n for n in missing(m.needs())}
    grit = [n for n in gone.values() if n.where.endswith("vbench/grit_model/grit_b_densecap_objectdet.pth")]
    assert len(grit) == 1 and "VBench_Used_Models/resolve/main/grit_b_densecap_objectdet.pth" in grit[0].fix
    assert any("detectron2" in w for w in gone) and any("bert-base-uncased tokenizer" in w for w in gone)


def test_local_mode_reads_clip_and_dino_from_the_vbench_cache(tmp_path, home):
    m = _metric(_fake_env(tmp_path), local=True)
    gone = {n.where for n in missing(m.needs())}
    cache = home / ".cache/vbench"
    assert gone == {str(cache / "clip_model/ViT-B-32.pt"), str(cache / "clip_model/ViT-L-14.pt"),
                    str(cache / "dino_model/facebookresearch_dino_main"),
                    str(cache / "dino_model/dino_vitbase16_pretrain.pth")}
    dino = next(n for n in missing(m.needs()) if n.where.endswith("facebookresearch_dino_main"))
    assert dino.fix.startswith("git clone https://github.com/facebookresearch/dino ")
    # dino's hubconf ignores VBench's path= and loads the weights from torch.hub's cache in local mode too
    (home / ".cache/torch/hub/checkpoints/dino_vitbase16_pretrain.pth").unlink()
    hub = [n for n in missing(m.needs()) if n.where.startswith(str(home / ".cache/torch"))]
    assert [n.where for n in hub] == [str(home / ".cache/torch/hub/checkpoints/dino_vitbase16_pretrain.pth")]
    assert "dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth" in hub[0].fix


def test_cache_dir_option_env_and_what_vbench_is_given(tmp_path, home, monkeypatch):
    py = _fake_env(tmp_path)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert V.vbench_cache_dir() == tmp_path / "elsewhere"
    gone = missing(_metric(py).needs())  # VBench's own files are looked for there now
    assert gone and all(n.where.startswith(str(tmp_path / "elsewhere")) for n in gone)
    m = _metric(py, cache_dir=str(home / ".cache/vbench"), work_dir=str(tmp_path / "work"), fps=8)
    assert not missing(m.needs())  # the option wins over the variable
    m.compute(_videos(), None, metric_contexts([m])[m.context_cls])
    assert (tmp_path / "work/calls.log").read_text() == f"{home / '.cache/vbench'}\n"  # and VBench reads it


def test_cuda_is_a_need_only_when_asked_for(tmp_path, home):
    no_cuda = _fake_env(tmp_path, cuda=False, name="python-nocuda")
    assert not missing(_metric(no_cuda).needs())  # auto: CPU is fine for VBench
    (gone,) = missing(_metric(no_cuda, device="cuda").needs())
    assert "CUDA" in gone.what and str(no_cuda) in gone.where
    assert not missing(_metric(_fake_env(tmp_path, cuda=True, name="python-cuda"), device="cuda").needs())


def test_fetch_commands_cli(tmp_path, home, capsys):
    (home / ".cache/vbench/raft_model/models/raft-things.pth").unlink()
    assert V.main(["--fetch-commands", "--dimensions", "dynamic_degree,imaging_quality"]) == 0
    (cmd,) = capsys.readouterr().out.splitlines()  # only what is missing
    assert "models.zip" in cmd and "unzip" in cmd
    V.main(["--fetch-commands", "--dimensions", "paper", "--all", "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert str(tmp_path / "c/amt_model/amt-s.pth") in out and "ViT-L-14.pt" in out
    with pytest.raises(SystemExit):
        V.main(["--fetch-commands", "--dimensions", "sharpness"])


def test_changed_samples_are_scored_again_not_reused(tmp_path, monkeypatch):
    calls = []

    def fake_run(videos, output, dimensions, *args, **kwargs):  # VBench's call, without its interpreter start
        vids = sorted(p.name for p in videos.glob("*.mp4"))
        calls.append({v: (videos / v).read_bytes() for v in vids})
        res = {d: [0.5, [{"video_path": str(videos / v), "video_results": 0.5} for v in vids]] for d in dimensions}
        output.mkdir(parents=True, exist_ok=True)
        (output / "orbitquant_eval_results.json").write_text(json.dumps(res))
        return output / "orbitquant_eval_results.json"

    monkeypatch.setattr(V, "run_vbench", fake_run)
    opts = {"python": str(tmp_path / "py"), "work_dir": str(tmp_path / "work"), "fps": 8, "dimensions": ["scene"]}

    def score(s):
        m = build_metrics([{"vbench_scene": opts}])[0]
        return m.compute(s, None, metric_contexts([m])[m.context_cls])

    a = _videos()
    score(a)
    score(a)
    assert len(calls) == 1  # the same samples: VBench's results are reused
    b = Samples(images=-a.images, labels=a.labels, meta=a.meta)  # same prompts and count, other values
    score(b)
    assert len(calls) == 2  # scored again...
    assert calls[1].keys() == calls[0].keys() and all(calls[1][v] != calls[0][v] for v in calls[0])  # ...new videos
    assert json.loads((tmp_path / "work" / V.STAMP_FILE).read_text())["fingerprint"] == b.fingerprint()
    (tmp_path / "work" / V.STAMP_FILE).unlink()  # a folder without a stamp (an older harness's): not trusted either
    score(b)
    assert len(calls) == 3
    opts["fps"] = 16  # other videos from the same samples
    score(b)
    assert len(calls) == 4


def test_vbench_metrics_run_once_in_their_environment_and_rescore_from_results(tmp_path, home):
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
    again = build_metrics([{"vbench_scene": {"python": str(py), "work_dir": str(tmp_path / "work"), "fps": 8}}])[0]
    assert again.compute(s, None, metric_contexts([again])[again.context_cls]).value == res["vbench_scene"].value


def test_vbench_failure_and_check_messages(tmp_path, home):
    absent = build_metrics([{"vbench_scene": {"python": str(tmp_path / "nope/python")}}])[0]
    with pytest.raises(FileNotFoundError, match="setup_vbench_env.sh"):
        absent.check()
    no_vbench = build_metrics([{"vbench_scene": {"python": sys.executable}}])[0]
    if __import__("importlib").util.find_spec("vbench") is None:
        with pytest.raises(FileNotFoundError, match="vbench package vbench in .* \\(not installed there\\)"):
            no_vbench.check()
    with pytest.raises(FileNotFoundError, match="full-info"):
        build_metrics([{"vbench_scene": {"python": str(_fake_env(tmp_path)), "full_info": str(tmp_path / "x.json")}}]
                      )[0].check()
    py = _fake_env(tmp_path)
    (tmp_path / "site/vbench/__init__.py").write_text("raise RuntimeError('weights missing: raft-things.pth')")
    m = build_metrics([{"vbench_scene": {"python": str(py), "work_dir": str(tmp_path / "w")}}])[0]
    with pytest.raises(RuntimeError, match="raft-things.pth"):
        m.compute(_videos(), None, metric_contexts([m])[m.context_cls])
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        build_metrics([{"vbench_scene": {"dimensions": ["sharpness"]}}])
