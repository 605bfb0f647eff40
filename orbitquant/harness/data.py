"""Data shipped with installed packages (no downloads): the 8x8 digits of scikit-learn; prompt lists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from orbitquant.harness.paths import REPO


def prompt_path(src: str | os.PathLike) -> Path:
    """A prompt file's path: as given from the working directory, else from the repository root."""
    path = Path(src)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    return path


def prompt_file_need(src, label: str, fix: str | None = None):
    """A protocol's prompt file as a preflight item (None when the prompts are given inline)."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    from orbitquant.harness.preflight import file_need

    return file_need(f"prompts of {label}", prompt_path(src), fix or "write the prompt file (docs/metrics.md says "
                     "where each protocol's prompts come from), or point eval.protocol.prompts= at it")


def load_prompts(src: str | os.PathLike | list[str] | tuple[str, ...]) -> list[str]:
    """Prompts from a list, or from a file: ``.txt`` (one per line; blank lines and ``#`` comments
    skipped), ``.json`` (a list of strings) or ``.jsonl`` (records with ``caption`` or ``prompt``, e.g. the COCO
    files of ``scripts/make_coco_prompts.py``, whose ``file_name`` names each caption's image). A relative path is
    tried from the working directory, then
    from the repository root (so ``orbitquant/assets/prompts/...`` works from anywhere)."""
    if not isinstance(src, (str, os.PathLike)):  # any sequence (list, tuple, OmegaConf ListConfig)
        prompts = list(src)
        where = "the prompts list"
    else:
        path = prompt_path(src)
        if not path.is_file():
            raise ValueError(f"prompt file {src!r} not found (give a .txt with one prompt per line, a .json list, "
                             "or an inline list)")
        where = f"prompt file {str(path)!r}"
        if path.suffix == ".jsonl":  # records: {"caption" | "prompt": text, "file_name": its image, ...}
            try:
                rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON lines: {e}") from None
            prompts = [r.get("caption", r.get("prompt")) if isinstance(r, dict) else None for r in rows]
        elif path.suffix == ".json":
            try:
                prompts = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from None
            if not isinstance(prompts, list):
                raise ValueError(f"{where} must hold a JSON list of strings")
        else:
            lines = (ln.strip() for ln in path.read_text().splitlines())
            prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad or not prompts:
        raise ValueError(f"{where} " + ("is empty" if not prompts else f"has {len(bad)} empty or non-string "
                                        f"prompts, e.g. {bad[0]!r}"))
    return prompts


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
