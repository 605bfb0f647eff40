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

Preflight (:meth:`VBenchMetric.needs`): the environment, and every checkpoint the requested dimensions read
(``vbench_assets``: VBench downloads them on first use, which fails offline after hours of sampling). The samples'
fingerprint is recorded in the work folder (``orbitquant_samples.json``): videos and results of other samples are
never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from orbitquant.harness.metrics.base import Metric, SampleSource, work_dir
from orbitquant.harness.metrics.clip_score import sample_prompts
from orbitquant.harness.metrics.inception import default_feature_cache
from orbitquant.harness.metrics.vbench_assets import (  # noqa: F401 - re-exported: the dimension lists and tables live with the checkpoints
    ALL_DIMENSIONS,
    CACHE_FILES,
    CLIP_URLS,
    DETECTRON2_DIMENSIONS,
    PAPER_DIMENSIONS,
    _q,
    checkpoint_needs,
    default_python,
    fetch_commands,
    main,
    vbench_cache_dir,
)
from orbitquant.harness.samplestore import MP4_FPS
from orbitquant.harness.types import MetricResult
from orbitquant.quant.atomic import atomic_write, atomic_write_json
from orbitquant.quant.registry import register_metric

#: dimensions whose per-video values are already on VBench's 0..100 scale (MUSIQ); the others are fractions
PER_VIDEO_PERCENT = {"imaging_quality"}
INDEX_FILE = "orbitquant_index.json"
STAMP_FILE = "orbitquant_samples.json"  # what the videos and results in a work folder were made from
SETUP_FIX = ("bash scripts/setup_vbench_env.sh (or point `python:` / $ORBITQUANT_VBENCH_PYTHON at an environment with "
             "vbench installed)")

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
    from orbitquant.harness.viz import save_mp4

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
        from orbitquant.harness.preflight import file_need

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
    from orbitquant.harness.preflight import cuda_need, module_need

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


def _register(dim: str) -> None:
    name = f"vbench_{dim}"
    cls = type(f"VBench_{dim}", (VBenchMetric,), {"name": name, "dimension": dim,
                                                  "__doc__": f"VBench {dim.replace('_', ' ')} (percent)."})
    register_metric(name)(cls)


if __name__ == "__main__":  # the checkpoint CLI (orbitquant.harness.metrics.vbench_assets), under its older name too
    sys.exit(main())
for _dim in ALL_DIMENSIONS:
    _register(_dim)
