"""Fake (meta) kernels: output shapes and dtypes without computing, for torch.compile and export."""

import torch

from . import _checks
from .schemas import ALL_NAMESPACES


FAKES = {}  # op name -> its fake kernel (vqkernels.triton registers the same ones for its namespace)


def _fake(name):
    """Registers the decorated function as the fake kernel of ``name`` in every namespace that defines it."""
    def register(fn):
        for ns in ALL_NAMESPACES:
            torch.library.register_fake(f"{ns}::{name}")(fn)
        FAKES[name] = fn
        return fn
    return register


@_fake("nearest_code")
def _nearest_code_fake(x, codebook, metric="l2"):
    _checks.check_search("nearest_code", x, codebook, metric)
    n = x.shape[0]
    dt = _checks.compute_dtype(x, codebook)
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=dt)


@_fake("nearest_code_topk")
def _nearest_code_topk_fake(x, codebook, k, metric="l2"):
    _checks.check_topk("nearest_code_topk", x, codebook, k, metric)
    n = x.shape[0]
    dt = _checks.compute_dtype(x, codebook)
    return x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, k, dtype=dt)


@_fake("vq_quantize")
def _vq_quantize_fake(x, codebook, metric="l2"):
    _checks.check_search("vq_quantize", x, codebook, metric)
    dt = _checks.compute_dtype(x, codebook)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty((), dtype=dt), x.new_empty((), dtype=dt))


@_fake("vq_quantize_backward")
def _vq_quantize_backward_fake(grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices):
    _checks.check_vq_quantize_backward("vq_quantize_backward", grad_quantized, grad_commit_loss, grad_codebook_loss,
                                       x, codebook, indices)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(codebook, memory_format=torch.contiguous_format))


@_fake("ema_update_")
def _ema_update_fake(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    _checks.check_ema("ema_update_", codebook, cluster_size, embed_sum, x, indices, decay, eps)


# residual quantization (RQ-VAE)


@_fake("residual_quantize")
def _residual_quantize_fake(x, codebooks, num_levels=-1, beam_size=1):
    levels = _checks.check_residual("residual_quantize", x, codebooks, num_levels, beam_size)
    dt = _checks.compute_dtype(x, codebooks)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], levels, dtype=torch.int64), x.new_empty(levels, dtype=dt),
            x.new_empty(levels, dtype=dt))


@_fake("residual_quantize_backward")
def _residual_quantize_backward_fake(grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks,
                                     indices):
    _checks.check_residual_backward("residual_quantize_backward", grad_quantized, grad_commit_losses,
                                    grad_codebook_losses, x, codebooks, indices)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(codebooks, memory_format=torch.contiguous_format))


# --- scalar quantizers: FSQ and LFQ ---
@_fake("fsq_quantize")
def _fsq_quantize_fake(z, levels, symmetric=False, hard_clamp=False):
    _checks.check_fsq("fsq_quantize", z, levels)
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(z.shape[0], dtype=torch.int64)


@_fake("fsq_quantize_backward")
def _fsq_quantize_backward_fake(grad_codes, z, levels, symmetric=False, hard_clamp=False):
    _checks.check_fsq_backward("fsq_quantize_backward", grad_codes, z, levels)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@_fake("residual_fsq_quantize")
def _residual_fsq_quantize_fake(z, scales, levels, symmetric=False, hard_clamp=False):
    _checks.check_residual_fsq("residual_fsq_quantize", z, scales, levels)
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty(z.shape[0], scales.shape[0], dtype=torch.int64))


@_fake("residual_fsq_quantize_backward")
def _residual_fsq_quantize_backward_fake(grad_quantized, z, scales, levels, symmetric=False, hard_clamp=False):
    _checks.check_residual_fsq_backward("residual_fsq_quantize_backward", grad_quantized, z, scales, levels)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@_fake("latent_quantize")
def _latent_quantize_fake(z, values, levels):
    _checks.check_latent_quantize("latent_quantize", z, values, levels)
    return (z.new_empty(z.shape, dtype=_checks.compute_dtype(z, values)), z.new_empty(z.shape, dtype=torch.int64),
            z.new_empty(z.shape[0], dtype=torch.int64))


@_fake("lfq_quantize")
def _lfq_quantize_fake(x, codebook_scale=1.0):
    _checks.check_lfq("lfq_quantize", x, _checks.LFQ_MAX_BITS)
    _checks.check_finite("lfq_quantize", "codebook_scale", codebook_scale)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty((), dtype=_checks.compute_dtype(x)))


@_fake("lfq_entropy")
def _lfq_entropy_fake(x, inv_temperature, weights=None):
    _checks.check_lfq_entropy("lfq_entropy", x, inv_temperature, weights)
    dt = _checks.compute_dtype(x)
    return x.new_empty((), dtype=dt), x.new_empty((), dtype=dt), x.new_empty(2 ** x.shape[1], dtype=dt)


@_fake("lfq_entropy_backward")
def _lfq_entropy_backward_fake(grad_per_sample_entropy, grad_codebook_entropy, grad_avg_probs, x, avg_probs,
                               inv_temperature, weights=None):
    _checks.check_lfq_entropy_backward("lfq_entropy_backward", grad_per_sample_entropy, grad_codebook_entropy,
                                       grad_avg_probs, x, avg_probs, inv_temperature, weights)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Gumbel-softmax quantization and the rotation trick


@_fake("gumbel_quantize")
def _gumbel_quantize_fake(logits, codebook, gumbels, tau, hard):
    _checks.check_gumbel("gumbel_quantize", logits, codebook, gumbels, tau)
    out_dtype = torch.promote_types(logits.dtype, codebook.dtype)
    return (logits.new_empty(logits.shape[0], codebook.shape[1], dtype=out_dtype),
            logits.new_empty(logits.shape[0], dtype=torch.int64),
            logits.new_empty((), dtype=_checks.compute_dtype(logits, codebook, gumbels)))


@_fake("gumbel_quantize_backward")
def _gumbel_quantize_backward_fake(grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau, hard):
    _checks.check_gumbel_backward("gumbel_quantize_backward", grad_quantized, grad_kl, logits, codebook, gumbels,
                                  indices, tau)
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            torch.empty_like(codebook, memory_format=torch.contiguous_format))


@_fake("rotation_trick")
def _rotation_trick_fake(src, tgt):
    _checks.check_rotation("rotation_trick", src, tgt)
    return torch.empty_like(tgt, memory_format=torch.contiguous_format)


@_fake("rotation_trick_backward")
def _rotation_trick_backward_fake(grad, src, tgt):
    _checks.check_rotation_backward("rotation_trick_backward", grad, src, tgt)
    return torch.empty_like(src, memory_format=torch.contiguous_format)


# BinaryMapper's one-hot
@_fake("binary_one_hot")
def _binary_one_hot_fake(logits, indices):
    _checks.check_binary_one_hot("binary_one_hot", logits, indices)
    return logits.new_empty(logits.shape[0], 1 << logits.shape[1], dtype=torch.float32)


@_fake("binary_one_hot_backward")
def _binary_one_hot_backward_fake(grad_one_hot, logits):
    _checks.check_binary_one_hot_backward("binary_one_hot_backward", grad_one_hot, logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# multiscale (VAR's multi-scale residual quantizer)
@_fake("multiscale_quantize_step")
def _multiscale_quantize_step_fake(f_rest, codebook, pn, metric="l2"):
    _checks.check_multiscale("multiscale_quantize_step", f_rest, codebook, pn, metric)
    b, c = f_rest.shape[0], f_rest.shape[1]
    return (f_rest.new_empty(b, pn[0], pn[1], dtype=torch.int64),
            codebook.new_empty(b, c, pn[0], pn[1]))


@_fake("multiscale_quantize_step_backward")
def _multiscale_quantize_step_backward_fake(grad_h, codebook, indices):
    _checks.check_multiscale_backward("multiscale_quantize_step_backward", grad_h, codebook, indices)
    return torch.empty_like(codebook, memory_format=torch.contiguous_format)
