"""Metrics; importing this package imports every module in it, and each metric registers itself (a new metric's
module is found without editing a list)."""

from orbitquant.harness.metrics.features import prepare_torch_fidelity

# torchmetrics imports torch-fidelity whenever it is installed, and torch-fidelity's package imports torchvision,
# which does not import beside the CPU torch wheel: register torch-fidelity's package without running its
# __init__ before anything imports torchmetrics (its Inception module is plain torch; see features.py)
prepare_torch_fidelity()

from orbitquant.harness.metrics.base import Metric  # noqa: E402
from orbitquant.harness.metrics.digits import DigitsContext  # noqa: E402

__all__ = ["DigitsContext", "Metric"]

from orbitquant.quant.registry import import_submodules  # noqa: E402

import_submodules(__name__)
