"""Every ``torch.ops.vqkernels`` schema, defined in this one place.

The C++ extension registers only kernels (``TORCH_LIBRARY_IMPL``) for the ops
defined here, so the op layer exists even where the extension could not be
built (the pure-PyTorch reference then serves every device).

Each backend has its own namespace with the same schemas: ``vqkernels_cpu`` (C++ CPU
kernels, csrc/cpu), ``vqkernels_cuda`` (CUDA C++ kernels, csrc/cuda) and ``vqkernels_ref``
(the pure-PyTorch reference); the Triton launchers define theirs as ``vqkernels_triton``
custom ops (vqkernels/triton). The public ``vqkernels::<op>`` routes each call to one of them
(csrc/dispatch.cpp, steered by vqkernels/_backend.py).
"""

import torch

NAMESPACE = "vqkernels"
BACKEND_NAMESPACES = ("vqkernels_cpu", "vqkernels_cuda", "vqkernels_ref")
ALL_NAMESPACES = (NAMESPACE, *BACKEND_NAMESPACES)

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
    # residual quantization (RQ-VAE)
    "residual_quantize": (
        "residual_quantize(Tensor x, Tensor codebooks, int num_levels=-1, int beam_size=1) "
        "-> (Tensor quantized, Tensor indices, Tensor commit_losses, Tensor codebook_losses)"
    ),
    "residual_quantize_backward": (
        "residual_quantize_backward(Tensor grad_quantized, Tensor grad_commit_losses, Tensor grad_codebook_losses, "
        "Tensor x, Tensor codebooks, Tensor indices) -> (Tensor grad_x, Tensor grad_codebooks)"
    ),
    # --- scalar quantizers: FSQ (finite scalar quantization) and LFQ (lookup-free quantization) ---
    "fsq_quantize": "fsq_quantize(Tensor z, int[] levels, bool symmetric=False, bool hard_clamp=False) -> (Tensor codes, Tensor indices)",
    "fsq_quantize_backward": "fsq_quantize_backward(Tensor grad_codes, Tensor z, int[] levels, bool symmetric=False, bool hard_clamp=False) -> Tensor grad_z",
    "residual_fsq_quantize": (
        "residual_fsq_quantize(Tensor z, Tensor scales, int[] levels, bool symmetric=False, bool hard_clamp=False) "
        "-> (Tensor quantized, Tensor indices)"
    ),
    "residual_fsq_quantize_backward": (
        "residual_fsq_quantize_backward(Tensor grad_quantized, Tensor z, Tensor scales, int[] levels, "
        "bool symmetric=False, bool hard_clamp=False) -> Tensor grad_z"
    ),
    # latent quantization (LatentQuantize): each dimension's nearest value
    "latent_quantize": (
        "latent_quantize(Tensor z, Tensor values, int[] levels) -> (Tensor codes, Tensor positions, Tensor indices)"
    ),
    "lfq_quantize": (
        "lfq_quantize(Tensor x, float codebook_scale=1.0) -> (Tensor codes, Tensor indices, Tensor commit_loss)"
    ),
    "lfq_entropy": (
        "lfq_entropy(Tensor x, float inv_temperature, Tensor? weights=None) "
        "-> (Tensor per_sample_entropy, Tensor codebook_entropy, Tensor avg_probs)"
    ),
    "lfq_entropy_backward": (
        "lfq_entropy_backward(Tensor grad_per_sample_entropy, Tensor grad_codebook_entropy, Tensor grad_avg_probs, "
        "Tensor x, Tensor avg_probs, float inv_temperature, Tensor? weights=None) -> Tensor grad_x"
    ),
    # Gumbel-softmax quantization (taming-transformers GumbelQuantize) and the rotation trick
    "gumbel_quantize": (
        "gumbel_quantize(Tensor logits, Tensor codebook, Tensor gumbels, float tau, bool hard) "
        "-> (Tensor quantized, Tensor indices, Tensor kl)"
    ),
    "gumbel_quantize_backward": (
        "gumbel_quantize_backward(Tensor grad_quantized, Tensor grad_kl, Tensor logits, Tensor codebook, "
        "Tensor gumbels, Tensor indices, float tau, bool hard) -> (Tensor grad_logits, Tensor grad_codebook)"
    ),
    "rotation_trick": "rotation_trick(Tensor src, Tensor tgt) -> Tensor",
    "rotation_trick_backward": "rotation_trick_backward(Tensor grad, Tensor src, Tensor tgt) -> Tensor",
    # BinaryMapper (Fleuret 2025): the one-hot of sampled bit codes, straight-through to the joint code probabilities
    "binary_one_hot": "binary_one_hot(Tensor logits, Tensor indices) -> Tensor one_hot",
    "binary_one_hot_backward": "binary_one_hot_backward(Tensor grad_one_hot, Tensor logits) -> Tensor grad_logits",
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
_libs = [torch.library.Library(_ns, "DEF") for _ns in ALL_NAMESPACES]
for _lib in _libs:
    for _schema in SCHEMAS.values():
        _lib.define(_schema)
