"""Triton kernels of vqkernels (optional: needs the ``triton`` package).

``import vqkernels`` never imports Triton; ``import vqkernels.triton`` does, and raises an
ImportError saying so when Triton is missing. The kernels run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before this package is imported; slow, for tests).

Ops (standalone for now, not yet a backend of ``torch.ops.vqkernels``):
    nearest_code(x, codebook, metric="l2") -> (indices, distances)
        registered as ``torch.ops.vqkernels_triton.nearest_code``; no autograd yet.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vqkernels.triton needs the 'triton' package (pip install triton); "
                      "the rest of vqkernels works without it") from exc

from .nearest_code import nearest_code

__all__ = ["nearest_code"]

# residual quantization, multiscale step, LFQ entropy (Triton): each op and its backward, registered as
# torch.ops.vqkernels_triton.<op> with the schema of vqkernels/schemas.py; no autograd (the *_backward
# launchers give the gradients).
from .lfq import lfq_entropy, lfq_entropy_backward  # noqa: E402
from .multiscale import multiscale_quantize_step, multiscale_quantize_step_backward  # noqa: E402
from .residual_quantize import residual_quantize, residual_quantize_backward  # noqa: E402

__all__ += ["residual_quantize", "residual_quantize_backward", "multiscale_quantize_step",
            "multiscale_quantize_step_backward", "lfq_entropy", "lfq_entropy_backward"]
