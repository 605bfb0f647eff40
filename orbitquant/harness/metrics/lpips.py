"""LPIPS against the fp sample with the same seed and prompt (SVDQuant's fidelity protocol), per sample.

torchmetrics' LPIPS (its ``_LPIPS`` network and the linear-layer weights shipped in the torchmetrics wheel) takes its
backbone from torchvision, which does not import beside the CPU torch wheel. The backbones are plain conv stacks, so
they are built here with torchvision's exact layout and loaded from torchvision's own checkpoint file
(``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` in ``$TORCH_HOME/hub/checkpoints/``, or ``backbone_weights:``);
no torchvision needed, the same numbers.

Options: ``net`` (``alex`` default, as SVDQuant; or ``vgg``), ``backbone_weights``, ``batch_size``, ``device``,
``progress``. Videos are scored per frame and averaged per sample.

The samples and the fp reference are read in step, one batch of each at a time; the network sees the frames in
consecutive groups of ``batch_size`` as before streaming (``base.rebatch``), so the values are the same.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from orbitquant.harness.metrics.base import Metric, cat_or_empty, frames, paired_batches, rebatch
from orbitquant.harness.metrics.features import resolve_device
from orbitquant.harness.metrics.inception import per_sample
from orbitquant.harness.types import MetricResult
from orbitquant.quant.registry import register_metric

BACKBONES = {  # torchmetrics' net name -> (torchvision model, checkpoint file)
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
}
URL = "https://download.pytorch.org/models/{}"


def alexnet_features() -> nn.Sequential:
    """torchvision ``alexnet().features`` (same modules, same indices)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))


def vgg16_features() -> nn.Sequential:
    """torchvision ``vgg16().features`` (configuration D, no batch norm)."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


_BUILDERS = {"alexnet": alexnet_features, "vgg16": vgg16_features}


def find_backbone_weights(net: str, path: str | None = None) -> Path:
    if net not in BACKBONES:
        raise ValueError(f"LPIPS net {net!r} not supported; choose one of {', '.join(BACKBONES)}")
    fname = BACKBONES[net][1]
    p = Path(path).expanduser() if path else Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS ({net}) backbone weights not found at {p}. Download {URL.format(fname)} "
                                f"(torchvision's ImageNet weights) to {Path(torch.hub.get_dir()) / 'checkpoints'}, "
                                "or point `backbone_weights:` at the file")
    return p


@contextlib.contextmanager
def _local_backbones(weights: Path | None):
    """Serve torchmetrics' backbone request from our builders (+ torchvision's checkpoint file) instead of torchvision."""
    import torchmetrics.functional.image.lpips as tm

    def features(name: str, pretrained: bool = False) -> nn.Sequential:
        seq = _BUILDERS[name]()
        if pretrained:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            seq.load_state_dict({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")})
        return seq

    orig = tm._get_tv_model_features
    tm._get_tv_model_features = features
    try:
        yield tm
    finally:
        tm._get_tv_model_features = orig


def build_lpips(net: str = "alex", backbone_weights: str | Path | None = None, random_backbone: bool = False):
    """torchmetrics' LPIPS network (trained linear heads from the torchmetrics wheel) on a locally built backbone."""
    weights = None if random_backbone else find_backbone_weights(net, backbone_weights)
    with _local_backbones(weights) as tm:
        return tm._NoTrainLpips(net=net, pnet_rand=random_backbone).eval()


@register_metric
class LPIPSvsFP(Metric):
    """Mean per-sample LPIPS (lower = closer) between each sample and the fp sample of the same seed and prompt."""

    name, higher_is_better, needs_reference = "lpips_vs_fp", False, True

    def __init__(self, net: str = "alex", backbone_weights: str | None = None, batch_size: int = 16,
                 device: str = "auto", progress: bool = True, lpips_net: nn.Module | None = None) -> None:
        self.net_name, self.backbone_weights = net, backbone_weights
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self._net = lpips_net

    def needs(self) -> list:
        from orbitquant.harness.preflight import file_need, hub_prefix

        if self._net is not None:
            return []
        if self.net_name not in BACKBONES:
            raise ValueError(f"LPIPS net {self.net_name!r} not supported; choose one of {', '.join(BACKBONES)}")
        fname = BACKBONES[self.net_name][1]
        hub = Path(torch.hub.get_dir()) / "checkpoints" / fname
        path = Path(self.backbone_weights).expanduser() if self.backbone_weights else hub
        # torchvision's file names carry their sha256 prefix (torch.hub's check_hash convention)
        return [file_need(f"LPIPS {self.net_name} backbone weights (torchvision)", path,
                          f"wget {URL.format(fname)} -O {path}", hash_prefix=hub_prefix(fname))]

    @functools.cached_property
    def net(self) -> nn.Module:
        return self._net if self._net is not None else build_lpips(self.net_name, self.backbone_weights)

    @torch.no_grad()
    def compute(self, samples, reference, ctx) -> MetricResult:
        from tqdm.auto import tqdm

        dev = resolve_device(self.device)
        net = self.net.to(dev)
        n_frames = 1
        bar = tqdm(total=len(samples), desc="LPIPS", unit="img", disable=not self.progress, leave=False)

        def frame_pairs():
            nonlocal n_frames
            for a, b, _ in paired_batches(samples, reference, self.batch_size):
                n_frames = a.shape[1] if a.ndim == 5 else 1
                bar.total = len(samples) * n_frames  # known once the first batch is read
                yield frames(a), frames(b)

        out = []
        with bar:
            for x, y in rebatch(frame_pairs(), self.batch_size):
                if x.shape[1] == 1:  # grey: the backbone takes RGB
                    x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
                out.append(net(x.to(dev).clamp(-1, 1), y.to(dev).clamp(-1, 1)).flatten().double().cpu())
                bar.update(len(x))
        per = cat_or_empty(out, "samples").view(-1, n_frames).mean(1)
        return self.result(per.mean(), len(per), std=per.std().item() if len(per) > 1 else 0.0, net=self.net_name,
                           per_sample=per_sample(per))
