"""Where real checkpoints come from: a local directory or the Hugging Face cache, never a silent download.

``resolve_checkpoint`` returns a local directory or raises :class:`WeightsNotFound` with one line
that names the repo id and how to get it; ``run.py`` prints that line and exits non-zero without a
traceback.
"""

from __future__ import annotations

from pathlib import Path


class WeightsNotFound(FileNotFoundError):
    """The checkpoint is neither at the given path nor in the local Hugging Face cache."""


def resolve_checkpoint(name: str, repo_id: str, path: str | None = None, allow_download: bool = False) -> str:
    """A local directory holding ``repo_id`` (or ``path``).

    With ``allow_download`` (config ``model.download=true``) a missing snapshot is fetched from the hub;
    otherwise only the local cache is consulted, which answers at once on offline machines.
    """
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise WeightsNotFound(f"model={name}: weights path {p} does not exist; point model.path at the "
                                  f"downloaded {repo_id} directory")
        return str(p)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=not allow_download)
    except LocalEntryNotFoundError:
        raise WeightsNotFound(
            f"model={name}: {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); download it "
            f"with {download_fix(repo_id)}"
        ) from None
    except OSError as e:  # network failures when downloading is allowed
        raise WeightsNotFound(f"model={name}: could not fetch {repo_id}: {e}") from None


def download_fix(repo_id: str) -> str:
    return (f"`hf download {repo_id}` (gated repos need `hf auth login` and accepted terms), or set "
            "model.path=/local/dir, or pass model.download=true on a machine with network access")


def checkpoint_need(name: str, repo_id: str, path: str | None = None, allow_download: bool = False):
    """The weights as a preflight item (``preflight.Need``): present locally, or to be downloaded at load when
    ``allow_download``; never downloads here."""
    from huggingface_hub import constants

    from orbitquant.harness.preflight import Need

    what = f"model={name}"
    try:
        return Need(what, f"{repo_id} weights at {resolve_checkpoint(name, repo_id, path, False)}", True)
    except WeightsNotFound:
        if allow_download and not path:
            return Need(what, f"{repo_id} weights (model.download=true: fetched from the hub at load)", True)
        if path:
            return Need(what, f"weights path {Path(path).expanduser()}", False,
                        f"point model.path at the downloaded {repo_id} directory (`hf download {repo_id} --local-dir "
                        "<dir>`)", "not found")
        return Need(what, f"{repo_id} weights in the Hugging Face cache ({constants.HF_HUB_CACHE})", False,
                    f"download with {download_fix(repo_id)}", "not found")
