"""Autograd formulas for the differentiable vqkernels ops (registered with torch.library)."""

import itertools

import torch

from ._checks import compute_dtype
from .reference import NORM_EPS, lookup


def _distance_grads(x, codebook, indices, grad, metric, need_x, need_codebook):
    """Gradients of d(x_n, codebook[indices[n, j]]) weighted by grad [N, J] (indices -1 contribute nothing)."""
    valid = indices >= 0
    g = torch.where(valid, grad, torch.zeros_like(grad)).unsqueeze(-1)  # [N, J, 1]
    xs = x.to(grad.dtype).unsqueeze(1)  # [N, 1, D]
    c = lookup(codebook, indices, grad.dtype).nan_to_num(0.0)  # [N, J, D]
    if metric == "l2":
        gx, gc = 2.0 * g * (xs - c), -2.0 * g * (xs - c)
    elif metric == "ip":
        gx, gc = -g * c, -g * xs.expand_as(c)
    else:  # cosine: d = 1 - <u, v>, u = x / |x|, v = c / |c|
        xn = xs.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        cn = c.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        u, v = xs / xn, c / cn
        s = (u * v).sum(-1, keepdim=True)
        gx, gc = -g * (v - s * u) / xn, -g * (u - s * v) / cn
    grad_x = gx.sum(1).to(x.dtype) if need_x else None
    grad_codebook = None
    if need_codebook:
        acc = torch.zeros(codebook.shape, dtype=grad.dtype, device=codebook.device)
        acc.index_add_(0, indices.clamp_min(0).reshape(-1), gc.reshape(-1, gc.shape[-1]))
        grad_codebook = acc.to(codebook.dtype)
    return grad_x, grad_codebook


def _search_setup(ctx, inputs, output):
    x, codebook = inputs[0], inputs[1]
    ctx.metric = inputs[-1]
    ctx.save_for_backward(x, codebook, output[0])


def _nearest_code_backward(ctx, grad_indices, grad_distances):
    x, codebook, indices = ctx.saved_tensors
    gx, gc = _distance_grads(x, codebook, indices.unsqueeze(1), grad_distances.unsqueeze(1), ctx.metric,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return gx, gc, None


def _nearest_code_topk_backward(ctx, grad_indices, grad_distances):
    x, codebook, indices = ctx.saved_tensors
    gx, gc = _distance_grads(x, codebook, indices, grad_distances, ctx.metric,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return gx, gc, None, None


def _vq_quantize_setup(ctx, inputs, output):
    x, codebook, _ = inputs
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero tensor is allocated for it)
    ctx.save_for_backward(x, codebook, output[1])


def _vq_quantize_backward(ctx, grad_quantized, grad_indices, grad_commit, grad_codebook_loss):
    x, codebook, indices = ctx.saved_tensors
    if grad_quantized is None and grad_commit is None and grad_codebook_loss is None:
        return None, None, None
    # the unused outputs' zero gradients: a stride-0 view for quantized (the kernels read it in place, e.g. when
    # the rotation trick reads the codes detached), scalars for the losses (float32, float64 for float64 inputs)
    if grad_quantized is None:
        grad_quantized = torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
    loss_dtype = compute_dtype(x, codebook)
    grad_commit = torch.zeros((), dtype=loss_dtype, device=x.device) if grad_commit is None else grad_commit
    if grad_codebook_loss is None:
        grad_codebook_loss = torch.zeros((), dtype=loss_dtype, device=x.device)
    grad_x, grad_codebook = torch.ops.vqkernels.vq_quantize_backward(
        grad_quantized, grad_commit, grad_codebook_loss, x, codebook, indices)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_codebook if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd("vqkernels::nearest_code", _nearest_code_backward, setup_context=_search_setup)
torch.library.register_autograd("vqkernels::nearest_code_topk", _nearest_code_topk_backward,
                                setup_context=_search_setup)
torch.library.register_autograd("vqkernels::vq_quantize", _vq_quantize_backward, setup_context=_vq_quantize_setup)


# residual quantization (RQ-VAE)


def _residual_quantize_setup(ctx, inputs, output):
    x, codebooks = inputs[0], inputs[1]
    ctx.save_for_backward(x, codebooks, output[1])


def _residual_quantize_backward(ctx, grad_quantized, grad_indices, grad_commit_losses, grad_codebook_losses):
    x, codebooks, indices = ctx.saved_tensors
    grad_x, grad_codebooks = torch.ops.vqkernels.residual_quantize_backward(
        grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_codebooks if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd("vqkernels::residual_quantize", _residual_quantize_backward,
                                setup_context=_residual_quantize_setup)


# --- scalar quantizers: FSQ and LFQ ---
def _fsq_quantize_setup(ctx, inputs, output):
    z, levels, symmetric, hard_clamp = inputs
    ctx.levels, ctx.symmetric, ctx.hard_clamp = levels, symmetric, hard_clamp
    ctx.save_for_backward(z)


def _fsq_quantize_backward(ctx, grad_codes, grad_indices):
    (z,) = ctx.saved_tensors
    return torch.ops.vqkernels.fsq_quantize_backward(grad_codes, z, ctx.levels, ctx.symmetric,
                                                     ctx.hard_clamp), None, None, None


def _residual_fsq_quantize_setup(ctx, inputs, output):
    z, scales, levels, symmetric, hard_clamp = inputs
    ctx.levels, ctx.symmetric, ctx.hard_clamp = levels, symmetric, hard_clamp
    ctx.save_for_backward(z, scales)


def _residual_fsq_quantize_backward(ctx, grad_quantized, grad_indices):
    """z's gradient; the scales get none (constants, as ResidualFSQ's buffer: the wrapper refuses ones that
    require a gradient)."""
    z, scales = ctx.saved_tensors
    grad_z = torch.ops.vqkernels.residual_fsq_quantize_backward(grad_quantized, z, scales, ctx.levels,
                                                                ctx.symmetric, ctx.hard_clamp)
    return grad_z, None, None, None, None


def _latent_quantize_setup(ctx, inputs, output):
    z, values, levels = inputs
    ctx.levels, ctx.values_dtype = levels, values.dtype
    ctx.save_for_backward(output[1])


def _latent_quantize_backward(ctx, grad_codes, grad_positions, grad_indices):
    """z gets no gradient (the codes are piecewise constant in z); each chosen value gets the gradient of the codes
    that chose it."""
    (positions,) = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[1]:
        starts = torch.tensor([0, *itertools.accumulate(ctx.levels)][:-1], device=positions.device)
        valid = positions >= 0
        grad_values = grad_codes.new_zeros(sum(ctx.levels)).index_add_(
            0, (positions + starts)[valid], grad_codes[valid]).to(ctx.values_dtype)
    return None, grad_values, None


def _lfq_quantize_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _lfq_quantize_backward(ctx, grad_codes, grad_indices, grad_commit_loss):
    """codes: straight-through (identity); commit_loss = mean((x - sg(codes))^2): 2 (x - codes) / numel."""
    x, codes = ctx.saved_tensors
    dt = grad_commit_loss.dtype
    scale = grad_commit_loss * (2.0 / max(x.numel(), 1))
    return (grad_codes.to(dt) + scale * (x.to(dt) - codes.to(dt))).to(x.dtype), None


def _lfq_entropy_setup(ctx, inputs, output):
    x, ctx.inv_temperature, weights = inputs
    ctx.save_for_backward(x, output[2], weights)


def _lfq_entropy_backward(ctx, grad_per_sample, grad_codebook, grad_avg_probs):
    """x's gradient; the row weights get none (they select rows: a mask, not a parameter)."""
    x, avg_probs, weights = ctx.saved_tensors
    grad_x = torch.ops.vqkernels.lfq_entropy_backward(grad_per_sample, grad_codebook, grad_avg_probs, x, avg_probs,
                                                      ctx.inv_temperature, weights)
    return grad_x, None, None


torch.library.register_autograd("vqkernels::fsq_quantize", _fsq_quantize_backward, setup_context=_fsq_quantize_setup)
torch.library.register_autograd("vqkernels::residual_fsq_quantize", _residual_fsq_quantize_backward,
                                setup_context=_residual_fsq_quantize_setup)
torch.library.register_autograd("vqkernels::latent_quantize", _latent_quantize_backward,
                                setup_context=_latent_quantize_setup)
torch.library.register_autograd("vqkernels::lfq_quantize", _lfq_quantize_backward, setup_context=_lfq_quantize_setup)
torch.library.register_autograd("vqkernels::lfq_entropy", _lfq_entropy_backward, setup_context=_lfq_entropy_setup)


# Gumbel-softmax quantization and the rotation trick


def _gumbel_quantize_setup(ctx, inputs, output):
    logits, codebook, gumbels, tau, hard = inputs
    ctx.tau, ctx.hard = tau, hard
    ctx.save_for_backward(logits, codebook, gumbels, output[1])


def _gumbel_quantize_backward(ctx, grad_quantized, grad_indices, grad_kl):
    logits, codebook, gumbels, indices = ctx.saved_tensors
    grad_logits, grad_codebook = torch.ops.vqkernels.gumbel_quantize_backward(
        grad_quantized, grad_kl, logits, codebook, gumbels, indices, ctx.tau, ctx.hard)
    # gumbels is noise: it gets no gradient.
    return (grad_logits if ctx.needs_input_grad[0] else None,
            grad_codebook if ctx.needs_input_grad[1] else None, None, None, None)


def _rotation_trick_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rotation_trick_backward(ctx, grad):
    src, tgt = ctx.saved_tensors
    # tgt gets no gradient through the rotation (every term that holds it is detached).
    return torch.ops.vqkernels.rotation_trick_backward(grad, src, tgt) if ctx.needs_input_grad[0] else None, None


torch.library.register_autograd("vqkernels::gumbel_quantize", _gumbel_quantize_backward,
                                setup_context=_gumbel_quantize_setup)
torch.library.register_autograd("vqkernels::rotation_trick", _rotation_trick_backward,
                                setup_context=_rotation_trick_setup)


# BinaryMapper's one-hot
def _binary_one_hot_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _binary_one_hot_backward(ctx, grad_one_hot):
    (logits,) = ctx.saved_tensors
    # the indices are sampled codes: they get no gradient
    return torch.ops.vqkernels.binary_one_hot_backward(grad_one_hot, logits), None


torch.library.register_autograd("vqkernels::binary_one_hot", _binary_one_hot_backward,
                                setup_context=_binary_one_hot_setup)


# multiscale (VAR's multi-scale residual quantizer)
def _multiscale_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], output[0])


def _multiscale_backward(ctx, grad_indices, grad_h):
    # f_rest gets no gradient: h depends on it only through the indices, which are piecewise
    # constant, so its gradient is zero wherever it is defined (VAR detaches f_rest too).
    codebook, indices = ctx.saved_tensors
    grad_codebook = None
    if ctx.needs_input_grad[1]:
        grad_codebook = torch.ops.vqkernels.multiscale_quantize_step_backward(grad_h, codebook, indices)
    return None, grad_codebook, None, None


torch.library.register_autograd("vqkernels::multiscale_quantize_step", _multiscale_backward,
                                setup_context=_multiscale_setup)
