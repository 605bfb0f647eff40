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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orbitquant.methods.base as qbase
from orbitquant import OrbitConfig, quantize_
from orbitquant.primitives import relative_error
from orbitquant.rotation import make_rotation

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
    from orbitquant.adapters.digits import DigitsAdapter
    from orbitquant.api import layer_treatment

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
    from orbitquant.viz import pyplot, save_figure

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results/rotation_study.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _cache_rotations()
    dims = [1920, 3840] if args.quick else [96, 384, 1920, 3072, 3840, 8960]
    seeds = [0] if args.quick else [0, 1, 2]
    syn = synthetic(dims, seeds)
    real = real_activations(["digits", "digits_outliers"], seeds)
    agg = syn.groupby(["d", "rotation"]).agg(w4a4_err=("w4a4_err", "mean"), w4a4_std=("w4a4_err", "std"),
                                             w4a8_err=("w4a8_err", "mean"), ks=("ks", "mean"),
                                             seconds=("seconds", "median"),
                                             time_vs_rpbh=("time_vs_rpbh", "median")).reset_index()
    hr = agg[agg.rotation == "haar"].set_index("d")
    agg["err_vs_haar"] = agg.apply(lambda r: r.w4a4_err / hr.loc[r.d, "w4a4_err"], axis=1)
    order = {n: i for i, n in enumerate(ROTATIONS)}
    agg = agg.sort_values(["d", "rotation"], key=lambda c: c.map(order) if c.name == "rotation" else c)
    per_seed = real.groupby(["source", "d", "rotation", "seed"]).agg(w4a4_err=("w4a4_err", "mean"), ks=("ks", "mean"),
                                                                    layers=("layer", "count")).reset_index()
    ragg = per_seed.groupby(["source", "d", "rotation"]).agg(
        w4a4_err=("w4a4_err", "mean"), w4a4_std=("w4a4_err", "std"), ks=("ks", "mean"),
        layers=("layers", "first")).reset_index()
    ragg = ragg.sort_values(["source", "d", "rotation"], key=lambda c: c.map(order) if c.name == "rotation" else c)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fmt = {"w4a4_err": "{:.4f}", "w4a4_std": "{:.4f}", "w4a8_err": "{:.4f}", "ks": "{:.4f}", "seconds": "{:.2e}",
           "time_vs_rpbh": "{:.2f}", "err_vs_haar": "{:.3f}"}
    show = agg.copy()
    for k, f in fmt.items():
        show[k] = show[k].map(f.format)
    rshow = ragg.copy()
    for k in ("w4a4_err", "w4a4_std", "ks"):
        rshow[k] = rshow[k].map("{:.4f}".format)
    text = ("# Rotation study (generated by scripts/bench_rotations.py)\n\n"
            f"CPU, 1 thread, fp32; {torch.__version__}. Synthetic stress: 512 tokens, N(0,1)+0.5 with 8 outlier "
            "channels x40, Student-t(4) weights (512 rows); mean over rotation seeds "
            f"{seeds}. Error = relative output error of one OrbitQuant layer; KS = distance of sqrt(d) x'/||x'|| "
            "to N(0,1); time = the rotation alone on the 512 tokens (median of 25), and its ratio to RPBH "
            "timed back to back in each round (median).\n\n"
            "## Synthetic stress\n\n" + show.to_markdown(index=False) +
            "\n\n## Real activations: every quantized linear's probe inputs (digits models; mean over layers, "
            "then mean ± std over rotation seeds)\n\n"
            + rshow.to_markdown(index=False) + "\n")
    args.out.write_text(text)
    syn.to_csv(args.out.with_suffix(".csv"), index=False)
    real.to_csv(args.out.with_name(args.out.stem + "_real.csv"), index=False)
    figure(ROOT / "results/figures/rotation_histograms.png")
    print(text)


if __name__ == "__main__":
    main()
