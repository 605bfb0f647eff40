"""VBench's checkpoints: what each dimension reads, where, and the command that downloads it.

VBench fetches each dimension's checkpoints on first use (``init_submodules`` in ``vbench/utils.py`` and a few
dimension modules), so on an offline node a run would sample for hours and then fail in scoring. The tables below
list, per dimension, every file VBench reads and where it downloads it from; :func:`checkpoint_needs` turns them into
preflight items (``VBenchMetric.needs``), :func:`fetch_commands` into downloads for a connected machine:

    python -m orbitquant.harness.metrics.vbench_assets --fetch-commands [--dimensions paper|all|a,b] | bash -e

(``scripts/setup_vbench_env.sh --fetch-checkpoints`` runs them). Written by hand: VBench offers no way to list or
fetch its checkpoints without running its evaluators.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# openai-clip's clip._MODELS; the path segment before the file is its sha256
from orbitquant.harness.metrics.clip_score import CLIP_URLS, url_sha256
from orbitquant.harness.paths import REPO

#: the paper's eight dimensions (ORBITQUANT_SPEC Table B), in its column order
PAPER_DIMENSIONS = ("imaging_quality", "aesthetic_quality", "motion_smoothness", "dynamic_degree",
                    "background_consistency", "subject_consistency", "scene", "overall_consistency")
ALL_DIMENSIONS = PAPER_DIMENSIONS + ("temporal_flickering", "object_class", "multiple_objects", "human_action", "color",
                                     "spatial_relationship", "temporal_style", "appearance_style")
# ---------------------------------------------------------------------------------------------- VBench's checkpoints
# Read from VBench 0.1.5 (the PyPI release scripts/setup_vbench_env.sh installs; github.com/Vchitect/VBench tag v0.1.5):
# vbench/utils.py (CACHE_DIR, init_submodules), aesthetic_quality.py (get_aesthetic_model), overall_consistency.py and
# temporal_style.py (the ViCLIP tokenizer), subject_consistency.py (torch.hub.load), background_consistency.py /
# appearance_style.py (clip.load), third_party/tag2Text/tag2text.py and third_party/grit_src (bert-base-uncased).
# URLs: those VBench's main branch uses now where 0.1.5's have moved (GRiT: no longer datarelease.blob.core.windows.net;
# the LAION head: raw.githubusercontent.com, not github.com/...?raw=true) -- the file lands on the same path.
_VBENCH_HF = "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/"
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
    from orbitquant.harness.preflight import Need, dir_need, file_need

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
            sha = url_sha256(url) if url.startswith("https://openaipublic.") else None  # CLIP: digest in URL
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
            out.append(file_need(f"CLIP {name} (clip.load) for {', '.join(by)}", path, fix, sha256=url_sha256(url)))
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


def default_python() -> Path:
    """The vbench environment's interpreter: ``$ORBITQUANT_VBENCH_PYTHON``, else ``.venv-vbench`` in the repository
    (``scripts/setup_vbench_env.sh`` creates it)."""
    env = os.environ.get("ORBITQUANT_VBENCH_PYTHON")
    return Path(env) if env else REPO / ".venv-vbench" / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    """``python -m orbitquant.harness.metrics.vbench_assets --fetch-commands``: print the download command of every
    checkpoint the dimensions need that is not in the cache (one shell command a line; pipe to ``bash -e`` on a
    connected machine)."""
    ap = argparse.ArgumentParser(prog="python -m orbitquant.harness.metrics.vbench_assets", description=main.__doc__)
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



if __name__ == "__main__":
    sys.exit(main())
