"""Rotation study: how well each rotation Gaussianizes inputs, what W4A4 error it gives, what it costs.

    python scripts/bench_rotations.py                # synthetic stress + real digits activations -> results/rotation_study.md
    python scripts/bench_rotations.py --quick        # fewer dims/seeds (a minute)

Synthetic stress (per dim d): 512 tokens of N(0, 1) activations with a nonzero mean (0.5) and 8 outlier
channels x40, Student-t (df 4) weights of 512 output rows; 3 rotation seeds. Per rotation: the relative
output error of an OrbitQuant W4A4 layer (and W4A8), the KS distance of the normalized rotated coordinates
(times sqrt(d)) to N(0, 1), and the rotation's CPU time on the 512 tokens relative to RPBH (timed back to
back in each of 25 rounds, median ratio: robust to other load on the machine; 1 thread, fp32). Real activations: the inputs of every quantized linear of the digits and
digits_outliers models on the probe batch (d = 96 and 384). Writes a Markdown + CSV table and the
paper-style histogram figure (normalized rotated coordinates vs the N(0, 1/d) density, KS in the legend).

Records: ``results/rotation_study.csv`` (synthetic, one row per d, rotation and seed), ``rotation_study_real.csv``
(one row per layer too) and ``rotation_study.meta.json`` (torch version, seeds, dims, rotations, date: what the
CSVs do not hold). The Markdown is rendered from these files alone (``scripts/render_records.py``;
``python scripts/bench_rotations.py --render`` rewrites it, measuring nothing). The figure is not: it plots fresh
(seeded) rotations of a d = 1920 stress input, whose coordinates the CSVs do not keep, so it is redrawn only by a
measuring run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from render_records import render_rotation_study, rotation_paths, write_tables  # noqa: E402  (scripts/)

import orbitquant.quant.methods.base as qbase
from orbitquant import OrbitConfig, quantize_
from orbitquant.quant.primitives import relative_error
from orbitquant.quant.rotation import make_rotation

ROTATIONS = ("none", "rpbh", "hadamard", "rpbh2", "rpbh_kron", "hadamard_kron", "haar")


def stress(d: int, seed: int = 0, tokens: int = 512, out: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g) + 0.5
    x[:, torch.randperm(d, generator=g)[:8]] *= 40.0
    torch.manual_seed(seed)  # StudentT samples from the global generator: fix it so the study is reproducible
    w = torch.distributions.StudentT(4.0).sample((out, d)) / d ** 0.5
    return x, w


def ks_normal(rotated: torch.Tensor) -> float:
    from scipy.stats import kstest

    u = rotated / rotated.norm(dim=-1, keepdim=True).clamp_min(1e-12) * rotated.shape[-1] ** 0.5
    v = u.flatten().double().numpy()
    if len(v) > 200_000:
        v = np.random.default_rng(0).choice(v, 200_000, replace=False)
    return float(kstest(v, "norm").statistic)


def layer_error(x: torch.Tensor, w: torch.Tensor, rotation: str, seed: int, w_bits: int, a_bits: int) -> float:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    ref = lin(x)
    seq = torch.nn.Sequential(lin)
    quantize_(seq, OrbitConfig(w_bits=w_bits, a_bits=a_bits, rotation=rotation, seed=seed, probe_tokens=0))
    return relative_error(ref, seq(x))


def timed(rot: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor, rounds: int = 25) -> tuple[float, float]:
    """(median seconds of ``rot``, median of per-round time ratios rot / ref). Each round times the two back
    to back, so a load change on a shared machine hits both and cancels in the ratio."""
    def once(m):
        t = time.perf_counter()
        m(x)
        return time.perf_counter() - t

    once(rot), once(ref)  # warm-up
    pairs = [(once(rot), once(ref)) for _ in range(rounds)]
    return float(np.median([a for a, _ in pairs])), float(np.median([a / b for a, b in pairs]))


def synthetic(dims: list[int], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for d in dims:
        x, w = stress(d)
        for rot_name in ROTATIONS:
            for seed in seeds:
                rot = qbase.make_rotation(rot_name, d, seed)
                with torch.no_grad():
                    seconds, ratio = timed(rot, qbase.make_rotation("rpbh", d, seed), x)
                    rows.append({"source": "synthetic", "d": d, "rotation": rot_name, "seed": seed,
                                 "w4a4_err": layer_error(x, w, rot_name, seed, 4, 4),
                                 "w4a8_err": layer_error(x, w, rot_name, seed, 4, 8),
                                 "ks": ks_normal(rot(x)), "seconds": seconds, "time_vs_rpbh": ratio})
        print(f"d={d} done", flush=True)
    return pd.DataFrame(rows)


def real_activations(models: list[str], seeds: list[int]) -> pd.DataFrame:
    """KS and W4A4 error of every quantized linear's probe inputs in the digits models, per rotation."""
    from orbitquant.harness.adapters.digits import DigitsAdapter
    from orbitquant.quant.api import layer_treatment

    rows = []
    for model in models:
        a = DigitsAdapter(name=model, outlier_channels=4 if model == "digits_outliers" else 0)
        pipe = a.load()
        den = a.denoiser(pipe)
        cfg = OrbitConfig()
        refs = [r for r in a.layers(den) if layer_treatment(r, cfg) == "method"]
        inputs = {}

        def keep(_m, args, _o, fqn):  # returns None: a forward hook's return value would replace the output
            inputs.setdefault(fqn, args[0].reshape(-1, args[0].shape[-1]).detach())

        hooks = [r.module.register_forward_hook(lambda m, a_, o, f=r.fqn: keep(m, a_, o, f)) for r in refs]
        a.probe(pipe)
        for h in hooks:
            h.remove()
        for rot_name in ROTATIONS:
            for seed in seeds:
                for r in refs:
                    x = inputs[r.fqn]
                    rot = qbase.make_rotation(rot_name, x.shape[-1], seed)
                    with torch.no_grad():
                        rows.append({"source": model, "d": x.shape[-1], "rotation": rot_name, "seed": seed,
                                     "layer": r.fqn, "ks": ks_normal(rot(x)),
                                     "w4a4_err": layer_error(x, r.module.weight.detach(), rot_name, seed, 4, 4)})
        print(f"{model} done", flush=True)
    return pd.DataFrame(rows)


def figure(path: Path, d: int = 1920) -> None:
    """The paper's figure style: normalized rotated coordinates (x sqrt(d)) vs N(0, 1), KS in the legend."""
    from orbitquant.harness.viz import pyplot, save_figure

    plt = pyplot()
    x, _ = stress(d)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), sharey=True)
    grid = np.linspace(-4, 4, 400)
    for ax, name in zip(axes, ("none", "rpbh", "rpbh_kron", "haar")):
        with torch.no_grad():
            y = make_rotation(name, d, 0)(x)
        u = (y / y.norm(dim=-1, keepdim=True) * d ** 0.5).flatten().numpy()
        ax.hist(np.clip(u, -4, 4), bins=120, density=True, alpha=0.6, color="C0",
                label=f"KS = {ks_normal(y):.4f}")
        ax.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), color="C3", lw=1.2, label="N(0, 1)")
        ax.set(title=f"{'raw' if name == 'none' else name}, d = {d}", xlabel="sqrt(d) * x'_i / ||x'||")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _cache_rotations() -> None:
    """Build each (kind, d, seed) rotation once: a dense Haar draw at d = 8960 is a minute of QR."""
    import functools

    qbase.make_rotation = functools.lru_cache(maxsize=64)(make_rotation)


def write_records(out: Path, syn: pd.DataFrame, real: pd.DataFrame, meta: dict) -> dict[str, Path]:
    """The study's records beside ``out`` (``<stem>.csv``, ``<stem>_real.csv``, ``<stem>.meta.json``): all that
    its Markdown is rendered from."""
    paths = rotation_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    syn.to_csv(paths["synthetic"], index=False)
    real.to_csv(paths["real"], index=False)
    paths["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results/rotation_study.md")
    ap.add_argument("--render", action="store_true",
                    help="rewrite --out from its committed records alone (no measuring, no figure)")
    args = ap.parse_args()
    if args.render:
        return write_tables([args.out])
    torch.set_num_threads(1)
    _cache_rotations()
    dims = [1920, 3840] if args.quick else [96, 384, 1920, 3072, 3840, 8960]
    seeds = [0] if args.quick else [0, 1, 2]
    models = ["digits", "digits_outliers"]
    meta = {"script": "scripts/bench_rotations.py", "torch": torch.__version__, "threads": 1, "seeds": seeds,
            "dims": dims, "rotations": list(ROTATIONS), "real_models": models, "date": time.strftime("%Y-%m-%d %H:%M")}
    syn = synthetic(dims, seeds)
    real = real_activations(models, seeds)
    write_records(args.out, syn, real, meta)
    text = render_rotation_study(args.out)  # from the records as written, as render_records.py does
    args.out.write_text(text, encoding="utf-8")
    figure(args.out.parent / "figures" / "rotation_histograms.png")  # results/figures/ by default
    print(text)


if __name__ == "__main__":
    main()
