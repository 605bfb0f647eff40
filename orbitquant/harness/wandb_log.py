"""Mirror a finished run's ``results.json`` to Weights & Biases (``logger=wandb``). W&B is a mirror, never the
store: everything it receives is already on disk, and a W&B failure never fails a run.

Safe defaults from measurements (``SCALEOUT_STACK.md`` section 2): the mode is always passed explicitly
(``auto`` follows W&B's own rules: ``WANDB_MODE`` if set, else online when a key is configured -- ``WANDB_API_KEY``
or the login ``wandb login`` stored in the netrc file -- else offline: a missing key must not hang on a login
prompt); W&B's run, staging, cache and config dirs are kept under ``logger.dir`` (otherwise offline table
images land in ``~/.local/share/wandb``); ``reinit="finish_previous"`` plus the context manager make sure
``finish`` runs and a crashed job's run is never reused by the next job of a sweep.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


#: W&B's WANDB_MODE values -> the mode passed to ``wandb.init`` (``dryrun`` and ``run`` are its legacy spellings)
_WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def _stored_login() -> bool:
    """Whether ``wandb login`` stored a key for the configured host: W&B keeps it in the netrc file (``$NETRC`` or
    ``~/.netrc``) under the API host (``$WANDB_BASE_URL``, default api.wandb.ai). Read with the stdlib parser rather
    than wandb's private auth module, which moves between releases."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``WANDB_MODE`` when set, else ``online`` when a key is configured (``WANDB_API_KEY`` or a stored
    ``wandb login``), else ``offline``. An explicit ``logger.mode`` wins over all of them."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be auto|online|offline|disabled, got {mode!r}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not a W&B mode ({', '.join(_WANDB_MODES)})")
        return _WANDB_MODES[env]
    return "online" if os.environ.get("WANDB_API_KEY") or _stored_login() else "offline"


def run_names(config: dict) -> tuple[str, str]:
    """``(group, name)``: the group is the run without its seed parts, so W&B aggregates seeds (mean ± std)."""
    group = "/".join([config["model"]["name"], config["quant"]["method"], config["quant"]["tag"],
                      config["eval"]["name"]])
    return group, f"{group}/q{config['quant_seed']}-s{config['seed']}"


def mirror(results: dict, run_dir: Path, logger_cfg: dict) -> str | None:
    """Log config, summary metrics, a table of samples, the per-layer error plot and results.json (as an
    artifact) of one run. Returns the W&B run directory, or None if nothing was logged."""
    if logger_cfg.get("name", "none") == "none":
        return None
    try:
        import wandb
    except ImportError:
        _once("import", "logger=wandb but wandb is not installed (pip install wandb); results are on disk only")
        return None
    mode = resolve_mode(logger_cfg.get("mode", "auto"))
    base = Path(logger_cfg.get("dir") or "results/wandb").resolve()
    for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault(var, str(base / sub))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", str(logger_cfg.get("init_timeout", 30)))
    if mode == "offline":
        _once("offline", "W&B logging offline to %s (WANDB_MODE=offline, or no key: neither WANDB_API_KEY nor a "
              "stored `wandb login`; `wandb sync` uploads it later)", base)
    config = results["config"]
    group, name = run_names(config)
    try:
        with wandb.init(project=logger_cfg.get("project", "orbitquant"), entity=logger_cfg.get("entity"),
                        name=name, group=group, job_type="eval", config=config, mode=mode, dir=str(base),
                        reinit="finish_previous",
                        tags=[config["model"]["name"], config["quant"]["method"], config["eval"]["name"]]) as run:
            summary = {f"metrics/{k}": _num(m["value"]) for k, m in results["metrics"].items()}
            summary |= {f"reference/{k}": _num(m["value"]) for k, m in results.get("reference_metrics", {}).items()}
            q = results.get("quant_report", {}).get("summary", {})
            summary |= {f"quant/{k}": q[k] for k in ("mean_rel_err", "max_rel_err", "compression", "seconds")
                        if q.get(k) is not None}
            summary |= {f"timing/{k}": v for k, v in results.get("timing", {}).items()}
            run.summary.update(summary)
            _log_samples(wandb, run, results, run_dir, int(logger_cfg.get("max_images", 64)))
            plot = run_dir / "layer_error.png"
            if plot.exists():
                run.log({"layer_error": wandb.Image(str(plot))})
            art = wandb.Artifact(name=f"results-{run.id}", type="results")
            art.add_file(str(run_dir / "results.json"))
            run.log_artifact(art)
            return getattr(run, "dir", None)
    except Exception as e:  # noqa: BLE001 - a mirror must never fail the run
        _once("fail", "W&B logging failed (%s: %s); results.json is complete on disk", type(e).__name__, e)
        return None


def _num(v) -> float:
    return float(v)


def _log_samples(wandb, run, results: dict, run_dir: Path, max_images: int) -> None:
    """A table of the first samples: images (first frames and animated GIFs for video models) with their labels.
    Reads only those samples from the run's sample store (or a legacy ``samples/samples.npz``)."""
    from orbitquant.harness.metrics.base import head, open_samples
    from orbitquant.harness.samplestore import StoreError

    if max_images <= 0:
        return
    try:
        samples = open_samples(run_dir / "samples")
    except (FileNotFoundError, StoreError):
        return  # no samples on disk (or an unfinished store): the table is optional
    images, labels = head(samples, max_images).numpy(), samples.labels[:max_images].tolist()
    prompts = results.get("sampling", {}).get("prompts")
    table = wandb.Table(columns=["index", "label", "prompt", "sample"])
    for i, (img, lab) in enumerate(zip(images, labels)):
        gif = run_dir / "samples" / f"{i:06d}.gif"
        if img.ndim == 4:  # video (F, C, H, W)
            media = wandb.Video(str(gif)) if gif.exists() else wandb.Image(_hwc(img[0]))
        else:
            media = wandb.Image(_hwc(img))
        prompt = prompts[int(lab)] if prompts and int(lab) < len(prompts) else ""
        table.add_data(i, int(lab), prompt, media)
    run.log({"samples": table})


def _hwc(img):
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8."""
    import numpy as np

    x = ((np.clip(img, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return x.transpose(1, 2, 0) if x.shape[0] == 3 else x[0]
