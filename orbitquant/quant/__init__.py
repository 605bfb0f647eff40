"""The quantization library: what ``orbitquant.quantize_`` needs and nothing of the benchmark harness.

``config`` (typed method configs), ``codebook`` (Lloyd-Max), ``rotation`` (RPBH and friends), ``primitives``
(uniform / group fake-quant, packing), ``nn`` (``QuantLinear``, runtime modes), ``act`` (activation
quantizers), ``weights`` (weight stores), ``dequant`` (back to ``nn.Linear``),
``api`` (``quantize_``, the report), ``calib`` (the calibration hooks methods share), ``methods`` (fp, rtn,
orbit; the baselines register from ``baselines/``), ``checkpoint`` (save / load quantized models),
``registry`` (methods, models, metrics), ``artifacts`` / ``atomic`` / ``faults`` (calibration caches and the
one atomic writer). Nothing here imports ``orbitquant.harness``.
"""
