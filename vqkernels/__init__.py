"""vqkernels: fused vector-quantization kernels for PyTorch."""

from . import schemas  # noqa: F401  (defines the ops first)
from . import _backend, autograd, fake  # noqa: F401  (kernels, autograd, fake tensors)
from ._backend import backend, compiled, cpu_isa, cuda_compiled, set_cpu_isa
from .ops import ema_update_, nearest_code, nearest_code_topk, vq_quantize

__version__ = "0.1.0"

__all__ = [
    "nearest_code", "nearest_code_topk", "vq_quantize", "ema_update_",
    "backend", "compiled", "cpu_isa", "cuda_compiled", "set_cpu_isa", "__version__",
]

# multiscale (VAR's multi-scale residual quantizer)
from .ops import multiscale_quantize_step  # noqa: E402

__all__ += ["multiscale_quantize_step"]
