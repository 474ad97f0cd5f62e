"""LFQ's entropy terms in Triton, through the two-half factorisation of ``vqkernels.reference``.

With logits l = x * (4 inv_temperature) (float32) and the bits split into a top half (the
first d // 2 columns) and a bottom half:

    A [N, 2**(d//2)], B [N, 2**(d - d//2)]: the code probability tables of the halves, each
        entry the product of the per-bit probabilities sigmoid(+-l) taken left to right
        (one Triton kernel, as reference._code_probs);
    avg_probs = (A^T B).reshape(-1) / N: a Triton GEMM, IEEE float32 (never TF32), N reduced in
        a fixed order (split into slices summed in slice order when the output has few tiles);
    per_sample_entropy = mean_n sum_j H(l_nj) with the binary entropy H(l) = softplus(-|l|)
        + |l| sigmoid(-|l|) (a Triton kernel writes the row sums; PyTorch takes their mean);
    codebook_entropy = -sum avg log(max(avg, 1e-5)) (PyTorch, O(2**d)).

Backward: g = d loss / d avg_probs (PyTorch, O(2**d), as the reference), the GEMMs B g^T and
A g (the same Triton GEMM), then one kernel per half turns them into the gradient of the
logits with the reference's cancellation-free form, sigmoid(-l_j) sum_{bit_j = 1} u -
sigmoid(l_j) sum_{bit_j = 0} u (u = G * P), adds the per-sample term and scales by
4 inv_temperature. float64 inputs are served by ``vqkernels.reference``.

Row weights w (optional): the kernels read them (as float32). A's rows are scaled by w_n and the
row entropies too, the N above becomes W = sum_n w_n (PyTorch, on the device; 1 where it is 0), and
the backward's per-sample term carries w_n (the pattern sums carry it through A). A row of weight
0 gives zeros in A, B and its entropy, and gradient 0, whatever x holds there.

The transcendental functions (exp, log, sigmoid) are Triton's, so the results match the
reference within float32 rounding, not bit for bit.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks, reference
from ._common import block, check_device, on_device, triton_op

OP = "triton.lfq_entropy"
OP_BACKWARD = "triton.lfq_entropy_backward"
PROB_EPS = reference.LFQ_PROB_EPS
BLOCK_N = 32
MAX_HALF_BITS = 16  # a half holds at most LFQ_ENTROPY_MAX_BITS - LFQ_ENTROPY_MAX_BITS // 2 = 15 bits
BLOCK_K = 32
# GEMM split-K: slices of at least SPLIT_MIN_K rows, up to SPLIT_TARGET_PROGRAMS programs in all
# (a couple of waves on an H100/H200), the partial results at most SPLIT_MAX_ELEMS floats.
SPLIT_MIN_K = 1024
SPLIT_TARGET_PROGRAMS = 264
SPLIT_MAX_ELEMS = 1 << 24


@triton.jit
def _log1p(z):
    """log(1 + z) without losing a small z (Goldberg's correction)."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


@triton.jit
def _code_probs_kernel(x_ptr, w_ptr, out_ptr, N, col0, k, sxn, sxd, s,
                       BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, HAS_W: tl.constexpr, SCALE: tl.constexpr):
    """out [N, 2**k] float32: probability of every sign pattern a of the bits col0 .. col0 + k - 1
    of row n (the first of them the top bit of a); with HAS_W, 0 for the rows of weight w[n] = 0
    (w float32 [N]) and, with SCALE, times w[n]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    codes = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    rmask = rows < N
    width = 1 << k
    xrow = x_ptr + rows.to(tl.int64) * sxn
    p = tl.full((BLOCK_N, BLOCK_A), 1.0, dtype=tl.float32)
    for j in range(0, k):
        lj = tl.load(xrow + (col0 + j) * sxd, mask=rmask, other=0.0).to(tl.float32) * s
        bit = (codes >> (k - 1 - j)) & 1
        p = p * tl.where(bit[None, :] == 1, tl.sigmoid(lj)[:, None], tl.sigmoid(-lj)[:, None])
    if HAS_W:
        wr = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        if SCALE:
            p = p * wr[:, None]
        p = tl.where((wr != 0.0)[:, None], p, 0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * width + codes[None, :], p,
             mask=rmask[:, None] & (codes < width)[None, :])


@triton.jit
def _entropy_rows_kernel(x_ptr, w_ptr, out_ptr, N, d, sxn, sxd, s, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_W: tl.constexpr):
    """out [N]: sum_j H(l_nj), the binary entropies of row n's bits; with HAS_W, times w[n] (0 where
    w[n] = 0)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    m = rmask[:, None] & (cols < d)[None, :]
    a = tl.abs(tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxn + cols[None, :] * sxd, mask=m,
                       other=0.0).to(tl.float32) * s)
    sig = tl.sigmoid(-a)
    h = _log1p(tl.exp(-a)) + tl.where(a == float("inf"), 0.0, a * sig)
    row = tl.sum(tl.where(m, h, 0.0), axis=1)
    if HAS_W:
        wr = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        row = tl.where(wr != 0.0, row * wr, 0.0)
    tl.store(out_ptr + rows, row, mask=rmask)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, Nc, K, k_split, sam, sak, sbk, sbn, scs, scm, scn,
                   BLOCK_M: tl.constexpr, BLOCK_NC: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[s] [M, Nc] = a[:, ks] @ b[ks, :] over split s's slice ks = [s * k_split, (s + 1) * k_split)
    of K: float32 IEEE products, the slice reduced in order."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_NC + tl.arange(0, BLOCK_NC)
    split = tl.program_id(2)
    k_end = tl.minimum(K, (split + 1) * k_split)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_NC), dtype=tl.float32)
    for k0 in range(split * k_split, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * sam + kk.to(tl.int64)[None, :] * sak,
                    mask=(rm < M)[:, None] & (kk < k_end)[None, :], other=0.0)
        b = tl.load(b_ptr + kk.to(tl.int64)[:, None] * sbk + rn.to(tl.int64)[None, :] * sbn,
                    mask=(kk < k_end)[:, None] & (rn < Nc)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    dst = c_ptr + split.to(tl.int64) * scs + rm.to(tl.int64)[:, None] * scm + rn.to(tl.int64)[None, :] * scn
    tl.store(dst, acc, mask=(rm < M)[:, None] & (rn < Nc)[None, :])


@triton.jit
def _logit_grad_kernel(x_ptr, w_ptr, g_ptr, p_ptr, coef_ptr, out_ptr, N, d, col0, k, sxn, sxd, s,
                       BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, KB: tl.constexpr, HAS_W: tl.constexpr):
    """out[:, col0:col0 + k] = (dE/dl + coef * H'(l)) * s for the k bits of one half, float32:
    dE/dl_j = sigmoid(-l_j) sum_{bit_j(a) = 1} u[a] - sigmoid(l_j) sum_{bit_j(a) = 0} u[a] with
    u = G * P (G, P [N, 2**k] float32 contiguous), H'(l) = -l sigmoid(l) sigmoid(-l). With HAS_W the
    H' term is times w[n] (u carries it already, through P or G) and the rows of weight 0 get 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    width = 1 << k
    jj = tl.arange(0, KB)
    jmask = jj < k
    shift = tl.maximum(k - 1 - jj, 0)
    ones = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    zeros = tl.zeros((BLOCK_N, KB), dtype=tl.float32)
    for a0 in range(0, width, BLOCK_A):
        codes = a0 + tl.arange(0, BLOCK_A)
        m = rmask[:, None] & (codes < width)[None, :]
        off = rows.to(tl.int64)[:, None] * width + codes[None, :]
        u = tl.load(g_ptr + off, mask=m, other=0.0) * tl.load(p_ptr + off, mask=m, other=0.0)
        bit = (codes[:, None] >> shift[None, :]) & 1
        ones = tl.dot(u, tl.where(jmask[None, :], bit, 0).to(tl.float32), ones, input_precision="ieee")
        zeros = tl.dot(u, tl.where(jmask[None, :], 1 - bit, 0).to(tl.float32), zeros, input_precision="ieee")
    m = rmask[:, None] & jmask[None, :]
    xo = rows.to(tl.int64)[:, None] * sxn + (col0 + jj)[None, :] * sxd
    lg = tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32) * s
    sp, sn = tl.sigmoid(lg), tl.sigmoid(-lg)
    grad = sn * ones - sp * zeros
    h_grad = tl.where(tl.abs(lg) == float("inf"), 0.0, -lg * sp * sn)
    if HAS_W:
        wr = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        h_grad = h_grad * wr[:, None]
    grad = (grad + tl.load(coef_ptr) * h_grad) * s
    if HAS_W:
        grad = tl.where((wr != 0.0)[:, None], grad, 0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * d + (col0 + jj)[None, :], grad, mask=m)


def _code_probs(x, col0, k, s, w=None, scale=False):
    """The pattern probabilities of bits col0 .. col0 + k - 1 (rows of weight 0 zero, and times the
    weights with ``scale``; w float32 contiguous or None)."""
    n = x.shape[0]
    out = torch.empty(n, 2 ** k, dtype=torch.float32, device=x.device)
    block_a = block(2 ** k, 16, 64)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(2 ** k, block_a))
    _code_probs_kernel[grid](x, w, out, n, col0, k, *x.stride(), s, BLOCK_N=BLOCK_N, BLOCK_A=block_a,
                             HAS_W=w is not None, SCALE=scale)
    return out


def _row_weights(weights, n):
    """(the weights as float32 contiguous, or None; the divisor of the sums over the rows: n, or the
    weights' sum as a device scalar, 1 where that is 0)."""
    if weights is None:
        return None, n
    w = weights.to(torch.float32).contiguous()
    total = w.sum()
    return w, torch.where(total == 0, 1.0, total)


def _matmul(a, b):
    """a @ b in IEEE float32 by the Triton GEMM; a, b float32 with any strides. A long reduction
    (A^T B over the rows) with few output tiles is split into slices of K summed afterwards in
    slice order: the slicing depends on the shapes only, so the result is deterministic."""
    (m, kk), nc = a.shape, b.shape[1]
    bm, bn = block(m, 16, 64), block(nc, 16, 64)
    tiles = triton.cdiv(m, bm) * triton.cdiv(nc, bn)
    splits = max(1, min(triton.cdiv(kk, SPLIT_MIN_K), triton.cdiv(SPLIT_TARGET_PROGRAMS, tiles),
                        SPLIT_MAX_ELEMS // (m * nc)))
    k_split = triton.cdiv(triton.cdiv(kk, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(kk, k_split)
    c = torch.empty(splits, m, nc, dtype=torch.float32, device=a.device)
    _matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(nc, bn), splits)](
        a, b, c, m, nc, kk, k_split, *a.stride(), *b.stride(), *c.stride(), BLOCK_M=bm, BLOCK_NC=bn, BLOCK_K=BLOCK_K)
    return c[0] if splits == 1 else c.sum(0)


@triton_op("lfq_entropy")
def _lfq_entropy_op(x: Tensor, inv_temperature: float,
                    weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_lfq_entropy(OP, x, inv_temperature, weights)
    n, d = x.shape
    if n == 0:
        return tuple(t.clone() for t in reference.lfq_entropy(x, inv_temperature, weights))
    s, half = 4.0 * inv_temperature, d // 2
    w, total = _row_weights(weights, n)
    with on_device(x):
        top, bottom = _code_probs(x, 0, half, s, w, scale=True), _code_probs(x, half, d - half, s, w)
        avg_probs = _matmul(top.t(), bottom).reshape(-1) / total
        rows = torch.empty(n, dtype=torch.float32, device=x.device)
        _entropy_rows_kernel[(triton.cdiv(n, BLOCK_N),)](x, w, rows, n, d, *x.stride(), s, BLOCK_N=BLOCK_N,
                                                         BLOCK_D=block(d, 16, 32), HAS_W=w is not None)
    per_sample = rows.sum() / total
    codebook = -(avg_probs * avg_probs.clamp_min(PROB_EPS).log()).sum()
    return per_sample, codebook, avg_probs


@triton_op("lfq_entropy_backward")
def _lfq_entropy_backward_op(grad_per_sample_entropy: Tensor, grad_codebook_entropy: Tensor,
                             grad_avg_probs: Tensor, x: Tensor, avg_probs: Tensor, inv_temperature: float,
                             weights: Optional[Tensor] = None) -> Tensor:
    args = (grad_per_sample_entropy, grad_codebook_entropy, grad_avg_probs, x, avg_probs, inv_temperature, weights)
    _checks.check_lfq_entropy_backward(OP_BACKWARD, *args)
    n, d = x.shape
    if n == 0:
        return reference.lfq_entropy_backward(*args).clone()
    dt, s, half = torch.float32, 4.0 * inv_temperature, d // 2
    w, total = _row_weights(weights, n)
    avg = avg_probs.to(dt)
    # d loss / d avg_probs, as the reference (O(2**d) work)
    g = grad_codebook_entropy.to(dt) * -(avg.clamp_min(PROB_EPS).log() + (avg >= PROB_EPS).to(dt))
    g = (g + grad_avg_probs.to(dt)).reshape(2 ** half, 2 ** (d - half)) / total
    coef = (grad_per_sample_entropy.to(dt) / total).reshape(1)
    grad = torch.empty(n, d, dtype=dt, device=x.device)
    with on_device(x):
        top, bottom = _code_probs(x, 0, half, s, w, scale=True), _code_probs(x, half, d - half, s, w)
        halves = ((0, half, top, _matmul(bottom, g.t())), (half, d - half, bottom, _matmul(top, g)))
        for col0, k, probs, g_half in halves:
            if k:
                block_a = block(2 ** k, 16, 64)
                _logit_grad_kernel[(triton.cdiv(n, BLOCK_N),)](x, w, g_half, probs, coef, grad, n, d, col0, k,
                                                                *x.stride(), s, BLOCK_N=BLOCK_N, BLOCK_A=block_a,
                                                                KB=MAX_HALF_BITS, HAS_W=w is not None)
    return grad.to(x.dtype)


def lfq_entropy(x: Tensor, inv_temperature: float = 100.0,
                weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """LFQ's entropy terms: the Triton kernels of :func:`vqkernels.lfq_entropy`.

    Same inputs and outputs: ``(per_sample_entropy, codebook_entropy, avg_probs [2**d])``, float32
    (float64 inputs are served by the PyTorch reference, as N = 0 is), x [N, d] with 1 <= d <= 30,
    optional row ``weights`` [N] (the weighted averages of :func:`vqkernels.lfq_entropy`; a row of
    weight 0 counts nowhere). Matches the reference within float32 rounding (Triton's
    exp/log/sigmoid); a NaN in a row of non-zero weight makes every output NaN. CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``. No autograd: :func:`lfq_entropy_backward` gives the gradient.
    """
    inv_temperature = float(inv_temperature)
    check_device(OP, x)
    return _lfq_entropy_op(x, inv_temperature, weights)


def lfq_entropy_backward(grad_per_sample_entropy: Tensor, grad_codebook_entropy: Tensor, grad_avg_probs: Tensor,
                         x: Tensor, avg_probs: Tensor, inv_temperature: float,
                         weights: Optional[Tensor] = None) -> Tensor:
    """Gradient of :func:`lfq_entropy` wrt ``x`` (as ``vqkernels.reference.lfq_entropy_backward``),
    in ``x``'s dtype, through the same factorisation: two GEMMs of N x 2**d work (0 for the rows of
    weight 0)."""
    inv_temperature = float(inv_temperature)
    args = (grad_per_sample_entropy, grad_codebook_entropy, grad_avg_probs, x, avg_probs, inv_temperature, weights)
    check_device(OP_BACKWARD, x)
    return _lfq_entropy_backward_op(*args)
