"""``model.init=random``: a family's denoiser at its checkpoint's true config with random weights, no download.

Dry runs of the real families (memory, time per stage, layer counts, the whole pipeline end to end) on machines
that cannot fetch the checkpoints. The denoiser is built from the transformer config shipped in
``orbitquant/assets/configs/<name>.json`` (the same file ``orbitquant.harness.inventory.build_meta`` reads), so its
module names and shapes are those of the real checkpoint; only the values are random. Everything around it is
a small stand-in whose *interface* matches what the denoiser expects: text encoders whose output width is the
denoiser's text/pooled/caption width, and VAEs with the real latent channels and spatial/temporal compression.
Each family's ``build_random`` (next to its ``build_tiny``) knows those widths; this module holds what they share.

Numbers (PSNR, FID, ...) produced by such a pipeline mean nothing; its timings and memory are the denoiser's
real ones at the protocol's resolution, plus small stand-ins.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from orbitquant.harness.paths import CONFIGS

#: valid values of ``model.init``
INITS = {"pretrained": "load the checkpoint (local path or HF cache)",
         "random": "true-size denoiser from orbitquant/assets/configs/<name>.json with random weights, no download"}


def check_init(init: str, tiny: bool, path: str | None, name: str) -> None:
    """Fail at construction, with the fix, on an unknown ``init`` or one that contradicts ``tiny``/``path``."""
    if init not in INITS:
        raise ValueError(f"model={name}: model.init={init!r} is not valid; valid: "
                         + "; ".join(f"{k} ({v})" for k, v in INITS.items()))
    if init == "random" and tiny:
        raise ValueError(f"model={name}: model.init=random builds the true-size denoiser and model.tiny=true the "
                         "small test one; drop one of them")
    if init == "random" and path:
        raise ValueError(f"model={name}: model.init=random reads no weights, but model.path={path} is set; drop "
                         "model.path, or use model.init=pretrained to load that checkpoint")


def shipped_config(name: str) -> dict[str, Any]:
    """The shipped transformer config of model config ``name`` (with its ``_class_name``)."""
    path = CONFIGS / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise ValueError(f"model={name}: model.init=random needs the checkpoint's transformer config at {path}; "
                         f"shipped: {known} (add a JSON there, see its README, or use model.init=pretrained)")
    return json.loads(path.read_text())


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a build without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def parameters_in(dtype: torch.dtype) -> Iterator[None]:
    """Every floating parameter registered inside is cast to ``dtype`` at registration.

    Modules create a parameter, register it, then initialise it in place (``reset_parameters``), so the cast
    happens before the init and the init runs in ``dtype``: a bf16 build never holds an fp32 copy of the model,
    only of one parameter at a time (``torch.set_default_dtype`` would also turn buffers such as RoPE tables to
    bf16, which ``from_pretrained`` keeps in fp32).
    """
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def cast(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or not param.is_floating_point() or param.dtype == dtype:
            return None
        return nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(cast)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def building(seed: int, dtype: torch.dtype, device: str = "cpu") -> Iterator[None]:
    """Where a family's ``build_random`` constructs its modules: seeded by ``seed``, parameters born in ``dtype``,
    on ``device`` (``"meta"``: the same modules without memory, for tests)."""
    with seeded(seed), parameters_in(dtype), torch.device(device):
        yield


def build_denoiser(config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The diffusers model of ``config`` (``_class_name`` + constructor arguments) with random weights in ``dtype``.

    Call it inside :func:`building`. Dtypes then follow ``from_pretrained(torch_dtype=dtype)``: the class's
    ``_keep_in_fp32_modules`` (e.g. Wan's norms and time embedder) are fp32, see :func:`as_loaded`.
    """
    import diffusers

    cfg = dict(config)
    cls = getattr(diffusers, cfg.pop("_class_name"))
    with parameters_in(dtype):
        model = cls.from_config(cfg)
    return as_loaded(model, dtype, set(getattr(cls, "_keep_in_fp32_modules", None) or []))


def as_loaded(model: nn.Module, dtype: torch.dtype, keep_fp32: set[str]) -> nn.Module:
    """Tensor dtypes as ``from_pretrained(torch_dtype=dtype)`` leaves them: floating parameters and persistent
    buffers in ``dtype``, except under a module or tensor named in ``keep_fp32`` (fp32); non-persistent buffers
    (tables recomputed at construction, never saved, such as RoPE frequencies) as built."""
    for mod_name, module in model.named_modules():
        parts = set(mod_name.split(".")) if mod_name else set()
        for name, p in list(module.named_parameters(recurse=False)):
            want = torch.float32 if (parts | {name}) & keep_fp32 else dtype
            if p.is_floating_point() and p.dtype != want:  # not setattr: parameters_in would cast it back
                module._parameters[name] = nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.float() if (parts | {name}) & keep_fp32 else b.to(dtype)
    return model.eval()


def standin_kl_vae(latent_channels: int, scaling_factor: float = 1.0, shift_factor: float | None = None) -> nn.Module:
    """A small ``AutoencoderKL`` with the real image VAEs' interface: ``latent_channels`` and 8x spatial
    compression (four levels; pipelines read the factor from ``len(block_out_channels)``), 8-16 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), latent_channels=latent_channels, norm_num_groups=8,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def finish(pipe: Any, dtype: torch.dtype) -> Any:
    """The stand-ins' persistent buffers in ``dtype`` (their parameters were born in it inside :func:`building`),
    as ``from_pretrained(torch_dtype=...)`` leaves every component; the denoiser is already done."""
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and name != "transformer":
            as_loaded(component, dtype, set())
    return pipe
