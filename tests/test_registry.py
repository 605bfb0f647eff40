from __future__ import annotations

import pytest

from orbitquant.quant.registry import METHODS, METRICS, MODELS, Registry


def test_unknown_names_list_valid_ones_and_suggest():
    with pytest.raises(KeyError, match="Did you mean 'orbit'") as e:
        METHODS.get("orbt")
    assert all(n in str(e.value) for n in METHODS.names())
    with pytest.raises(KeyError, match="digits"):
        MODELS.get("digitz")
    with pytest.raises(KeyError, match="psnr_vs_fp"):
        METRICS.get("psnr")


def test_collisions_and_bad_names_are_errors():
    reg = Registry("thing", ())
    reg.register("a")(int)
    reg.register("a")(int)  # same object again is fine (re-import)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(str)
    with pytest.raises(ValueError, match="lower-case"):
        reg.register("Bad Name")


def test_registered_names_are_path_safe():
    for reg in (METHODS, MODELS, METRICS):
        for name in reg.names():
            assert name.replace("_", "").isalnum() and name == name.lower()
