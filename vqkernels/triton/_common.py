"""Pieces shared by the Triton launchers of residual_quantize, multiscale_quantize_step and
lfq_entropy: the device rules, and the scatter-add of rows into codebook rows.

``scatter_add_rows_(out, indices, src)`` adds row ``r`` of ``src`` into ``out[indices[r]]``
(rows with index -1, or any index outside [0, K), are skipped), in float32. Two kernels:

- fast (default): one program per (block of rows, block of columns), ``tl.atomic_add`` into
  ``out``; the order of the float additions varies from run to run.
- deterministic (``torch.are_deterministic_algorithms_enabled()``): the indices are sorted
  stably, and one program per (code, block of columns) walks that code's rows in increasing
  row order, starting from ``out``'s current value: exactly the sums of a sequential
  ``out.index_add_(0, indices, src)`` (what the reference computes on the CPU), bit for bit.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from .. import _checks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import time too


def require_device(op, t):
    """A ValueError unless ``t`` is a CUDA tensor (or any tensor under TRITON_INTERPRET=1)."""
    if t.device.type != "cuda" and not INTERPRET:
        _checks._fail(op, f"{t.device} tensors given; the Triton kernel needs CUDA tensors "
                          "(or TRITON_INTERPRET=1 for CPU tensors)")


def on_device(t):
    """Launches on ``t``'s GPU (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def block(n, lo, hi):
    """A power-of-two block size covering n, clipped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _row_offset(rows, P, W, s0, s1, s2):
    """Element offset of row r = (a, b, c) with a = r // P, b = (r % P) // W, c = r % W: covers
    a matrix [N, D] (P = W = 1, s0 = its row stride) and the cells of an NCHW tensor
    (P = H * W, s0, s1, s2 = the B, H, W strides)."""
    return (rows // P) * s0 + ((rows % P) // W) * s1 + (rows % W) * s2


@triton.jit
def _scatter_atomic_kernel(out_ptr, idx_ptr, src_ptr, N, K, D, P, W, s0, s1, s2, sd, so,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    idx = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    m = (rmask & (idx >= 0) & (idx < K))[:, None] & (cols < D)[None, :]
    off = _row_offset(rows.to(tl.int64), P, W, s0, s1, s2)
    v = tl.load(src_ptr + off[:, None] + cols[None, :] * sd, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + idx[:, None] * so + cols[None, :], v, mask=m)


@triton.jit
def _scatter_sorted_kernel(out_ptr, order_ptr, bounds_ptr, src_ptr, D, P, W, s0, s1, s2, sd, so,
                           BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    dst = out_ptr + k.to(tl.int64) * so + cols
    acc = tl.load(dst, mask=cmask, other=0.0)
    start = tl.load(bounds_ptr + k)
    end = tl.load(bounds_ptr + k + 1)
    for j in range(start, end):  # this code's rows, in increasing row order
        off = _row_offset(tl.load(order_ptr + j), P, W, s0, s1, s2)
        acc += tl.load(src_ptr + off + cols * sd, mask=cmask, other=0.0).to(tl.float32)
    tl.store(dst, acc, mask=cmask)


def scatter_add_rows_(out, indices, src):
    """out[indices[r]] += src row r for every r with 0 <= indices[r] < K, in float32 (the indices
    are not range-checked, which would synchronise with the GPU: one outside [-1, K) adds nothing).

    out: float32 [K, D] with unit column stride. indices: int64 [N]. src: [N, D] (any
    strides), or [B, D, H, W] whose rows are its cells r = (b, h, w) (N = B * H * W).
    Deterministic (bitwise ``index_add_`` in row order) under
    ``torch.are_deterministic_algorithms_enabled()``, float atomics otherwise.
    """
    n, (k, d) = indices.shape[0], out.shape
    if n == 0 or d == 0:
        return out
    indices = indices.contiguous()
    if src.dim() == 4:
        layout = (src.shape[2] * src.shape[3], src.shape[3], src.stride(0), src.stride(2), src.stride(3),
                  src.stride(1))
    else:
        layout = (1, 1, src.stride(0), 0, 0, src.stride(1))
    block_d = block(d, 16, 128)
    with on_device(out):
        if torch.are_deterministic_algorithms_enabled():
            keys, order = torch.sort(indices, stable=True)
            bounds = torch.searchsorted(keys, torch.arange(k + 1, device=keys.device))
            _scatter_sorted_kernel[(k, triton.cdiv(d, block_d))](out, order, bounds, src, d, *layout, out.stride(0),
                                                                 BLOCK_D=block_d)
        else:
            grid = (triton.cdiv(n, 32), triton.cdiv(d, block_d))
            _scatter_atomic_kernel[grid](out, indices, src, n, k, d, *layout, out.stride(0),
                                         BLOCK_N=32, BLOCK_D=block_d)
    return out
