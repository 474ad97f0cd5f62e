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
