"""Residual quantization (RQ-VAE) in Triton: greedy levels of the fused nearest-code search.

Forward, per level l (residuals and the running sum in float32, as the reference):

    i_l = nearest_code(r_l, codebook_l)         (the Triton kernel of .nearest_code, l2)
    q_l = codebook_l[i_l]  (NaN row for index -1)
    r_{l+1} = r_l - q_l,   quantized += q_l,   sq_l[n] = sum_d (r_l - q_l)^2 in float64

one fused kernel per level for the last line; the loss of level l is sum_n sq_l[n] / (N D),
a fixed-order reduction rounded to float32. Given the same indices, quantized is bit for bit
the reference's. beam_size > 1, D = 0 and float64 inputs are served by ``vqkernels.reference``.

Backward, per level: one kernel walks the code path again (r_{l+1} = r_l - q_l), adds
a_l r_{l+1} to grad_x (a_l = grad_commit_losses[l] * 2 / (N D), rounded as the reference: no
fused multiply-add) and writes b_l r_{l+1} (b_l = -grad_codebook_losses[l] * 2 / (N D)) for
the scatter-add into the chosen codebook rows (float atomics, or the deterministic sorted
segment sums of ._common under ``torch.use_deterministic_algorithms``).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks, reference
from ._common import block, check_device, on_device, triton_op
from .scatter import scatter_add_rows_
from .nearest_code import _nearest_code_op

OP = "triton.residual_quantize"
OP_BACKWARD = "triton.residual_quantize_backward"
BLOCK_N = 32


@triton.jit
def _residual_step_kernel(r_ptr, quant_ptr, cb_ptr, idx_ptr, sq_ptr, N, D, scn,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """r [N, D] and quant [N, D] float32 contiguous, updated in place; cb [K, D] float32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    valid = idx >= 0
    crow = cb_ptr + tl.maximum(idx, 0)[:, None] * scn
    base = rows.to(tl.int64)[:, None] * D
    sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        r = tl.load(r_ptr + base + dd[None, :], mask=m, other=0.0)
        c = tl.load(crow + dd[None, :], mask=m & valid[:, None], other=0.0)
        q = tl.where(valid[:, None], c, float("nan"))
        diff = r.to(tl.float64) - q.to(tl.float64)
        sq += tl.sum(tl.where(m, diff * diff, 0.0), axis=1)
        tl.store(r_ptr + base + dd[None, :], r - q, mask=m)
        acc = tl.load(quant_ptr + base + dd[None, :], mask=m, other=0.0)
        tl.store(quant_ptr + base + dd[None, :], acc + q, mask=m)
    tl.store(sq_ptr + rows, sq, mask=rmask)


@triton.jit
def _residual_grad_kernel(r_ptr, gx_ptr, contrib_ptr, cb_ptr, idx_ptr, a_ptr, b_ptr, N, K, D, scn,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One level of the backward walk: r <- r - q (in place), gx <- gx + a r, contrib = b r (0
    where the index is -1); r, gx, contrib [N, D] float32 contiguous; a, b: this level's scalars.
    An index outside [-1, K) (not checked: that would synchronise) counts as -1: nothing is read
    or written outside the tensors."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    valid = (idx >= 0) & (idx < K)
    crow = cb_ptr + tl.maximum(idx, 0)[:, None] * scn
    base = rows.to(tl.int64)[:, None] * D
    a = tl.load(a_ptr)
    b = tl.load(b_ptr)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        c = tl.load(crow + dd[None, :], mask=m & valid[:, None], other=0.0)
        nxt = tl.load(r_ptr + base + dd[None, :], mask=m, other=0.0) - tl.where(valid[:, None], c, float("nan"))
        tl.store(r_ptr + base + dd[None, :], nxt, mask=m)
        gx = tl.load(gx_ptr + base + dd[None, :], mask=m, other=0.0)
        tl.store(gx_ptr + base + dd[None, :], gx + a * nxt, mask=m)
        tl.store(contrib_ptr + base + dd[None, :], tl.where(valid[:, None], b * nxt, 0.0), mask=m)


def _float32_codebooks(codebooks):
    return codebooks.to(torch.float32).contiguous()


@triton_op("residual_quantize")
def _residual_quantize_op(x: Tensor, codebooks: Tensor, num_levels: int = -1,
                          beam_size: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    levels = _checks.check_residual(OP, x, codebooks, num_levels, beam_size)
    n, d = x.shape
    if beam_size > 1 or d == 0:
        return tuple(t.clone() for t in reference.residual_quantize(x, codebooks, num_levels, beam_size))
    indices = torch.empty(n, levels, dtype=torch.int64, device=x.device)
    sq = torch.zeros(levels, n, dtype=torch.float64, device=x.device)
    r = x.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    quant = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    if n:
        cbs = _float32_codebooks(codebooks)
        block_d = block(d, 16, 64)
        with on_device(x):
            for level in range(levels):
                cb = reference._level_codebook(cbs, level)
                idx = _nearest_code_op(r, cb, "l2")[0]
                indices[:, level] = idx
                _residual_step_kernel[(triton.cdiv(n, BLOCK_N),)](r, quant, cb, idx, sq[level], n, d, cb.stride(0),
                                                                  BLOCK_N=BLOCK_N, BLOCK_D=block_d,
                                                                  enable_fp_fusion=False)
    losses = (sq.sum(1) / max(n * d, 1)).to(torch.float32)
    return quant.to(x.dtype), indices, losses, losses.clone()


@triton_op("residual_quantize_backward")
def _residual_quantize_backward_op(grad_quantized: Tensor, grad_commit_losses: Tensor, grad_codebook_losses: Tensor,
                                   x: Tensor, codebooks: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    args = (grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices)
    levels = _checks.check_residual_backward(OP_BACKWARD, *args)
    n, d = x.shape
    if d == 0:
        return tuple(t.clone() for t in reference.residual_quantize_backward(*args))
    scale = 2.0 / max(x.numel(), 1)
    # The reference's coefficients, rounded as it rounds them (float32 tensor * Python float).
    coef_a = (grad_commit_losses.to(torch.float32) * scale).contiguous()
    coef_b = (-grad_codebook_losses.to(torch.float32) * scale).contiguous()
    gx = grad_quantized.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    grad_cbs = torch.zeros(codebooks.shape, dtype=torch.float32, device=x.device)
    if n:
        cbs = _float32_codebooks(codebooks)
        r = x.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        contrib = torch.empty(n, d, dtype=torch.float32, device=x.device)
        block_d = block(d, 16, 64)
        with on_device(x):
            for level in range(levels):
                idx = indices[:, level].contiguous()
                _residual_grad_kernel[(triton.cdiv(n, BLOCK_N),)](
                    r, gx, contrib, reference._level_codebook(cbs, level), idx, coef_a[level:], coef_b[level:],
                    n, cbs.shape[-2], d, cbs.stride(-2), BLOCK_N=BLOCK_N, BLOCK_D=block_d, enable_fp_fusion=False)
                scatter_add_rows_(reference._level_codebook(grad_cbs, level), idx, contrib)
    return gx.to(x.dtype), grad_cbs.to(codebooks.dtype)


def residual_quantize(x: Tensor, codebooks: Tensor, num_levels: int = -1,
                      beam_size: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Residual quantization: the Triton kernels of :func:`vqkernels.residual_quantize`.

    Same inputs, rules and outputs as :func:`vqkernels.residual_quantize`: ``(quantized [N, D]
    in x's dtype, indices int64 [N, L], commit_losses [L], codebook_losses [L])``, float32 losses
    (float64 for float64 inputs, which the PyTorch reference serves, as it serves
    ``beam_size > 1``). Each level's search is the Triton nearest_code kernel (exact float32, ties
    to the lowest index), so an index can differ from ``vqkernels.residual_quantize``'s only at a
    float32 near-tie. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. No autograd:
    :func:`residual_quantize_backward` gives the gradients.
    """
    check_device(OP, x)
    return _residual_quantize_op(x, codebooks, num_levels, beam_size)


def residual_quantize_backward(grad_quantized: Tensor, grad_commit_losses: Tensor, grad_codebook_losses: Tensor,
                               x: Tensor, codebooks: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`residual_quantize` (as ``vqkernels.reference.residual_quantize_backward``).

    Returns ``(grad_x, grad_codebooks)`` in x's and codebooks' dtypes: grad_x = grad_quantized +
    sum_l grad_commit_losses[l] * 2 / (N D) * r_{l+1}; codebook row i_l of level l gets
    -grad_codebook_losses[l] * 2 / (N D) * r_{l+1} (summed over the levels for a shared
    codebook; rows with index -1 add nothing). The indices are not range-checked (that would
    synchronise with the GPU; vqkernels' CPU kernel raises): one outside [-1, K) counts as -1,
    nothing outside the tensors is touched. The codebook sums use float atomics, or, under
    ``torch.use_deterministic_algorithms(True)``, per-code sums in row order, bitwise those of
    the reference.
    """
    args = (grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices)
    check_device(OP_BACKWARD, x)
    return _residual_quantize_backward_op(*args)
