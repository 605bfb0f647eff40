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
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..registry import register_metric
from ..types import MetricResult
from .base import Metric, SampleSource, work_dir
from .clip_score import sample_prompts
from .features import to_uint8
from .inception import default_feature_cache

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
INDEX_FILE = "orbitquant_index.json"


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

    def check(self) -> None:
        need = {"geneval_dir (or $ORBITQUANT_GENEVAL_DIR): a checkout of https://github.com/djghosh13/geneval":
                self.geneval_dir,
                "python (or $ORBITQUANT_GENEVAL_PYTHON): the interpreter of GenEval's environment (mmdet, open_clip)":
                self.python,
                "detector_dir (or $ORBITQUANT_GENEVAL_DETECTOR): the folder GenEval's evaluation/download_models.sh "
                "fills (Mask2Former)": self.detector_dir}
        for what, path in need.items():
            if path is None or not path.exists():
                raise FileNotFoundError(f"metric {self.name}: {what} -- {'not set' if path is None else f'{path} missing'}")
        for f in (self.geneval_dir / "evaluation" / "evaluate_images.py", self.metadata):
            if not f.is_file():
                raise FileNotFoundError(f"metric {self.name}: {f} not found (is {self.geneval_dir} a GenEval checkout?)")

    def folder(self, samples: SampleSource) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        return work_dir(samples, "geneval") or default_feature_cache().parent / "geneval" / samples.fingerprint()[:16]

    def evaluate(self, samples: SampleSource) -> dict[str, dict]:
        work = self.folder(samples)
        result = work / "results.jsonl"
        index_path = work / "images" / INDEX_FILE
        if result.exists() and index_path.exists():  # a re-score reuses GenEval's results
            index = json.loads(index_path.read_text())
        else:
            index = write_geneval(samples, work / "images", load_metadata(self.metadata))
            cmd = [str(self.python), str(self.geneval_dir / "evaluation" / "evaluate_images.py"), str(work / "images"),
                   "--outfile", str(result), "--model-path", str(self.detector_dir)]
            p = subprocess.run(cmd, cwd=self.geneval_dir, capture_output=True, text=True, timeout=self.timeout,
                               check=False)
            if p.returncode != 0 or not result.exists():
                raise RuntimeError(f"GenEval evaluator failed (exit {p.returncode}); its output ends with:\n"
                                   f"{(p.stderr or p.stdout)[-3000:]}")
        return parse_results(result, index, len(samples))

    def compute(self, samples: SampleSource, reference, ctx: GenEvalContext) -> MetricResult:
        res = ctx.results(self, samples)
        if self.tag not in res:
            raise RuntimeError(f"GenEval results have no {self.tag!r} images (have {', '.join(res)})")
        r = res[self.tag]
        return self.result(r["score"], r["n"], per_sample=r["per_sample"])


for _tag in (*TAGS, "overall"):
    register_metric(f"geneval_{_tag}")(type(f"GenEval_{_tag}", (GenEvalMetric,), {
        "name": f"geneval_{_tag}", "tag": _tag,
        "__doc__": f"GenEval {_tag.replace('_', ' ')}: fraction of images judged correct (0..1)."}))
