"""The diffusers backend: ``quant_backend="orbitquant"`` for ``from_pretrained`` (``quantizer``)."""
