"""The in-place EMA codebook update (VQ-VAE / Sonnet) in Triton.

With the float32 statistics cluster_size [K] and embed_sum [K, D]:

    counts[k], sums[k] = the number and the sum (float32) of the rows of x with index k
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum    = decay * embed_sum    + (1 - decay) * sums
    total        = sum(cluster_size)
    codebook     = embed_sum / ((cluster_size + eps) / (total + K * eps) * total)

Three launches: counts and sums (integer and float atomics; or, when
``torch.are_deterministic_algorithms_enabled()``, a stable sort of the indices and a per-code
sum in a fixed row order, :mod:`vqkernels.triton.scatter`), the cluster_size update with its
total (one program, fixed order), and the elementwise finalize of embed_sum and codebook. All
three tensors are updated in place through their strides. Indices outside [-1, K) raise a
ValueError before anything is written (a host synchronisation, as in the reference).
float64 statistics are served by ``vqkernels.reference.ema_update_``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import check_device, on_device, triton_op
from .scatter import code_segments, segment_sum

OP = "triton.ema_update_"
_BLOCK_N, _BLOCK_K, _BLOCK_D = 32, 32, 64  # tiles of the accumulate and finalize kernels
_BLOCK_STATS = 1024  # codes per step of the one-program cluster_size kernel


@triton.jit
def _ema_accumulate_kernel(x_ptr, idx_ptr, counts_ptr, sums_ptr, N, D, sxn, sxd, sin,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    code = tl.load(idx_ptr + rows.to(tl.int64) * sin, mask=rmask, other=-1)
    valid = rmask & (code >= 0)
    m = valid[:, None] & (dd < D)[None, :]
    xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxn + dd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(sums_ptr + code[:, None] * D + dd[None, :], xt, mask=m)
    tl.atomic_add(counts_ptr + code, tl.full((BLOCK_N,), 1, dtype=tl.int32), mask=valid & (tl.program_id(1) == 0))


@triton.jit
def _ema_stats_kernel(cs_ptr, counts_ptr, total_ptr, K, scs, decay, one_minus_decay, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        m = kk < K
        cs = tl.load(cs_ptr + kk * scs, mask=m, other=0.0)
        count = tl.load(counts_ptr + kk, mask=m, other=0).to(tl.float32)
        cs = cs * decay + count * one_minus_decay
        tl.store(cs_ptr + kk * scs, cs, mask=m)
        acc += cs
    tl.store(total_ptr, tl.sum(acc, axis=0))


@triton.jit
def _ema_finalize_kernel(cb_ptr, cs_ptr, es_ptr, sums_ptr, total_ptr, K, D, scbk, scbd, scs, sek, sed,
                         decay, one_minus_decay, eps, k_eps, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kmask = kk < K
    m = kmask[:, None] & (dd < D)[None, :]
    k64 = kk.to(tl.int64)[:, None]
    es_at = es_ptr + k64 * sek + dd[None, :] * sed
    es = tl.load(es_at, mask=m, other=0.0) * decay + tl.load(sums_ptr + k64 * D + dd[None, :], mask=m,
                                                             other=0.0) * one_minus_decay
    tl.store(es_at, es, mask=m)
    total = tl.load(total_ptr)
    smoothed = (tl.load(cs_ptr + kk * scs, mask=kmask, other=1.0) + eps) / (total + k_eps) * total
    tl.store(cb_ptr + k64 * scbk + dd[None, :] * scbd, es / smoothed[:, None], mask=m)


@triton_op("ema_update_")
def _ema_update_op(codebook: Tensor, cluster_size: Tensor, embed_sum: Tensor, x: Tensor, indices: Tensor,
                   decay: float, eps: float) -> None:
    _checks.check_ema(OP, codebook, cluster_size, embed_sum, x, indices, decay, eps)
    k, d = codebook.shape
    if bool(((indices < -1) | (indices >= k)).any()):
        _checks._fail(OP, f"indices must be in [-1, K={k}), got values outside it")
    n = x.shape[0]
    dev = x.device
    if torch.are_deterministic_algorithms_enabled():
        order, starts = code_segments(indices, k)
        counts = starts[1:] - starts[:-1]
        sums = torch.empty(k, d, dtype=torch.float32, device=dev)
        segment_sum(x, order, starts, sums)
    else:
        counts = torch.zeros(k, dtype=torch.int32, device=dev)
        sums = torch.zeros(k, d, dtype=torch.float32, device=dev)
        if n > 0:
            grid = (triton.cdiv(n, _BLOCK_N), max(triton.cdiv(d, _BLOCK_D), 1))
            with on_device(x):
                _ema_accumulate_kernel[grid](x, indices, counts, sums, n, d, *x.stride(), indices.stride(0),
                                             BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D)
    total = torch.empty(1, dtype=torch.float32, device=dev)
    with on_device(x):
        _ema_stats_kernel[(1,)](cluster_size, counts, total, k, cluster_size.stride(0), decay, 1.0 - decay,
                                BLOCK=_BLOCK_STATS)
        if k * d > 0:
            grid = (triton.cdiv(k, _BLOCK_K), triton.cdiv(d, _BLOCK_D))
            _ema_finalize_kernel[grid](codebook, cluster_size, embed_sum, sums, total, k, d, *codebook.stride(),
                                       cluster_size.stride(0), *embed_sum.stride(), decay, 1.0 - decay, eps, k * eps,
                                       BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)


def ema_update_(codebook: Tensor, cluster_size: Tensor, embed_sum: Tensor, x: Tensor, indices: Tensor,
                decay: float, eps: float) -> None:
    """In-place EMA codebook update: the Triton kernels of :func:`vqkernels.ema_update_`.

    Same arguments, validation and formula as :func:`vqkernels.ema_update_`: ``codebook`` [K, D]
    (any float dtype), ``cluster_size`` [K] and ``embed_sum`` [K, D] (both float32 or both
    float64) are updated in place from the rows of ``x`` [N, D] and their ``indices`` [N]
    (-1: the row counts for no code; outside [-1, K): ValueError, nothing written). Sums use float
    atomics, or a fixed order (bitwise reproducible) when
    ``torch.are_deterministic_algorithms_enabled()``; they agree with the reference within float32
    rounding. float64 statistics: the PyTorch reference. CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    check_device(OP, x)
    _ema_update_op(codebook, cluster_size, embed_sum, x, indices, decay, eps)
