"""Train the embedded default model and its metric network, deterministically, on CPU.

    python scripts/train_digits.py                  # ~25 min on 1 CPU thread; writes orbitquant/assets/
    python scripts/train_digits.py --smoke --out /tmp/x   # a few steps (used by the tests)

The DiT (diffusers DiTTransformer2DModel, hidden 96, 8 blocks, 1.64 M parameters) is trained with
rectified flow on all 1797 scikit-learn digits; 10 % of labels are replaced by the null class for
classifier-free guidance; the EMA weights are saved in fp16 safetensors. The classifier is trained on
a stratified 75 % split and its held-out accuracy is recorded in TRAINING.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orbitquant.harness.adapters.digits import NULL_CLASS, DigitsPipeline, build_dit  # noqa: E402
from orbitquant.harness.data import digits_split, load_digits_tensor  # noqa: E402
from orbitquant.harness.metrics.digits_net import DigitNet  # noqa: E402
from orbitquant.harness.viz import save_grid  # noqa: E402


def train_dit(steps: int, batch: int, lr: float, seed: int, log_every: int) -> tuple[torch.nn.Module, list[float]]:
    x, y = load_digits_tensor()
    model = build_dit(seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(batch, generator=g) < 0.1] = NULL_CLASS
        t = torch.rand(batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        pred = model(xt, timestep=t * 1000, class_labels=labels).sample
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"dit step {step + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return ema, losses


def train_classifier(epochs: int, seed: int) -> tuple[DigitNet, float]:
    torch.manual_seed(seed)
    d = digits_split(seed=0)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(d["x_train"]), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            xb = d["x_train"][b] + 0.05 * torch.randn(d["x_train"][b].shape, generator=g)  # mild noise robustness
            loss = F.cross_entropy(net(xb), d["y_train"][b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(d["x_test"]).argmax(1) == d["y_test"]).float().mean().item()
    return net, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--classifier-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "orbitquant" / "assets")
    ap.add_argument("--smoke", action="store_true", help="a few steps only, to check the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.classifier_epochs = 3, 1
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    net, acc = train_classifier(args.classifier_epochs, args.seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "digits_classifier.safetensors"))
    print(f"classifier held-out accuracy {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)

    t1 = time.time()
    ema, losses = train_dit(args.steps, args.batch, args.lr, args.seed, log_every=max(1, min(250, args.steps)))
    ema.to(torch.float16).save_pretrained(str(args.out / "digits_dit"), safe_serialization=True)
    dit_seconds = time.time() - t1

    pipe = DigitsPipeline(ema.float())
    g = torch.Generator().manual_seed(0)
    imgs = pipe.sample(torch.randn(100, 1, 8, 8, generator=g), torch.arange(100) % 10, steps=32, guidance=2.0)
    save_grid(imgs, args.out.parent.parent / "results" / "digits_training_grid.png" if not args.smoke
              else args.out / "grid.png")
    with torch.no_grad():
        gen_acc = (net(imgs).argmax(1) == torch.arange(100) % 10).float().mean().item()
    info = {
        "dit": {"kwargs": {k: v for k, v in ema.config.items() if not k.startswith("_")},
                "params": sum(p.numel() for p in ema.parameters()), "steps": args.steps, "batch": args.batch,
                "lr": args.lr, "seed": args.seed, "final_loss_avg250": sum(losses[-250:]) / len(losses[-250:]),
                "seconds": round(dit_seconds, 1), "threads": args.threads,
                "sample_class_accuracy_100": gen_acc},
        "classifier": {"epochs": args.classifier_epochs, "heldout_accuracy": acc, "split": "stratified 75/25, seed 0"},
        "torch": torch.__version__,
    }
    (args.out / "TRAINING.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(info, indent=2, default=str))


if __name__ == "__main__":
    main()
