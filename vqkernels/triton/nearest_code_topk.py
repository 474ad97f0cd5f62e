"""Fused k-nearest-code search in Triton: the N x K distance matrix is never written.

The search walks the codebook in tiles as :mod:`vqkernels.triton.nearest_code` does and
scores each tile with the same helper (``_tile_scores``: float32 accumulation, never TF32,
+inf for NaN scores and NaN codes). Each (score, code) pair becomes one int64 key: the
score's float32 bits mapped to a monotone integer in the high 32 bits, the code index in the
low 32 (a score is never -0.0: it is add - p with add >= +0.0, and a - a rounds to +0.0).
Keys are distinct and their order is the reference's stable sort order: by score, ties to the
lowest index.

Each row keeps its k smallest keys so far in registers (a [BLOCK_N, KP] block, KP the next
power of two >= k, slots beyond k pinned below every key so they are never evicted). A tile
is merged by moving its smallest key into the slot of the row's largest kept key while it
is smaller (at most k moves per tile; after the first tiles most tiles move none). The
epilogue extracts the kept keys in increasing order and recomputes each chosen code's
distance in float32 from x and that code (l2: sum (x - c)^2), as nearest_code's does.

Rules as :func:`vqkernels.nearest_code_topk`: a row of x holding a NaN gets indices -1 and
distances NaN; slots holding a NaN code (fewer than k usable codes) get -1 and +inf.
k above ``MAX_K``, and float64 inputs, are served by ``vqkernels.reference.nearest_code_topk``.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks, reference
from ._common import INTERPRET, check_device, on_device, triton_op
from .nearest_code import _code_distance, _row_block, _tile_scores, launch_kwargs, search_operands

OP = "triton.nearest_code_topk"
MAX_K = 32  # larger k: the reference (the kept keys would not fit in registers)

# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages): smaller row blocks than nearest_code's,
# the kept keys take BLOCK_N * KP int64 registers on top of the tile's keys.
_CUDA_CONFIGS = [(64, 64, 32, 4, 2), (64, 128, 32, 4, 2), (128, 64, 32, 8, 2), (32, 128, 32, 4, 2)]


def _configs():
    if INTERPRET:  # the interpreter is ~1000x slower: one config
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bk, bd, w, s in _CUDA_CONFIGS]


_TOP = tl.constexpr(9223372036854775807)  # int64 max: above every key (the largest is +inf's, 0x7F800000 << 32 | index)
_INF_BITS = tl.constexpr(0x7F800000)  # the high half of a +inf score's key


@triton.jit
def _order_keys(score, cols):
    """int64 keys [BLOCK_N, BLOCK_K] ordered as (score, code index), score's bits in the high half."""
    b = score.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats: larger magnitude -> smaller integer
    return (b.to(tl.int64) << 32) + cols.to(tl.int64)[None, :]


@triton.autotune(configs=_configs(), key=["K", "D", "KP", "METRIC", "IEEE", "UPCAST"])
@triton.jit
def _topk_kernel(x_ptr, c_ptr, add_ptr, scale_ptr, idx_ptr, dist_ptr,
                 N, K, D, TOPK, sxn, sxd, scn, scd,
                 METRIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr,
                 KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, xrow, xsq, inv_xn = _row_block(x_ptr, N, D, sxn, sxd, EPS, BLOCK_N, BLOCK_D)

    # Kept keys: distinct placeholders, above every key in the first TOPK slots (evicted first),
    # below every key in the others (never evicted).
    slot = tl.zeros((BLOCK_N, KP), dtype=tl.int64) + tl.arange(0, KP)[None, :]
    kept = tl.where(slot < TOPK, _TOP - slot, -_TOP + slot)
    kr = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        score = _tile_scores(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, k0, K, D, sxd, scn, scd,
                             METRIC, IEEE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        cols = k0 + kr
        keys = tl.where((cols < K)[None, :], _order_keys(score, cols), _TOP)
        cand = tl.min(keys, axis=1)
        worst = tl.max(kept, axis=1)
        move = cand < worst
        while tl.max(move.to(tl.int32), axis=0) > 0:
            kept = tl.where(move[:, None] & (kept == worst[:, None]), cand[:, None], kept)
            keys = tl.where(move[:, None] & (keys == cand[:, None]), _TOP, keys)
            cand = tl.min(keys, axis=1)
            worst = tl.max(kept, axis=1)
            move = cand < worst

    # Epilogue: the kept keys in increasing order; each code's distance recomputed in float32.
    kept = tl.where(slot < TOPK, kept, _TOP)
    nan_row = xsq != xsq
    out = rows.to(tl.int64) * TOPK
    for j in range(0, TOPK):
        key = tl.min(kept, axis=1)
        kept = tl.where(kept == key[:, None], _TOP, kept)
        high = key >> 32
        code = (key - (high << 32)).to(tl.int32)
        dist, add_c = _code_distance(xrow, rmask, c_ptr, code, add_ptr, scale_ptr, inv_xn, D, sxd, scn, scd,
                                     METRIC, BLOCK_N, BLOCK_D)
        dist = tl.where(high == _INF_BITS, float("inf"), dist)  # no finite score: as the reference
        missing = add_c == float("inf")  # a NaN code: fewer than k usable codes
        idx = tl.where(missing | nan_row, -1, code.to(tl.int64))
        dist = tl.where(missing, float("inf"), dist)
        tl.store(idx_ptr + out + j, idx, mask=rmask)
        tl.store(dist_ptr + out + j, tl.where(nan_row, float("nan"), dist), mask=rmask)


@triton_op("nearest_code_topk")
def _nearest_code_topk_op(x: Tensor, codebook: Tensor, k: int, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    _checks.check_topk(OP, x, codebook, k, metric)
    if k > MAX_K:
        return tuple(t.clone() for t in reference.nearest_code_topk(x, codebook, k, metric))
    n, d = x.shape
    num_codes = codebook.shape[0]
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    distances = torch.empty(n, k, dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, distances
    x, codebook, add, scale = search_operands(x, codebook, metric)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device(x):
        _topk_kernel[grid](x, codebook, add, scale, indices, distances,
                           n, num_codes, d, k, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
                           KP=triton.next_power_of_2(k), **launch_kwargs(x, metric))
    return indices, distances


def nearest_code_topk(x: Tensor, codebook: Tensor, k: int, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of every row of ``x``, nearest first: the Triton kernel of
    :func:`vqkernels.nearest_code_topk`.

    Same inputs, metrics, tie and NaN rules as :func:`vqkernels.nearest_code_topk` (equal
    distances list the lower index first; a NaN row gets -1 / NaN; slots beyond the usable codes
    -1 / +inf; ``k`` outside [1, K] raises a ValueError). Returns ``indices`` int64 [N, k] and
    ``distances`` [N, k] float32 (float64 for float64 inputs, which the PyTorch reference serves,
    as it serves k > 32). Distances are recomputed directly in float32 (l2: sum (x - c)^2), so
    they can differ from ``vqkernels.nearest_code_topk``'s by float32 rounding. CUDA tensors, or
    CPU tensors under ``TRITONINTERPRET=1``. No autograd yet: ``distances`` carries no gradient.
    """
    check_device(OP, x)
    return _nearest_code_topk_op(x, codebook, k, metric)
