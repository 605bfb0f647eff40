"""LPIPS vs fp: torchmetrics' LPIPS network on our torchvision-free backbones (random backbone weights, saved in
torchvision's checkpoint format), checked against an independent re-computation; per-sample PSNR/SSIM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orbitquant.harness.factory import build_metrics
from orbitquant.harness.metrics.lpips import alexnet_features, build_lpips, vgg16_features
from orbitquant.harness.types import Samples


def _torchvision_style_checkpoint(path, features: nn.Sequential):
    torch.manual_seed(0)
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            nn.init.normal_(m.bias, std=0.1)
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files also hold the classifier: ignored
    torch.save(sd, path)
    return features


def _lpips_by_hand(features, lins, x, y, taps):
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def acts(z):
        z, out = (z - shift) / scale, []
        for i, layer in enumerate(features[: max(taps) + 1]):
            z = layer(z)
            if i in taps:
                out.append(z)
        return out

    total = 0
    for a, b, lin in zip(acts(x), acts(y), lins):
        a = a / torch.sqrt(1e-8 + (a * a).sum(1, keepdim=True))
        b = b / torch.sqrt(1e-8 + (b * b).sum(1, keepdim=True))
        total = total + nn.functional.conv2d((a - b) ** 2, lin).mean((2, 3))
    return total.flatten()


@pytest.mark.parametrize("net,builder,taps", [("alex", alexnet_features, (1, 4, 7, 9, 11)),
                                              ("vgg", vgg16_features, (3, 8, 15, 22, 29))])
def test_lpips_network_matches_definition_with_loaded_backbone(tmp_path, net, builder, taps):
    feats = _torchvision_style_checkpoint(tmp_path / "backbone.pth", builder())
    lp = build_lpips(net, backbone_weights=tmp_path / "backbone.pth")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    lins = [lin.model[-1].weight for lin in lp.lins]
    with torch.no_grad():
        ours = lp(x, y).flatten()
        ref = _lpips_by_hand(feats.eval(), lins, x, y, taps)
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6) and (ours > 0).all()
        assert lp(x, x).abs().max() < 1e-6


def test_lpips_vs_fp_per_sample_paired_and_video():
    lp = build_lpips("alex", random_backbone=True)
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(ref.shape, generator=g) * torch.tensor([0.0, 0.1, 0.4]).view(3, 1, 1, 1)
    labels = torch.arange(3)
    (m,) = build_metrics([{"lpips_vs_fp": {"lpips_net": lp, "progress": False, "batch_size": 2}}])
    m.check()
    r = m.compute(Samples((ref + noise).clamp(-1, 1), labels), Samples(ref, labels), None)
    per = r.extra["per_sample"]
    assert per[0] < 1e-6 < per[1] < per[2] and r.value == pytest.approx(sum(per) / 3, rel=1e-5)
    assert m.needs_reference and not m.higher_is_better
    video = Samples(ref.view(3, 1, 3, 64, 64).expand(3, 2, 3, 64, 64), labels)
    assert m.compute(video, video, None).value < 1e-6
    with pytest.raises(ValueError, match="fp reference"):
        m.compute(Samples(ref, labels), None, None)


def test_lpips_check_names_the_backbone_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        build_metrics(["lpips_vs_fp"])[0].check()
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and "https://download.pytorch.org/models/" in msg and str(tmp_path) in msg


def test_psnr_ssim_return_per_sample_values():
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    q = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    labels = torch.arange(4)
    for name in ("psnr_vs_fp", "ssim_vs_fp"):
        r = build_metrics([name])[0].compute(Samples(q, labels), Samples(ref, labels), None)
        assert len(r.extra["per_sample"]) == 4
        assert r.value == pytest.approx(sum(r.extra["per_sample"]) / 4, rel=1e-5)
