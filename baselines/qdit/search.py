"""Q-DiT's evolutionary search over per-layer group sizes (BASELINES_SPEC section 8.1, step 5).

Genome: one group size from ``space`` per *input tensor* of the target linears (weights and activations
tied), as in the official code, whose DiT has a fused ``qkv``: its genome is 4 genes per block (qkv,
proj, fc1, fc2). Linears that read one tensor (diffusers' split ``to_q/to_k/to_v``; FLUX single blocks'
q/k/v and ``proj_mlp``; gate and up of a gated FFN) share one gene (:func:`shared_input_genes`).
Constraint: mean gene >= ``min_mean_group`` (the official code's BitOps proxy ``sum(cand)/len(cand)``,
so a shared q/k/v input counts once). Each epoch keeps the
``select`` fittest genomes seen so far and breeds ``mutations`` mutants (every gene resampled with
probability ``m_prob``) and ``crossovers`` uniform crossovers (each gene from either parent with
p = 0.5), legal and unvisited only, topped up with random legal genomes. The all-``preset`` genome
seeds the first population. ``budget`` caps fitness evaluations (the expensive part: each is an
FID of a quantized model's samples). Lower fitness is better.

The official ``scripts/evolution.py`` crashes (``update_top_k`` undefined, ``tqdm`` not imported);
this is the algorithm its call sites describe, written from the spec.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from orbitquant.quant.types import LayerRef

from . import GROUP_SPACE

Genome = tuple[int, ...]


def shared_input_genes(model: nn.Module, refs: list[LayerRef], forward: Callable[[], object]) -> list[list[str]]:
    """Group the target linears ``refs`` by the input tensor they read in one ``forward()`` of ``model``: one
    list of fqns per gene, in layer order. Layers the forward never reaches get a gene of their own."""
    first: dict[str, object] = {}  # fqn -> its first input tensor (held, so no id is reused during the forward)

    def make_hook(fqn):
        def hook(_mod, args):
            first.setdefault(fqn, args[0])
        return hook

    handles = [r.module.register_forward_pre_hook(make_hook(r.fqn)) for r in refs]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    genes: list[list[str]] = []
    owner: list[object] = []
    for r in refs:
        x = first.get(r.fqn)
        k = next((i for i, t in enumerate(owner) if x is not None and t is x), None)
        if k is None:
            genes.append([r.fqn])
            owner.append(x)
        else:
            genes[k].append(r.fqn)
    return genes


def expand(genome: Genome, genes: list[list[str]]) -> dict[str, int]:
    """The per-layer group map of a genome: every layer of a gene gets the gene's group size."""
    if len(genome) != len(genes):
        raise ValueError(f"genome has {len(genome)} genes, the model {len(genes)}")
    return {fqn: g for gene, g in zip(genes, genome) for fqn in gene}


@dataclass(frozen=True)
class SearchConfig:
    space: tuple[int, ...] = GROUP_SPACE
    population: int = 50
    select: int = 10
    mutations: int = 25
    crossovers: int = 25
    m_prob: float = 0.1
    epochs: int = 10
    min_mean_group: float = 128.0
    preset: int = 128
    budget: int | None = None  # max fitness evaluations (None: population x epochs at most)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", tuple(self.space))
        if not self.space or min(self.space) <= 0:
            raise ValueError("space must be positive group sizes")
        if max(self.space) < self.min_mean_group:
            raise ValueError(f"no genome can meet min_mean_group={self.min_mean_group} with space {self.space}")
        if self.preset not in self.space:
            raise ValueError(f"preset {self.preset} is not in the search space {self.space}")
        if min(self.population, self.select, self.epochs) < 1 or not 0 <= self.m_prob <= 1:
            raise ValueError("population, select and epochs must be >= 1 and m_prob in [0, 1]")
        if self.budget is not None and self.budget < 1:
            raise ValueError("budget must be >= 1 (or null)")


@dataclass
class SearchResult:
    best: Genome
    best_fitness: float
    history: list[tuple[Genome, float]] = field(default_factory=list)  # every evaluation, in order
    epochs_run: int = 0


def evolve(n_genes: int, fitness: Callable[[Genome], float], cfg: SearchConfig = SearchConfig(),
           progress: bool = True) -> SearchResult:
    """Minimise ``fitness`` over legal genomes of length ``n_genes``."""
    rng = random.Random(cfg.seed)
    scores: dict[Genome, float] = {}
    history: list[tuple[Genome, float]] = []
    limit = cfg.budget if cfg.budget is not None else cfg.population * cfg.epochs

    def legal(g: Genome) -> bool:
        return sum(g) / len(g) >= cfg.min_mean_group

    def random_genome() -> Genome:
        while True:
            g = tuple(rng.choice(cfg.space) for _ in range(n_genes))
            if legal(g):
                return g

    def fill(pop: list[Genome], make: Callable[[], Genome], k: int) -> None:
        added, tries = 0, 0
        while added < k and tries < 50 * max(k, 1):
            tries += 1
            g = make()
            if legal(g) and g not in scores and g not in pop:
                pop.append(g)
                added += 1

    pop: list[Genome] = [(cfg.preset,) * n_genes]
    fill(pop, random_genome, cfg.population - 1)
    epoch = 0
    with tqdm(total=limit, desc="qdit group search", unit="eval", disable=not progress, leave=False) as bar:
        while epoch < cfg.epochs and len(history) < limit:
            for g in pop:
                if len(history) >= limit:
                    break
                scores[g] = fitness(g)
                history.append((g, scores[g]))
                bar.update(1)
                bar.set_postfix(best=f"{min(scores.values()):.4g}")
            epoch += 1
            top = sorted(scores, key=scores.get)[: cfg.select]
            pop = []
            fill(pop, lambda: tuple(rng.choice(cfg.space) if rng.random() < cfg.m_prob else v
                                    for v in rng.choice(top)), cfg.mutations)
            fill(pop, lambda: tuple(a if rng.random() < 0.5 else b
                                    for a, b in zip(rng.choice(top), rng.choice(top))), cfg.crossovers)
            fill(pop, random_genome, cfg.population - len(pop))
    best = min(scores, key=scores.get)
    return SearchResult(best, scores[best], history, epoch)
