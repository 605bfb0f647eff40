"""Baselines: the same Quantizer protocol as ``orbitquant.quant.methods``, with an UPSTREAM.md per method.

Importing this package registers them (``orbitquant.quant.registry.METHODS`` imports it lazily).
"""

from . import hadamard_rtn, ptq4dit, qdit, smoothquant, svdquant, vidit_q  # noqa: F401
