"""Deterministic scatter-add of rows onto codes (the Triton twin of csrc/cpu/scatter.h).

``code_segments`` groups the rows by code with a stable sort of the indices, so the rows of
code k are ``order[starts[k]:starts[k + 1]]`` in increasing row order; ``segment_sum`` then
has one program per (code, column block) add its rows in that fixed order. The sums are
bitwise the same run to run: no float atomics (the fast paths of the callers use them when
``torch.are_deterministic_algorithms_enabled()`` is off).
"""

import torch
import triton
import triton.language as tl

from .nearest_code import on_device

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
