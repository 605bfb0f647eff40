"""Side-by-side sample grids of several runs (same seed, so the same noise), with labels.

    python scripts/compare_samples.py results/runs/digits_outliers/{fp/fp,orbit/w4a4,rtn/w4a4}/digits/q0-s0 \
        --rows 3 --out results/figures/digits_outliers_w4a4.png
    python scripts/compare_samples.py results/runs/digits/{fp/fp,rtn/w4a4,orbit/w4a4}/digits/q0-s0 --rows 1 --cols 2 \
        --out results/figures/digits_headline_grid.png     # panels wrapped two per row
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orbitquant.harness.metrics.base import head, open_samples
from orbitquant.harness.viz import to_uint8


def main() -> None:
    from PIL import Image, ImageDraw

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with its sample store samples/, or a "
                    "legacy samples/samples.npz)")
    ap.add_argument("--rows", type=int, default=3, help="rows of 10 samples per run")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--cols", type=int, help="panels per row (default: all in one row)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    panels, labels = [], []
    for run in args.runs:
        first = head(open_samples(run / "samples"), 10 * args.rows)  # reads only these samples from the store
        imgs = to_uint8(first[:, 0] if first.ndim == 5 else first)  # (N, H, W, C); videos: first frames
        _, h, w, c = imgs.shape
        grid = torch.from_numpy(imgs).view(args.rows, 10, h, w, c).permute(0, 2, 1, 3, 4).reshape(args.rows * h, 10 * w, c)
        panels.append(Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy()).resize(
            (10 * w * args.scale, args.rows * h * args.scale), Image.NEAREST))
        res = json.loads((run / "results.json").read_text())
        q = res["config"]["quant"]
        psnr = res["metrics"].get("psnr_vs_fp", {}).get("value")
        labels.append(f"{q['method']} {q['tag']}" + (f"  PSNR {float(psnr):.1f} dB" if psnr not in (None, "inf") else ""))
    pad, text_h = 8, 14
    cols = args.cols or len(panels)
    rows = -(-len(panels) // cols)
    cell_w, cell_h = panels[0].width + pad, panels[0].height + text_h + pad
    canvas = Image.new("L", (cols * cell_w + pad, rows * cell_h + pad), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        x, y = pad + (i % cols) * cell_w, pad // 2 + (i // cols) * cell_h
        draw.text((x, y), label, fill=0)
        canvas.paste(panel.convert("L"), (x, y + text_h))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
