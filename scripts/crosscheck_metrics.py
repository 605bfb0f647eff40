"""Our Inception metrics next to the reference implementations, on the same samples: the agreement table.

On a GPU node with the real weights (each reference runs where it is installed; a row says why one did not):

    # ImageNet protocol (adm preprocessing): ours vs torch-fidelity and ADM's evaluator (its TF environment)
    python scripts/crosscheck_metrics.py --samples results/runs/dit_xl_2/fp/fp/imagenet/q0-s0/samples \\
        --reference data/VIRTUAL_imagenet256_labeled.npz --preprocess adm --split-size 5000 \\
        --adm-evaluator guided-diffusion/evaluations/evaluator.py --adm-python ~/envs/adm-tf/bin/python \\
        --out results/crosscheck/dit_imagenet.md
    # text-to-image protocol (clean preprocessing): ours vs clean-fid on the same folders
    python scripts/crosscheck_metrics.py --samples .../coco_fid_clip/q0-s0/samples --reference data/coco/val2014 \\
        --reference-files data/coco/val2014_5k.jsonl --preprocess clean --out results/crosscheck/coco.md

On any machine (the default test run does this, tests/test_crosscheck.py):

    python scripts/crosscheck_metrics.py --cpu --out results/crosscheck/cpu.md

``--cpu`` builds torch-fidelity's real InceptionV3 with seeded random weights (no download) and compares our whole
path -- samples in a store on disk, uint8 reads, batching, the feature cache, both preprocessings -- with the
reference arithmetic that runs here: torchmetrics' FID and IS, clean-fid's resize, ADM's Fréchet arithmetic (numpy
+ scipy ``sqrtm``) for sFID and ADM's k-NN manifolds (brute force) for precision/recall, on features the script
computes by calling torch-fidelity's network directly. Random weights make the numbers meaningless as quality and
exact as agreement.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("fid", "sfid", "isc", "precision", "recall")  # subset: the Inception metrics the ADM evaluator computes


@dataclass
class Row:
    """One comparison: our value, the reference implementation's, and the relative tolerance they must meet."""

    metric: str
    ours: float
    reference: str
    theirs: float | None = None
    tol: float = 1e-6
    note: str = ""

    @property
    def rel(self) -> float | None:
        if self.theirs is None:
            return None
        return abs(self.ours - self.theirs) / max(abs(self.theirs), 1e-12)

    @property
    def agree(self) -> bool | None:
        return None if self.rel is None else self.rel <= self.tol


def render(rows: list[Row], title: str, context: list[str]) -> str:
    """The agreement table (markdown)."""
    lines = [f"# {title}", "", *context, "",
             "| metric | ours | reference implementation | theirs | rel. diff | tolerance | agree |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = "not run" if r.theirs is None else f"{r.theirs:.6g}"
        rel = "" if r.rel is None else f"{r.rel:.1e}"
        verdict = {True: "yes", False: "**NO**", None: "-"}[r.agree]
        lines.append(f"| {r.metric} | {r.ours:.6g} | {r.reference}{f' ({r.note})' if r.note else ''} | {theirs} | "
                     f"{rel} | {r.tol:.0e} | {verdict} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- ours
def ours(samples, reference: str, *, preprocess: str, weights: str | None, names=METRICS, split_size: int = 5000,
         reference_files: str | None = None, cache_dir: str | None = None) -> dict[str, float]:
    """Our metrics through the harness's own path (``build_metrics`` -> ``compute``)."""
    from orbitquant.harness.factory import build_metrics, metric_contexts

    common = {"inception_weights": weights, "progress": False, "cache_dir": cache_dir, "preprocess": preprocess}
    spec = {}
    for name in names:
        opts = dict(common)
        if name == "isc":
            opts.update(split_size=split_size)
        else:
            opts.update(reference=reference, reference_files=reference_files)
        spec[name] = opts
    metrics = build_metrics(spec)
    ctx = metric_contexts(metrics)
    return {m.name: m.compute(samples, None, ctx.get(m.context_cls)).value for m in metrics}


# ---------------------------------------------------------------------------------------------- reference arithmetic
def adm_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """ADM's evaluator: ``np.cov`` statistics and scipy's ``sqrtm`` (real part)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ``ManifoldEstimator`` by brute force: a point is inside a set's manifold if it is within the k-th
    nearest-neighbour radius of some point of the set."""
    def d2(x, y):
        return ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)

    def radii(x):
        return np.sort(d2(x, x), axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    precision = float((d2(fake, real) <= r_real[None]).any(1).mean())
    recall = float((d2(real, fake) <= r_fake[None]).any(1).mean())
    return precision, recall


class _Given(torch.nn.Module):
    """A torchmetrics feature module that returns its input: the features are computed by the reference pass."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from orbitquant.harness.metrics.features import prepare_torch_fidelity

    prepare_torch_fidelity()
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def torchmetrics_is(logits: torch.Tensor) -> float:
    from torchmetrics.image.inception import InceptionScore

    score = InceptionScore(feature=_Given(logits.shape[1]), splits=1)
    score.update(logits)
    return float(score.compute()[0])


def reference_features(net, images_u8: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's network called directly on uint8 images (no harness code in between): pool3, the unbiased
    logits, and ADM's sFID features (first 7 channels of mixed_6/conv, NHWC) from a hook of our own here."""
    grabbed = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(
        lambda _m, _i, out: grabbed.__setitem__("spatial", out[:, :7].permute(0, 2, 3, 1).flatten(1)))
    with torch.no_grad():
        pool3, logits = net(images_u8)
    hook.remove()
    return {"pool3": pool3.double().numpy(), "logits": logits.double(), "spatial": grabbed["spatial"].double().numpy()}


# ---------------------------------------------------------------------------------------------- the CPU check
def _synthetic(n: int, size: int, seed: int, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + shift  # per-image colour, plus texture
    x = (base + 0.35 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def cpu_check(work: Path, n: int = 4, seed: int = 0, scipy_rows: bool = True) -> list[Row]:
    """Our full path vs the reference arithmetic on ``n`` synthetic samples and ``n`` references (see the module
    docstring). Needs torch-fidelity (and clean-fid for the clean row). ``scipy_rows``: also ADM's scipy ``sqrtm``
    arithmetic for FID and sFID (14 s each at 2048-d on a 2-core CPU; the test run leaves them out -- the arithmetic
    itself is compared with scipy in tests/test_metrics_inception.py)."""
    from PIL import Image

    from orbitquant.harness.metrics.features import import_torch_fidelity_inception, write_random_inception_weights
    from orbitquant.harness.samplestore import SampleSet, StoreWriter

    work.mkdir(parents=True, exist_ok=True)
    weights = write_random_inception_weights(work / "inception-random.pth", seed)
    fake_u8, real_u8 = _synthetic(n, 64, seed, 0.0), _synthetic(n, 80, seed + 1, 0.15)
    store = work / "samples"
    writer = StoreWriter(store, "crosscheck", n, "uint8", overwrite=True)
    for start in range(0, n, 2):  # several shards: the read path regroups them
        stop = min(n, start + 2)
        writer.write(start, stop, fake_u8[start:stop].float() / 127.5 - 1, list(range(start, stop)))
    writer.close()
    samples = SampleSet.open(store, n)
    np.savez(work / "ref_batch.npz", arr_0=real_u8.permute(0, 2, 3, 1).numpy())  # ADM layout, images only
    folder = work / "ref_images"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(real_u8.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:03d}.png")

    cache = str(work / "features")
    mine = ours(samples, str(work / "ref_batch.npz"), preprocess="adm", weights=str(weights), split_size=10 * n,
                cache_dir=cache)
    mine_clean = ours(samples, str(folder), preprocess="clean", weights=str(weights), names=("fid",), cache_dir=cache)

    net = import_torch_fidelity_inception()("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(weights)).eval()
    fake, real = reference_features(net, fake_u8), reference_features(net, real_u8)
    prec, rec = adm_precision_recall(real["pool3"], fake["pool3"])
    rows = [
        Row("fid", mine["fid"], "torchmetrics FrechetInceptionDistance", torchmetrics_fid(
            torch.from_numpy(real["pool3"]), torch.from_numpy(fake["pool3"])), 1e-6),
        Row("sfid", mine["sfid"], "torchmetrics FrechetInceptionDistance on mixed_6/conv[:7]", torchmetrics_fid(
            torch.from_numpy(real["spatial"]), torch.from_numpy(fake["spatial"])), 1e-6),
        Row("isc", mine["isc"], "torchmetrics InceptionScore (1 split)", torchmetrics_is(fake["logits"]), 1e-6),
        Row("precision", mine["precision"], "ADM ManifoldEstimator (brute force, k=3)", prec, 0.0),
        Row("recall", mine["recall"], "ADM ManifoldEstimator (brute force, k=3)", rec, 0.0),
    ]
    if scipy_rows:
        note = f"{n} points in 2048-d: sqrtm of a rank-{n - 1} product"
        rows += [Row("fid", mine["fid"], "ADM evaluator arithmetic (np.cov, scipy sqrtm)",
                     adm_frechet(real["pool3"], fake["pool3"]), 1e-4, note),
                 Row("sfid", mine["sfid"], "ADM evaluator arithmetic (np.cov, scipy sqrtm)",
                     adm_frechet(real["spatial"], fake["spatial"]), 1e-4)]
    try:
        from cleanfid.resize import make_resizer
    except ImportError:
        rows.append(Row("fid (clean)", mine_clean["fid"], "clean-fid resize + torchmetrics FID", None,
                        note="not run: clean-fid not installed (pip install --no-deps clean-fid)"))
        return rows
    resize = make_resizer("PIL", False, "bicubic", (299, 299))

    def clean(x_u8):  # clean-fid's resize, rounded for torch-fidelity's uint8 input; our crop is a no-op on squares
        arrs = [np.rint(resize(a)).astype(np.uint8) for a in x_u8.permute(0, 2, 3, 1).numpy()]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    cf, cr = reference_features(net, clean(fake_u8)), reference_features(net, clean(real_u8))
    rows.append(Row("fid (clean)", mine_clean["fid"], "clean-fid resize + torchmetrics FID", torchmetrics_fid(
        torch.from_numpy(cr["pool3"]), torch.from_numpy(cf["pool3"])), 1e-6))
    return rows


# ---------------------------------------------------------------------------------------------- real runs
def export_folder(samples, folder: Path) -> Path:
    """The samples as PNGs (what torch-fidelity and clean-fid read), one batch in memory at a time."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for x, _ in samples.batches(16, uint8=True):
        for im in x.permute(0, 2, 3, 1).numpy():
            Image.fromarray(im).save(folder / f"{k:06d}.png")
            k += 1
    return folder


def export_adm_batch(samples, path: Path) -> Path:
    """The samples as ADM's evaluator reads them: ``arr_0``, uint8 NHWC (the whole set in memory, as ADM needs)."""
    parts = [x.permute(0, 2, 3, 1).numpy() for x, _ in samples.batches(64, uint8=True)]
    np.savez(path, arr_0=np.concatenate(parts))
    return path


def adm_rows(mine: dict, evaluator: str, python: str, ref_batch: str, sample_batch: Path) -> list[Row]:
    """ADM's ``evaluations/evaluator.py`` (TensorFlow, its own environment) on the same batch."""
    p = subprocess.run([python, evaluator, ref_batch, str(sample_batch)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        return [Row(m, v, "ADM evaluator", note=f"not run: exit {p.returncode}: {(p.stderr or p.stdout)[-200:]}")
                for m, v in mine.items()]
    found = {m.group(1).lower(): float(m.group(2)) for m in re.finditer(r"^(Inception Score|FID|sFID|Precision|"
                                                                         r"Recall): ([-\d.eE+]+)", p.stdout, re.M)}
    # subset: our Inception metrics -> the ADM evaluator's printed names
    names = {"isc": "inception score", "fid": "fid", "sfid": "sfid", "precision": "precision", "recall": "recall"}
    return [Row(m, v, "ADM evaluator (TF)", found.get(names[m]), 1e-3) for m, v in mine.items()]


def torch_fidelity_rows(mine: dict, fake_dir: Path, ref: str, weights: str | None, split_size: int, n: int
                        ) -> list[Row]:
    try:
        import torch_fidelity
        from torch_fidelity import calculate_metrics  # its package imports torchvision
    except Exception as e:  # noqa: BLE001 - reported as a row
        return [Row(m, v, "torch-fidelity", note=f"not run: {type(e).__name__}: {str(e)[:120]}")
                for m, v in mine.items()]
    kw = {"feature_extractor_weights_path": weights} if weights else {}
    out = calculate_metrics(input1=str(fake_dir), input2=ref, fid=True, isc=True, prc=True, verbose=False,
                            isc_splits=max(1, n // split_size), cuda=torch.cuda.is_available(), **kw)
    # subset: our metrics torch-fidelity also computes -> its result keys
    theirs = {"fid": out.get("frechet_inception_distance"), "isc": out.get("inception_score_mean"),
              "precision": out.get("precision"), "recall": out.get("recall")}
    # IS: torch-fidelity splits its own seeded permutation and ours another, so split noise (~1% at 2 splits of
    # 5,000) separates them; the other metrics do not depend on order
    return [Row(m, mine[m], f"torch-fidelity {torch_fidelity.__version__}", theirs[m], 2e-2 if m == "isc" else 1e-3,
                "its IS splits its own permutation" if m == "isc" else "") for m in theirs if m in mine]


def cleanfid_rows(mine: dict, fake_dir: Path, ref: str) -> list[Row]:
    try:
        from cleanfid import fid as cleanfid
    except Exception as e:  # noqa: BLE001 - reported as a row
        return [Row("fid", mine["fid"], "clean-fid", note=f"not run: {type(e).__name__}: {str(e)[:120]}")]
    theirs = cleanfid.compute_fid(str(fake_dir), ref, mode="clean", num_workers=0)
    return [Row("fid", mine["fid"], "clean-fid (mode=clean; its TorchScript Inception, float input)", theirs, 1e-2,
                "we round the resized image to uint8 and crop references square")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU check with random Inception weights")
    ap.add_argument("--samples", help="a run's samples (store directory or samples.npz)")
    ap.add_argument("--reference", help="what the protocol compares with (ADM .npz, image folder, store)")
    ap.add_argument("--reference-files", help="a list of the reference folder's images (COCO .jsonl)")
    ap.add_argument("--preprocess", choices=("adm", "clean"), default="adm")
    ap.add_argument("--inception-weights", help="torch-fidelity's weights file (default: the usual lookup)")
    ap.add_argument("--split-size", type=int, default=5000, help="IS split size (ADM: 5000)")
    ap.add_argument("--adm-evaluator", help="guided-diffusion's evaluations/evaluator.py")
    ap.add_argument("--adm-python", default=sys.executable, help="the python of ADM's TensorFlow environment")
    ap.add_argument("--work", help="where exported samples go (default: a temporary folder)")
    ap.add_argument("--out", help="write the table here (markdown); default: print it")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="crosscheck-"))
    if args.cpu:
        rows = cpu_check(work)
        title, context = "Metric cross-check on the CPU (random Inception weights)", [
            f"`python scripts/crosscheck_metrics.py --cpu`: torch-fidelity's InceptionV3 with seeded random weights; "
            "4 synthetic samples (a sample store, 64 px, 2 shards) vs 4 references (80 px); "
            f"device {describe_device()}."]
    else:
        if not (args.samples and args.reference):
            ap.error("give --samples and --reference (or --cpu)")
        from orbitquant.harness.metrics.base import open_samples

        samples = open_samples(args.samples)
        names = METRICS if args.preprocess == "adm" else ("fid",)
        mine = ours(samples, args.reference, preprocess=args.preprocess, weights=args.inception_weights, names=names,
                    split_size=args.split_size, reference_files=args.reference_files)
        fake_dir = export_folder(samples, work / "samples_png")
        rows = []
        if args.preprocess == "adm":
            rows += torch_fidelity_rows(mine, fake_dir, args.reference, args.inception_weights, args.split_size,
                                        len(samples))
            if args.adm_evaluator:
                rows += adm_rows(mine, args.adm_evaluator, args.adm_python, args.reference,
                                 export_adm_batch(samples, work / "sample_batch.npz"))
        else:
            rows += cleanfid_rows(mine, fake_dir, args.reference)
        title = f"Metric cross-check: {args.samples}"
        context = [f"samples {args.samples} ({len(samples)}), reference {args.reference}, preprocess "
                   f"{args.preprocess}; device {describe_device()}."]
    text = render(rows, title, context)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0 if all(r.agree is not False for r in rows) else 1


def describe_device() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
