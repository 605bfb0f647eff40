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
``~/.cache/orbitquant/vbench/<checksum>``), ``fps`` (16, Wan 2.1), ``device``, ``local`` (load VBench's checkpoints
from ``~/.cache/vbench`` instead of downloading), ``timeout`` (seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..atomic import atomic_write
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
               device: str = "auto", local: bool = False, timeout: float | None = None) -> Path:
    """Run VBench's evaluation in its environment; returns ``<output>/<name>_eval_results.json``."""
    py = Path(python) if python else default_python()
    args = {"videos": str(Path(videos).resolve()), "output": str(Path(output).resolve()), "name": name,
            "dimensions": list(dimensions), "mode": mode, "full_info": full_info, "device": device, "local": local}
    p = subprocess.run([str(py), "-c", DRIVER, json.dumps(args)], capture_output=True, text=True, timeout=timeout,
                       check=False)
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
                 local: bool = False, timeout: float | None = None) -> None:
        self.python = Path(python) if python else default_python()
        self.dimensions = list(dimensions or PAPER_DIMENSIONS)
        if self.dimension not in self.dimensions:
            self.dimensions.append(self.dimension)
        unknown = sorted(set(self.dimensions) - set(ALL_DIMENSIONS))
        if unknown:
            raise ValueError(f"unknown VBench dimension(s) {unknown}; valid: {', '.join(ALL_DIMENSIONS)}")
        self.mode, self.full_info, self.work_dir, self.fps = mode, full_info, work_dir, fps
        self.device, self.local, self.timeout = device, local, timeout

    def check(self) -> None:
        if not self.python.exists():
            raise FileNotFoundError(f"metric {self.name}: the VBench environment's python {self.python} does not exist; "
                                    "create it with `bash scripts/setup_vbench_env.sh` (or point `python:` / "
                                    "$ORBITQUANT_VBENCH_PYTHON at one with vbench installed)")
        code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vbench') is None)"
        probe = subprocess.run([str(self.python), "-c", code], capture_output=True, timeout=120, check=False)
        if probe.returncode != 0:
            raise FileNotFoundError(f"metric {self.name}: {self.python} has no vbench package; run "
                                    "`bash scripts/setup_vbench_env.sh`")
        if self.full_info is not None and not Path(self.full_info).is_file():
            raise FileNotFoundError(f"metric {self.name}: VBench full-info file {self.full_info} not found")

    def folder(self, samples: SampleSource) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return work_dir(samples, "vbench") or default_feature_cache().parent / "vbench" / samples.fingerprint()[:16]

    def evaluate(self, samples: SampleSource) -> dict[str, dict]:
        work = self.folder(samples)
        index = write_videos(samples, work / "videos", fps=self.fps)
        result = work / "results" / "orbitquant_eval_results.json"
        done = json.loads(result.read_text()) if result.exists() else {}
        if not set(self.dimensions) <= set(done):  # a re-score reuses VBench's results
            result = run_vbench(work / "videos", work / "results", self.dimensions, self.python, mode=self.mode,
                                full_info=self.full_info, device=self.device, local=self.local, timeout=self.timeout)
        return parse_results(result, index, len(samples))

    def compute(self, samples: SampleSource, reference, ctx: VBenchContext) -> MetricResult:
        res = ctx.results(self, samples)
        if self.dimension not in res:
            raise RuntimeError(f"VBench returned no {self.dimension!r} (has {', '.join(res)})")
        r = res[self.dimension]
        scored = [v for v in r["per_sample"] if v is not None]
        return self.result(r["score"], len(scored), dimension=self.dimension, per_sample=r["per_sample"])


def _register(dim: str) -> None:
    name = f"vbench_{dim}"
    cls = type(f"VBench_{dim}", (VBenchMetric,), {"name": name, "dimension": dim,
                                                  "__doc__": f"VBench {dim.replace('_', ' ')} (percent)."})
    register_metric(name)(cls)


for _dim in ALL_DIMENSIONS:
    _register(_dim)
