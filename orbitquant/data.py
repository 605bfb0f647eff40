"""Data shipped with installed packages (no downloads): the 8x8 digits of scikit-learn."""

from __future__ import annotations

import torch


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images, labels)``.

    ``images`` is float32 ``(N, 1, 8, 8)`` scaled from 0..16 to [-1, 1]; ``labels`` is int64 ``(N,)``.
    """
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    return x, y


def digits_split(seed: int = 0, test_frac: float = 0.25) -> dict[str, torch.Tensor]:
    """A deterministic stratified train/test split of the digits (used by the classifier)."""
    x, y = load_digits_tensor()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_frac)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
