"""VBench dimensions (Huang et al. 2024) with the ``vbench`` package, run in its own environment.

vbench pins old transformers / numpy / timm, so it lives in a separate venv (``scripts/setup_vbench_env.sh``) and is
called as a subprocess on a folder of videos written in its naming contract: ``{prompt}-{i}.mp4``, ``i`` = 0..4 for
the five samples of each prompt of its standard prompt list (``vbench_standard`` mode). Its results file
``<name>_eval_results.json`` holds ``{dimension: [score, [{"video_path": ..., "video_results": ...}, ...]]}``; it is
parsed into one MetricResult per dimension (value in percent, as papers report it) with per-sample values.

Options (all VBench metrics share one run; the first one to compute runs every dimension in ``dimensions``):
``python`` (the vbench env's interpreter; default ``$ORBITQUANT_VBENCH_PYTHON``, then ``.venv-vbench/bin/python`` in
the repository), ``dimensions`` (default: the paper's eight), ``mode`` (``vbench_standard``; ``custom_input`` reads
prompts from file names and cannot score ``scene``), ``full_info`` (VBench_full_info.json; default: the one in the
vbench package), ``work_dir`` (videos and results; default next to the samples, else
``~/.cache/orbitquant/vbench/<checksum>``), ``fps`` (16, Wan 2.1), ``device`` (``auto``: CUDA when there is one,
else CPU -- VBench's dimensions run on either; ``cuda`` makes CUDA a need), ``local`` (VBench's ``local``: CLIP and DINO
from VBench's cache too, instead of clip's and torch.hub's), ``cache_dir`` (VBench's checkpoint cache; default
``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench``, as VBench resolves it; passed to VBench as ``VBENCH_CACHE_DIR``),
``timeout`` (seconds).

Preflight (:meth:`VBenchMetric.needs`): VBench fetches each dimension's checkpoints on first use (``init_submodules``
in ``vbench/utils.py``, and a few dimension modules), so on an offline node a run would sample for hours and then fail
in scoring. :data:`CACHE_FILES` (and :data:`LOCAL_FILES`, :data:`CLIP_MODELS`, :data:`TORCH_HUB`, :data:`HF_FILES` for
the weights that come from other libraries' caches) list, per dimension, every file VBench reads and where it downloads
it from; each missing one is a need whose fix is the download. ``python -m orbitquant.metrics.vbench --fetch-commands``
prints those downloads for a connected machine (``scripts/setup_vbench_env.sh --fetch-checkpoints`` runs them).
The samples' fingerprint is recorded in the work folder (``orbitquant_samples.json``): videos and results of other
samples are never reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from ..atomic import atomic_write, atomic_write_json
from ..registry import register_metric
from ..samplestore import MP4_FPS
from ..types import MetricResult
from .base import Metric, SampleSource, work_dir
from .clip_score import sample_prompts
from .inception import default_feature_cache

#: the paper's eight dimensions (ORBITQUANT_SPEC Table B), in its column order
PAPER_DIMENSIONS = ("imaging_quality", "aesthetic_quality", "motion_smoothness", "dynamic_degree",
                    "background_consistency", "subject_consistency", "scene", "overall_consistency")
ALL_DIMENSIONS = PAPER_DIMENSIONS + ("temporal_flickering", "object_class", "multiple_objects", "human_action", "color",
                                     "spatial_relationship", "temporal_style", "appearance_style")
#: dimensions whose per-video values are already on VBench's 0..100 scale (MUSIQ); the others are fractions
PER_VIDEO_PERCENT = {"imaging_quality"}
REPO = Path(__file__).resolve().parents[2]
INDEX_FILE = "orbitquant_index.json"
STAMP_FILE = "orbitquant_samples.json"  # what the videos and results in a work folder were made from
SETUP_FIX = ("bash scripts/setup_vbench_env.sh (or point `python:` / $ORBITQUANT_VBENCH_PYTHON at an environment with "
             "vbench installed)")

# ---------------------------------------------------------------------------------------------- VBench's checkpoints
# Read from VBench 0.1.5 (the PyPI release scripts/setup_vbench_env.sh installs; github.com/Vchitect/VBench tag v0.1.5):
# vbench/utils.py (CACHE_DIR, init_submodules), aesthetic_quality.py (get_aesthetic_model), overall_consistency.py and
# temporal_style.py (the ViCLIP tokenizer), subject_consistency.py (torch.hub.load), background_consistency.py /
# appearance_style.py (clip.load), third_party/tag2Text/tag2text.py and third_party/grit_src (bert-base-uncased).
# URLs: those VBench's main branch uses now where 0.1.5's have moved (GRiT: no longer datarelease.blob.core.windows.net;
# the LAION head: raw.githubusercontent.com, not github.com/...?raw=true) -- the file lands on the same path.
_VBENCH_HF = "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/"
CLIP_URLS = {  # openai-clip's clip._MODELS; the path segment before the file name is its published sha256
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}
RAFT_ZIP = "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip"  # unzipped into raft_model/ (models/*.pth)
DINO_REPO = "https://github.com/facebookresearch/dino"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
_GRIT = (("grit_model/grit_b_densecap_objectdet.pth", _VBENCH_HF + "grit_b_densecap_objectdet.pth"),)
_VICLIP = (("ViCLIP/ViClip-InternVid-10M-FLT.pth", _VBENCH_HF + "ViClip-InternVid-10M-FLT.pth"),
           ("ViCLIP/bpe_simple_vocab_16e6.txt.gz",
            "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz"))
_CLIP_B32 = (("clip_model/ViT-B-32.pt", CLIP_URLS["ViT-B/32"]),)

#: dimension -> (path under VBench's cache, where VBench downloads it from) for every file it reads from its cache
#: (and downloads when it is missing), whatever ``local`` is. MUSIQ's ``-358bb6af`` looks like a torch.hub sha256
#: prefix, but neither VBench nor pyiqa checks it and no published digest confirms it, so no hash is checked for it.
CACHE_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "imaging_quality": (("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                         "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
                         "musiq_spaq_ckpt-358bb6af.pth"),),
    "aesthetic_quality": (("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                           "https://raw.githubusercontent.com/LAION-AI/aesthetic-predictor/main/"
                           "sa_0_4_vit_l_14_linear.pth"),),
    "motion_smoothness": (("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),),
    "dynamic_degree": (("raft_model/models/raft-things.pth", RAFT_ZIP),),
    "background_consistency": (),
    "subject_consistency": (),
    "scene": (("caption_model/tag2text_swin_14m.pth",
               "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth"),),
    "overall_consistency": _VICLIP,
    "temporal_flickering": (),
    "object_class": _GRIT,
    "multiple_objects": _GRIT,
    "human_action": (("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      _VBENCH_HF + "l16_ptk710_ftk710_ftk400_f16_res224.pth"),),
    "color": _GRIT,
    "spatial_relationship": _GRIT,
    "temporal_style": _VICLIP,
    "appearance_style": (),
}
#: ``local: true`` only: CLIP and DINO read from VBench's cache (git clone for DINO's code) instead of the libraries'
LOCAL_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "background_consistency": _CLIP_B32,
    "appearance_style": _CLIP_B32,
    "aesthetic_quality": (("clip_model/ViT-L-14.pt", CLIP_URLS["ViT-L/14"]),),
    "subject_consistency": (("dino_model/facebookresearch_dino_main/hubconf.py", DINO_REPO),
                            ("dino_model/dino_vitbase16_pretrain.pth", DINO_URL)),
}
#: ``local: false`` (the default): ``clip.load(name)`` -- openai-clip's ``~/.cache/clip/<file>``, checked against the
#: sha256 in its URL (clip re-downloads a file that does not match)
CLIP_MODELS = {"background_consistency": "ViT-B/32", "appearance_style": "ViT-B/32", "aesthetic_quality": "ViT-L/14"}
#: ``local: false``: ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')`` -- the repository in the hub dir
#: and the weights its hubconf fetches into ``<hub dir>/checkpoints``. With ``local: true`` VBench loads the clone in
#: its cache (source='local') and also passes ``path=`` its own copy of the weights, but dino's hubconf ignores that
#: keyword and still calls ``torch.hub.load_state_dict_from_url``: the hub-cache weights are needed in both modes.
TORCH_HUB = {"subject_consistency": ("facebookresearch_dino_main", "checkpoints/dino_vitbase16_pretrain.pth")}
#: Hugging Face hub files (both modes): Tag2Text builds ``BertModel.from_pretrained('bert-base-uncased')`` and its
#: tokenizer; GRiT's ROI heads load the tokenizer. Each entry is a tuple of alternatives (transformers takes
#: model.safetensors, else pytorch_model.bin).
_BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_FILES: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "scene": ("bert-base-uncased", (("vocab.txt",), _BERT_WEIGHTS)),
    **{d: ("bert-base-uncased", (("vocab.txt",),)) for d in ("object_class", "multiple_objects", "color",
                                                             "spatial_relationship")},
}
#: dimensions that build GRiT, which imports detectron2 (not a vbench dependency: VBench's README installs it apart)
DETECTRON2_DIMENSIONS = ("object_class", "multiple_objects", "color", "spatial_relationship")


def vbench_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where VBench reads its checkpoints: ``cache_dir``, else ``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench``
    (``vbench.utils.CACHE_DIR``)."""
    return Path(cache_dir or os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench").expanduser()


def clip_cache_dir() -> Path:
    """openai-clip's download root (``clip.load``'s default; no environment variable moves it)."""
    return Path("~/.cache/clip").expanduser()


def torch_hub_dir() -> Path:
    """torch.hub's directory: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "torch"
    return Path(home).expanduser() / "hub"


def hf_hub_cache() -> Path:
    """The hub cache transformers 4.33 reads: ``$TRANSFORMERS_CACHE``, ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``,
    ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub`` (first set wins)."""
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _clip_sha256(url: str) -> str:
    return url.rsplit("/", 2)[-2]


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


def download_command(cache: Path, rel: str, url: str) -> str:
    """The shell command that puts ``url`` at ``cache/rel`` as VBench would (``wget``; the RAFT zip is unzipped, the
    DINO repository cloned)."""
    target = cache / rel
    if url == RAFT_ZIP:
        d = cache / rel.split("/")[0]
        return f"mkdir -p {_q(d)} && wget {url} -P {_q(d)} && unzip -o -d {_q(d)} {_q(d / 'models.zip')} && rm " \
               f"{_q(d / 'models.zip')}"
    if url == DINO_REPO:
        return f"git clone {url} {_q(target.parent)}"
    return f"mkdir -p {_q(target.parent)} && wget {url} -O {_q(target)}"


def _hf_repo_dir(repo: str) -> Path:
    return hf_hub_cache() / f"models--{repo.replace('/', '--')}"


def _hf_snapshot(repo: str) -> Path | None:
    """The snapshot folder huggingface_hub resolves offline for ``repo`` at ``main`` (``refs/main``), if any."""
    root = _hf_repo_dir(repo)
    try:
        commit = (root / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return root / "snapshots" / commit


def checkpoint_needs(dimensions: list[str] | tuple[str, ...], cache_dir: str | Path | None = None, local: bool = False,
                     python: str | Path | None = None) -> list:
    """A ``preflight.Need`` for every checkpoint the ``dimensions`` read (each file once, naming the dimensions that
    read it); a missing one's fix is the download."""
    from ..preflight import Need, dir_need, file_need

    cache = vbench_cache_dir(cache_dir)
    py = _q(python or default_python())
    dims = [d for d in ALL_DIMENSIONS if d in dimensions]
    files: dict[str, tuple[str, list[str]]] = {}  # rel -> (url, dims)
    for d in dims:
        for rel, url in CACHE_FILES[d] + (LOCAL_FILES.get(d, ()) if local else ()):
            files.setdefault(rel, (url, []))[1].append(d)
    out = []
    for rel, (url, by) in files.items():
        what = f"VBench checkpoint for {', '.join(by)}"
        fix = download_command(cache, rel, url)
        if url == DINO_REPO:
            out.append(dir_need(what, cache / Path(rel).parent, fix, contains=[Path(rel).name]))
        else:
            sha = _clip_sha256(url) if url.startswith("https://openaipublic.") else None  # CLIP: digest in URL
            out.append(file_need(what, cache / rel, fix, sha256=sha))
    if not local:
        clips: dict[str, list[str]] = {}
        for d in dims:
            if d in CLIP_MODELS:
                clips.setdefault(CLIP_MODELS[d], []).append(d)
        for name, by in clips.items():
            url = CLIP_URLS[name]
            path = clip_cache_dir() / url.rsplit("/", 1)[-1]  # what clip.load downloads, and where
            fix = f"mkdir -p {_q(path.parent)} && wget {url} -O {_q(path)}"
            out.append(file_need(f"CLIP {name} (clip.load) for {', '.join(by)}", path, fix, sha256=_clip_sha256(url)))
    for d in dims:
        if d in TORCH_HUB:
            repo, weights = TORCH_HUB[d]
            fix = f"{py} -c \"import torch; torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')\""
            if not local:
                out.append(dir_need(f"DINO code (torch.hub) for {d}", torch_hub_dir() / repo, fix,
                                    contains=["hubconf.py"]))
            else:  # the cloned hubconf ignores VBench's `path` and fetches the same weights into torch.hub's cache
                fix = f"mkdir -p {_q(torch_hub_dir() / 'checkpoints')} && wget {DINO_URL} -O " \
                      f"{_q(torch_hub_dir() / weights)}"
            out.append(file_need(f"DINO ViT-B/16 weights (torch.hub) for {d}", torch_hub_dir() / weights, fix))
    hf: dict[str, tuple[list[tuple[str, ...]], list[str]]] = {}
    for d in dims:
        if d in HF_FILES:
            repo, alts = HF_FILES[d]
            want, by = hf.setdefault(repo, ([], []))
            want.extend(a for a in alts if a not in want)
            by.append(d)
    for repo, (want, by) in hf.items():
        weights = any(a == _BERT_WEIGHTS for a in want)
        fix = (f"{py} -c \"from transformers import BertModel, BertTokenizer; BertTokenizer.from_pretrained('{repo}')"
               + (f"; BertModel.from_pretrained('{repo}')" if weights else "") + '"')
        what = f"{repo} {'tokenizer and weights' if weights else 'tokenizer'} (Hugging Face cache) for {', '.join(by)}"
        snap = _hf_snapshot(repo)
        where = str(snap or _hf_repo_dir(repo))
        if snap is None:
            out.append(Need(what, where, False, fix, "not in the cache (no refs/main)"))
            continue
        absent = [" or ".join(a) for a in want if not any((snap / f).is_file() for f in a)]
        out.append(Need(what, where, not absent, fix, f"lacks {', '.join(absent)}" if absent else ""))
    return out


def fetch_commands(dimensions: list[str] | tuple[str, ...], cache_dir: str | Path | None = None, local: bool = False,
                   python: str | Path | None = None, everything: bool = False) -> list[str]:
    """The download commands of the checkpoints ``dimensions`` need -- only the missing ones unless ``everything``."""
    cmds = []
    for n in checkpoint_needs(dimensions, cache_dir, local, python):
        if (everything or not n.ok) and n.fix not in cmds:
            cmds.append(n.fix)
    return cmds

DRIVER = r"""
import json, os, sys
import torch, vbench
from vbench import VBench
a = json.loads(sys.argv[1])
full = a["full_info"] or os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
dev = a["device"] if a["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
VBench(torch.device(dev), full, a["output"]).evaluate(videos_path=a["videos"], name=a["name"],
    dimension_list=a["dimensions"], local=a["local"], mode=a["mode"])
"""


def video_name(prompt: str, i: int) -> str:
    if "/" in prompt or "\0" in prompt:
        raise ValueError(f"prompt {prompt!r} cannot be a VBench file name ({{prompt}}-{{i}}.mp4)")
    return f"{prompt}-{i}.mp4"


def write_videos(samples: SampleSource, out_dir: str | Path, fps: int = 16) -> dict[str, int]:
    """Write every video as ``{prompt}-{i}.mp4`` (i counts the samples of a prompt) and ``orbitquant_index.json``
    (file name -> sample index). Existing files are kept (a re-score rewrites nothing, and reads no video when
    every file is there); the others are written one video at a time as they are read."""
    from ..viz import save_mp4

    if _first_ndim(samples) != 5:
        raise ValueError("VBench scores videos (N, F, C, H, W); these samples are images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, seen, names = {}, {}, []
    for k, prompt in enumerate(sample_prompts(samples)):
        i = seen[prompt] = seen.get(prompt, -1) + 1
        names.append(video_name(prompt, i))
        index[names[-1]] = k
    if not all((out / name).exists() for name in names) and getattr(samples, "fmt", None) == "mp4" and fps == MP4_FPS:
        for name, data in zip(names, samples.encoded()):  # the stored file is what save_mp4 would write: copy it
            if not (out / name).exists():
                atomic_write(out / name, lambda f, b=data: f.write(b))
    if not all((out / name).exists() for name in names):
        k = 0
        for x, _ in samples.batches(1):  # one video (F frames) in memory at a time
            for clip in x:
                if not (out / names[k]).exists() and save_mp4(clip, out / names[k], fps=fps) is None:
                    raise ModuleNotFoundError("writing mp4 needs imageio and imageio-ffmpeg (pip install -e "
                                              "'.[video]')")
                k += 1
    (out / INDEX_FILE).write_text(json.dumps(index, indent=0))
    return index


def _first_ndim(samples: SampleSource) -> int:
    """The first sample's batch rank (5 for videos), checked before anything is written."""
    for x, _ in samples.batches(1, uint8=True):
        return x.ndim
    return 0


def default_python() -> Path:
    env = os.environ.get("ORBITQUANT_VBENCH_PYTHON")
    return Path(env) if env else REPO / ".venv-vbench" / "bin" / "python"


def run_vbench(videos: str | Path, output: str | Path, dimensions: list[str], python: str | Path | None = None,
               name: str = "orbitquant", mode: str = "vbench_standard", full_info: str | None = None,
               device: str = "auto", local: bool = False, timeout: float | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """Run VBench's evaluation in its environment (its checkpoint cache: ``cache_dir``, see :func:`vbench_cache_dir`);
    returns ``<output>/<name>_eval_results.json``."""
    py = Path(python) if python else default_python()
    args = {"videos": str(Path(videos).resolve()), "output": str(Path(output).resolve()), "name": name,
            "dimensions": list(dimensions), "mode": mode, "full_info": full_info, "device": device, "local": local}
    env = {**os.environ, "VBENCH_CACHE_DIR": str(vbench_cache_dir(cache_dir))}
    p = subprocess.run([str(py), "-c", DRIVER, json.dumps(args)], capture_output=True, text=True, timeout=timeout,
                       check=False, env=env)
    result = Path(output) / f"{name}_eval_results.json"
    if p.returncode != 0 or not result.exists():
        tail = (p.stderr or p.stdout)[-3000:]
        raise RuntimeError(f"VBench ({py}) failed with exit code {p.returncode}; its output ends with:\n{tail}")
    return result


def parse_results(path: str | Path, index: dict[str, int] | None = None, n: int | None = None) -> dict[str, dict]:
    """VBench's results JSON -> ``{dimension: {"score": percent, "per_video": {file name: percent}, "per_sample":
    [percent or None] * n}}`` (``index``: file name -> sample index, as written by :func:`write_videos`)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for dim, entry in data.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise ValueError(f"{path}: dimension {dim!r} is not [score, [per-video results]]")
        score, videos = entry
        scale = 1.0 if dim in PER_VIDEO_PERCENT else 100.0
        per_video = {}
        for v in videos:
            val = v["video_results"]
            per_video[os.path.basename(v["video_path"])] = None if val is None else float(val) * scale
        per_sample = None
        if index is not None:
            per_sample = [None] * (n if n is not None else (max(index.values()) + 1 if index else 0))
            for fname, val in per_video.items():
                if fname in index:
                    per_sample[index[fname]] = val
        out[dim] = {"score": float(score) * 100.0, "per_video": per_video, "per_sample": per_sample}
    return out


class VBenchContext:
    """One VBench run per sample set, shared by all the VBench metrics of a run."""

    def __init__(self) -> None:
        self._runs: dict[tuple, dict[str, dict]] = {}

    def results(self, metric: VBenchMetric, samples: SampleSource) -> dict[str, dict]:
        key = (samples.fingerprint(), tuple(metric.dimensions))
        if key not in self._runs:
            self._runs[key] = metric.evaluate(samples)
        return self._runs[key]


class VBenchMetric(Metric):
    context_cls = VBenchContext
    higher_is_better = True
    dimension: str

    def __init__(self, python: str | None = None, dimensions: list[str] | None = None, mode: str = "vbench_standard",
                 full_info: str | None = None, work_dir: str | None = None, fps: int = 16, device: str = "auto",
                 local: bool = False, timeout: float | None = None, cache_dir: str | None = None) -> None:
        self.python = Path(python) if python else default_python()
        self.dimensions = list(dimensions or PAPER_DIMENSIONS)
        if self.dimension not in self.dimensions:
            self.dimensions.append(self.dimension)
        unknown = sorted(set(self.dimensions) - set(ALL_DIMENSIONS))
        if unknown:
            raise ValueError(f"unknown VBench dimension(s) {unknown}; valid: {', '.join(ALL_DIMENSIONS)}")
        self.mode, self.full_info, self.work_dir, self.fps = mode, full_info, work_dir, fps
        self.device, self.local, self.timeout = device, local, timeout
        self.cache_dir = vbench_cache_dir(cache_dir)

    def needs(self) -> list:
        """The vbench environment and package (detectron2 for GRiT's dimensions; CUDA only with ``device: cuda`` --
        VBench's dimensions run on CPU too), the full-info file when given, and every checkpoint the requested
        dimensions read (:func:`checkpoint_needs`)."""
        from ..preflight import file_need

        out = [file_need("VBench environment's python", self.python, SETUP_FIX)]
        if self.python.exists():
            out.append(_env_need("vbench package", "vbench", SETUP_FIX, self.python))
            grit = [d for d in self.dimensions if d in DETECTRON2_DIMENSIONS]
            if grit:
                out.append(_env_need(f"detectron2 (GRiT) for {', '.join(grit)}", "detectron2",
                                     f"{_q(self.python)} -m pip install 'git+https://github.com/facebookresearch/"
                                     "detectron2.git' (VBench's README)", self.python))
            if str(self.device).startswith("cuda"):
                out.append(_env_need("CUDA in the VBench environment (device: cuda)", None,
                                     "run on a node with a CUDA GPU, or device: auto", self.python))
        if self.full_info is not None:
            out.append(file_need("VBench full-info file", self.full_info,
                                 "leave `full_info` unset (the VBench_full_info.json in the vbench package) or point "
                                 "it at an existing file"))
        out += checkpoint_needs(self.dimensions, self.cache_dir, self.local, self.python)
        return out

    def folder(self, samples: SampleSource) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return work_dir(samples, "vbench") or default_feature_cache().parent / "vbench" / samples.fingerprint()[:16]

    def stamp(self, samples: SampleSource) -> dict:
        """What the videos and results of a work folder are made from: the sample values and prompts, and the
        options that change the videos (fps) or the scores (mode, full_info)."""
        prompts = hashlib.sha256("\n".join(sample_prompts(samples)).encode()).hexdigest()
        return {"fingerprint": samples.fingerprint(), "prompts": prompts, "fps": self.fps, "mode": self.mode,
                "full_info": self.full_info}

    def evaluate(self, samples: SampleSource) -> dict[str, dict]:
        work = self.folder(samples)
        stamp = self.stamp(samples)
        if _read_json(work / STAMP_FILE) != stamp:  # another sample set's (or an unstamped) folder: start over
            (work / STAMP_FILE).unlink(missing_ok=True)  # first, so an interrupted redo never looks finished
            shutil.rmtree(work / "videos", ignore_errors=True)
            shutil.rmtree(work / "results", ignore_errors=True)
        index = write_videos(samples, work / "videos", fps=self.fps)
        result = work / "results" / "orbitquant_eval_results.json"
        done = _read_json(result) if result.exists() else {}
        if not set(self.dimensions) <= set(done or {}):  # a re-score of the same samples reuses VBench's results
            result = run_vbench(work / "videos", work / "results", self.dimensions, self.python, mode=self.mode,
                                full_info=self.full_info, device=self.device, local=self.local, timeout=self.timeout,
                                cache_dir=self.cache_dir)
        atomic_write_json(work / STAMP_FILE, stamp)
        return parse_results(result, index, len(samples))

    def compute(self, samples: SampleSource, reference, ctx: VBenchContext) -> MetricResult:
        res = ctx.results(self, samples)
        if self.dimension not in res:
            raise RuntimeError(f"VBench returned no {self.dimension!r} (has {', '.join(res)})")
        r = res[self.dimension]
        scored = [v for v in r["per_sample"] if v is not None]
        return self.result(r["score"], len(scored), dimension=self.dimension, per_sample=r["per_sample"])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=256)
def _probe_once(what: str, module: str | None, fix: str, python: str, stamp: tuple):
    from ..preflight import cuda_need, module_need

    return module_need(what, module, fix, python=python) if module else cuda_need(what, python=python, fix=fix)


def _env_need(what: str, module: str | None, fix: str, python: Path):
    """``module_need`` (``module=None``: ``cuda_need``) in the environment of ``python``, probed once per process for
    an unchanged interpreter: the VBench metrics of a run share one environment, and each declares it."""
    try:
        st = python.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = ()
    return _probe_once(what, module, fix, str(python), stamp)


def main(argv: list[str] | None = None) -> int:
    """``python -m orbitquant.metrics.vbench --fetch-commands``: print the download command of every checkpoint the
    dimensions need that is not in the cache (one shell command a line; pipe to ``bash -e`` on a connected machine)."""
    ap = argparse.ArgumentParser(prog="python -m orbitquant.metrics.vbench", description=main.__doc__)
    ap.add_argument("--fetch-commands", action="store_true", required=True)
    ap.add_argument("--dimensions", default="paper",
                    help="'paper' (the eight of the paper), 'all', or a comma-separated list")
    ap.add_argument("--cache-dir", default=None,
                    help="VBench's cache (default $VBENCH_CACHE_DIR, else ~/.cache/vbench)")
    ap.add_argument("--local", action="store_true",
                    help="also CLIP/DINO into VBench's cache (the metrics' local: true)")
    ap.add_argument("--python", default=None, help="the vbench environment's python (for the torch.hub / transformers "
                                                   "downloads; default $ORBITQUANT_VBENCH_PYTHON or .venv-vbench)")
    ap.add_argument("--all", action="store_true", help="print present files' commands too")
    a = ap.parse_args(argv)
    dims = {"paper": list(PAPER_DIMENSIONS), "all": list(ALL_DIMENSIONS)}.get(
        a.dimensions, [d.strip() for d in a.dimensions.split(",") if d.strip()])
    unknown = sorted(set(dims) - set(ALL_DIMENSIONS))
    if unknown:
        ap.error(f"unknown VBench dimension(s) {unknown}; valid: {', '.join(ALL_DIMENSIONS)}")
    for cmd in fetch_commands(dims, a.cache_dir, a.local, a.python, everything=a.all):
        print(cmd)
    return 0


def _register(dim: str) -> None:
    name = f"vbench_{dim}"
    cls = type(f"VBench_{dim}", (VBenchMetric,), {"name": name, "dimension": dim,
                                                  "__doc__": f"VBench {dim.replace('_', ' ')} (percent)."})
    register_metric(name)(cls)


if __name__ == "__main__":  # the CLI: the package import above registered the metrics already
    from orbitquant.metrics import vbench as _module

    sys.exit(_module.main())
for _dim in ALL_DIMENSIONS:
    _register(_dim)
