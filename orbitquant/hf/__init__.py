"""The diffusers backend: ``quant_backend="orbitquant"`` for ``from_pretrained``.

``config`` (``OrbitQuantDiffusersConfig``: the method, bits and options, validated on construction), ``layers``
(which linears a model's class gets, through its adapter's role table), ``quantizer`` (the loader hooks that
quantize each layer as its weights load, and ``register()``).
"""
