"""Q-DiT's evolutionary search of per-layer group sizes, scored by a small-sample FID of the quantized model.

    python scripts/qdit_search.py                                  # digits, W4A8, budget 60
    python scripts/qdit_search.py w_bits=4 a_bits=4 search.budget=200 search.metric=fid_vs_real

Each candidate quantizes the model with Q-DiT (weights ``search.weights``, default RTN as in the
official code), samples ``search.protocol`` with noise seed ``seed + 20000`` (the same for every
candidate, disjoint from eval and calibration noise, so the search never sees the scored samples),
and scores ``search.metric`` against the fp samples of that protocol. The genome has one gene per input
tensor (q/k/v of a block share one, as the official fused qkv); the mean-group constraint is over genes.
Writes ``groups.json`` (the best map, its genes, its fitness, every evaluation) and ``search.png`` into
the Hydra run dir, and prints the run.py command that uses it. Config: conf/qdit_search.yaml.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("orbitquant.qdit_search")


def _plot(history: list[tuple[tuple, float]], path: Path, metric: str) -> None:
    from orbitquant.harness.viz import pyplot, save_figure

    fit = [f for _, f in history]
    best = [min(fit[: i + 1]) for i in range(len(fit))]
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.scatter(range(1, len(fit) + 1), fit, s=8, alpha=0.5, label="candidate")
    ax.plot(range(1, len(fit) + 1), best, color="C3", label="best so far")
    ax.axhline(fit[0], color="gray", ls="--", lw=1, label="all-128 preset")
    ax.set(xlabel="fitness evaluation", ylabel=f"{metric} (lower is better)", title="Q-DiT group-size search")
    ax.legend()
    save_figure(fig, path)


@hydra.main(config_path="../conf", config_name="qdit_search", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig

    from baselines.qdit.search import SearchConfig, evolve, expand, shared_input_genes
    from orbitquant.harness.factory import build_adapter, build_metrics, build_quant_config, metric_contexts
    from orbitquant.harness.generate import reference_key
    from orbitquant.harness.samplestore import cached_samples
    from orbitquant.harness.stages import resolve_device
    from orbitquant.quant.api import layer_treatment, quantized
    from orbitquant.quant.config import torch_dtype

    c = OmegaConf.to_container(cfg, resolve=True)
    s = dict(c["search"])
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        c["device"] = device = resolve_device(str(cfg.device))
        adapter = build_adapter(c["model"])
        if c["quant"]["method"] != "qdit":
            raise ValueError(f"the search is for quant=qdit, got quant={c['quant']['method']}")
        weights, metric_name, protocol = s.pop("weights"), s.pop("metric"), s.pop("protocol")
        scfg = SearchConfig(**s, seed=cfg.quant_seed)
        base = {**c["quant"], "weights": weights, "groups": None}
        build_quant_config(base)
        metric = build_metrics([metric_name])[0]
        adapter.check_protocol(protocol, "search.protocol")
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"config error: {e}")
    torch.set_num_threads(cfg.threads)
    try:
        pipe = adapter.load(torch_dtype(cfg.dtype), device)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")

    # fitness noise is fixed across candidates and disjoint from the eval seeds (noise = seed) and the
    # calibration seeds (quant_seed + 10000): selecting groups on the samples later scored would be a leak
    fit_seed = cfg.seed + 20_000

    def sample(desc: str, sink=None):  # candidates' samples stay in memory: a fitness protocol is small
        return adapter.generate(pipe, **protocol, seed=fit_seed, progress=False, desc=desc, sink=sink)

    key = reference_key(c["model"], {**protocol, "dtype": cfg.dtype, "device": device, "store": "float32"}, fit_seed,
                        adapter.fingerprint())
    reference, _ = cached_samples(Path(cfg.cache_dir) / "reference" / key, key, adapter.n_items(protocol), "float32",
                                  lambda sink: sample("fp reference", sink))
    denoiser = adapter.denoiser(pipe)
    probe_cfg = build_quant_config(base)
    targets = [r for r in adapter.layers(denoiser) if layer_treatment(r, probe_cfg) == "method"]
    # one gene per input tensor, as the official code's fused qkv: split q/k/v share one group size
    genes = shared_input_genes(denoiser, targets, lambda: adapter.probe(pipe))
    ctx = metric_contexts([metric]).get(metric.context_cls)
    calib = c["calib"]["protocol"]

    def fitness(genome: tuple[int, ...]) -> float:
        qcfg = build_quant_config({**base, "groups": expand(genome, genes)})
        def calibrate():
            return adapter.generate(pipe, **calib, seed=cfg.quant_seed + 10_000, progress=False)

        with quantized(denoiser, qcfg, adapter.layers(denoiser), calibrate=calibrate):
            return float(metric.compute(sample("candidate"), reference, ctx).value)

    t0 = time.perf_counter()
    log.info("searching %d group sizes (one per input tensor of %d layers) over %s (budget %s evaluations, "
             "metric %s, %d samples)", len(genes), len(targets), scfg.space, scfg.budget, metric_name, len(reference))
    res = evolve(len(genes), fitness, scfg, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    groups = expand(res.best, genes)
    out = {"groups": groups, "genes": genes, "fitness": res.best_fitness, "metric": metric_name,
           "preset_fitness": res.history[0][1], "mean_group": sum(res.best) / len(res.best),
           "evaluations": len(res.history), "epochs_run": res.epochs_run, "seconds": round(seconds, 1),
           "search": OmegaConf.to_container(cfg.search, resolve=True), "model": c["model"],
           "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "quant_seed": cfg.quant_seed, "fitness_noise_seed": fit_seed,
           "history": [{"genome": list(g), "fitness": f} for g, f in res.history]}
    path = out_dir / "groups.json"
    path.write_text(json.dumps(out, indent=1))
    _plot(res.history, out_dir / "search.png", metric_name)
    print(f"best {metric_name} {res.best_fitness:.4f} (all-128 preset {res.history[0][1]:.4f}) after "
          f"{len(res.history)} evaluations in {seconds:.0f} s; mean group {out['mean_group']:.1f}\n"
          f"groups: {path}\nuse:    python run.py quant=qdit quant.groups={path} "
          f"quant.tag=w{cfg.w_bits}a{cfg.a_bits}-searched "
          f"w_bits={cfg.w_bits} a_bits={cfg.a_bits}")


if __name__ == "__main__":
    main()
