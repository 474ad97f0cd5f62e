"""Typed Python entry points for the ``torch.ops.vqkernels`` ops."""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks

_ops = torch.ops.vqkernels


def nearest_code(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """Nearest code of every row of ``x``, without an N x K distance matrix.

    Args:
        x: [N, D] float32, float16, bfloat16 or float64 (half types accumulate in float32).
        codebook: [K, D], K >= 1, same device as ``x``; any of the same dtypes.
        metric: ``"l2"`` squared Euclidean distance; ``"cosine"`` 1 - cos(x, c) with both
            sides l2-normalised; ``"ip"`` maximum inner product, distance -<x, c>.

    Returns:
        ``indices`` int64 [N] and ``distances`` [N] (float32, float64 for float64 inputs).
        Ties go to the lowest index. A row of ``x`` holding a NaN gets index -1 and distance
        NaN; a codebook row holding a NaN is never chosen. ``distances`` is differentiable
        with respect to ``x`` and ``codebook``.
    """
    return _ops.nearest_code(x, codebook, metric)


def nearest_code_topk(x: Tensor, codebook: Tensor, k: int, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of every row, sorted by distance (ties: lower index first).

    Same inputs, metrics and NaN rules as :func:`nearest_code`; ``1 <= k <= K``.
    Returns ``indices`` int64 [N, k] and ``distances`` [N, k]. When fewer than ``k`` codes
    are usable (codebook rows with NaNs), the missing slots hold index -1 and distance +inf.
    """
    return _ops.nearest_code_topk(x, codebook, k, metric)


def vq_quantize(x: Tensor, codebook: Tensor, metric: str = "l2") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused vector quantization: search, lookup and both VQ-VAE losses in one pass.

    Returns ``(quantized, indices, commit_loss, codebook_loss)``:
        quantized: [N, D] in ``x``'s dtype, the chosen codebook rows (``codebook[indices]``),
            straight-through: its gradient flows to ``x`` unchanged.
        indices: int64 [N], as :func:`nearest_code` (-1 and a NaN row for a NaN input row).
        commit_loss: mean((x - sg(q))**2), a scalar whose gradient goes to ``x``.
        codebook_loss: mean((sg(x) - q)**2), a scalar whose gradient goes to the chosen
            codebook rows only (a scatter, not a dense one-hot).
    The losses are float32 (float64 for float64 inputs). ``metric`` only changes the search:
    ``quantized`` is always the raw codebook row.
    """
    return _ops.vq_quantize(x, codebook, metric)


def ema_update_(codebook: Tensor, cluster_size: Tensor, embed_sum: Tensor, x: Tensor, indices: Tensor,
                decay: float = 0.99, eps: float = 1e-5) -> None:
    """In-place exponential-moving-average codebook update (VQ-VAE, Sonnet ``VectorQuantizerEMA``).

    With counts ``n_k`` and sums ``s_k`` of the rows of ``x`` assigned to code ``k``::

        cluster_size = decay * cluster_size + (1 - decay) * n
        embed_sum    = decay * embed_sum    + (1 - decay) * s
        smoothed     = (cluster_size + eps) / (sum(cluster_size) + K * eps) * sum(cluster_size)
        codebook     = embed_sum / smoothed[:, None]

    ``codebook`` [K, D] (any float dtype), ``cluster_size`` [K] and ``embed_sum`` [K, D]
    (both float32 or both float64) are updated in place; ``x`` [N, D]; ``indices`` int64 [N]
    in [-1, K), where -1 rows are ignored. One pass over ``x``; deterministic on the CPU.
    """
    _ops.ema_update_(codebook, cluster_size, embed_sum, x, indices, float(decay), float(eps))


# residual quantization (RQ-VAE)


def residual_quantize(x: Tensor, codebooks: Tensor, num_levels: int = -1,
                      beam_size: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused residual quantization (RQ-VAE): L levels of nearest-code search on the residual.

    With ``r_0 = x``, level ``l`` picks ``i_l``, the nearest code (squared L2, ties to the
    lowest index) of ``r_l`` in its codebook, ``q_l = codebook_l[i_l]`` and
    ``r_{l+1} = r_l - q_l`` (residuals in float32, float64 for float64 inputs).

    Args:
        x: [N, D] float32, float16, bfloat16 or float64.
        codebooks: [L, K, D], one codebook per level (``num_levels`` -1 or L), or [K, D]
            shared by every level (``num_levels`` >= 1 gives L). Same device as ``x``.
        num_levels: the number of levels L; -1 takes it from ``codebooks``' first dimension.
        beam_size: B in [1, K]. 1 is the greedy search above. B > 1 keeps the B code paths
            with the smallest residual squared norm: at every level each kept path is extended
            by its B nearest codes, the candidates are ranked by their new residual's squared
            norm ||r_{l+1}||^2 (exact, rounded to the residual dtype; equal values go to the
            lower-ranked path, then to the lower code index) and the best B are kept; the
            result is the best path after the last level. Beam search usually, but not always
            (a path it drops early may have ended better), ends with a smaller final error.

    Returns ``(quantized, indices, commit_losses, codebook_losses)``:
        quantized: [N, D] in ``x``'s dtype, ``q_0 + ... + q_{L-1}``, straight-through: its
            gradient flows to ``x`` unchanged.
        indices: int64 [N, L], the chosen code of every level.
        commit_losses: [L], ``mean((x - sg(q_0 + ... + q_l))**2) = mean(r_{l+1}**2)``, whose
            gradient goes to ``x`` only.
        codebook_losses: [L], the same values, ``mean((sg(r_l) - q_l)**2)``, whose gradient
            goes to the chosen rows of codebook l only (a shared codebook sums the levels).
    The losses are float32 (float64 for float64 inputs); for N = 0 they are zeros.
    A row of ``x`` holding a NaN, or a level whose codebook has no usable code, gets index -1
    from that level on, a NaN ``quantized`` row and NaN losses from that level on; codebook
    rows holding a NaN are never chosen.
    """
    return _ops.residual_quantize(x, codebooks, num_levels, beam_size)


# --- scalar quantizers: FSQ and LFQ ---
def fsq_quantize(z: Tensor, levels: Sequence[int], symmetric: bool = False,
                 hard_clamp: bool = False) -> Tuple[Tensor, Tensor]:
    """Finite scalar quantization (Mentzer et al. 2023), as vector-quantize-pytorch's ``FSQ``.

    Every column j of ``z`` [N, d] (d = len(levels)) is bounded, rounded and scaled to [-1, 1]::

        bounded = tanh(z + shift) * half_l - offset        half_l = (L - 1) * (1 + 1e-3) / 2
        codes   = round(bounded) / (L // 2)                offset = 0.5 (even L) or 0, shift = atanh(offset / half_l)

    with the constants in float32 exactly as vector-quantize-pytorch computes them, the arithmetic
    in float32 (float64 for float64 inputs; half inputs are converted to float32 first), ``round``
    half-to-even, and a zero code +0.0. With ``symmetric`` (its ``preserve_symmetry``, the
    symmetry-preserving quantizer of arXiv:2411.19842, section 3.2; levels of 2 allowed)::

        level = floor((L - 1) * (tanh(z) + 1) / 2 + 0.5)   codes = (2 / (L - 1)) * level - 1

    With ``hard_clamp`` (its ``bound_hard_clamp``, for inputs already in range) ``tanh`` is a clamp
    to [-1, 1] and ``shift = offset / half_l``; the gradient is then 1 inside [-1, 1] and 0 outside.

    Args:
        z: [N, d] float32, float16, bfloat16 or float64.
        levels: d integers in [2, 1000] whose product is below 2**63.

    Returns:
        ``codes`` [N, d] in ``z``'s dtype, straight-through: its gradient reaches ``z`` through the
        bound (the rounding counts as the identity), and ``indices`` int64 [N], the mixed-radix index
        sum_j (round(bounded_j) + L_j // 2) * prod_{i<j} L_i (``level_j`` with ``symmetric``; the
        first column varies fastest). A NaN in a row gives that row index -1 (and NaN codes where
        ``z`` is NaN).
    """
    return _ops.fsq_quantize(z, list(levels), symmetric, hard_clamp)


def residual_fsq_quantize(z: Tensor, scales: Tensor, levels: Sequence[int], symmetric: bool = False,
                          hard_clamp: bool = False) -> Tuple[Tensor, Tensor]:
    """Residual FSQ (vector-quantize-pytorch's ``ResidualFSQ`` levels) in one pass over ``z``.

    Level l = 0 .. Q - 1 (Q = ``scales.shape[0]``) quantizes what the previous levels left, at its
    own scale, with :func:`fsq_quantize`'s bound and rounding (same ``levels``, ``symmetric``,
    ``hard_clamp``)::

        r_0 = z
        c_l, i_l = fsq_quantize(r_l / scales[l])      q_l = c_l * scales[l]
        r_{l+1} = r_l - q_l                           quantized = 0 + q_0 + q_1 + ... + q_{Q-1}

    each step rounded as these tensor expressions round, in float32 (float64 when ``z`` or
    ``scales`` is float64; half inputs are converted to float32 first), so the results are those of
    the same loop over :func:`fsq_quantize` bit for bit. Every row's residual stays in registers
    across the levels: one read of ``z`` and one write of the output, where the loop makes about a
    dozen passes and autograd nodes per level.

    Args:
        z: [N, d] float32, float16, bfloat16 or float64.
        scales: [Q, d] floating, the levels' scales (``ResidualFSQ``'s ``L ** -l``); constants: no
            gradient flows to them, and one that requires a gradient is refused.
        levels, symmetric, hard_clamp: as :func:`fsq_quantize`.

    Returns:
        ``quantized`` [N, d] in ``z``'s dtype, straight-through: its gradient reaches ``z`` as the
        sum over levels of each level's :func:`fsq_quantize` gradient (taken at ``r_l / scales[l]``,
        for ``scales[l]`` times the output's gradient, divided by ``scales[l]``), summed from the last
        level to the first as autograd sums them through the loop (so the same bits as that loop's); the
        codes taken from the residual are constants (vector-quantize-pytorch detaches them).
        ``indices`` int64 [N, Q], every level's mixed-radix index as :func:`fsq_quantize`'s; a row
        holding a NaN gets -1 at every level.
    """
    if scales.requires_grad and torch.is_grad_enabled():
        raise ValueError("vqkernels.residual_fsq_quantize: scales get no gradient; pass a tensor that does not "
                         "require one (scales.detach())")
    return _ops.residual_fsq_quantize(z, scales, list(levels), symmetric, hard_clamp)


def fsq_indices_to_codes(indices: Tensor, levels: Sequence[int], symmetric: bool = False) -> Tensor:
    """The codes [..., d] (float32) of FSQ ``indices`` [...] (any integer dtype): the inverse of
    :func:`fsq_quantize`'s indices (with the same ``symmetric``). Indices outside [0, prod(levels))
    give NaN codes.

    A plain PyTorch function rather than an op: it is an elementwise integer decode with no
    gradient, which torch (and torch.compile) already runs at memory speed on every device.
    """
    _checks.check_levels("fsq_indices_to_codes", levels)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"vqkernels.fsq_indices_to_codes: indices must be an integer tensor, got {indices.dtype}")
    lv = torch.tensor(list(levels), dtype=torch.int64, device=indices.device)
    basis = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0)
    idx = indices.long().unsqueeze(-1)
    level = (idx // basis) % lv
    if symmetric:
        codes = level.float() * (2.0 / (lv - 1).float()) - 1.0
    else:
        half_width = lv // 2
        codes = (level - half_width).float() / half_width.float()
    valid = (idx >= 0) & (idx < math.prod(levels))
    return codes.masked_fill(~valid, float("nan"))


def latent_quantize(z: Tensor, values: Tensor, levels: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Latent quantization (Hsu et al. 2023), as vector-quantize-pytorch's ``LatentQuantize``: every value
    ``z[r, j]`` snaps to the nearest of dimension j's own values.

    Dimension j's values are ``values[s_j : s_j + levels[j]]`` (``s_j`` the sum of the levels before j), in any
    order. The nearest is the first minimum of ``|z - value|`` in float32 (float64 when ``z`` or ``values`` is;
    half inputs are converted first), as ``torch.argmin`` chooses: ties go to the earlier value, and a value
    whose distance is NaN counts as the nearest. No N x levels distance matrix is formed.

    Args:
        z: [N, d] float32, float16, bfloat16 or float64, d = len(levels).
        values: 1-D floating, sum(levels) values on z's device.
        levels: d counts, each at least 1, whose product is below 2**63 and whose sum is below 2**31.

    Returns:
        ``codes`` [N, d] in the compute dtype, the chosen values (NaN where z is NaN); ``positions`` int64 [N, d],
        the chosen value's position within its dimension (-1 where z is NaN); ``indices`` int64 [N], the
        mixed-radix index sum_j positions_j * prod_{i<j} levels_i (the first dimension fastest; -1 for a row
        holding a NaN). Gradients: z gets none (the codes are piecewise constant in z; ``LatentQuantize`` adds
        its straight-through estimator around the op), each value the sum of the codes' gradient where it
        was chosen.
    """
    return _ops.latent_quantize(z, values, list(levels))


def lfq_quantize(x: Tensor, codebook_scale: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Lookup-free (sign) quantization, as vector-quantize-pytorch's ``LFQ``, with its commitment loss.

    Args:
        x: [N, d] float32, float16, bfloat16 or float64, 1 <= d <= 63.
        codebook_scale: finite; the codes are +-codebook_scale.

    Returns ``(codes, indices, commit_loss)``:
        codes: [N, d] in ``x``'s dtype, +codebook_scale where x > 0 and -codebook_scale elsewhere
            (0 included), rounded to float32 and then to ``x``'s dtype; straight-through: its
            gradient reaches ``x`` unchanged. NaN where ``x`` is NaN.
        indices: int64 [N], sum over the positive columns j of 2**(d - 1 - j) (the first column is
            the top bit, as vector-quantize-pytorch); -1 for a row holding a NaN.
        commit_loss: mean((x - sg(codes))**2) over all N*d elements (0 for N = 0), float32
            (float64 for float64 inputs); its gradient goes to ``x``.
    """
    return _ops.lfq_quantize(x, float(codebook_scale))


def lfq_entropy(x: Tensor, inv_temperature: float = 100.0,
                weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """LFQ's entropy terms without an N x 2**d probability matrix.

    Each row x_n [d] gives a distribution over the 2**d codes c in {-1, +1}**d with logits
    2 * inv_temperature * <x_n, c> (vector-quantize-pytorch's softmax of -distance * inv_temperature
    for codebook_scale 1; fold a codebook scale s into ``inv_temperature * s``). It factorises over
    the bits: p_n(c_j = +1) = sigmoid(4 * inv_temperature * x_nj).

    ``weights`` (optional, [N], floating, on x's device) weights the rows: both averages below become
    sum_n w_n (.) / W with W = sum_n w_n (W = 0 counts as 1, so all-zero weights give zeros). A 0/1
    mask thus keeps exactly its rows: a row of weight 0 counts nowhere, whatever x holds there (NaN
    included), and its gradient is 0. The weights are meant to be >= 0 (not checked: that would read
    them back to the host); they get no gradient. Without weights every row has weight 1 (W = N).

    Returns ``(per_sample_entropy, codebook_entropy, avg_probs)`` (float32, float64 for float64 inputs):
        per_sample_entropy: mean_n of the exact entropy of p_n, the sum of its d binary entropies.
            vector-quantize-pytorch clamps every code probability at 1e-5 inside the log, which
            lowers this term by sum_{c: p(c) < 1e-5} p(c) log(1e-5 / p(c)) <= 2**d * 1e-5 / e per
            row (for 2**d * 1e-5 <= e); here it is exact.
        codebook_entropy: -sum_c avg(c) log(max(avg(c), 1e-5)) with avg = mean_n p_n, clamp
            included, as vector-quantize-pytorch.
        avg_probs: avg [2**d], the batch-average code distribution (index order as
            :func:`lfq_quantize`'s indices).

    avg comes from one GEMM A^T B / N of the per-row probabilities of the top and bottom halves
    of the bits (A [N, 2**(d//2)], B [N, 2**(d - d//2)]; with weights, A's rows scaled by w_n):
    memory O(N 2**(d/2) + 2**d). All three outputs are differentiable wrt ``x`` (the backward uses
    the same factorisation). N = 0 gives zeros; a NaN in a row of non-zero weight makes every
    output NaN. 1 <= d <= 30.
    """
    return _ops.lfq_entropy(x, float(inv_temperature), weights)


# Gumbel-softmax quantization and the rotation trick


def gumbel_quantize(logits: Tensor, codebook: Tensor, gumbels: Tensor, tau: float = 1.0,
                    hard: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused Gumbel-softmax quantization (DALL-E dVAE, taming-transformers ``GumbelQuantize``).

    With ``y = softmax((logits + gumbels) / tau)`` per row::

        quantized = y @ codebook                       (hard=False)
        quantized = codebook[indices]                  (hard=True, straight-through)
        indices   = argmax(logits + gumbels)           (the first maximum)
        kl        = mean_n sum_k q_k log(q_k K + 1e-10),   q = softmax(logits)

    ``kl`` is taming's KL divergence to the uniform prior (before the noise and the
    temperature). ``hard`` is ``F.gumbel_softmax``'s: the value is the one-hot row of
    ``indices``, the gradient that of ``y`` (straight-through), so the codebook's gradient
    goes to the chosen rows only and the logits' through the softmax's Jacobian. The
    backward recomputes the softmaxes; nothing N x K is saved beyond the inputs.

    Args:
        logits: [N, K] rows of scores (channels last), any float dtype.
        codebook: [K, D], K >= 1, same device.
        gumbels: [N, K] Gumbel(0, 1) noise supplied by the caller, e.g.
            ``-torch.empty_like(logits).exponential_().log()`` (zeros: plain softmax); it gets
            no gradient.
        tau: the temperature, positive and finite.
        hard: straight-through one-hot values; ``tau`` and ``hard`` default as in
            ``F.gumbel_softmax``.

    Returns:
        ``quantized`` [N, D] (dtype ``torch.promote_types(logits.dtype, codebook.dtype)``),
        ``indices`` int64 [N] and ``kl``, a scalar in float32 (float64 when any input is
        float64, 0 for N = 0); half inputs are computed in float32. A row whose
        ``logits + gumbels`` holds a NaN gets index -1 and a NaN ``quantized`` row; ``kl`` is
        NaN where torch's softmax of a logits row is (a NaN or +inf in it, or every entry
        -inf); -inf logits mask codes out. Plain PyTorch (``F.gumbel_softmax``, its argmax, the
        product with the codebook) gives the same up to rounding: its hard value is
        ``1 - y + y``, not always exactly 1, and its argmax of ``y`` can differ on near-ties.
    """
    return _ops.gumbel_quantize(logits, codebook, gumbels, float(tau), bool(hard))


def rotation_trick(src: Tensor, tgt: Tensor) -> Tensor:
    """The rotation trick gradient estimator (Fifty et al. 2024, arXiv:2410.06424).

    Returns ``tgt``'s values (a contiguous copy, in ``tgt``'s dtype) for rows ``src`` and
    ``tgt`` [N, D]; the gradient ``g`` of the result reaches ``src`` as through
    vector-quantize-pytorch's ``rotate_to(src, tgt)``::

        grad_src = s (g - 2 (g.w) w + 2 (g.q) u),   u = src / max(|src|, 1e-6),
        q = tgt / max(|tgt|, 1e-6),  w = (u + q) / max(|u + q|, 1e-6),  s = |tgt| / max(|src|, 1e-6)

    and ``tgt`` gets none (every term of ``rotate_to`` that holds it is detached). The
    gradient is computed in double per row and rounded to ``src``'s dtype.

    vector-quantize-pytorch recomputes the forward value as the rotation and rescaling of
    ``src``; that equals ``tgt`` up to rounding, about ``2 u |tgt|`` per element and at most
    ``13 u |tgt|`` on random rows (``u`` the unit roundoff of the dtype; more where ``src``
    points nearly opposite ``tgt``, where ``w`` is ill-conditioned). Where its clamps act
    (``|src| < 1e-6``) its value is not ``tgt`` at all (``src = 0`` gives 0); this op always
    returns ``tgt``. Rows are ``[N, D]`` (flatten leading dimensions first).
    """
    return _ops.rotation_trick(src, tgt)


# BinaryMapper's one-hot
def binary_one_hot(logits: Tensor, indices: Tensor) -> Tensor:
    """The one-hot of sampled bit codes whose gradient is that of their joint probabilities: the straight-through
    of ``BinaryMapper`` (Fleuret 2025, arXiv:2510.17558).

    Args:
        logits: [N, bits], 1 <= bits <= 30, float32, float16, bfloat16 or float64: each bit b of a token is on
            with probability ``p_b = sigmoid(logits_b)``.
        indices: int64 [N] on the same device, each in [0, 2**bits): the sampled code of each token (code c has
            bit b on where ``(c >> b) & 1``).

    Returns:
        ``one_hot`` float32 [N, 2**bits], exactly 0 and 1. Its gradient reaches ``logits`` as that of the joint
        code probabilities ``G[n, c] = prod_b p_b^c_b (1 - p_b)^(1 - c_b)`` (what ``one_hot + G - G.detach()``
        gives): ``grad_logits[n, b] = sum_c g[n, c] G[n, c] (c_b - p_b)``, computed in float32 (float64 for
        float64 inputs) and returned in ``logits``' dtype. G is never formed: the CPU kernel contracts each row
        of the gradient with the tables of the low and the high half of the bits. Indices outside the range raise
        ValueError on the CPU; on other devices (the reference serves them) they fail an assertion on the device,
        which does not synchronise.
    """
    return _ops.binary_one_hot(logits, indices)


# multiscale (VAR's multi-scale residual quantizer)
def multiscale_quantize_step(f_rest: Tensor, codebook: Tensor, pn: int | Tuple[int, int],
                             metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """One scale of VAR's multi-scale residual quantizer, fused: area-downsample ``f_rest`` to
    ``pn``, find each cell's nearest code, look it up.

    Args:
        f_rest: [B, C, H, W] (any strides), H, W >= 1; float32, float16, bfloat16 or float64.
        codebook: [K, C], K >= 1, same device; any of the same dtypes.
        pn: the output side ``pn`` (``pn`` x ``pn`` cells) or a pair ``(ph, pw)``.
        metric: ``"l2"`` (VAR's default), ``"cosine"`` (VAR's ``using_znorm``) or ``"ip"``.

    The downsampling is ``F.interpolate(f_rest, (ph, pw), mode='area')`` (adaptive average
    pooling, non-divisible sizes included) with the same arithmetic, bit for bit the result
    F.interpolate gives for ``f_rest.contiguous()`` (whatever ``f_rest``'s layout): sums in
    float32 (float64 for float64) rounded to ``f_rest``'s dtype, the mean over (H, W) for a 1 x 1
    output; ``pn == (H, W)`` is the identity (VAR's last scale). The search follows
    :func:`nearest_code` (ties to the lowest index; a cell holding a NaN gets index -1 and a NaN
    code; a codebook row with a NaN is never chosen).

    Returns:
        ``indices`` int64 [B, ph, pw] and ``h`` [B, C, ph, pw] (contiguous NCHW, the codebook's
        dtype): ``h[b, :, y, x] = codebook[indices[b, y, x]]``. ``h`` is differentiable with
        respect to ``codebook`` (the gradient of each cell lands on its code, summed in a fixed
        order: deterministic). ``f_rest`` gets no gradient: h depends on it only through the
        piecewise-constant indices (VAR detaches it as well).
    """
    pn = (pn, pn) if isinstance(pn, int) else tuple(pn)
    return _ops.multiscale_quantize_step(f_rest, codebook, pn, metric)
