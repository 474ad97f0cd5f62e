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
