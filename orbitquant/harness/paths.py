"""Where the harness finds its files: the package's shipped assets and the repository root (results, conf)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # orbitquant/
ASSETS = PACKAGE / "assets"                    # shipped weights, transformer configs, prompt lists
CONFIGS = ASSETS / "configs"                   # full-size transformer configs (inventory, random init, planner)
REPO = PACKAGE.parent                          # the checkout: conf/, results/, scripts/
