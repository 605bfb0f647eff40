"""Feature-set statistics: Fréchet distance (torchmetrics' arithmetic), Inception Score, and improved
precision/recall (Kynkäänniemi et al. 2019, k-NN manifolds, as in ADM's evaluator).

torch-fidelity's ``prc`` needs torchvision at import, so the k-NN is written here: batched squared distances in
float64, checked against a brute-force numpy computation in the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov``, as ADM's evaluator), float64."""
    x = feats.double()
    mu = x.mean(0)
    xc = x - mu
    sigma = xc.T @ xc / (len(x) - 1)
    return mu.numpy(), sigma.numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) with torchmetrics' ``_compute_fid`` (eigenvalues of S1 S2), in
    float64; tiny negatives (round-off for identical sets) clamp to 0."""
    from orbitquant.harness.metrics.features import prepare_torch_fidelity

    prepare_torch_fidelity()  # torchmetrics.image.fid imports torch-fidelity (and so torchvision) when installed
    from torchmetrics.image.fid import _compute_fid

    t = [torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2)]
    if t[0].shape != t[2].shape or t[1].shape != t[3].shape:
        raise ValueError(f"feature dimensions differ: {tuple(t[0].shape)} vs {tuple(t[2].shape)} (reference statistics "
                         "from another feature layer?)")
    return max(float(_compute_fid(*t)), 0.0)


def inception_score(logits: torch.Tensor, split_size: int = 5000, shuffle: int | None = 0
                    ) -> tuple[float, float, torch.Tensor]:
    """``exp(E_x KL(p(y|x) || p(y)))`` over splits of ``split_size`` samples (ADM's evaluator: 5000), mean and std
    over splits; also each sample's KL(p(y|x) || p(y_split)) (its contribution to the score), in sample order.

    The splits are taken after a permutation seeded by ``shuffle`` (``None``: in sample order). ADM's evaluator
    splits in file order, and its sampler draws the class labels at random, so each split sees every class; a
    harness protocol generates class by class (10 per class x 1000), where consecutive splits of 5000 would each see
    500 classes and cap the score at 500 -- the shuffle makes the splits what ADM's would be.
    """
    logp = logits.double().log_softmax(1)
    n = len(logp)
    order = torch.arange(n) if shuffle is None else torch.randperm(n, generator=torch.Generator().manual_seed(shuffle))
    scores, per = [], torch.empty(n, dtype=torch.float64)
    for start in range(0, n, split_size):
        idx = order[start:start + split_size]
        lp = logp[idx]
        log_py = torch.logsumexp(lp, 0) - math.log(len(lp))
        kl = (lp.exp() * (lp - log_py)).sum(1)
        per[idx] = kl
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores)), per


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


@torch.no_grad()
def knn_radii(feats: torch.Tensor, k: int = 3, batch: int = 4096, device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance of every point to its k-th nearest *other* point (the point itself is neighbour 0)."""
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(feats)}")
    x = feats.to(device, torch.float64)
    out = torch.empty(len(x), dtype=torch.float64)
    for s in range(0, len(x), batch):
        out[s:s + batch] = _sqdist(x[s:s + batch], x).kthvalue(k + 1, dim=1).values.cpu()
    return out


@torch.no_grad()
def in_manifold(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch: int = 4096,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """For each query point: is it within the k-NN ball (squared radius, inclusive) of any center?"""
    q, c, r = (t.to(device, torch.float64) for t in (query, centers, radii))
    out = torch.zeros(len(q), dtype=torch.bool)
    for s in range(0, len(q), batch):
        hit = torch.zeros(min(batch, len(q) - s), dtype=torch.bool, device=device)
        for t in range(0, len(c), batch):
            hit |= (_sqdist(q[s:s + batch], c[t:t + batch]) <= r[t:t + batch][None]).any(1)
        out[s:s + batch] = hit.cpu()
    return out


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 4096,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample indicators: ``precision[i]`` = fake i lies in the real manifold; ``recall[j]`` = real j lies in the
    fake manifold. Their means are the improved precision and recall."""
    r_real, r_fake = knn_radii(real, k, batch, device), knn_radii(fake, k, batch, device)
    return in_manifold(fake, real, r_real, batch, device), in_manifold(real, fake, r_fake, batch, device)
