"""Scatter-adds of rows onto codes (the Triton counterpart of csrc/cpu/scatter.h).

``code_segments`` groups the rows by code with a stable sort of the indices, so the rows of
code k are ``order[starts[k]:starts[k + 1]]`` in increasing row order; ``segment_sum`` then
has one program per (code, column block) add its rows in that fixed order. The sums are
bitwise the same run to run: no float atomics (the fast paths of the callers use them when
``torch.are_deterministic_algorithms_enabled()`` is off).

``scatter_add_rows_(out, indices, src)`` adds row r of ``src`` (a matrix, or the cells of an
NCHW tensor) into ``out[indices[r]]``: float atomics by default; in deterministic mode one
program per (code, column block) walks the code's segment in row order starting from ``out``'s
value, bitwise a sequential ``out.index_add_(0, indices, src)``.
"""

import torch
import triton
import triton.language as tl

from ._common import block, on_device

_BLOCK_R, _BLOCK_D = 16, 64  # rows added per step, columns per program


def code_segments(indices, num_codes):
    """(order, starts): the rows whose index is code k are order[starts[k]:starts[k + 1]], in
    increasing row order. Indices outside [0, num_codes) (-1: no code) fall in no segment.
    No host synchronisation."""
    keys = torch.where((indices < 0) | (indices >= num_codes), num_codes, indices)
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(num_codes + 1, device=indices.device))
    return order, starts


@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, starts_ptr, sub_ptr, coef_ptr, out_ptr,
                        D, ssn, ssd, sbk, sbd, sok, sod,
                        HAS_SUB: tl.constexpr, HAS_COEF: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    code = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    start = tl.load(starts_ptr + code)
    end = tl.load(starts_ptr + code + 1)
    if HAS_SUB:
        sub = tl.load(sub_ptr + code * sbk + dd * sbd, mask=dmask, other=0.0).to(tl.float32)
    jr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_R):
        j = j0 + jr
        jmask = j < end
        row = tl.load(order_ptr + j, mask=jmask, other=0)
        m = jmask[:, None] & dmask[None, :]
        v = tl.load(src_ptr + row[:, None] * ssn + dd[None, :] * ssd, mask=m, other=0.0).to(tl.float32)
        if HAS_SUB:
            v = tl.where(m, v - sub[None, :], 0.0)
        acc += v
    total = tl.sum(acc, axis=0)
    if HAS_COEF:  # an empty segment stays 0, whatever the coefficient (as an index_add of nothing)
        total = tl.where(end > start, total * tl.load(coef_ptr), 0.0)
    tl.store(out_ptr + code * sok + dd * sod, total, mask=dmask)


def segment_sum(src, order, starts, out, sub=None, coef=None):
    """out[k, :] = coef * sum over the rows r of code k of (src[r, :] - sub[k, :]), in float32,
    the rows added in a fixed order (see code_segments); sub [K, D] and the one-element coef
    tensor are optional. out [K, D] float32 is written whole (an empty segment gives 0)."""
    num_codes, d = out.shape
    if out.numel() == 0:
        return
    grid = (num_codes, triton.cdiv(d, _BLOCK_D))
    with on_device(out):
        _segment_sum_kernel[grid](src, order, starts, out if sub is None else sub, out if coef is None else coef, out,
                                  d, src.stride(0), src.stride(1), *(out if sub is None else sub).stride(),
                                  *out.stride(), HAS_SUB=sub is not None, HAS_COEF=coef is not None,
                                  BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D)


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
            order, bounds = code_segments(indices, k)
            _scatter_sorted_kernel[(k, triton.cdiv(d, block_d))](out, order, bounds, src, d, *layout, out.stride(0),
                                                                 BLOCK_D=block_d)
        else:
            grid = (triton.cdiv(n, 32), triton.cdiv(d, block_d))
            _scatter_atomic_kernel[grid](out, indices, src, n, k, d, *layout, out.stride(0),
                                         BLOCK_N=32, BLOCK_D=block_d)
    return out
