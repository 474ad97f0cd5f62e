"""Every ``torch.ops.vqkernels`` schema, defined in this one place.

The C++ extension registers only kernels (``TORCH_LIBRARY_IMPL``) for the ops
defined here, so the op layer exists even where the extension could not be
built (the pure-PyTorch reference then serves every device).
"""

import torch

NAMESPACE = "vqkernels"

SCHEMAS = {
    "nearest_code": "nearest_code(Tensor x, Tensor codebook, str metric=\"l2\") -> (Tensor indices, Tensor distances)",
    "nearest_code_topk": (
        "nearest_code_topk(Tensor x, Tensor codebook, int k, str metric=\"l2\") -> (Tensor indices, Tensor distances)"
    ),
    "vq_quantize": (
        "vq_quantize(Tensor x, Tensor codebook, str metric=\"l2\") "
        "-> (Tensor quantized, Tensor indices, Tensor commit_loss, Tensor codebook_loss)"
    ),
    "vq_quantize_backward": (
        "vq_quantize_backward(Tensor grad_quantized, Tensor grad_commit_loss, Tensor grad_codebook_loss, "
        "Tensor x, Tensor codebook, Tensor indices) -> (Tensor grad_x, Tensor grad_codebook)"
    ),
    "ema_update_": (
        "ema_update_(Tensor(a!) codebook, Tensor(b!) cluster_size, Tensor(c!) embed_sum, Tensor x, "
        "Tensor indices, float decay, float eps) -> ()"
    ),
    # multiscale (VAR's multi-scale residual quantizer): one scale, and its codebook gradient
    "multiscale_quantize_step": (
        "multiscale_quantize_step(Tensor f_rest, Tensor codebook, int[2] pn, str metric=\"l2\") "
        "-> (Tensor indices, Tensor h)"
    ),
    "multiscale_quantize_step_backward": (
        "multiscale_quantize_step_backward(Tensor grad_h, Tensor codebook, Tensor indices) -> Tensor"
    ),
}

# Kept alive for the life of the process: dropping a Library object removes its definitions.
_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)
