"""Command-line checks that run before Hydra composes anything, so a typo costs a second, not a traceback.

Hydra's own error for ``quant=orbt`` is a screen of search-path text; :func:`check_group_overrides`
answers with one line naming the nearest valid option instead.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

# values Hydra's sweeper expands itself (range(1,3), choice(a,b), glob(*), interval(...)): not option names
_SWEEP_FN = re.compile(r"^\s*(range|choice|glob|interval|tag|sort|shuffle)\(")
_BITS_KEYS = ("w_bits", "a_bits", "bits")


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The option names of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(argv: list[str], conf_dir: Path) -> str | None:
    """One error line for the first ``group=value`` override whose option does not exist, naming the
    nearest valid options; None when every group option exists. Comma sweeps are checked element-wise."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if "." in group or group.startswith("hydra/") or not (conf_dir / group).is_dir() or _SWEEP_FN.match(value):
            continue  # a plain key, a sweep function, or hydra/* (plugins add options): Hydra handles it
        valid = group_options(conf_dir, group)
        for v in (s.strip() for s in value.split(",")):
            if v in ("", "null") or v in valid:
                continue
            near = difflib.get_close_matches(v, valid, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(f'{group}={n}' for n in near)}? " if near else ""
            return f"config error: unknown {group} option {v!r}; {hint}valid: {', '.join(valid)}"
    return None


def fp_bits_error(method: str, task_overrides: list[str], multirun: bool) -> str | None:
    """quant=fp runs the unquantized model: bit widths given for a single fp run are a mistake (a sweep may
    list fp beside quantized methods, so there the widths are simply not used)."""
    if method != "fp" or multirun:
        return None
    given = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in _BITS_KEYS]
    if not given:
        return None
    return (f"config error: quant=fp runs the unquantized model and ignores {', '.join(given)}; drop them, or pick a "
            "quantizer (quant=orbit, rtn, ...)")
