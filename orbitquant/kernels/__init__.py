"""Optional native CPU kernels (``orbit_cpu.cpp``), JIT-built with torch's C++ extension loader.

The build needs a C++ compiler and ninja (a dependency); it runs once per source version (~30-60 s) and
is cached under torch's extension directory (``TORCH_EXTENSIONS_DIR``). Everything works without it:
:func:`orbit_cpu` returns None (after one warning) and callers take the pure-torch path, which computes
the same thing (rotations bit-identical, codes identical up to ties at the 1-ulp level).

``ORBITQUANT_KERNELS=0`` disables the kernels (e.g. to measure the torch path).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("orbit_cpu.cpp")


def enabled() -> bool:
    """Whether kernels are allowed (``ORBITQUANT_KERNELS`` unset or not 0/false/off)."""
    return os.environ.get("ORBITQUANT_KERNELS", "1").lower() not in ("0", "false", "off", "no")


@functools.lru_cache(maxsize=None)
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        venv_bin = str(Path(sys.executable).parent)  # pip puts ninja beside the interpreter, maybe not on PATH
        if shutil.which("ninja") is None and (Path(venv_bin) / "ninja").exists():
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        return load(name=f"orbitquant_cpu_{digest}", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-ffp-contract=off"], verbose=False)
    except Exception as e:  # no compiler, no ninja, sandboxed build dir...: fall back, say it once
        log.warning("OrbitQuant CPU kernel unavailable (%s: %s); using the pure-torch path (slower, same "
                    "numbers). Install a C++ compiler and ninja to enable it.", type(e).__name__, str(e)[:200])
        return None


def orbit_cpu() -> ModuleType | None:
    """The compiled kernel module, or None when disabled or unavailable."""
    return _build() if enabled() else None
