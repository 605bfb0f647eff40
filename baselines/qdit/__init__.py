"""Q-DiT (Chen et al., CVPR 2025): in progress.

Only the GPTQ weight quantizer with input-channel groups (``gptq.py``) exists so far, with its parity
test against RTN. The ``qdit`` method (block-sequential calibration, dynamic per-token x group
activations, the group-size evolutionary search) is not registered yet.
"""
