"""VQ quantization in Triton: the nearest-code search with a gather epilogue, and its backward.

Forward: the search of :mod:`vqkernels.triton.nearest_code` (the same @triton.jit helpers:
tiles of x against tiles of the codebook, float32 accumulation, ties to the lowest index,
NaN codes never chosen), then, while the row block is still in hand, the chosen code's row
is written as the quantized row (in x's dtype; NaN for index -1) and the row's squared error
sum (x - q)^2 in float32. The two (equal) losses are the mean of those errors: a float64 sum
of the per-row vector (torch.sum: a fixed reduction order), divided by N * D.

Backward (``vq_quantize_backward``), with a = grad_commit_loss * 2 / (N D) and
b = -grad_codebook_loss * 2 / (N D) as device tensors (no host synchronisation):

    grad_x[r]        = grad_quantized[r] + a * (x[r] - q[r])
    grad_codebook[k] = sum over the rows r with index k of b * (x[r] - c[k])

grad_x is one elementwise kernel; grad_codebook is scattered in the same kernel with float
atomics, or, when ``torch.are_deterministic_algorithms_enabled()``, summed per code in a
fixed row order (:mod:`vqkernels.triton.scatter`). Indices are not range-checked (that needs
a host synchronisation): one outside [-1, K) counts as -1.

float64 inputs are served by ``vqkernels.reference`` (float64 semantics).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import check_device, on_device, triton_op
from .nearest_code import _configs, _nearest, _row_block, launch_kwargs, search_operands
from .scatter import code_segments, segment_sum

OP = "triton.vq_quantize"
OP_BACKWARD = "triton.vq_quantize_backward"
_BLOCK_N, _BLOCK_D = 32, 64  # the backward's elementwise tiles


@triton.autotune(configs=_configs(), key=["K", "D", "METRIC", "IEEE", "UPCAST"])
@triton.jit
def _vq_quantize_kernel(x_ptr, c_ptr, add_ptr, scale_ptr, q_ptr, idx_ptr, err_ptr,
                        N, K, D, sxn, sxd, scn, scd,
                        METRIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, xrow, xsq, inv_xn = _row_block(x_ptr, N, D, sxn, sxd, EPS, BLOCK_N, BLOCK_D)
    _, code = _nearest(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, K, D, sxd, scn, scd,
                       METRIC, IEEE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
    # No usable code (NaN row, or the only candidates are NaN codes): index -1, quantized row NaN.
    invalid = (xsq != xsq) | (tl.load(add_ptr + code, mask=rmask, other=0.0) == float("inf"))
    tl.store(idx_ptr + rows, tl.where(invalid, -1, code.to(tl.int64)), mask=rmask)

    # Gather epilogue: the quantized rows and the rows' squared errors, float32.
    crow = c_ptr + code.to(tl.int64)[:, None] * scn
    qrow = q_ptr + rows.to(tl.int64)[:, None] * D
    dr = tl.arange(0, BLOCK_D)
    err = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dr
        m = rmask[:, None] & (dd < D)[None, :]
        xt = tl.load(xrow + dd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        ct = tl.load(crow + dd[None, :] * scd, mask=m, other=0.0).to(tl.float32)
        ct = tl.where(invalid[:, None], float("nan"), ct)
        tl.store(qrow + dd[None, :], ct, mask=m)
        diff = xt - ct
        err += tl.sum(tl.where(m, diff * diff, 0.0), axis=1)
    tl.store(err_ptr + rows, err, mask=rmask)


@triton_op("vq_quantize")
def _vq_quantize_op(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _checks.check_search(OP, x, codebook, metric)
    n, d = x.shape
    k = codebook.shape[0]
    quantized = torch.empty(n, d, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    errors = torch.empty(n, dtype=torch.float32, device=x.device)
    if n > 0:
        xs, cb, add, scale = search_operands(x, codebook, metric)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        with on_device(x):
            _vq_quantize_kernel[grid](xs, cb, add, scale, quantized, indices, errors,
                                      n, k, d, xs.stride(0), xs.stride(1), cb.stride(0), cb.stride(1),
                                      **launch_kwargs(xs, metric))
    if n * d == 0:
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
    else:
        loss = (errors.sum(dtype=torch.float64) / (n * d)).to(torch.float32)
    return quantized, indices, loss, loss.clone()


def vq_quantize(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nearest-code quantization with its two losses: the Triton kernel of :func:`vqkernels.vq_quantize`.

    Same inputs, metrics, tie and NaN rules as :func:`vqkernels.vq_quantize`. Returns
    ``quantized`` [N, D] in x's dtype (the chosen codes' rows; NaN for a row without a code),
    ``indices`` int64 [N], and ``commit_loss`` and ``codebook_loss``, both mean((x - q)^2), float32
    (float64 for float64 inputs, which the PyTorch reference serves). The loss is summed in a fixed
    order, so it is bitwise the same run to run, but it can differ from ``vqkernels.vq_quantize``'s
    by float32 rounding. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. No autograd
    here: :func:`vq_quantize_backward` is the backward kernel.
    """
    check_device(OP, x)
    return _vq_quantize_op(x, codebook, metric)


@triton.jit
def _vq_backward_kernel(gq_ptr, x_ptr, c_ptr, idx_ptr, coef_ptr, gx_ptr, gc_ptr,
                        N, K, D, sgn, sgd, sxn, sxd, scn, scd, sin,
                        ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    m = rmask[:, None] & (dd < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    code = tl.load(idx_ptr + rows.to(tl.int64) * sin, mask=rmask, other=-1)
    valid = ((code >= 0) & (code < K))[:, None]
    xt = tl.load(x_ptr + r64 * sxn + dd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    ct = tl.load(c_ptr + code[:, None] * scn + dd[None, :] * scd, mask=m & valid, other=0.0).to(tl.float32)
    diff = xt - tl.where(valid, ct, float("nan"))  # no code: q is NaN, so is the row's grad_x
    gq = tl.load(gq_ptr + r64 * sgn + dd[None, :] * sgd, mask=m, other=0.0).to(tl.float32)
    tl.store(gx_ptr + r64 * D + dd[None, :], gq + tl.load(coef_ptr) * diff, mask=m)
    if ATOMIC:
        tl.atomic_add(gc_ptr + code[:, None] * D + dd[None, :], tl.load(coef_ptr + 1) * diff, mask=m & valid)


@triton_op("vq_quantize_backward")
def _vq_quantize_backward_op(grad_quantized: Tensor, grad_commit_loss: Tensor, grad_codebook_loss: Tensor,
                             x: Tensor, codebook: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    _checks.check_vq_quantize_backward(OP_BACKWARD, grad_quantized, grad_commit_loss, grad_codebook_loss, x,
                                       codebook, indices)
    dt = _checks.compute_dtype(x, codebook)
    n, d = x.shape
    k = codebook.shape[0]
    scale = 2.0 / max(n * d, 1)
    coef = torch.stack([grad_commit_loss.to(x.device, dt).reshape(()) * scale,
                        -grad_codebook_loss.to(x.device, dt).reshape(()) * scale])
    grad_x = torch.empty(n, d, dtype=x.dtype, device=x.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_codebook = (torch.empty if deterministic else torch.zeros)(k, d, dtype=dt, device=x.device)
    if n * d > 0:
        grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(d, _BLOCK_D))
        with on_device(x):
            _vq_backward_kernel[grid](grad_quantized, x, codebook, indices, coef, grad_x, grad_codebook,
                                      n, k, d, *grad_quantized.stride(), *x.stride(), *codebook.stride(),
                                      indices.stride(0), ATOMIC=not deterministic, BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D)
    if deterministic:
        order, starts = code_segments(indices, k)
        segment_sum(x, order, starts, grad_codebook, sub=codebook, coef=coef[1:])
    return grad_x, grad_codebook.to(codebook.dtype)


def vq_quantize_backward(grad_quantized: Tensor, grad_commit_loss: Tensor, grad_codebook_loss: Tensor, x: Tensor,
                         codebook: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`vq_quantize`: the Triton kernels of :func:`vqkernels.vq_quantize_backward`.

    ``grad_x = grad_quantized + grad_commit_loss * 2 / (N D) * (x - q)`` (straight-through plus
    the commitment term; NaN rows where the index is -1) in x's dtype, and ``grad_codebook``
    [K, D] in the codebook's dtype, the codebook-loss term ``grad_codebook_loss * 2 / (N D) *
    (c - x)`` summed onto each row's code: float atomics, or a fixed order (bitwise reproducible)
    when ``torch.are_deterministic_algorithms_enabled()``. ``indices`` are vq_quantize's (an index
    outside [-1, K) counts as -1: no range check, which would synchronise with the host).
    float64 inputs: the PyTorch reference. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    check_device(OP_BACKWARD, x)
    return _vq_quantize_backward_op(grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices)
