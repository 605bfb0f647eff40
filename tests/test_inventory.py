"""Full-size architectures on the meta device: layer inventories match the published counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orbitquant.harness.inventory import build_meta, meta_inventory, role_tables

ROOT = Path(__file__).resolve().parent.parent

# (total, orbit, adaln INT4, untouched): the first three are the published inventories (spec section 2.7)
PUBLISHED = {
    "flux1_schnell": (502, 418, 76, 8),
    "wan21": (306, 300, 0, 6),
    "zimage_turbo": (276, 238, 32, 6),
}
# RPBH block sizes the spec pins for the paper's dims (h = largest power of two dividing d)
BLOCKS = {1536: 512, 3072: 1024, 3840: 256, 8960: 256, 10240: 2048, 12288: 4096, 15360: 1024,
          1920: 128, 7680: 512, 5120: 1024, 13824: 512}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_inventories(name):
    r = meta_inventory(name)
    t = r["by_treatment"]
    assert (r["total"], t["orbit"], t["adaln_int4"], t["untouched"]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(role_tables()))
def test_every_linear_has_a_role_and_dims_follow_the_block_rule(name):
    model = build_meta(name)
    refs = role_tables()[name].refs(model)
    n_linear = sum(1 for m in model.modules() if m.__class__.__name__ == "Linear")
    assert len(refs) == n_linear == len({r.fqn for r in refs})
    r = meta_inventory(name)
    assert sum(r["by_treatment"].values()) == r["total"]
    for d, h in r["dims"].items():
        if int(d) in BLOCKS:
            assert h == BLOCKS[int(d)]
        assert int(d) % h == 0 and h & (h - 1) == 0 and (int(d) // h) % 2 == 1


def test_block_indices_are_global_in_execution_order():
    refs = role_tables()["flux1_schnell"].refs(build_meta("flux1_schnell"))
    blocks = {r.block for r in refs if r.block >= 0}
    assert blocks == set(range(19 + 38))
    single0 = next(r for r in refs if r.fqn == "single_transformer_blocks.0.attn.to_q")
    assert single0.block == 19


def test_inventory_script_json():
    p = subprocess.run([sys.executable, str(ROOT / "scripts/inventory.py"), "model=wan21", "--json"],
                       capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(p.stdout)
    assert out == {"total": 306, "by_treatment": {"orbit": 300, "adaln_int4": 0, "untouched": 6},
                   "dims": {"1536": 512, "8960": 256}}
