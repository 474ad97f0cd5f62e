"""Drop-in quantizer layers built on the vqkernels ops.

Constructor keywords, forward return convention ``(quantized, indices, loss)`` and
``state_dict`` layout follow vector-quantize-pytorch for the options people use.
"""
