"""Shared plumbing of adapters around real diffusers pipelines (text-to-image and text-to-video).

Subclasses provide the family's role table, pipeline class, default repo id, per-call keyword
arguments, and a ``build_tiny`` recipe; this class does loading (local path or HF cache, optional
CPU offload), sampling with per-sample seeded generators, and the probe.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from orbitquant.harness.adapters.base import ModelAdapter
from orbitquant.harness.adapters.hf import resolve_checkpoint
from orbitquant.harness.adapters.random_init import check_init
from orbitquant.harness.adapters.roles import RoleTable
from orbitquant.harness.data import load_prompts
from orbitquant.harness.distributed import shard_range
from orbitquant.harness.samplestore import MemorySink
from orbitquant.quant.calib import publish_calls
from orbitquant.quant.types import LayerRef


class DiffusersAdapter(ModelAdapter):
    roles: ClassVar[RoleTable]
    #: the diffusers transformer class name the role table describes: the diffusers backend and the inventory find
    #: a model's role table through it (by name, so that nothing imports every diffusers model class)
    transformer_cls: ClassVar[str]
    pipeline_cls: ClassVar[str]
    default_name: ClassVar[str]  # the model config name of the default checkpoint
    default_repo: ClassVar[str]
    #: keyword arguments every pipeline call gets (e.g. max_sequence_length)
    call_kwargs: ClassVar[dict[str, Any]] = {}
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {}
    #: extra arguments of the one-step probe call (e.g. a few frames for video models)
    probe_kwargs: ClassVar[dict[str, Any]] = {"height": 256, "width": 256}
    tiny_probe_kwargs: ClassVar[dict[str, Any]] = {"height": 64, "width": 64}
    #: sampling arguments of the tiny pipeline in tests (guidance, and the resolution / frames it supports)
    tiny_generate_kwargs: ClassVar[dict[str, Any]] = {"guidance": 0.0, "height": 32, "width": 32}
    #: how the pipeline runs classifier-free guidance (see ``calib.publish_calls``)
    cfg_layout: ClassVar[str] = "cond_first"

    def __init__(self, name: str | None = None, repo_id: str | None = None, path: str | None = None,
                 download: bool = False, cpu_offload: bool = False, tiny: bool = False, tiny_seed: int = 0,
                 init: str = "pretrained", init_seed: int = 0) -> None:
        """``init``: ``pretrained`` loads the checkpoint; ``random`` builds the true-size denoiser with weights
        seeded by ``init_seed`` and small stand-ins around it (``build_random``; no download, no HF cache)."""
        self.name = name or self.default_name
        self.repo_id = repo_id or self.default_repo
        self.path, self.download, self.cpu_offload = path, download, cpu_offload
        self.tiny, self.tiny_seed = tiny, tiny_seed
        check_init(init, tiny, path, self.name)
        self.init, self.init_seed = init, init_seed

    # ------------------------------------------------------------------ loading
    def load(self, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Any:
        if self.init == "random":  # built on the CPU, like from_pretrained loads; moved below
            pipe = self.build_random(self.init_seed, dtype)
        elif self.tiny and not self.path:
            pipe = self.build_tiny(self.tiny_seed).to(dtype=dtype)
        else:
            import diffusers

            src = resolve_checkpoint(self.name, self.repo_id, self.path, self.download)
            pipe = getattr(diffusers, self.pipeline_cls).from_pretrained(src, torch_dtype=dtype)
        if self.cpu_offload and device.startswith("cuda"):
            pipe.enable_model_cpu_offload()  # keeps only the running component on the GPU
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def needs(self) -> list:
        """The checkpoint (HF cache or ``model.path``) as a preflight item; none for random and tiny pipelines."""
        from orbitquant.harness.adapters.hf import checkpoint_need
        from orbitquant.harness.preflight import Need

        if self.init == "random":
            return [Need(f"model={self.name}", "model.init=random: true-size denoiser, random weights", True)]
        if self.tiny and not self.path:
            return [Need(f"model={self.name}", "tiny random-init pipeline (no checkpoint)", True)]
        return [checkpoint_need(self.name, self.repo_id, self.path, self.download)]

    def fingerprint(self) -> str:
        if self.init == "random":
            return f"random-{self.name}-{self.init_seed}"
        return f"tiny-{self.tiny_seed}" if self.tiny and not self.path else str(self.path or self.repo_id)

    def build_random(self, seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None,
                     device: str = "cpu") -> Any:
        """The pipeline with the denoiser at ``config`` (default: the checkpoint's true config,
        ``random_init.shipped_config(self.name)``) with random weights in ``dtype``, and small random stand-ins
        for the text encoder(s) and VAE whose widths and compression factors fit it. ``device="meta"`` builds
        it without memory. Deterministic in (seed, dtype); no hub access."""
        raise NotImplementedError(f"model={self.name}: model.init=random is not implemented for this family; "
                                  "use model.init=pretrained")

    def _call_kwargs(self, pipe) -> dict[str, Any]:
        return dict(self.tiny_call_kwargs if self.tiny and not self.path else self.call_kwargs)

    def denoiser(self, pipe) -> nn.Module:
        return pipe.transformer

    def layers(self, denoiser: nn.Module) -> list[LayerRef]:
        return self.roles.refs(denoiser)

    # ------------------------------------------------------------------ sampling
    def _output(self, out) -> torch.Tensor:
        """Pipeline output -> images (N, C, H, W) or videos (N, F, C, H, W), in [-1, 1], fp32 on CPU."""
        return (out.frames if self.modality == "video" else out.images).float().cpu() * 2 - 1

    def _sample_batches(self, pipe, labels: list[int], batch_size: int, seed: int, call, progress: bool, desc: str,
                        steps: int | None = None, shard: tuple[int, int] = (0, 1), sink=None) -> int:
        """Run ``call(start, stop, generators)`` over this rank's batches and hand each batch to ``sink``
        (``samplestore``: a store on disk, or memory); batches the sink already has are skipped (resume). Sample
        k's noise comes from a generator seeded by (seed, k), so results do not depend on the batch size. Counts
        denoiser forwards per batch (the real cost of a protocol: CFG doubles it, and Turbo models may differ
        from the step count) and publishes each forward's step and CFG halves to calibration collectors
        (``calib.publish_calls``). Returns the forwards of the batches sampled here."""
        calls = [0]
        denoiser = self.denoiser(pipe)
        hook = denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        idx = shard_range(len(labels), shard)  # this rank's items (all of them without torchrun)
        with hook, tqdm(total=len(idx), desc=desc, unit="sample", disable=not progress, leave=False) as bar:
            for start in range(idx.start, idx.stop, batch_size):
                stop = min(idx.stop, start + batch_size)
                if sink.has(start, stop):
                    bar.update(stop - start)
                    continue
                before = calls[0]
                gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(start, stop)]
                with publish_calls(denoiser, self.cfg_layout, rows=stop - start, n_steps=steps):
                    images = self._output(call(start, stop, gens))
                sink.write(start, stop, images, labels[start:stop], forwards=calls[0] - before)
                bar.update(stop - start)
        return calls[0]

    def check_protocol(self, protocol: dict, eval_name: str = "") -> None:
        super().check_protocol(protocol, eval_name)
        if "prompts" in protocol:
            try:
                load_prompts(protocol["prompts"])
            except ValueError as e:
                raise ValueError(f"{eval_name}: {e}") from None

    def generate(self, pipe, *, prompts: list[str] | str, n_per_prompt: int = 1, steps: int, guidance: float,
                 height: int, width: int, batch_size: int, seed: int, progress: bool = True,
                 desc: str = "sampling", shard: tuple[int, int] = (0, 1), sink=None, **extra: Any):
        """``n_per_prompt`` images (or videos) for every prompt (``prompts``: a list or a prompt file), written
        batch by batch to ``sink`` (default: memory, returning :class:`Samples`; see ``samplestore``)."""
        prompts = load_prompts(prompts)
        items = [(i, p) for i, p in enumerate(prompts) for _ in range(n_per_prompt)]
        sink = sink if sink is not None else MemorySink()

        def call(start, stop, gens):
            return pipe([p for _, p in items[start:stop]], num_inference_steps=steps, guidance_scale=guidance,
                        height=height, width=width, generator=gens, output_type="pt", **self._call_kwargs(pipe),
                        **extra)

        self._sample_batches(pipe, [i for i, _ in items], batch_size, seed, call, progress, desc, steps, shard, sink)
        return sink.finish({"prompts": prompts, "steps": steps, "guidance": guidance, "seed": seed})

    @property
    def heavy(self) -> bool:  # tiny test pipelines are not
        return not (self.tiny and not self.path)

    def n_items(self, protocol: dict) -> int:
        return len(load_prompts(protocol["prompts"])) * protocol.get("n_per_prompt", 1)

    def probe(self, pipe) -> None:
        """One denoising step on one prompt at a small resolution."""
        g = torch.Generator().manual_seed(1234)
        size = self.tiny_probe_kwargs if self.tiny and not self.path else self.probe_kwargs
        pipe(["a photo of a cat"], num_inference_steps=1, guidance_scale=0.0, generator=[g], output_type="latent",
             **size, **self._call_kwargs(pipe))


def diffusers_adapters() -> dict[str, type[DiffusersAdapter]]:
    """Every registered diffusers family: registry name -> adapter class."""
    from orbitquant.quant.registry import MODELS

    return {n: c for n, c in MODELS.items() if isinstance(c, type) and issubclass(c, DiffusersAdapter)}


def roles_by_class_name() -> dict[str, RoleTable]:
    """Diffusers transformer class name -> the role table of the adapter that declares it (``transformer_cls``)."""
    return {c.transformer_cls: c.roles for c in diffusers_adapters().values() if getattr(c, "transformer_cls", None)}


def roles_for_class(model_cls: type) -> RoleTable | None:
    """The role table of the adapter whose ``transformer_cls`` is ``model_cls`` or one of its bases; None if none."""
    by_name = roles_by_class_name()
    return next((by_name[k.__name__] for k in model_cls.__mro__ if k.__name__ in by_name), None)
