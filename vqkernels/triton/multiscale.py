"""One scale of VAR's multi-scale residual quantizer in Triton, and its codebook gradient.

Forward, three launches:
1. area downsampling of f_rest [B, C, H, W] (any strides) to [B * ph * pw, C] (cells as rows,
   f_rest's dtype), adaptive average pooling's arithmetic: cell (y, x) averages rows
   [floor(y H / ph), ceil((y + 1) H / ph)) and columns [floor(x W / pw), ceil((x + 1) W / pw)),
   summed in float32 rows outer, columns inner, divided by the window's height then its
   width (correctly rounded division), rounded to f_rest's dtype: bit for bit what
   F.interpolate(mode='area') gives on the CPU for a contiguous f_rest. A 1 x 1 output is
   PyTorch's mean over (H, W) there, so the launcher takes that mean with PyTorch too and the
   kernel passes it through (a 1 x 1 window);
2. the nearest code of every cell: the Triton kernel of .nearest_code;
3. a gather writing h [B, C, ph, pw] (NCHW, the codebook's dtype; NaN for index -1).

Backward: grad_h's cells scatter-added onto their codes (._common.scatter_add_rows_: float
atomics, or the deterministic row-order sums under ``torch.use_deterministic_algorithms``).
float64 inputs are served by ``vqkernels.reference``.
"""

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import INTERPRET, block, check_device, on_device, triton_op
from .scatter import scatter_add_rows_
from .nearest_code import _nearest_code_op

OP = "triton.multiscale_quantize_step"
OP_BACKWARD = "triton.multiscale_quantize_step_backward"
BLOCK_R = 32


@triton.jit
def _area_kernel(f_ptr, out_ptr, n, C, H, W, ph, pw, sb, sc, sh, sw, max_kh, max_kw,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [n, C] (row r = cell (b, y, x) = (b * ph + y) * pw + x) = the area average of f."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n
    cmask = cols < C
    x = rows % pw
    y = (rows // pw) % ph
    b = (rows // (pw * ph)).to(tl.int64)
    h0 = (y * H) // ph
    kh = ((y + 1) * H + ph - 1) // ph - h0
    w0 = (x * W) // pw
    kw = ((x + 1) * W + pw - 1) // pw - w0
    base = f_ptr + (b * sb)[:, None] + cols.to(tl.int64)[None, :] * sc
    m = rmask[:, None] & cmask[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for i in range(0, max_kh):
        for j in range(0, max_kw):  # adding the 0.0 of a masked-off position leaves the sum as it is
            inside = (i < kh) & (j < kw)
            off = (h0 + i).to(tl.int64) * sh + (w0 + j).to(tl.int64) * sw
            acc += tl.load(base + off[:, None], mask=m & inside[:, None], other=0.0).to(tl.float32)
    avg = tl.math.div_rn(tl.math.div_rn(acc, kh.to(tl.float32)[:, None]), kw.to(tl.float32)[:, None])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], avg.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_nchw_kernel(cb_ptr, idx_ptr, h_ptr, n, C, plane, scn, scc,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """h[b, c, cell] = cb[idx[r], c] (NaN for index -1) with r = b * plane + cell."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n
    m = rmask[:, None] & (cols < C)[None, :]
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    valid = (idx >= 0)[:, None]
    v = tl.load(cb_ptr + tl.maximum(idx, 0)[:, None] * scn + cols[None, :] * scc, mask=m & valid, other=0.0)
    v = tl.where(valid, v.to(tl.float32), float("nan")).to(h_ptr.dtype.element_ty)  # exact: v is a code entry
    r64 = rows.to(tl.int64)
    dst = (r64 // plane * C * plane + r64 % plane)[:, None] + cols.to(tl.int64)[None, :] * plane
    tl.store(h_ptr + dst, v, mask=m)


def _area_downsample(f_rest, ph, pw):
    """[B * ph * pw, C] in f_rest's dtype: F.interpolate(f_rest, (ph, pw), mode='area'), cells as rows."""
    b, c, hh, ww = f_rest.shape
    if ph == 1 and pw == 1:  # PyTorch's own 1 x 1 path: the mean over (H, W)
        f_rest = f_rest.contiguous().mean((2, 3), keepdim=True)
        hh = ww = 1
    n = b * ph * pw
    # The interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest): round in PyTorch there.
    via_float = INTERPRET and f_rest.dtype == torch.bfloat16
    out = torch.empty(n, c, dtype=torch.float32 if via_float else f_rest.dtype, device=f_rest.device)
    max_kh = max(((y + 1) * hh + ph - 1) // ph - (y * hh) // ph for y in range(ph))
    max_kw = max(((x + 1) * ww + pw - 1) // pw - (x * ww) // pw for x in range(pw))
    block_c = block(c, 16, 64)
    grid = (triton.cdiv(n, BLOCK_R), triton.cdiv(c, block_c))
    _area_kernel[grid](f_rest, out, n, c, hh, ww, ph, pw, *f_rest.stride(), max_kh, max_kw,
                       BLOCK_R=BLOCK_R, BLOCK_C=block_c)
    return out.to(torch.bfloat16) if via_float else out


@triton_op("multiscale_quantize_step")
def _multiscale_quantize_step_op(f_rest: Tensor, codebook: Tensor, pn: List[int],
                                 metric: str = "l2") -> Tuple[Tensor, Tensor]:
    _checks.check_multiscale(OP, f_rest, codebook, pn, metric)
    b, c = f_rest.shape[0], f_rest.shape[1]
    ph, pw = pn
    n = b * ph * pw
    h = torch.empty(b, c, ph, pw, dtype=codebook.dtype, device=codebook.device)
    if n == 0 or c == 0:  # C = 0: every code is at distance 0 and the first wins
        return torch.zeros(b, ph, pw, dtype=torch.int64, device=f_rest.device), h
    with on_device(f_rest):
        rest = _area_downsample(f_rest, ph, pw)
        indices = _nearest_code_op(rest, codebook, metric)[0]
        block_c = block(c, 16, 64)
        grid = (triton.cdiv(n, BLOCK_R), triton.cdiv(c, block_c))
        _gather_nchw_kernel[grid](codebook, indices, h, n, c, ph * pw, *codebook.stride(),
                                  BLOCK_R=BLOCK_R, BLOCK_C=block_c)
    return indices.view(b, ph, pw), h


@triton_op("multiscale_quantize_step_backward")
def _multiscale_quantize_step_backward_op(grad_h: Tensor, codebook: Tensor, indices: Tensor) -> Tensor:
    _checks.check_multiscale_backward(OP_BACKWARD, grad_h, codebook, indices)
    grad = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
    scatter_add_rows_(grad, indices.reshape(-1), grad_h)
    return grad.to(codebook.dtype)


def multiscale_quantize_step(f_rest: Tensor, codebook: Tensor, pn: int | Tuple[int, int],
                             metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """One scale of VAR's quantizer: the Triton kernels of :func:`vqkernels.multiscale_quantize_step`.

    Same inputs and rules: area-downsample ``f_rest`` [B, C, H, W] to ``pn`` (an int or a pair
    ``(ph, pw)``), bit for bit ``F.interpolate(mode='area')`` on the CPU; each cell's nearest code
    by the Triton nearest_code kernel (exact float32, ties to the lowest index, a cell holding a
    NaN gets index -1 and a NaN code), so an index can differ from
    ``vqkernels.multiscale_quantize_step``'s only at a float32 near-tie. Returns ``indices``
    int64 [B, ph, pw] and ``h`` [B, C, ph, pw] (contiguous, the codebook's dtype). float64
    inputs are served by the PyTorch reference. CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``. No autograd: :func:`multiscale_quantize_step_backward` gives the
    codebook gradient.
    """
    pn = [pn, pn] if isinstance(pn, int) else list(pn)
    check_device(OP, f_rest)
    return _multiscale_quantize_step_op(f_rest, codebook, pn, metric)


def multiscale_quantize_step_backward(grad_h: Tensor, codebook: Tensor, indices: Tensor) -> Tensor:
    """Codebook gradient of :func:`multiscale_quantize_step`'s ``h``: each cell of ``grad_h``
    [B, C, ph, pw] added onto the row ``indices[b, y, x]`` (index -1, or any index outside
    [0, K), which is not checked as that would synchronise with the GPU, adds nothing), in float32,
    returned in the codebook's dtype. Float atomics, or, under
    ``torch.use_deterministic_algorithms(True)``, per-code sums in cell order, bitwise the
    reference's. float64 inputs are served by the PyTorch reference.
    """
    check_device(OP_BACKWARD, codebook)
    return _multiscale_quantize_step_backward_op(grad_h, codebook, indices)
