"""The digit classifier / feature network behind the ``eval=digits`` metrics.

Trained by ``scripts/train_digits.py`` and shipped as ``orbitquant/assets/digits_classifier.safetensors``.
Its 64-d penultimate activation is the feature space for FID; its logits give class accuracy and the
Inception-score analogue.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from orbitquant.harness.paths import ASSETS

CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"


class DigitNet(nn.Module):
    """Small CNN on 8x8 digits in [-1, 1]: conv32-conv64-pool-fc64-fc10."""

    num_features = 64  # torchmetrics' FID reads this to size its statistics

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitFeatures(nn.Module):
    """Feature-extractor view of :class:`DigitNet` with the interface torchmetrics' FID expects."""

    def __init__(self, net: DigitNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class DigitLogits(nn.Module):
    """Logit view of :class:`DigitNet` for torchmetrics' InceptionScore (it softmaxes what it gets)."""

    def __init__(self, net: DigitNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> DigitNet:
    """Load the shipped classifier (eval mode, fp32, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"digit classifier weights not found at {path}; run `python scripts/train_digits.py` to recreate them"
        )
    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()
