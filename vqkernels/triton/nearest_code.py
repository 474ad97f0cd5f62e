"""Fused nearest-code search in Triton: the N x K distance matrix is never written.

Each program takes BLOCK_N rows of x and walks the codebook in tiles of BLOCK_K codes; a
tile's dot products x . c accumulate in float32 with ``tl.dot`` over BLOCK_D-wide chunks
of D (IEEE float32 for float32 inputs, never TF32; float16/bfloat16 inputs multiply in
their own type and accumulate in float32). Every metric is one affine form of the dot:

    score[n, k] = add[k] - dot[n, k] * scale[k] (* rowscale[n] for cosine)

    l2:     add = ||c||^2,  scale = 2            (||x||^2 does not change the argmin)
    ip:     add = 0,        scale = 1
    cosine: add = 1,        scale = 1/max(||c||, eps), rowscale = 1/max(||x||, eps)

with ``add = +inf`` for a codebook row holding a NaN, so it is never chosen. A running
(min, argmin) per row stays in registers; tiles merge with a strict ``<`` in increasing K
order and a tile's own argmin takes its first minimum, so ties go to the lowest index.
The epilogue recomputes the distance of the chosen code directly in float32 (l2:
sum (x - c)^2, no cancellation), and gives a row of x holding a NaN index -1, distance NaN.

float64 inputs are served by ``vqkernels.reference.nearest_code`` (float64 semantics;
no float64 Triton kernel yet).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks, reference
from ._common import INTERPRET, check_device, on_device, triton_op

NORM_EPS = reference.NORM_EPS
_METRIC_IDS = {"l2": 0, "ip": 1, "cosine": 2}
OP = "triton.nearest_code"


# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages): a few points of {64, 128}^2 x {32, 64} x
# {4, 8} x {2, 3}, so that autotuning a new (K, D, dtype) stays at a few seconds.
_CUDA_CONFIGS = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (128, 128, 32, 4, 3), (128, 64, 32, 4, 3),
                 (64, 128, 32, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2), (64, 128, 64, 4, 2)]


def _configs():
    if INTERPRET:  # the interpreter is ~1000x slower: one config
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bk, bd, w, s in _CUDA_CONFIGS]


@triton.jit
def _row_sq_norms(xrow, rmask, D, sxd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """||x||^2 [BLOCK_N] in float32 of the rows at pointers xrow [BLOCK_N, 1]: the cosine row
    scale, and NaN detection (a NaN entry makes it NaN)."""
    dr = tl.arange(0, BLOCK_D)
    xsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dr
        xt = tl.load(xrow + dd[None, :] * sxd, mask=rmask[:, None] & (dd < D)[None, :], other=0.0)
        xt = xt.to(tl.float32)
        xsq += tl.sum(xt * xt, axis=1)
    return xsq


@triton.jit
def _row_block(x_ptr, N, D, sxn, sxd, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_N rows of x: (rows, mask, row pointers, ||x||^2, 1 / max(||x||, eps))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    xrow = x_ptr + rows.to(tl.int64)[:, None] * sxn
    xsq = _row_sq_norms(xrow, rmask, D, sxd, BLOCK_N, BLOCK_D)
    return rows, rmask, xrow, xsq, 1.0 / tl.maximum(tl.sqrt(xsq), EPS)


@triton.jit
def _tile_scores(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, k0, K, D, sxd, scn, scd,
                 METRIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores [BLOCK_N, BLOCK_K] of the rows against codes k0 .. k0 + BLOCK_K - 1 (the affine
    form of the module docstring), +inf where not usable: NaN scores, NaN codes, codes >= K."""
    dr = tl.arange(0, BLOCK_D)
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dr
        dmask = dd < D
        xt = tl.load(xrow + dd[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        ct = tl.load(c_ptr + cols[None, :] * scn + dd[:, None] * scd,
                     mask=cmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's bfloat16 tl.dot is wrong; bf16 products are exact in fp32
            acc = tl.dot(xt.to(tl.float32), ct.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(xt, ct, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, ct, acc)
    add = tl.load(add_ptr + cols, mask=cmask, other=float("inf"))
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    if METRIC == 2:
        acc = acc * inv_xn[:, None]
    score = add[None, :] - acc * scale[None, :]
    return tl.where(score != score, float("inf"), score)  # NaN (inf - inf, NaN codes) -> never chosen


@triton.jit
def _nearest(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, K, D, sxd, scn, scd,
             METRIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(best score, its code) [BLOCK_N] over the whole codebook: a running (min, argmin) merged
    tile by tile with a strict ``<`` in increasing K order, each tile's argmin its first minimum,
    so ties go to the lowest index. best is +inf when no code has a finite score."""
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        score = _tile_scores(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, k0, K, D, sxd, scn, scd,
                             METRIC, IEEE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
        tmin = tl.min(score, axis=1)
        targ = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int32) + k0
        better = tmin < best
        best = tl.where(better, tmin, best)
        best_idx = tl.where(better, targ, best_idx)
    return best, best_idx


@triton.jit
def _code_distance(xrow, rmask, c_ptr, code, add_ptr, scale_ptr, inv_xn, D, sxd, scn, scd,
                   METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(distance, add term) [BLOCK_N] of each row to its code ``code`` [BLOCK_N] (a valid index),
    recomputed in float32 from x and that code (l2: sum (x - c)^2, no cancellation)."""
    dr = tl.arange(0, BLOCK_D)
    crow = c_ptr + code.to(tl.int64)[:, None] * scn
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dr
        m = rmask[:, None] & (dd < D)[None, :]
        xt = tl.load(xrow + dd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        ct = tl.load(crow + dd[None, :] * scd, mask=m, other=0.0).to(tl.float32)
        diff = xt - ct
        sq += tl.sum(diff * diff, axis=1)
        dot += tl.sum(xt * ct, axis=1)
    add_c = tl.load(add_ptr + code, mask=rmask, other=0.0)
    scale_c = tl.load(scale_ptr + code, mask=rmask, other=0.0)
    if METRIC == 0:
        dist = sq
    elif METRIC == 1:
        dist = -dot
    else:
        dist = add_c - dot * scale_c * inv_xn
    return dist, add_c


@triton.autotune(configs=_configs(), key=["K", "D", "METRIC", "IEEE", "UPCAST"])
@triton.jit
def _nearest_code_kernel(x_ptr, c_ptr, add_ptr, scale_ptr, idx_ptr, dist_ptr,
                         N, K, D, sxn, sxd, scn, scd,
                         METRIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rmask, xrow, xsq, inv_xn = _row_block(x_ptr, N, D, sxn, sxd, EPS, BLOCK_N, BLOCK_D)
    best, best_idx = _nearest(xrow, rmask, c_ptr, add_ptr, scale_ptr, inv_xn, K, D, sxd, scn, scd,
                              METRIC, IEEE, UPCAST, BLOCK_N, BLOCK_K, BLOCK_D)
    # Epilogue: the chosen code's distance, recomputed in float32 from x and that code.
    dist, add_best = _code_distance(xrow, rmask, c_ptr, best_idx, add_ptr, scale_ptr, inv_xn, D, sxd, scn, scd,
                                    METRIC, BLOCK_N, BLOCK_D)
    dist = tl.where(best == float("inf"), float("inf"), dist)  # no finite score: as the reference
    # No usable code (NaN row, or the only candidates are NaN codes): index -1, distance NaN.
    invalid = (xsq != xsq) | (add_best == float("inf"))
    tl.store(idx_ptr + rows, tl.where(invalid, -1, best_idx.to(tl.int64)), mask=rmask)
    tl.store(dist_ptr + rows, tl.where(invalid, float("nan"), dist), mask=rmask)


def _code_terms(cb, metric):
    """add [K] and scale [K] of the affine score form, float32; add = +inf for NaN codes."""
    c = cb.float()
    k = c.shape[0]
    if metric == "l2":
        add, scale = (c * c).sum(1), torch.full((k,), 2.0, device=c.device)
    elif metric == "ip":
        add, scale = torch.zeros(k, device=c.device), torch.ones(k, device=c.device)
    else:
        add = torch.ones(k, device=c.device)
        scale = 1.0 / c.norm(dim=1).clamp_min(NORM_EPS)
    add = add.masked_fill(torch.isnan(c).any(1), float("inf"))
    return add.contiguous(), scale.contiguous()


def search_operands(x, codebook, metric):
    """(x, codebook, add, scale) as the search kernels take them: tl.dot needs one operand type, so
    float16/bfloat16 pairs stay as they are and any mix becomes float32; the per-code terms."""
    if x.dtype != codebook.dtype:
        x, codebook = x.float(), codebook.float()
    return (x, codebook, *_code_terms(codebook, metric))


def launch_kwargs(x, metric):
    """The constexpr arguments every search kernel shares, for x as search_operands returns it."""
    return dict(METRIC=_METRIC_IDS[metric], IEEE=x.dtype == torch.float32,
                UPCAST=INTERPRET and x.dtype == torch.bfloat16, EPS=NORM_EPS)


@triton_op("nearest_code")
def _nearest_code_op(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    _checks.check_search(OP, x, codebook, metric)
    n, d = x.shape
    k = codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    distances = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return indices, distances
    x, codebook, add, scale = search_operands(x, codebook, metric)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device(x):
        _nearest_code_kernel[grid](x, codebook, add, scale, indices, distances,
                                   n, k, d, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
                                   **launch_kwargs(x, metric))
    return indices, distances


def nearest_code(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """Nearest code of every row of ``x``: the Triton kernel of :func:`vqkernels.nearest_code`.

    Same inputs, metrics, tie and NaN rules as :func:`vqkernels.nearest_code`. Returns
    ``indices`` int64 [N] and ``distances`` [N] float32 (float64 for float64 inputs, which the
    PyTorch reference serves). The distance of the chosen code is recomputed directly in float32
    (l2: sum (x - c)^2), so it can differ from ``vqkernels.nearest_code``'s by float32 rounding
    (its l2 uses the expanded form). CUDA tensors, or CPU tensors under ``TRITONINTERPRET=1``.
    No autograd yet: ``distances`` carries no gradient.
    """
    check_device(OP, x)
    return _nearest_code_op(x, codebook, metric)
