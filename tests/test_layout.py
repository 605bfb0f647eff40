"""The architecture is readable from the tree and kept that way: library and harness apart (the library never imports
the harness), the public imports users have still work, no module outside the kernels grows past ~400 lines, and no
hand-kept list of methods, families or metrics exists beside the registries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "orbitquant"


def test_the_tree_shows_library_and_harness_apart():
    assert {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("__")} == {
        "quant", "kernels", "hf", "harness", "assets"}
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py"]


def test_the_library_never_imports_the_harness():
    """Run in a fresh interpreter: quantize a model and save it; nothing of ``orbitquant.harness`` may be imported on
    the way (``import orbitquant`` registers the diffusers backend, ``orbitquant.hf``, which is library too)."""
    code = """
import sys, torch, tempfile
import orbitquant as oq
from orbitquant.quant.checkpoint import save_quantized
m = torch.nn.Sequential(torch.nn.Linear(64, 64))
oq.quantize_(m, oq.OrbitConfig(w_bits=4, a_bits=8))
save_quantized(m, tempfile.mkdtemp(), oq.OrbitConfig(w_bits=4, a_bits=8))
bad = sorted(k for k in sys.modules if k.startswith("orbitquant.harness"))
print(",".join(bad))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "", f"the library imported harness modules: {p.stdout.strip()}"
    for f in (PKG / "quant").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                assert not mod.startswith(("orbitquant.harness", "orbitquant.hf")), f"{f.relative_to(ROOT)}: {mod}"


def test_public_imports_from_before_the_split_still_work():
    code = """
import orbitquant as oq
import orbitquant.checkpoint, orbitquant.hf_quantizer
from orbitquant.checkpoint import save_quantized, load_quantized
from orbitquant.hf_quantizer import OrbitQuantDiffusersConfig
assert orbitquant.checkpoint is __import__("orbitquant.quant.checkpoint", fromlist=["x"])
assert oq.checkpoint is orbitquant.checkpoint and callable(oq.quantize_) and oq.OrbitConfig
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert p.stdout.strip() == "ok", p.stderr[-2000:]


MAX_LINES = 420  # "about 400": a module past it is split along a seam


@pytest.mark.parametrize("folder", ["orbitquant", "baselines", "scripts"])
def test_no_module_outside_the_kernels_exceeds_about_400_lines(folder):
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / folder).rglob("*.py")
            if "kernels" not in f.parts and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along a seam: {long}"


def _string_collections(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            yield node, [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        elif isinstance(node, ast.Dict):
            yield node, [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]


def _marked_subset(lines: list[str], node: ast.AST) -> bool:
    """A deliberate selection (a bench's default methods, a test's example metrics) says so: ``# subset: <why>`` on
    the line before the literal or on one of its lines."""
    return any("# subset:" in lines[i] for i in range(max(0, node.lineno - 2), node.end_lineno))


def _candidates(tree: ast.Module, is_test: bool):
    """Library, harness and scripts: every literal. Tests: the literals a test would enumerate -- module-level
    constants and ``parametrize`` arguments (a hand list there leaves a new entry untested); a literal inside a test
    body is a chosen example."""
    if not is_test:
        yield from _string_collections(tree)
        return
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            yield from _string_collections(stmt.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize":
            for arg in node.args[1:]:
                yield from _string_collections(arg)


def test_no_hand_kept_list_of_methods_families_or_metrics():
    """A literal list / tuple / set / dict naming three or more registered methods, families or metrics is a list
    that drifts: derive it from the registry (``METHODS.names()``, ``diffusers_adapters()``, ...) instead, or mark a
    deliberate selection ``# subset: <why>``."""
    from orbitquant.quant.registry import METHODS, METRICS, MODELS

    kinds = {"methods": set(METHODS.names()), "families": set(MODELS.names()), "metrics": set(METRICS.names())}
    found = []
    for folder in ("orbitquant", "baselines", "scripts", "tests"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            lines = text.splitlines()
            for node, strings in _candidates(ast.parse(text), folder == "tests"):
                if _marked_subset(lines, node):
                    continue
                for kind, names in kinds.items():
                    hits = sorted(set(strings) & names)
                    if len(hits) >= 3:
                        found.append(f"{f.relative_to(ROOT)}:{node.lineno} lists {kind} {hits}")
    assert not found, "\n".join(found)
