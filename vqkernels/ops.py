"""Typed Python entry points for the ``torch.ops.vqkernels`` ops."""

from typing import Tuple

import torch
from torch import Tensor

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
