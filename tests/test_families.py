"""Real diffusers families on tiny random-init pipelines: the loading path, sampling, and every method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_run import _run

import orbitquant as oq
from orbitquant.quant.codebook import distortion
from orbitquant.quant.registry import METHODS, MODELS


def _tiny_families() -> dict[str, tuple[str, str, dict]]:
    """Every registered diffusers family -> (its tiny model config ``tiny_<family>``, that config's eval protocol, the
    adapter's tiny sampling kwargs): enumerated from the registry, so a new family is tested once registered."""
    from test_run import _compose

    from orbitquant.harness.adapters.diffusers_base import diffusers_adapters

    out = {}
    for name, cls in sorted(diffusers_adapters().items()):
        conf = CONF / f"tiny_{name}.yaml"
        assert conf.is_file(), f"family {name!r} has no conf/model/tiny_{name}.yaml (docs/extending.md, recipe 2)"
        out[name] = (f"tiny_{name}", _compose([f"model=tiny_{name}"]).eval.name, dict(cls.tiny_generate_kwargs))
    return out


CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = _tiny_families()


@pytest.mark.parametrize("adapter_name", sorted(TINY))
def test_save_pretrained_then_load_from_path_matches(adapter_name, tmp_path):
    cls = MODELS.get(adapter_name)
    pipe = cls(tiny=True).load(torch.float32)
    pipe.save_pretrained(tmp_path / "ckpt")
    loaded = cls(path=str(tmp_path / "ckpt")).load(torch.float32)
    cond = dict(classes=[1]) if adapter_name == "dit" else dict(prompts=["a photo of a cat"])
    proto = dict(steps=2, batch_size=1, seed=0, progress=False, **cond, **TINY[adapter_name][2])
    a = cls(tiny=True).generate(pipe, **proto)
    # a path-loaded tiny pipeline uses the real-checkpoint call kwargs; pin them to the tiny ones here
    b = cls(tiny=True, path=None).generate(loaded, **proto)
    assert torch.allclose(a.images, b.images, atol=1e-5)


@pytest.mark.parametrize("adapter_name", sorted(TINY))
def test_quantized_tiny_pipeline_generates_finite_images(adapter_name):
    cls = MODELS.get(adapter_name)
    adapter = cls(tiny=True)
    pipe = adapter.load(torch.float32)
    den = adapter.denoiser(pipe)
    report = oq.quantize_(den, oq.OrbitConfig(w_bits=4, a_bits=4), adapter.layers(den),
                          probe=lambda: adapter.probe(pipe))
    assert report.probe == "model" and report.summary()["mean_rel_err"] < 0.5
    check_error_floor(report, 4, 4)  # and not a no-op
    kw = TINY[adapter_name][2]
    cond = dict(classes=[3]) if adapter_name == "dit" else dict(prompts=["a red car"])
    s = adapter.generate(pipe, steps=2, batch_size=1, seed=0, progress=False, **cond, **kw)
    assert torch.isfinite(s.images).all() and s.images.shape[-3] == 3
    if "height" in kw:
        assert s.images.shape[-2:] == (kw["height"], kw["width"])
    if "num_frames" in kw:
        assert s.images.shape[1] == kw["num_frames"]


def check_error_floor(report: oq.QuantReport, w_bits: int, a_bits: int, margin: float = 0.2) -> None:
    """Every orbit layer's output error on the probe is at least ``margin`` x the Lloyd-Max floor of its input dim:
    a unit row / token of dim d quantized to b bits keeps a squared relative error d * D(d, b) (the least any b-bit
    scalar codebook leaves), and the weight and activation errors add, so the output's relative error is about
    sqrt(d (D(d, w) + D(d, a))). Measured on the five tiny families at every LADDER pair: 0.37-14 x that (the
    lowest: wan's cross-attention out-projection, d = 24, at W4A8; every other layer >= 0.47). An unquantized
    layer's error is ~1e-7."""
    layers = [r for r in report.layers if r.treatment.startswith("orbit") and r.rel_err is not None]
    assert layers, "no orbit layer was measured"
    for r in layers:
        d = r.in_features
        floor = margin * math.sqrt(d * (distortion(d, w_bits) + distortion(d, a_bits)))
        assert r.rel_err >= floor, (f"{r.fqn}: W{w_bits}A{a_bits} error {r.rel_err:.3g} below the floor {floor:.3g}")


#: bit pairs from most to fewest bits: each step down must raise the mean layer error by >= 1.2x. Measured on the
#: five tiny families, per step: W8A8 -> W4A8 3.9-10x, W4A8 -> W4A4 1.35-1.50x (an activation error as large as
#: the weight's: ~sqrt(2)), W4A4 -> W3A3 1.77-1.97x, W3A3 -> W2A2 1.74-1.84x.
LADDER = [(8, 8), (4, 8), (4, 4), (3, 3), (2, 2)]


def check_error_grows_as_bits_shrink(adapter_name: str) -> dict:
    """The ordering check (raises AssertionError); returns mean_rel_err per bit pair."""
    cls = MODELS.get(adapter_name)
    errs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("orbitquant.quant.api.rotation_ks", lambda *_: (None, None))  # KS diagnostics: not under test, slow
        for w_bits, a_bits in LADDER:
            adapter = cls(tiny=True)
            pipe = adapter.load(torch.float32)
            den = adapter.denoiser(pipe)
            report = oq.quantize_(den, oq.OrbitConfig(w_bits=w_bits, a_bits=a_bits), adapter.layers(den),
                                  probe=lambda: adapter.probe(pipe))
            check_error_floor(report, w_bits, a_bits)
            errs[(w_bits, a_bits)] = report.summary()["mean_rel_err"]
    for more, fewer in zip(LADDER, LADDER[1:]):
        assert errs[fewer] >= 1.2 * errs[more], (f"{adapter_name}: W{fewer[0]}A{fewer[1]} not worse than "
                                                 f"W{more[0]}A{more[1]}", errs)
    return errs


@pytest.mark.parametrize("adapter_name", sorted(TINY))
def test_orbit_error_grows_as_bits_shrink_and_stays_above_the_floor(adapter_name):
    check_error_grows_as_bits_shrink(adapter_name)


#: the whole run.py method sweep on three families (27-42 s each) runs under -m slow; their adapters, roles and
#: sampling are still in the default run (test above and test_adapters.py), flux / wan sweep the same t2i / t2v
#: protocols here, and every method quantizes the tiny DiT in tests/test_every_method.py (a family added later gets
#: the sweep in the default run)
SWEEP_SLOW = {"tiny_cogvideox", "tiny_zimage", "tiny_dit"}


@pytest.mark.parametrize("model, eval_", [pytest.param(m, e, marks=[pytest.mark.slow] if m in SWEEP_SLOW else [])
                                          for m, e in sorted((m, e) for m, e, _ in TINY.values())])
def test_run_every_method_on_tiny_family(model, eval_, tmp_path):
    # calibrated methods calibrate on the family's smoke calib protocol (same name as the eval)
    methods = METHODS.names()  # every registered method, each by its own conf/quant/<name>.yaml
    _run(["-m", f"model={model}", "quant=" + ",".join(methods),
          f"eval={eval_}", f"calib={eval_}", "dtype=float32", "w_bits=4", "a_bits=8"], tmp_path)
    found = sorted(p.relative_to(tmp_path / "runs").parts[1] for p in (tmp_path / "runs").glob("**/results.json"))
    assert found == methods
    qdit = json.loads(next((tmp_path / "runs").glob("**/qdit/**/results.json")).read_text())
    assert qdit["quant_report"]["summary"]["calibration"]["inputs_recorded"] >= 1
    fp = json.loads(next((tmp_path / "runs").glob("**/fp/**/results.json")).read_text())
    assert fp["metrics"]["psnr_vs_fp"]["value"] == "inf"  # identity method is bit-exact through the pipeline
    assert next((tmp_path / "runs").glob("**/orbit/**/samples/grid.png")).exists()


def test_missing_real_checkpoint_exits_with_one_line(tmp_path):
    p = _run(["model=flux1_schnell", "eval=t2i_smoke", "+model.path=" + str(tmp_path / "absent")], tmp_path,
             check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "black-forest-labs/FLUX.1-schnell" in p.stderr


PAPER_EVALS = {"flux1_schnell": "flux_schnell_fidelity", "flux1_dev": "flux_dev_fidelity",
               "zimage_turbo": "zimage_turbo_fidelity", "wan21": "wan21_fidelity", "wan21_14b": "wan21_fidelity",
               "cogvideox_2b": "cogvideox_fidelity", "cogvideox_5b": "cogvideox_fidelity", "dit_xl_2": "dit_fidelity"}


@pytest.mark.parametrize("model, eval_", sorted(PAPER_EVALS.items()))
def test_paper_protocols_fit_their_models_and_others_are_refused(model, eval_):
    from omegaconf import OmegaConf
    from test_run import _compose

    from orbitquant.harness.factory import build_adapter

    cfg = _compose([f"model={model}", f"eval={eval_}"])
    adapter = build_adapter(OmegaConf.to_container(cfg.model, resolve=True))
    adapter.check_protocol(OmegaConf.to_container(cfg.eval.protocol), eval_)
    with pytest.raises(ValueError, match="does not fit"):
        adapter.check_protocol(OmegaConf.to_container(_compose(["eval=digits"]).eval.protocol), "digits")


def test_video_samples_are_stored_exactly_with_grid_gif_and_mp4_previews(tmp_path):
    import imageio.v3 as iio

    from orbitquant.harness.generate import save_previews
    from orbitquant.harness.samplestore import SampleSet, StoreWriter

    clips = torch.rand(2, 9, 3, 16, 24) * 2 - 1
    w = StoreWriter(tmp_path / "samples", "k", 2, "float32")
    w.write(0, 2, clips, [0, 1])
    w.finish({})
    w.close()
    stored = SampleSet.open(tmp_path / "samples")
    files = save_previews(stored, tmp_path / "samples")
    assert {"samples", "grid.png", "gif_000", "mp4_000", "mp4_001"} <= set(files)
    assert torch.equal(next(stored.batches(2))[0], clips)
    frames = iio.imread(tmp_path / files["mp4_000"])
    assert frames.shape == (9, 16, 24, 3)
    from orbitquant.harness.viz import save_mp4

    ramp = torch.linspace(-1, 1, 24).expand(9, 3, 16, 24)  # smooth content: H.264 keeps it (noise it does not)
    got = torch.from_numpy(iio.imread(save_mp4(ramp, tmp_path / "ramp.mp4"))).float()
    assert (got - ((ramp + 1) * 127.5).round().permute(0, 2, 3, 1)).abs().mean() < 3  # not uint8 frames x 255
