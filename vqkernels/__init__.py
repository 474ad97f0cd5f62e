"""vqkernels: fused vector-quantization kernels for PyTorch."""

from . import schemas  # noqa: F401  (defines the ops first)
from . import _backend, autograd, fake  # noqa: F401  (kernels, autograd, fake tensors)
from ._backend import (backend, compiled, cpu_isa, cuda_compiled, get_backend, set_auto_table, set_backend,
                       set_cpu_isa, use_backend)
from .ops import ema_update_, nearest_code, nearest_code_topk, vq_quantize
# residual quantization (RQ-VAE)
from .ops import residual_quantize
# --- scalar quantizers: FSQ and LFQ ---
from .ops import fsq_indices_to_codes, fsq_quantize, lfq_entropy, lfq_quantize, residual_fsq_quantize
# latent quantization
from .ops import latent_quantize
# Gumbel-softmax quantization and the rotation trick
from .ops import gumbel_quantize, rotation_trick
# multi-scale residual quantization (VAR)
from .ops import multiscale_quantize_step
# BinaryMapper's one-hot
from .ops import binary_one_hot

__version__ = "0.1.0"

__all__ = [
    "nearest_code", "nearest_code_topk", "vq_quantize", "ema_update_",
    "backend", "compiled", "cpu_isa", "cuda_compiled", "set_cpu_isa", "__version__",
    "set_backend", "use_backend", "get_backend", "set_auto_table",
    # residual quantization (RQ-VAE)
    "residual_quantize",
    # --- scalar quantizers: FSQ and LFQ ---
    "fsq_quantize", "residual_fsq_quantize", "fsq_indices_to_codes", "lfq_quantize", "lfq_entropy",
    # latent quantization
    "latent_quantize",
    # Gumbel-softmax quantization and the rotation trick
    "gumbel_quantize", "rotation_trick",
    # multi-scale residual quantization (VAR)
    "multiscale_quantize_step",
    # BinaryMapper's one-hot
    "binary_one_hot",
]
