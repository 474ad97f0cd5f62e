"""Fake (meta) kernels: output shapes and dtypes without computing, for torch.compile and export."""

import torch

from . import _checks


def _lib_op(name):
    return f"vqkernels::{name}"


@torch.library.register_fake(_lib_op("nearest_code"))
def _nearest_code_fake(x, codebook, metric="l2"):
    _checks.check_search("nearest_code", x, codebook, metric)
    n = x.shape[0]
    dt = _checks.compute_dtype(x, codebook)
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=dt)


@torch.library.register_fake(_lib_op("nearest_code_topk"))
def _nearest_code_topk_fake(x, codebook, k, metric="l2"):
    _checks.check_topk("nearest_code_topk", x, codebook, k, metric)
    n = x.shape[0]
    dt = _checks.compute_dtype(x, codebook)
    return x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, k, dtype=dt)


@torch.library.register_fake(_lib_op("vq_quantize"))
def _vq_quantize_fake(x, codebook, metric="l2"):
    _checks.check_search("vq_quantize", x, codebook, metric)
    dt = _checks.compute_dtype(x, codebook)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=torch.int64),
            x.new_empty((), dtype=dt), x.new_empty((), dtype=dt))


@torch.library.register_fake(_lib_op("vq_quantize_backward"))
def _vq_quantize_backward_fake(grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(codebook, memory_format=torch.contiguous_format))


@torch.library.register_fake(_lib_op("ema_update_"))
def _ema_update_fake(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    _checks.check_ema("ema_update_", codebook, cluster_size, embed_sum, x, indices, decay, eps)


# multiscale (VAR's multi-scale residual quantizer)

@torch.library.register_fake(_lib_op("multiscale_quantize_step"))
def _multiscale_quantize_step_fake(f_rest, codebook, pn, metric="l2"):
    _checks.check_multiscale("multiscale_quantize_step", f_rest, codebook, pn, metric)
    b, c = f_rest.shape[0], f_rest.shape[1]
    return (f_rest.new_empty(b, pn[0], pn[1], dtype=torch.int64),
            codebook.new_empty(b, c, pn[0], pn[1]))


@torch.library.register_fake(_lib_op("multiscale_quantize_step_backward"))
def _multiscale_quantize_step_backward_fake(grad_h, codebook, indices):
    _checks.check_multiscale_backward("multiscale_quantize_step_backward", grad_h, codebook, indices)
    return torch.empty_like(codebook, memory_format=torch.contiguous_format)
