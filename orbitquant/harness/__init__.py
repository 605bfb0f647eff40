"""The benchmark harness that ``run.py`` drives: model adapters (one per family, all model knowledge),
metrics, calibration and evaluation protocols, run directories, records and tables, W&B, the planner.

Built on ``orbitquant.quant``; the library never imports the harness.
"""
