"""Drop-in quantizer layers built on the vqkernels ops.

Constructor keywords, forward return convention ``(quantized, indices, loss)`` and
``state_dict`` layout follow vector-quantize-pytorch for the options people use.
"""

from .binary_mapper import BinaryMapper
from .evo_lfq import EvoLFQ
from .frozen import minilm_word_embeddings
from .fsp import FSP
from .fsq import FSQ
from .gumbel import GumbelQuantize
from .hierarchical_vq import HierarchicalVQ
from .latent_quantize import LatentQuantize
from .lfq import LFQ
from .multiscale import MultiScaleVQ
from .random_projection import RandomProjectionQuantizer
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_scalar import GroupedResidualFSQ, GroupedResidualLFQ, ResidualFSQ, ResidualLFQ
from .sim_vq import ResidualSimVQ, SimVQ
from .vector_quantizer import VectorQuantizer
from .vq import VectorQuantize

__all__ = ["VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "FSQ", "ResidualFSQ", "GroupedResidualFSQ", "LFQ",
           "ResidualLFQ", "GroupedResidualLFQ", "SimVQ", "ResidualSimVQ", "RandomProjectionQuantizer", "GumbelQuantize", "MultiScaleVQ",
           "HierarchicalVQ", "LatentQuantize", "VectorQuantizer", "FSP", "EvoLFQ", "BinaryMapper",
           "minilm_word_embeddings"]
