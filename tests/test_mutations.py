"""Mutation checks: break the implementation in-process (pytest's monkeypatch; no file is edited) and assert that
the default run's quality checks then fail. Each case runs the *actual* check -- the Hypothesis property test
itself, or the helper a default-run ordering test calls -- and passes only if that check raises AssertionError,
so a check that stops detecting its mutation fails here.

=====================  =========================================================  ==================================
mutation               what it does                                               caught by (default run)
=====================  =========================================================  ==================================
uniform_codebook       Lloyd-Max centroids -> 2^b evenly spaced levels over the   test_properties: Lloyd-Max
                       same range (codebook._codebook)                            distortion / best uniform grid;
                                                                                  test_ordering: W4A4
no_rotation            every rotated method's rotation -> identity                test_properties: outlier channels;
                       (methods.base.make_rotation)                               test_ordering: W4A4
identity_act_quant     OrbitActQuant returns its input (torch path and the        test_properties: Lloyd-Max floor;
                       fused native kernel)                                       test_families: bit ladder
gptq_is_rtn            Q-DiT's GPTQ solver -> group RTN on the same grid          test_qdit, test_baselines: GPTQ
                                                                                  beats group RTN
calibration_ignored    SmoothQuant / SVDQuant calibration statistics ->           test_ordering: calibration is used
                       data-free ones (absmax 1, reservoir of N(0, 1) tokens)     (both); test_baselines: SmoothQuant
                                                                                  beats RTN
=====================  =========================================================  ==================================

``python scripts/mutate.py`` runs every mutation against every check and prints the full matrix (which checks catch
which mutation, and which do not, e.g. the old upper-bound-only property test catches none).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


# ---------------------------------------------------------------------------------------------- mutations
def uniform_codebook(mp: pytest.MonkeyPatch) -> None:
    """Every codebook the layers get has 2^b evenly spaced levels between Lloyd-Max's outermost centroids."""
    from orbitquant.quant import codebook as cb

    def build(d: int, bits: int, density: str, device: str) -> cb.Codebook:
        c = cb.lloyd_max(d, bits)
        return cb.Codebook(torch.linspace(float(c[0]), float(c[-1]), 2 ** bits, dtype=torch.float64)).to(device)

    mp.setattr(cb, "_codebook", build)


def no_rotation(mp: pytest.MonkeyPatch) -> None:
    """Rotated methods (orbit, hadamard_rtn) draw the identity instead of their rotation."""
    from orbitquant.quant.methods import base
    from orbitquant.quant.rotation import IdentityRotation

    mp.setattr(base, "make_rotation", lambda kind, d, seed=0: IdentityRotation(d))


def identity_act_quant(mp: pytest.MonkeyPatch) -> None:
    """OrbitQuant's activation quantizer passes activations through (both its torch path and the fused kernel)."""
    from orbitquant.quant.act import OrbitActQuant

    mp.setattr(OrbitActQuant, "forward", lambda self, x: x.float())
    mp.setattr(OrbitActQuant, "fused", lambda self, rotation, x, out_dtype=None, flag=None: None)


def gptq_is_rtn(mp: pytest.MonkeyPatch) -> None:
    """Q-DiT's GPTQ returns plain round-to-nearest codes on the same per-row x group grid (no error feedback)."""
    import baselines.qdit as qdit
    from baselines.qdit import gptq

    def rtn(w, h, bits, group, symmetric=False, *args, **kwargs):
        return gptq.rtn_groups(w, bits, group, symmetric)

    mp.setattr(qdit, "gptq_quantize", rtn)
    mp.setattr(gptq, "gptq_quantize", rtn)


def calibration_ignored(mp: pytest.MonkeyPatch) -> None:
    """Collected calibration statistics (SmoothQuant, SVDQuant) are replaced by data-free ones: per-channel absmax 1
    and a reservoir of N(0, 1) tokens -- what the method would assume without calibration data."""
    from orbitquant.quant.methods.base import CollectingQuantizer

    collected = CollectingQuantizer.collected

    def data_free(self):
        stats = collected(self)
        g = torch.Generator().manual_seed(0)
        for st in stats.values():
            st.absmax = torch.ones_like(st.absmax)
            st.absmax_by_key = {k: torch.ones_like(v) for k, v in st.absmax_by_key.items()}
            if st.reservoir is not None:
                st.reservoir = torch.randn(st.reservoir.shape, generator=g)
        return stats

    mp.setattr(CollectingQuantizer, "collected", data_free)


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "uniform_codebook": uniform_codebook, "no_rotation": no_rotation, "identity_act_quant": identity_act_quant,
    "gptq_is_rtn": gptq_is_rtn, "calibration_ignored": calibration_ignored,
}


# ------------------------------------------------------------------------------------------------- checks
def _first_failure(test: Callable[[], None]) -> Callable[[], None]:
    """A Hypothesis test run on its own examples (derandomized: the default run's), stopping at the first failure:
    without shrinking, which takes ~10 s for a failure every example shows and adds nothing here."""
    from hypothesis import Phase, settings

    def run() -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(test, "_hypothesis_internal_use_settings",
                       settings(test._hypothesis_internal_use_settings, phases=[Phase.explicit, Phase.generate]))
            test()

    return run


def _checks() -> dict[str, Callable[[], object]]:
    """The default-run checks, by name: each raises AssertionError when it detects a problem."""
    import test_baselines
    import test_families
    import test_ordering
    import test_properties
    import test_qdit
    import test_svdquant

    return {
        "properties.lloyd_max_distortion_and_uniform_grid": _first_failure(
            test_properties.test_orbit_error_is_the_lloyd_max_distortion_and_beats_the_best_uniform_grid),
        "properties.rotation_cuts_outlier_error": _first_failure(
            test_properties.test_rotation_cuts_the_error_on_outlier_channels),
        "properties.within_the_codebook_bound": _first_failure(  # the upper bound alone: catches none of these
            test_properties.test_orbit_layer_is_finite_shape_preserving_and_within_the_codebook_bound),
        **{f"ordering.W{w}A{a}": (lambda w=w, a=a, r=r, p=p: test_ordering.check_orbit_beats_rtn_and_hadamard_rtn(
            w, a, r, p)) for w, a, r, p in test_ordering.CASES},
        "families.bit_ladder[dit]": lambda: test_families.check_error_grows_as_bits_shrink("dit"),
        "qdit.gptq_beats_group_rtn": test_qdit.test_qdit_gptq_beats_group_rtn_and_w8a8_is_near_lossless,
        "baselines.gptq_beats_rtn": test_baselines.test_gptq_beats_rtn_on_layer_output_error_at_the_same_grouping,
        "baselines.smoothquant_beats_rtn": test_baselines.test_smoothquant_beats_rtn_on_outlier_channels,
        "svdquant.beats_rtn": test_svdquant.test_svdquant_beats_rtn_with_outliers_and_the_branch_helps,
        **{f"ordering.calibration_is_used[{m}]": (lambda m=m: test_ordering.check_calibration_is_used(m))
           for m in test_ordering.CALIBRATED},
    }


#: mutation -> the default-run checks that must catch it (scripts/mutate.py prints the whole matrix)
CAUGHT_BY = {
    "uniform_codebook": ["properties.lloyd_max_distortion_and_uniform_grid", "ordering.W4A4"],
    "no_rotation": ["properties.rotation_cuts_outlier_error", "ordering.W4A4"],
    "identity_act_quant": ["properties.lloyd_max_distortion_and_uniform_grid", "families.bit_ladder[dit]"],
    "gptq_is_rtn": ["qdit.gptq_beats_group_rtn", "baselines.gptq_beats_rtn"],
    "calibration_ignored": ["ordering.calibration_is_used[smoothquant]", "ordering.calibration_is_used[svdquant]",
                            "baselines.smoothquant_beats_rtn"],
}


def failure(check: Callable[[], object]) -> str | None:
    """Run ``check``: the assertion message if it failed by assertion, None if it passed. Any other exception
    propagates (a mutation that crashes the code is not a check that detects it)."""
    try:
        check()
    except AssertionError as e:
        return str(e).splitlines()[0][:300] if str(e) else "AssertionError"
    except BaseExceptionGroup as eg:  # Hypothesis reports several distinct failures as a group
        if eg.split(AssertionError)[1] is None:
            return f"{len(eg.exceptions)} assertion failures"
        raise
    return None


@pytest.mark.parametrize("mutation, check", [(m, c) for m, cs in CAUGHT_BY.items() for c in cs])
def test_mutation_is_caught(mutation, check, monkeypatch):
    torch.set_num_threads(1)
    checks = _checks()
    MUTATIONS[mutation](monkeypatch)
    assert failure(checks[check]) is not None, f"mutation {mutation!r} went undetected by {check}"
