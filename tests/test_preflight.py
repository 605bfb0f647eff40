"""Preflight (orbitquant/harness/preflight.py): file hashes against published digests (and their cache), .npz reference keys
per metric, evaluator interpreters probed, and ``run.py preflight=true`` / a normal run stopping with the checklist
before anything is loaded or written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from orbitquant.harness import preflight
from orbitquant.harness.factory import build_metrics
from orbitquant.harness.metrics.features import INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL
from orbitquant.harness.preflight import Need, cuda_need, dir_need, file_need, hub_prefix, module_need, npz_need

ROOT = Path(__file__).resolve().parent.parent
_sha256 = hashlib.sha256  # the tests' own digests, not counted by ``sha256_calls``


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    """Each test its own digest cache, so the machine's ~/.cache never answers for a test."""
    monkeypatch.setenv(preflight.HASH_CACHE_ENV, str(tmp_path / "sha256.json"))
    return tmp_path / "sha256.json"


@pytest.fixture
def sha256_calls(monkeypatch):
    """How many times preflight hashed a file (each hash builds one hashlib.sha256 object)."""
    calls, real = [], hashlib.sha256

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(preflight.hashlib, "sha256", counting)
    return calls


def _touch_later(path: Path, seconds: int = 5) -> None:
    """A new modification time, whatever the filesystem's timestamp granularity."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# ---------------------------------------------------------------------------------------------- files and hashes
def test_file_need_checks_the_sha256_and_hashes_each_version_once(tmp_path, sha256_calls, _hash_cache):
    f = tmp_path / "weights.bin"
    data = bytes(range(256)) * 64
    f.write_bytes(data)
    digest = _sha256(data).hexdigest()
    assert file_need("w", f, "fix it", sha256=digest).ok and len(sha256_calls) == 1
    assert str(f.resolve()) in json.loads(_hash_cache.read_text())
    assert file_need("w", f, "fix it", sha256=digest).ok and len(sha256_calls) == 1  # from the cache
    assert file_need("w", f, "fix it", sha256=digest.upper()).ok  # a digest as published in capitals

    changed = bytearray(data)
    changed[100] ^= 1  # one byte, same size: only the modification time tells
    f.write_bytes(changed)
    _touch_later(f)
    n = file_need("w", f, "fix it", sha256=digest)
    assert not n.ok and "sha256" in n.problem and n.where == str(f) and n.fix == "fix it"
    assert len(sha256_calls) == 2
    f.write_bytes(data + b"x")  # a size change
    assert not file_need("w", f, "fix it", sha256=digest).ok and len(sha256_calls) == 3
    f.write_bytes(data)
    _touch_later(f, 10)
    assert file_need("w", f, "fix it", sha256=digest).ok and len(sha256_calls) == 4


def test_the_hash_cache_is_what_answers_for_an_unchanged_file(tmp_path, sha256_calls, _hash_cache):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc")
    st = f.stat()
    _hash_cache.write_text(json.dumps({str(f.resolve()): [st.st_size, st.st_mtime_ns, "feed" * 16]}))
    assert preflight.file_sha256(f) == "feed" * 16 and not sha256_calls  # trusted by (path, size, mtime)
    _touch_later(f)
    assert preflight.file_sha256(f) == _sha256(b"abc").hexdigest() and len(sha256_calls) == 1
    _hash_cache.write_text("{not json")  # a corrupt cache: hashed again, not a crash
    assert preflight.file_sha256(f) == _sha256(b"abc").hexdigest() and len(sha256_calls) == 2


def test_hash_prefix_and_hub_names(tmp_path):
    f = tmp_path / "alexnet-owt-7be5be79.pth"
    f.write_bytes(b"not alexnet")
    digest = _sha256(b"not alexnet").hexdigest()
    assert hub_prefix("alexnet-owt-7be5be79.pth") == "7be5be79"
    assert hub_prefix(f) == "7be5be79" and hub_prefix("/x/vgg16-397923af.pth") == "397923af"
    assert hub_prefix("model.safetensors") is None
    assert file_need("w", f, "", hash_prefix=digest[:8]).ok
    bad = file_need("w", f, "", hash_prefix=hub_prefix(f))
    assert not bad.ok and "sha256" in bad.problem and "7be5be79" in bad.problem


def test_absent_files_and_folders_say_why(tmp_path):
    n = file_need("w", tmp_path / "nope.pth", "wget it")
    assert not n.ok and n.problem == "not found" and "nope.pth" in n.where and "wget it" in n.line()
    assert file_need("w", tmp_path, "").problem == "not a file"
    unset = file_need("w", None, "set it", unset="$SOME_VAR")
    assert not unset.ok and unset.where == "$SOME_VAR" and unset.problem == "not set"
    (tmp_path / "a.json").write_text("{}")
    assert dir_need("d", tmp_path, "", contains=["a.json"]).ok
    lacking = dir_need("d", tmp_path, "", contains=["a.json", "b.bin"])
    assert not lacking.ok and "b.bin" in lacking.problem
    assert dir_need("d", tmp_path / "a.json", "").problem == "not a folder"


# ---------------------------------------------------------------------------------------------- reference .npz keys
class _Extractor(nn.Module):
    """A locally built extractor: the metrics then need no Inception weights (only the reference is checked)."""

    outputs = ("pool3", "logits_unbiased", "spatial")


def _needs(name: str, **opts) -> list[Need]:
    (m,) = build_metrics([{name: {"extractor": _Extractor(), **opts}}])
    return m.needs()


def test_a_mu_sigma_npz_passes_fid_but_not_sfid_or_precision(tmp_path):
    """The issue's case: a reference .npz holding only mu/sigma used to pass the check, and sFID failed after
    sampling. Each metric now checks the keys it reads."""
    ref = tmp_path / "stats.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    (fid,) = _needs("fid", reference=str(ref))
    assert fid.ok and fid.where == str(ref)
    (sfid,) = _needs("sfid", reference=str(ref))
    assert not sfid.ok and "has mu, sigma" in sfid.problem
    assert "mu_s+sigma_s" in sfid.problem and "arr_0" in sfid.problem
    (prec,) = _needs("precision", reference=str(ref))
    assert not prec.ok and "arr_0" in prec.problem and "mu+sigma" not in prec.problem  # statistics are not enough
    (sub,) = _needs("fid", reference=str(ref), limit=100)  # a subset of the reference needs its images
    assert not sub.ok and "arr_0" in sub.problem
    (m,) = build_metrics([{"sfid": {"extractor": _Extractor(), "reference": str(ref)}}])
    with pytest.raises(FileNotFoundError, match="mu_s"):
        m.check()

    both = tmp_path / "both.npz"
    np.savez(both, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(4), sigma_s=np.eye(4))
    assert _needs("fid", reference=str(both))[0].ok and _needs("sfid", reference=str(both))[0].ok
    assert not _needs("precision", reference=str(both))[0].ok
    batch = tmp_path / "batch.npz"
    np.savez(batch, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    for name in ("fid", "sfid", "precision", "recall"):  # subset: the metrics that read a reference batch
        assert _needs(name, reference=str(batch))[0].ok, name


def test_npz_need_reads_the_index_only(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    n = npz_need("ref", junk, [("mu", "sigma")], "fix")
    assert not n.ok and "unreadable" in n.problem
    assert npz_need("ref", tmp_path / "none.npz", [("mu",)], "fix").problem == "not found"


def test_wrong_inception_weights_are_a_sha256_mismatch_not_present(tmp_path, monkeypatch):
    import orbitquant.harness.metrics.inception as inception

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    fake = tmp_path / INCEPTION_FILE
    fake.write_bytes(b"an HTML error page, saved as the weights")

    def weights(**opts) -> Need:
        (m,) = build_metrics([{"fid": {"reference": "fp", **opts}}])
        (n,) = [n for n in m.needs() if n.what.startswith("InceptionV3 weights")]
        return n

    n = weights(inception_weights=str(fake))
    assert not n.ok and "sha256" in n.problem and n.where == str(fake) and INCEPTION_URL in n.fix
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub's cache, where torch-fidelity downloads
    hub = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    assert weights().problem == "not found" and weights().where == str(hub)
    hub.parent.mkdir(parents=True)
    hub.write_bytes(fake.read_bytes())
    assert not weights().ok and "sha256" in weights().problem
    (m,) = build_metrics([{"fid": {"reference": "fp"}}])
    with pytest.raises(FileNotFoundError, match="sha256"):
        m.check()
    # the content is what counts: the same file passes against its own digest
    monkeypatch.setattr(inception, "INCEPTION_SHA256", _sha256(fake.read_bytes()).hexdigest())
    assert weights().ok and weights(inception_weights=str(fake)).ok


# ---------------------------------------------------------------------------------------------- other interpreters
def _interpreter(tmp_path: Path, name: str, status: int) -> Path:
    """A stand-in for an evaluator environment's python: records its arguments, exits with ``status``."""
    p = tmp_path / name
    p.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{tmp_path}/{name}.log"\nexit {status}\n')
    p.chmod(0o755)
    return p


def test_module_and_cuda_needs_probe_the_given_interpreter(tmp_path):
    yes, no = _interpreter(tmp_path, "yes", 0), _interpreter(tmp_path, "no", 1)
    n = module_need("vbench", "vbench", "bash scripts/setup_vbench_env.sh", python=yes)
    assert n.ok and str(yes) in n.where
    assert "find_spec('vbench')" in (tmp_path / "yes.log").read_text()  # the module asked about, in that interpreter
    n = module_need("vbench", "vbench", "bash scripts/setup_vbench_env.sh", python=no)
    assert not n.ok and n.problem == "not installed there" and "setup_vbench_env" in n.line()
    assert cuda_need("CUDA", python=yes).ok
    assert "torch.cuda.is_available()" in (tmp_path / "yes.log").read_text()
    c = cuda_need("CUDA", python=no)
    assert not c.ok and c.problem == "no CUDA device there"
    for n in (module_need("m", "vbench", "", python=tmp_path / "env/bin/python"),
              cuda_need("CUDA", python=tmp_path / "env/bin/python")):
        assert not n.ok and "not found" in n.problem and "env/bin/python" in n.problem
    assert module_need("json", "json", "").ok  # here: found without importing
    absent = module_need("x", "orbitquant_no_such_module", "pip install x")
    assert not absent.ok and absent.problem == "not installed"


# ---------------------------------------------------------------------------------------------- a run's list
def test_collect_lists_each_item_once_with_everything_that_needs_it(tmp_path):
    class M:
        def __init__(self, name, needs):
            self.name, self._needs = name, needs

        def needs(self):
            return self._needs

    w = file_need("weights", tmp_path / "w.pth", "wget w")
    ref = dir_need("reference", tmp_path, "")
    needs = preflight.collect(None, [M("fid", [w, ref]), M("sfid", [w]), M("isc", [w])])  # subset: examples
    assert [(n.what, n.by) for n in needs] == [("weights", ("fid", "sfid", "isc")), ("reference", ("fid",))]
    text = preflight.render(needs)
    assert "1/2 present" in text and text.count("MISSING") == 1 and "[fid, sfid, isc]" in text
    one = preflight.error_text(needs)
    assert one.count("\n") == 0 and one.startswith("error: weights:") and "wget w" in one
    two = preflight.error_text([*needs, Need("CUDA device", "device=cuda", False, "run on a GPU node")])
    assert two.count("MISSING") == 2 and "2 things this run needs are missing" in two


# ---------------------------------------------------------------------------------------------- run.py
FLUX = ["model=flux1_dev", "eval=coco_fid_clip"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """The run.py commands of this file, started together (a few seconds of imports each) and awaited once:
    name -> (completed process, its results_dir, its cache_dir)."""
    base = tmp_path_factory.mktemp("preflight_cli")
    ref = base / "stats.npz"  # holds only mu/sigma: sFID must fail the check before anything is sampled
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBITQUANT_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(base / "hf"), TORCH_HOME=str(base / "torch"),
               ORBITQUANT_HASH_CACHE=str(base / "sha256.json"), XDG_CACHE_HOME=str(base / "xdg"),
               ORBITQUANT_COCO_PROMPTS=str(base / "coco/captions.txt"), ORBITQUANT_COCO_IMAGES=str(base / "coco/val"))
    commands = {
        "digits": ["preflight=true"],
        "flux": [*FLUX, "preflight=true"],
        "flux_run": [*FLUX, f"+eval.metrics.sfid.reference={ref}"],
        "sweep": ["-m", *FLUX, "quant=orbit,rtn", "device=cuda", "preflight=true"],
    }
    procs = {}
    for name, args in commands.items():
        flags, overrides = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
        out = base / name
        cmd = [sys.executable, str(ROOT / "run.py"), *flags, f"results_dir={out}/runs", f"cache_dir={out}/cache",
               "progress=false", *overrides]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out)
    done = {}
    for name, (p, out) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), out / "runs", out / "cache")
    done["base"] = base
    return done


def _created(results: Path, cache: Path) -> list[str]:
    """What a command left besides Hydra's own record of the job (.hydra/, run.log, a sweep's multirun.yaml):
    nothing, for a run that stopped at preflight."""
    files = [p for d in (results, cache) if d.exists() for p in d.rglob("*") if p.is_file()]
    return [str(p) for p in files if p.name not in ("run.log", "multirun.yaml") and ".hydra" not in p.parts]


def _missing_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("MISSING")]


def test_preflight_of_the_default_run_is_all_present(cli):
    p, results, cache = cli["digits"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert "present" in p.stdout and "everything this run needs is present" in p.stdout
    assert "MISSING" not in p.stdout and "ok       model=digits" in p.stdout
    assert not _created(results, cache)


def test_preflight_lists_everything_missing_with_its_fix_and_loads_nothing(cli):
    p, results, cache = cli["flux"]
    base = cli["base"]
    assert p.returncode == 1, p.stdout + p.stderr
    missing = _missing_lines(p.stdout)
    want = {  # item -> what its line must say (where it is looked for, and the fix)
        "model=flux1_dev:": ["black-forest-labs/FLUX.1-dev", str(base / "hf"), "fix: download with `hf download"],
        "InceptionV3 weights": [str(base / "torch/hub/checkpoints" / INCEPTION_FILE), f"fix: wget {INCEPTION_URL}"],
        "reference images:": [str(base / "coco/val"), "(not found); fix: "],
        "prompts of coco_fid_clip:": [str(base / "coco/captions.txt"), "(not found); fix: "],
    }
    if importlib.util.find_spec("torch_fidelity") is None:  # an optional package: missing here, or listed as ok
        want["torch-fidelity"] = ["fix: pip install"]
    else:
        assert "ok       torch-fidelity" in p.stdout
    for item, parts in want.items():
        (line,) = [ln for ln in missing if ln.startswith(f"MISSING  {item}")]
        for part in parts:
            assert part in line, (part, line)
    assert "nothing was loaded or sampled" in p.stdout and "Traceback" not in p.stderr
    assert not _created(results, cache)


def test_a_run_with_something_missing_stops_with_the_list_before_loading(cli):
    p, results, cache = cli["flux_run"]
    assert p.returncode not in (0, None), p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    err = p.stderr
    assert err.startswith("error: ") and "things this run needs are missing" in err
    for item in ("model=flux1_dev:", "InceptionV3 weights", "reference images:", "prompts of coco_fid_clip:"):
        assert f"MISSING  {item}" in err, item
    # the case: statistics without sFID's keys fail now, not after hours of sampling
    (npz,) = [ln for ln in _missing_lines(err) if ln.startswith("MISSING  reference .npz with mu_s+sigma_s")]
    assert "has mu, sigma" in npz and npz.endswith("[sfid]")
    assert not _created(results, cache)


def test_a_preflight_sweep_lists_each_missing_item_once(cli):
    p, results, cache = cli["sweep"]
    assert p.returncode == 1, p.stdout + p.stderr
    missing = _missing_lines(p.stdout)
    items = [ln.split(":", 1)[0] for ln in missing]
    assert len(items) == len(set(items)), missing  # two jobs, every item listed once
    single = {ln.split(":", 1)[0] for ln in _missing_lines(cli["flux"][0].stdout)}
    assert single <= set(items)
    assert sum(ln.startswith("preflight ") for ln in p.stdout.splitlines()) == 2  # a title per job
    assert "nothing new (listed above)" in p.stdout  # the second job: all listed by the first
    # device=cuda without a GPU: an item of the checklist, not a config error
    assert "config error" not in p.stdout + p.stderr
    if torch.cuda.is_available():
        assert "ok       CUDA device: device=cuda" in p.stdout
    else:
        assert sum(ln.startswith("MISSING  CUDA device: device=cuda") for ln in missing) == 1
    assert not _created(results, cache)
