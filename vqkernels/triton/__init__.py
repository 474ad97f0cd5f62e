"""Triton kernels of vqkernels (optional: needs the ``triton`` package).

``import vqkernels`` never imports Triton; ``import vqkernels.triton`` does, and raises an
ImportError saying so when Triton is missing. The kernels run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before this package is imported; slow, for tests).

Each launcher ``vqkernels.triton.<op>(...)`` has the signature of ``vqkernels.<op>`` and is the
opaque kernel of ``torch.ops.vqkernels_triton.<op>``, defined with the op's one schema
(vqkernels/schemas.py) and its one fake kernel (vqkernels/fake.py) by ``_common.triton_op``; no
autograd of its own. As a backend of ``torch.ops.vqkernels.<op>`` (``vqkernels.set_backend(
"triton")``) the public op's autograd applies, its backward ops served by Triton too where
they exist. float64 inputs, and cases a kernel does not cover, go to the reference.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("vqkernels.triton needs the 'triton' package (pip install triton); "
                      "the rest of vqkernels works without it") from exc

from .ema_update import ema_update_
from .lfq import lfq_entropy, lfq_entropy_backward
from .multiscale import multiscale_quantize_step, multiscale_quantize_step_backward
from .nearest_code import nearest_code
from .nearest_code_topk import nearest_code_topk
from .residual_quantize import residual_quantize, residual_quantize_backward
from .vq_quantize import vq_quantize, vq_quantize_backward

__all__ = ["nearest_code", "nearest_code_topk", "vq_quantize", "vq_quantize_backward", "ema_update_",
           "residual_quantize", "residual_quantize_backward", "multiscale_quantize_step",
           "multiscale_quantize_step_backward", "lfq_entropy", "lfq_entropy_backward"]
