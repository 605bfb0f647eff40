"""Baselines: methods reimplemented from other papers, on the same Quantizer protocol as
``orbitquant.quant.methods``, each with an UPSTREAM.md read against the official code.

Importing this package imports every subpackage, and each registers itself (``orbitquant.quant.registry.METHODS``
imports it lazily): a new ``baselines/<name>/`` is found without editing a list.
"""

from orbitquant.quant.registry import import_submodules

import_submodules(__name__)
