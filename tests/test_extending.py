"""docs/extending.md's three recipes, run verbatim on a copy of the repository: every file block is written where the
recipe says, then the recipe's proof tests run there. So the guide cannot drift from the code, and a new method,
family and metric are picked up by the registry-enumerating tests without any list being edited."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"
#: what a recipe needs of the checkout (results/ and docs/ are not read by the proof tests)
COPY = ("orbitquant", "baselines", "conf", "tests", "scripts", "run.py", "pyproject.toml")


def recipe_files(text: str) -> dict[str, str]:
    """``File `path`:`` followed by a fenced block -> {path: block}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^File `([^`]+)`:\n\n```\w*\n(.*?)^```", text, re.M | re.S)}


def proofs(text: str) -> list[tuple[list[str], str]]:
    """Each ``Proof: `python -m pytest -q <files> -k <expr>` `` -> (test files, -k expression)."""
    out = []
    for m in re.finditer(r"Proof: `python -m pytest -q ([^`]*?) -k (\w+)`", text):
        out.append((m.group(1).split(), m.group(2)))
    return out


def test_the_guide_names_three_recipes_with_files_and_proofs():
    text = GUIDE.read_text()
    files, checks = recipe_files(text), proofs(text)
    assert {"baselines/absmax_pt/__init__.py", "conf/quant/absmax_pt.yaml", "orbitquant/harness/adapters/pixart.py",
            "conf/model/tiny_pixart.yaml", "orbitquant/harness/metrics/mse.py"} == set(files)
    assert [k for _, k in checks] == ["absmax_pt", "pixart", "mse_vs_fp"]
    assert not any((ROOT / f).exists() for f in files), "a recipe's file already exists in the repository"


def test_the_three_recipes_work_verbatim_on_a_copy(tmp_path):
    text = GUIDE.read_text()
    copy = tmp_path / "repo"
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy2(src, copy / name)
    for path, body in recipe_files(text).items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_text(body)
    checks = proofs(text)
    files = sorted({f for fs, _ in checks for f in fs})
    expr = " or ".join(k for _, k in checks)
    # the copy's package shadows the installed one (an editable install points at this checkout)
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files, "-k", expr],
                       cwd=copy, capture_output=True, text=True, env=env, timeout=900, check=False)
    tail = p.stdout[-4000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    # every recipe was exercised: the new names appear among the collected test ids
    ran = re.search(r"(\d+) passed", p.stdout)
    assert ran and int(ran.group(1)) >= 8, tail
