"""Pure-PyTorch reference implementations of every vqkernels op.

They define the semantics the compiled kernels must match, run in float64 when
given float64 inputs (the tests' ground truth), serve as the naive baseline in
the benchmarks, and are the fallback kernels wherever no compiled kernel is
registered (no extension built, or a device without kernels yet).

They work on row chunks so that even the fallback never holds an N x K distance
matrix: the extra memory is O(chunk * K).
"""

import torch
import torch.nn.functional as F

from . import _checks

_CHUNK_ELEMS = 1 << 22  # rows per chunk * K stays below this
NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _row_chunks(n, k):
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _scores(xc, cb, metric, cnorm):
    """Distances of rows xc [B, D] to every code [K, D], in xc's dtype."""
    if metric == "l2":
        xn = (xc * xc).sum(1, keepdim=True)
        return torch.addmm(cnorm.unsqueeze(0) + xn, xc, cb.t(), alpha=-2.0).clamp_min_(0.0)
    if metric == "cosine":
        return 1.0 - F.normalize(xc, dim=1, eps=NORM_EPS) @ cb.t()
    return -(xc @ cb.t())


def _prepare(x, codebook, metric):
    dt = _checks.compute_dtype(x, codebook)
    x = x.to(dt)
    cb = codebook.to(dt)
    if metric == "cosine":
        cb = F.normalize(cb, dim=1, eps=NORM_EPS)
    cnorm = (cb * cb).sum(1)
    # A codebook row holding a NaN is never chosen.
    bad_code = torch.isnan(cb).any(1)
    return x, cb, cnorm, bad_code


def nearest_code(x, codebook, metric="l2"):
    """Index and distance of the nearest code for each row; see vqkernels.nearest_code."""
    _checks.check_search("nearest_code", x, codebook, metric)
    xs, cb, cnorm, bad_code = _prepare(x, codebook, metric)
    n = xs.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    distances = torch.empty(n, dtype=xs.dtype, device=x.device)
    for s, e in _row_chunks(n, cb.shape[0]):
        d = _scores(xs[s:e], cb, metric, cnorm)
        d = d.masked_fill(torch.isnan(d) | bad_code.unsqueeze(0), float("inf"))
        dist, idx = d.min(1)  # first minimum: ties go to the lowest index
        # No usable code (NaN row, or every code NaN): index -1, distance NaN.
        invalid = torch.isnan(xs[s:e]).any(1) | bad_code[idx]
        indices[s:e] = idx.masked_fill(invalid, -1)
        distances[s:e] = dist.masked_fill(invalid, float("nan"))
    return indices, distances


def nearest_code_topk(x, codebook, k, metric="l2"):
    """The k nearest codes per row, sorted by distance; see vqkernels.nearest_code_topk."""
    _checks.check_topk("nearest_code_topk", x, codebook, k, metric)
    xs, cb, cnorm, bad_code = _prepare(x, codebook, metric)
    n = xs.shape[0]
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    distances = torch.empty(n, k, dtype=xs.dtype, device=x.device)
    for s, e in _row_chunks(n, cb.shape[0]):
        d = _scores(xs[s:e], cb, metric, cnorm)
        unusable = bad_code.unsqueeze(0).expand_as(d)
        d = d.masked_fill(torch.isnan(d) | unusable, float("inf"))
        dist, idx = torch.sort(d, dim=1, stable=True)  # stable: ties keep the lower index first
        dist, idx = dist[:, :k], idx[:, :k]
        # Fewer than k usable codes: the missing slots are index -1, distance +inf.
        missing = torch.gather(unusable, 1, idx)
        idx = idx.masked_fill(missing, -1)
        dist = dist.masked_fill(missing, float("inf"))
        nan_row = torch.isnan(xs[s:e]).any(1, keepdim=True)
        indices[s:e] = idx.masked_fill(nan_row, -1)
        distances[s:e] = dist.masked_fill(nan_row, float("nan"))
    return indices, distances


def lookup(codebook, indices, dtype=None):
    """codebook[indices] with NaN rows where the index is -1."""
    dtype = codebook.dtype if dtype is None else dtype
    q = codebook.to(dtype)[indices.clamp_min(0)]
    return q.masked_fill((indices < 0).unsqueeze(-1), float("nan"))


def vq_quantize(x, codebook, metric="l2"):
    """Nearest-code quantization with its two losses; see vqkernels.vq_quantize."""
    _checks.check_search("vq_quantize", x, codebook, metric)
    indices, _ = nearest_code(x, codebook, metric)
    dt = _checks.compute_dtype(x, codebook)
    q = lookup(codebook, indices, dt)
    loss = (x.to(dt) - q).pow(2).mean() if x.numel() else torch.zeros((), dtype=dt, device=x.device)
    return q.to(x.dtype), indices, loss, loss.clone()


def vq_quantize_backward(grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices):
    """Gradients of vq_quantize: straight-through for quantized, the two losses' own terms."""
    dt = _checks.compute_dtype(x, codebook)
    q = lookup(codebook, indices, dt)
    diff = x.to(dt) - q
    scale = 2.0 / max(x.numel(), 1)
    grad_x = grad_quantized.to(dt) + grad_commit_loss.to(dt) * scale * diff
    grad_codebook = torch.zeros(codebook.shape, dtype=dt, device=codebook.device)
    valid = indices >= 0
    grad_codebook.index_add_(0, indices[valid], (-grad_codebook_loss.to(dt) * scale) * diff[valid])
    return grad_x.to(x.dtype).contiguous(), grad_codebook.to(codebook.dtype)


def ema_update_(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    """In-place EMA codebook update (VQ-VAE / Sonnet); see vqkernels.ema_update_."""
    _checks.check_ema("ema_update_", codebook, cluster_size, embed_sum, x, indices, decay, eps)
    k = codebook.shape[0]
    if bool(((indices < -1) | (indices >= k)).any()):
        raise ValueError(f"vqkernels.ema_update_: indices must be in [-1, K={k}), got values outside it")
    dt = cluster_size.dtype
    valid = indices >= 0
    idx = indices[valid]
    counts = torch.bincount(idx, minlength=k).to(dt)
    sums = torch.zeros(embed_sum.shape, dtype=dt, device=x.device).index_add_(0, idx, x[valid].to(dt))
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    codebook.copy_(embed_sum / smoothed.unsqueeze(1))


# multiscale (VAR's multi-scale residual quantizer)

def multiscale_quantize_step(f_rest, codebook, pn, metric="l2"):
    """Area downsampling to pn, nearest code per cell, lookup; see vqkernels.multiscale_quantize_step."""
    _checks.check_multiscale("multiscale_quantize_step", f_rest, codebook, pn, metric)
    b, c = f_rest.shape[0], f_rest.shape[1]
    ph, pw = pn
    if b and c:
        rest = F.interpolate(f_rest.contiguous(), size=(ph, pw), mode="area")  # NCHW: the kernel's arithmetic
    else:  # adaptive pooling rejects C = 0; nothing to average anyway
        rest = f_rest.new_zeros(b, c, ph, pw)
    indices, _ = nearest_code(rest.permute(0, 2, 3, 1).reshape(-1, c), codebook, metric)
    h = lookup(codebook, indices).view(b, ph, pw, c).permute(0, 3, 1, 2).contiguous()
    return indices.view(b, ph, pw), h


def multiscale_quantize_step_backward(grad_h, codebook, indices):
    """Codebook gradient of multiscale_quantize_step's h: grad_h's cells summed onto their codes."""
    _checks.check_multiscale_backward("multiscale_quantize_step_backward", grad_h, codebook, indices)
    dt = _checks.compute_dtype(grad_h, codebook)
    c = codebook.shape[1]
    idx = indices.reshape(-1)
    valid = (idx >= 0).unsqueeze(1)
    g = torch.where(valid, grad_h.to(dt).permute(0, 2, 3, 1).reshape(-1, c), torch.zeros((), dtype=dt))
    grad = torch.zeros(codebook.shape, dtype=dt, device=codebook.device).index_add_(0, idx.clamp_min(0), g)
    return grad.to(codebook.dtype)
