"""GenEval (Ghosh et al. 2023): object-focused compositional alignment -- single object, two objects, counting, colors,
position, color attribution, and their mean ("overall", avg. over tasks as ``summary_scores.py``).

GenEval's evaluator (Mask2Former via mmdetection, plus CLIP for colours) runs in its own environment from its
repository checkout. The harness writes the samples in GenEval's layout -- ``<dir>/<prompt index:05d>/metadata.jsonl``
(that prompt's line of ``prompts/evaluation_metadata.jsonl``) and ``<dir>/<prompt index:05d>/samples/<i:04d>.png`` --
calls ``evaluation/evaluate_images.py`` by path, and parses its ``results.jsonl`` (one line per image: ``filename``,
``tag``, ``correct``, ...).

Options: ``geneval_dir`` (the GenEval checkout; default ``$ORBITQUANT_GENEVAL_DIR``), ``python`` (its environment's
interpreter; default ``$ORBITQUANT_GENEVAL_PYTHON``), ``detector_dir`` (``--model-path``: the folder with the
Mask2Former checkpoint GenEval's ``download_models.sh`` fetches; default ``$ORBITQUANT_GENEVAL_DETECTOR``),
``metadata`` (default ``<geneval_dir>/prompts/evaluation_metadata.jsonl``), ``work_dir``, ``timeout``.

Preflight (:meth:`GenEvalMetric.needs`), from GenEval's ``evaluation/evaluate_images.py``, ``download_models.sh``,
``environment.yml`` and README (github.com/djghosh13/geneval): the checkout (evaluator, ``object_names.txt``, metadata),
the environment's python and the packages the evaluator imports (mmdet + mmcv, open_clip, clip_benchmark, pandas),
mmdetection's Mask2Former config where the evaluator looks it up (``<mmdet package>/../configs/mask2former/...``:
a source install of mmdetection 2.x, as GenEval's README does), the Mask2Former checkpoint in ``detector_dir`` (its
OpenMMLab sha256 prefix checked), the open_clip ViT-L-14 ``openai`` weights where open_clip finds them, and CUDA in
that environment (the evaluator asserts it). The samples' fingerprint is recorded in the work folder
(``orbitquant_samples.json``): results of other samples are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from orbitquant.harness.metrics.base import Metric, SampleSource, work_dir
from orbitquant.harness.metrics.clip_score import sample_prompts
from orbitquant.harness.metrics.features import to_uint8
from orbitquant.harness.metrics.inception import default_feature_cache
from orbitquant.harness.types import MetricResult
from orbitquant.quant.atomic import atomic_write_json
from orbitquant.quant.registry import register_metric

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
INDEX_FILE = "orbitquant_index.json"
STAMP_FILE = "orbitquant_samples.json"  # what the images and results in a work folder were made from
REPO_URL = "https://github.com/djghosh13/geneval"

# What evaluation/evaluate_images.py loads (djghosh13/geneval at af4902f, 2025-03): the detector ``--options
# model=`` default and its checkpoint ``<--model-path>/<model>.pth``; the config it builds from ``mmdet.__file__``;
# the CLIP model of its colour classifier (``--options clip_model=`` default, pretrained="openai").
DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
DETECTOR_CONFIG = f"configs/mask2former/{DETECTOR}.py"  # relative to the folder above the mmdet package
#: evaluation/download_models.sh downloads this and saves it as ``<folder>/<DETECTOR>.pth``
DETECTOR_URL = ("https://download.openmmlab.com/mmdetection/v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_"
                "coco/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth")
#: OpenMMLab names published checkpoints ``<name>-<sha256[:8]>.pth`` (mmdetection tools/model_converters/
#: publish_model.py); the evaluator itself checks no hash
DETECTOR_SHA256_PREFIX = "743b7d99"
CLIP_ARCH, CLIP_PRETRAINED = "ViT-L-14", "openai"
#: the evaluator's imports that its environment must provide (mmcv: mmdet imports it), with the install GenEval uses
PACKAGES = (
    ("mmdet", "git clone https://github.com/open-mmlab/mmdetection.git && cd mmdetection && git checkout 2.x && "
              "{py} -m pip install -v -e .  (GenEval's README; a source install also provides configs/)"),
    ("mmcv", "{py} -m pip install mmcv-full==1.7.1  (GenEval's environment.yml)"),
    ("open_clip", "{py} -m pip install open-clip-torch==2.20.0  (GenEval's environment.yml)"),
    ("clip_benchmark", "{py} -m pip install clip-benchmark==1.4.0  (GenEval's environment.yml)"),
    ("pandas", "{py} -m pip install pandas"),
)
ENV_FIX = (f"create GenEval's environment: git clone {REPO_URL} && cd geneval && conda env create -f environment.yml, "
           "then point `python:` / $ORBITQUANT_GENEVAL_PYTHON at its bin/python")

#: Run in GenEval's environment: where the mmdet package is (found, not imported) and where open_clip keeps the
#: pretrained weights of ``argv[1]``/``argv[2]`` -- resolved by open_clip's own table the way its download_pretrained
#: does, without downloading: a URL (open_clip 2.20.0, GenEval's pin: ~/.cache/clip/<file>, the sha256 in an
#: openaipublic URL) wins over the Hugging Face hub entry (newer open_clip: the hub cache, via try_to_load_from_cache).
ENV_PROBE = r"""
import importlib.util, json, os, sys
out = {}
spec = importlib.util.find_spec("mmdet")
out["mmdet"] = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
try:
    from open_clip.pretrained import get_pretrained_cfg
    cfg = get_pretrained_cfg(sys.argv[1], sys.argv[2]) or {}
    url, hub = cfg.get("url", ""), cfg.get("hf_hub", "")
    if url:
        out["clip"] = {"path": os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)),
                       "sha256": url.split("/")[-2] if "openaipublic" in url else ""}
    elif hub:
        from huggingface_hub import try_to_load_from_cache
        repo, name = os.path.split(hub)
        names = [name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        hits = [try_to_load_from_cache(repo, n) for n in names]
        hits = [h for h in hits if isinstance(h, str)]
        out["clip"] = {"path": hits[0] if hits else None, "hub": repo + "/" + " or ".join(names)}
    else:
        out["clip"] = {"error": "open_clip has no pretrained weights %s/%s" % (sys.argv[1], sys.argv[2])}
except Exception as e:
    out["clip"] = {"error": "%s: %s" % (type(e).__name__, e)}
print(json.dumps(out))
"""


def load_metadata(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_geneval(samples: SampleSource, out_dir: str | Path, metadata: list[dict],
                  batch_size: int = 64) -> dict[str, int]:
    """Write the samples in GenEval's layout, ``batch_size`` images at a time; returns (and saves) image path
    relative to ``out_dir`` -> sample index. Each sample's prompt is matched to its metadata line by text (GenEval's
    generation prompts are the metadata's ``prompt`` fields, in order); every prompt is checked before any file is
    written."""
    from PIL import Image

    by_prompt = {m["prompt"]: (i, m) for i, m in enumerate(metadata)}
    out = Path(out_dir)
    index, seen, plan = {}, {}, []
    for k, prompt in enumerate(sample_prompts(samples)):
        if prompt not in by_prompt:
            raise ValueError(f"prompt {prompt!r} is not in GenEval's evaluation metadata; the geneval protocol must "
                             "sample GenEval's own prompts (prompts/generation_prompts.txt)")
        p, meta = by_prompt[prompt]
        j = seen[p] = seen.get(p, -1) + 1
        folder = out / f"{p:05d}"
        if j == 0:
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        rel = f"{p:05d}/samples/{j:04d}.png"
        plan.append(rel)
        index[rel] = k
    k = 0
    for x, _ in samples.batches(batch_size, uint8=True):
        for img in to_uint8(x).permute(0, 2, 3, 1).numpy():
            Image.fromarray(img).save(out / plan[k])
            k += 1
    (out / INDEX_FILE).write_text(json.dumps(index, indent=0))
    return index


def parse_results(path: str | Path, index: dict[str, int] | None = None, n: int | None = None) -> dict[str, dict]:
    """GenEval's results.jsonl -> ``{tag: {"score", "n", "per_sample"}}`` for the six tasks and ``overall`` (the mean
    of the task scores present; its per-sample values are every image's correctness)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no GenEval results")
    size = n if n is not None else (max(index.values()) + 1 if index else 0)

    def where(row) -> int | None:
        if index is None:
            return None
        fn = Path(row["filename"])
        return index.get(f"{fn.parent.parent.name}/{fn.parent.name}/{fn.name}")

    out: dict[str, dict] = {}
    all_per = [None] * size
    for tag in TAGS:
        tag_rows = [r for r in rows if r["tag"] == tag]
        if not tag_rows:
            continue
        per = [None] * size
        for r in tag_rows:
            k = where(r)
            if k is not None:
                per[k] = all_per[k] = float(bool(r["correct"]))
        out[tag] = {"score": sum(bool(r["correct"]) for r in tag_rows) / len(tag_rows), "n": len(tag_rows),
                    "per_sample": per if index is not None else None}
    unknown = {r["tag"] for r in rows} - set(TAGS)
    if unknown:
        raise ValueError(f"{path}: unknown GenEval tags {sorted(unknown)}")
    out["overall"] = {"score": sum(v["score"] for v in out.values()) / len(out), "n": len(rows),
                      "per_sample": all_per if index is not None else None}
    return out


class GenEvalContext:
    def __init__(self) -> None:
        self._runs: dict[tuple, dict] = {}

    def results(self, metric: GenEvalMetric, samples: SampleSource) -> dict[str, dict]:
        key = samples.fingerprint()  # one evaluator run per sample set, shared by the seven GenEval metrics
        if key not in self._runs:
            self._runs[key] = metric.evaluate(samples)
        return self._runs[key]


def _env_path(value: str | None, env: str) -> Path | None:
    v = value or os.environ.get(env)
    return Path(v).expanduser() if v else None


class GenEvalMetric(Metric):
    context_cls = GenEvalContext
    higher_is_better = True
    tag: str

    def __init__(self, geneval_dir: str | None = None, python: str | None = None, detector_dir: str | None = None,
                 metadata: str | None = None, work_dir: str | None = None, timeout: float | None = None) -> None:
        self.geneval_dir = _env_path(geneval_dir, "ORBITQUANT_GENEVAL_DIR")
        self.python = _env_path(python, "ORBITQUANT_GENEVAL_PYTHON")
        self.detector_dir = _env_path(detector_dir, "ORBITQUANT_GENEVAL_DETECTOR")
        self.metadata = Path(metadata) if metadata else (
            self.geneval_dir / "prompts" / "evaluation_metadata.jsonl" if self.geneval_dir else None)
        self.work_dir, self.timeout = work_dir, timeout

    def needs(self) -> list:
        """Everything the evaluator loads (see the module docstring); each missing item with its fix."""
        from orbitquant.harness.preflight import Need, dir_need, file_need

        out = [dir_need("GenEval checkout", self.geneval_dir, f"git clone {REPO_URL}",
                        contains=["evaluation/evaluate_images.py", "evaluation/object_names.txt"],
                        unset=f"geneval_dir (or $ORBITQUANT_GENEVAL_DIR): a checkout of {REPO_URL}"),
               file_need("GenEval evaluation metadata", self.metadata,
                         f"use a complete checkout of {REPO_URL} (prompts/evaluation_metadata.jsonl) or set "
                         "`metadata:`", unset="metadata (set geneval_dir)"),
               file_need(f"Mask2Former checkpoint {DETECTOR}.pth",
                         self.detector_dir / f"{DETECTOR}.pth" if self.detector_dir else None,
                         f"bash <geneval>/evaluation/download_models.sh {_q(self.detector_dir or '<folder>')}  (= wget "
                         f"{DETECTOR_URL} -O <folder>/{DETECTOR}.pth)", hash_prefix=DETECTOR_SHA256_PREFIX,
                         unset="detector_dir (or $ORBITQUANT_GENEVAL_DETECTOR): the folder GenEval's "
                               "evaluation/download_models.sh fills"),
               file_need("GenEval environment's python", self.python, ENV_FIX,
                         unset="python (or $ORBITQUANT_GENEVAL_PYTHON): the interpreter of GenEval's environment")]
        if self.python is None or not self.python.exists():
            return out  # the environment's contents are probed once it exists
        py = _q(self.python)
        out += [_env_need(f"{module} (GenEval's evaluator imports it)", module, fix.format(py=py), self.python)
                for module, fix in PACKAGES]
        probe = _env_probe(self.python)
        mmdet = probe.get("mmdet")
        config_fix = PACKAGES[0][1].format(py=py)
        if mmdet:
            out.append(file_need(f"mmdetection config {DETECTOR}.py (evaluate_images.py: <mmdet>/../configs)",
                                 Path(mmdet).parent / DETECTOR_CONFIG, config_fix))
        else:
            out.append(Need(f"mmdetection config {DETECTOR}.py (evaluate_images.py: <mmdet>/../configs)",
                            f"configs/ beside mmdet in {self.python}", False, config_fix, "mmdet is not installed"))
        clip = probe.get("clip") or {"error": probe.get("error", "the probe gave no answer")}
        what = f"open_clip {CLIP_ARCH} '{CLIP_PRETRAINED}' weights (colour classifier)"
        clip_fix = (f"{py} -c \"import open_clip; open_clip.create_model_and_transforms('{CLIP_ARCH}', "
                    f"pretrained='{CLIP_PRETRAINED}')\"")
        if "error" in clip:
            out.append(Need(what, f"open_clip in {self.python}", False, clip_fix, f"cannot locate: {clip['error']}"))
        elif clip.get("path") is None:
            out.append(Need(what, f"Hugging Face cache: {clip.get('hub')}", False, clip_fix, "not in the cache"))
        else:
            out.append(file_need(what, clip["path"], clip_fix, sha256=clip.get("sha256") or None))
        out.append(_env_need("CUDA in GenEval's environment (evaluate_images.py asserts DEVICE == 'cuda')", None,
                             "run on a node with a CUDA GPU (the evaluator cannot run on CPU)", self.python))
        return out

    def folder(self, samples: SampleSource) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return work_dir(samples, "geneval") or default_feature_cache().parent / "geneval" / samples.fingerprint()[:16]

    def stamp(self, samples: SampleSource) -> dict:
        """What a work folder's images and results are made from: the sample values and their prompts."""
        prompts = hashlib.sha256("\n".join(sample_prompts(samples)).encode()).hexdigest()
        return {"fingerprint": samples.fingerprint(), "prompts": prompts}

    def evaluate(self, samples: SampleSource) -> dict[str, dict]:
        work = self.folder(samples)
        result = work / "results.jsonl"
        index_path = work / "images" / INDEX_FILE
        stamp = self.stamp(samples)
        if _read_json(work / STAMP_FILE) == stamp and result.exists() and index_path.exists():
            index = json.loads(index_path.read_text())  # a re-score of the same samples reuses GenEval's results
        else:  # another sample set's (or an unstamped, or unfinished) folder: start over
            (work / STAMP_FILE).unlink(missing_ok=True)  # first, so an interrupted redo never looks finished
            result.unlink(missing_ok=True)
            shutil.rmtree(work / "images", ignore_errors=True)  # the evaluator scores every folder it finds
            index = write_geneval(samples, work / "images", load_metadata(self.metadata))
            cmd = [str(self.python), str(self.geneval_dir / "evaluation" / "evaluate_images.py"), str(work / "images"),
                   "--outfile", str(result), "--model-path", str(self.detector_dir)]
            p = subprocess.run(cmd, cwd=self.geneval_dir, capture_output=True, text=True, timeout=self.timeout,
                               check=False)
            if p.returncode != 0 or not result.exists():
                raise RuntimeError(f"GenEval evaluator failed (exit {p.returncode}); its output ends with:\n"
                                   f"{(p.stderr or p.stdout)[-3000:]}")
            atomic_write_json(work / STAMP_FILE, stamp)
        return parse_results(result, index, len(samples))

    def compute(self, samples: SampleSource, reference, ctx: GenEvalContext) -> MetricResult:
        res = ctx.results(self, samples)
        if self.tag not in res:
            raise RuntimeError(f"GenEval results have no {self.tag!r} images (have {', '.join(res)})")
        r = res[self.tag]
        return self.result(r["score"], r["n"], per_sample=r["per_sample"])


def _q(path) -> str:
    return shlex.quote(str(path))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _python_stamp(python: Path) -> tuple:
    try:
        st = python.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return ()


@lru_cache(maxsize=256)
def _probe_once(what: str, module: str | None, fix: str, python: str, stamp: tuple):
    from orbitquant.harness.preflight import cuda_need, module_need

    return module_need(what, module, fix, python=python) if module else cuda_need(what, python=python, fix=fix)


def _env_need(what: str, module: str | None, fix: str, python: Path):
    """``module_need`` (``module=None``: ``cuda_need``) in GenEval's environment, probed once per process for an
    unchanged interpreter: the seven GenEval metrics of a run share one environment, and each declares it (the CUDA
    probe imports torch there)."""
    return _probe_once(what, module, fix, str(python), _python_stamp(python))


@lru_cache(maxsize=32)
def _env_probe_once(python: str, stamp: tuple) -> dict:
    from orbitquant.harness.preflight import PROBE_TIMEOUT

    try:
        p = subprocess.run([python, "-c", ENV_PROBE, CLIP_ARCH, CLIP_PRETRAINED], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"probe failed: {e}"}
    lines = p.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": (p.stderr or p.stdout)[-300:]}
    except ValueError:
        return {"error": lines[-1][-300:]}


def _env_probe(python: Path) -> dict:
    """:data:`ENV_PROBE`'s answer from GenEval's environment (``{"error": ...}`` when it could not run)."""
    return _env_probe_once(str(python), _python_stamp(python))


for _tag in (*TAGS, "overall"):
    register_metric(f"geneval_{_tag}")(type(f"GenEval_{_tag}", (GenEvalMetric,), {
        "name": f"geneval_{_tag}", "tag": _tag,
        "__doc__": f"GenEval {_tag.replace('_', ' ')}: fraction of images judged correct (0..1)."}))
