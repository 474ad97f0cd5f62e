"""Drop-in quantizer layers built on the vqkernels ops.

Constructor keywords, forward return convention ``(quantized, indices, loss)`` and
``state_dict`` layout follow vector-quantize-pytorch for the options people use.
"""

from .frozen import minilm_word_embeddings
from .residual import GroupedResidualVQ, ResidualVQ
from .vq import VectorQuantize

__all__ = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "minilm_word_embeddings"]
