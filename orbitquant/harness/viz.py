"""Pictures: sample grids."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, ncol: int = 10, scale: int = 4,
              max_rows: int = 10) -> Path:
    """Save up to ``ncol * max_rows`` images -- (N, C, H, W) in [-1, 1] or uint8 tiles (N, H, W, C) -- as one PNG
    grid (nearest upsampling by ``scale``, 1px gutters).

    With labels cycling 0..9 (the digits protocol), column k shows class k.
    """
    from PIL import Image

    arr = images[: ncol * max_rows] if isinstance(images, np.ndarray) else to_uint8(images[: ncol * max_rows])
    n, h, w, c = arr.shape
    rows = -(-n // ncol)
    hs, ws = h * scale, w * scale
    canvas = np.full((rows * (hs + 1) + 1, ncol * (ws + 1) + 1, c), 64, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, k = divmod(i, ncol)
        big = img.repeat(scale, 0).repeat(scale, 1)
        canvas[1 + r * (hs + 1): 1 + r * (hs + 1) + hs, 1 + k * (ws + 1): 1 + k * (ws + 1) + ws] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas).save(path)
    return path


def save_gif(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """(F, C, H, W) frames in [-1, 1] -> an animated GIF (Pillow only; no ffmpeg needed)."""
    from PIL import Image

    arr = to_uint8(frames)
    imgs = [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arr]
    path = Path(path)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path


def save_mp4(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path | None:
    """(F, C, H, W) frames in [-1, 1] -> H.264 mp4 via diffusers' exporter (needs the ``[video]`` extra:
    imageio + imageio-ffmpeg, whose wheel carries ffmpeg). Returns None when they are not installed."""
    import importlib.util

    if importlib.util.find_spec("imageio") is None or importlib.util.find_spec("imageio_ffmpeg") is None:
        return None
    from diffusers.utils import export_to_video
    from PIL import Image

    # PIL frames: export_to_video multiplies numpy frames by 255 (it expects floats in [0, 1]), which wraps uint8
    # frames into noise; PIL images are written as they are
    imgs = [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).convert("RGB") for a in to_uint8(frames)]
    return Path(export_to_video(imgs, str(path), fps=fps, macro_block_size=1))


def encode_mp4(video: torch.Tensor, fps: int = 16) -> bytes:
    """(F, C, H, W) frames in [-1, 1] -> the bytes of the mp4 :func:`save_mp4` writes (what VBench reads)."""
    with tempfile.TemporaryDirectory() as d:
        path = save_mp4(video, Path(d) / "v.mp4", fps=fps)
        if path is None:
            raise ModuleNotFoundError("eval.store=mp4 needs imageio and imageio-ffmpeg: pip install -e '.[video]'")
        return path.read_bytes()


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes -> uint8 frames (F, 3, H, W)."""
    import imageio.v3 as iio

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        return np.ascontiguousarray(iio.imread(f.name).transpose(0, 3, 1, 2))


def plot_layer_errors(layers: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Per-layer relative output error on the probe batch, in model order, coloured by role (log scale).
    ``layers`` are ``QuantReport.to_dict()["layers"]`` rows; None when no layer has a measured error."""
    rows = [r for r in layers if r.get("rel_err") is not None and r["treatment"] != "skip"]
    if not rows:
        return None
    plt = pyplot()
    roles = sorted({r["role"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, len(rows) / 8)), 3.5))
    for k, role in enumerate(roles):
        pts = [(i, r["rel_err"]) for i, r in enumerate(rows) if r["role"] == role]
        ax.scatter([p[0] for p in pts], [max(p[1], 1e-8) for p in pts], s=12, color=f"C{k % 10}", label=role)
    ax.set(yscale="log", xlabel="quantized layer (model order)", ylabel="relative output error", title=title)
    ax.legend(fontsize=7, ncol=min(len(roles), 4))
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, dpi=110)


def plot_metric_vs_bits(df, metric: str, path: str | Path, title: str = "") -> Path | None:
    """One line per method: mean ± std over seeds of ``metric`` at each bit pair (``load_results`` rows,
    one model and eval). The fp value is a dashed line when finite. None if the metric is absent."""
    from orbitquant.harness.tables import _bits_order

    plt = pyplot()

    d = df[df["metric"] == metric]
    if d.empty:
        return None
    bits = sorted((b for b in d["bits"].unique() if b != "fp"), key=_bits_order)
    fig, ax = plt.subplots(figsize=(1.2 * len(bits) + 3, 3.6))
    fp = d[d["bits"] == "fp"]["value"]
    if len(fp) and np.isfinite(fp.mean()):
        ax.axhline(fp.mean(), color="gray", ls="--", lw=1, label="fp")
    for k, (method, g) in enumerate(d[d["bits"] != "fp"].groupby("method")):
        stats = g.groupby("bits")["value"].agg(["mean", "std"]).reindex(bits)
        # missing bit pairs stay NaN, so a line never bridges a setting that was not run
        ax.errorbar(range(len(bits)), stats["mean"].to_numpy(), yerr=stats["std"].fillna(0).to_numpy(), marker="o",
                    ms=4, capsize=3, color=f"C{k % 10}", label=method)
    hib = bool(d["higher_is_better"].iloc[0])
    ax.set_xticks(range(len(bits)), bits)
    ax.set(ylabel=f"{metric} ({'higher' if hib else 'lower'} is better)", title=title)
    if not hib and (d["value"] > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (headless machines, workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Tight layout, save as PNG (creating the folder), close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata={"Software": None})  # no version stamp: rebuilt figures are byte-stable
    pyplot().close(fig)
    return path
