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


# residual quantization (RQ-VAE)


def _level_codebook(codebooks, level):
    """Level `level`'s codebook [K, D]: its slice of [L, K, D], or the shared [K, D] itself."""
    return codebooks[level] if codebooks.dim() == 3 else codebooks


def _residual_path(x, codebooks, indices, dt):
    """Walks the code path `indices` [N, L]: yields (level, r_level, q_level), residuals in dt."""
    r = x.to(dt)
    for level in range(indices.shape[1]):
        q = lookup(_level_codebook(codebooks, level), indices[:, level], dt)
        yield level, r, q
        r = r - q


def residual_quantize(x, codebooks, num_levels=-1, beam_size=1):
    """Residual quantization with optional beam search; see vqkernels.residual_quantize."""
    levels = _checks.check_residual("residual_quantize", x, codebooks, num_levels, beam_size)
    dt = _checks.compute_dtype(x, codebooks)
    n, d = x.shape
    res = x.to(dt).unsqueeze(1)  # [N, beams, D]: the beams' residuals, best first
    paths = torch.empty(n, 1, 0, dtype=torch.int64, device=x.device)  # [N, beams, levels so far]
    for level in range(levels):
        cb = _level_codebook(codebooks, level)
        beams = res.shape[1]
        flat = res.reshape(n * beams, d)
        if beam_size == 1:
            cand = nearest_code(flat, cb)[0].unsqueeze(1)
        else:  # each beam's best beam_size codes, listed by code index (the tie rule's order)
            cand = nearest_code_topk(flat, cb, beam_size)[0].sort(1).values
        width = cand.shape[1]
        cand = cand.view(n, beams * width)  # candidate j of beam b at b * width + j
        parent = res.repeat_interleave(width, 1)
        # The rank key: the new residual's squared norm, exact (float64) then rounded to dt.
        key = (parent.double() - cb.double()[cand.clamp_min(0)]).square().sum(-1).to(dt)
        key = key.masked_fill(cand < 0, float("nan"))  # no usable code: ranked last (sort puts NaN last)
        # Stable: equal keys keep the lower beam, then the lower code index, first.
        order = torch.sort(key, dim=1, stable=True).indices[:, :beam_size]
        new_res = parent - lookup(cb, cand, dt)
        res = torch.gather(new_res, 1, order.unsqueeze(-1).expand(-1, -1, d))
        parent_paths = torch.gather(paths, 1, (order // width).unsqueeze(-1).expand(-1, -1, level))
        paths = torch.cat([parent_paths, torch.gather(cand, 1, order).unsqueeze(-1)], 2)
    indices = paths[:, 0].contiguous()
    quantized = torch.zeros(n, d, dtype=dt, device=x.device)
    losses = []
    for _, r, q in _residual_path(x, codebooks, indices, dt):
        quantized = quantized + q
        losses.append((r.double() - q.double()).square().sum() / max(n * d, 1))
    losses = torch.stack(losses).to(dt)
    return quantized.to(x.dtype), indices, losses, losses.clone()


def residual_quantize_backward(grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices):
    """Gradients of residual_quantize: straight-through for quantized, each level's two loss terms."""
    _checks.check_residual_backward("residual_quantize_backward", grad_quantized, grad_commit_losses,
                                    grad_codebook_losses, x, codebooks, indices)
    dt = _checks.compute_dtype(x, codebooks)
    scale = 2.0 / max(x.numel(), 1)
    grad_x = grad_quantized.to(dt)
    grad_codebooks = torch.zeros(codebooks.shape, dtype=dt, device=codebooks.device)
    for level, r, q in _residual_path(x, codebooks, indices, dt):
        nxt = r - q  # r_{level+1} = x - (q_0 + ... + q_level)
        grad_x = grad_x + grad_commit_losses[level].to(dt) * scale * nxt
        idx = indices[:, level]
        valid = (idx >= 0).unsqueeze(1)
        contrib = torch.where(valid, (-grad_codebook_losses[level].to(dt) * scale) * nxt, torch.zeros_like(nxt))
        _level_codebook(grad_codebooks, level).index_add_(0, idx.clamp_min(0), contrib)
    return grad_x.to(x.dtype).contiguous(), grad_codebooks.to(codebooks.dtype)


# --- scalar quantizers: FSQ and LFQ ---
FSQ_EPS = 1e-3  # vector-quantize-pytorch FSQ.bound's eps: the bound stretches the levels by 1 + eps
LFQ_PROB_EPS = 1e-5  # vector-quantize-pytorch LFQ clamps probabilities at this inside the log


def mixed_radix_basis(levels, device=None):
    """int64 [d]: the weight of each dimension's level in a mixed-radix index, cumprod([1, L_0, ..., L_{d-2}])
    (the first dimension varies fastest)."""
    lv = torch.tensor(list(levels), dtype=torch.int64, device=device)
    return torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0)


def fsq_constants(levels, device=None, hard_clamp=False):
    """Per-dimension constants of the FSQ bound, float32 as vector-quantize-pytorch computes them:
    half_l = (L - 1) * (1 + eps) / 2, offset = 0.5 for even L else 0, shift = atanh(offset / half_l)
    (offset / half_l with ``hard_clamp``); plus half_width = L // 2 and the mixed-radix basis
    cumprod([1, L_0, ..., L_{d-2}]) (int64)."""
    lv = torch.tensor(list(levels), dtype=torch.int64, device=device)
    half_l = (lv.float() - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).float()
    shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
    return half_l, offset, shift, lv // 2, mixed_radix_basis(levels, device)


def _fsq_squash(z, hard_clamp):
    """tanh, or the hard clamp to [-1, 1] (NaN stays NaN)."""
    return z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)


def _fsq_squash_grad(z, hard_clamp):
    """d squash / dz: 1 - tanh^2, or 1 inside the clamp's [-1, 1] (bounds included, as torch.clamp's backward)."""
    if hard_clamp:
        return ((z >= -1) & (z <= 1)).to(z.dtype)
    t = torch.tanh(z)
    return 1 - t * t


def _fsq_symmetric_scale(levels, device):
    """2 / (L - 1) in float32 for every input dtype, as vector-quantize-pytorch's int tensor division gives."""
    return 2.0 / (torch.tensor(list(levels), dtype=torch.int64, device=device) - 1).float()


def _fsq_levels_and_codes(z, levels, symmetric, hard_clamp):
    """(level 0 .. L - 1 of every value, in z's dtype, NaN where z is; the codes), computed in z's dtype with
    vector-quantize-pytorch's expressions and rounding order."""
    lv = torch.tensor(list(levels), dtype=torch.int64, device=z.device)
    if symmetric:  # QL(x) = 2 / (L - 1) * floor((L - 1) * (squash(x) + 1) / 2 + 0.5) - 1
        lm1 = (lv - 1).to(z.dtype)
        level = torch.floor(lm1 * (_fsq_squash(z, hard_clamp) + 1) / 2 + 0.5)
        return level, _fsq_symmetric_scale(levels, z.device).to(z.dtype) * level - 1 + 0.0
    half_l, offset, shift, half_width, _ = fsq_constants(levels, z.device, hard_clamp)
    bounded = _fsq_squash(z + shift.to(z.dtype), hard_clamp) * half_l.to(z.dtype) - offset.to(z.dtype)
    rounded = bounded.round()
    # + 0.0: a zero code is +0.0, as vector-quantize-pytorch's straight-through sum z + (round(z) - z) gives
    return rounded + half_width.to(z.dtype), rounded / half_width.to(z.dtype) + 0.0


def _fsq_indices(level, levels):
    """Each row's mixed-radix index of its levels [N, d] (-1 for a row holding a NaN)."""
    basis = fsq_constants(levels, level.device)[4]
    nan_row = torch.isnan(level).any(1)
    return (level.nan_to_num(0.0).to(torch.int64) * basis).sum(1).masked_fill(nan_row, -1)


def _fsq_grad(g, z, levels, symmetric, hard_clamp):
    """The straight-through gradient of the codes of z for their gradient g (both in the compute dtype)."""
    dt = z.dtype
    if symmetric:
        lm1 = torch.tensor(list(levels), dtype=torch.int64, device=z.device).sub(1).to(dt)
        return g * _fsq_symmetric_scale(levels, z.device).to(dt) / 2 * lm1 * _fsq_squash_grad(z, hard_clamp)
    half_l, _, shift, half_width, _ = fsq_constants(levels, z.device, hard_clamp)
    return g / half_width.to(dt) * half_l.to(dt) * _fsq_squash_grad(z + shift.to(dt), hard_clamp)


def fsq_quantize(z, levels, symmetric=False, hard_clamp=False):
    """Finite scalar quantization: bound, round, scale; see vqkernels.fsq_quantize."""
    _checks.check_fsq("fsq_quantize", z, levels)
    level, codes = _fsq_levels_and_codes(z.to(_checks.compute_dtype(z)), levels, symmetric, hard_clamp)
    return codes.to(z.dtype), _fsq_indices(level, levels)


def fsq_quantize_backward(grad_codes, z, levels, symmetric=False, hard_clamp=False):
    """Straight-through gradient of fsq_quantize, through the bound (the rounding counts as the identity):
    d codes / dz = squash'(z + shift) * half_l / (L // 2), or squash'(z) * (2 / (L - 1)) / 2 * (L - 1) with
    ``symmetric`` (2 / (L - 1) rounded to float32, as there); squash' is 1 - tanh^2, or 1 inside [-1, 1] with ``hard_clamp``."""
    _checks.check_fsq_backward("fsq_quantize_backward", grad_codes, z, levels)
    dt = _checks.compute_dtype(z)
    return _fsq_grad(grad_codes.to(dt), z.to(dt), levels, symmetric, hard_clamp).to(z.dtype).contiguous()


def residual_fsq_quantize(z, scales, levels, symmetric=False, hard_clamp=False):
    """Residual FSQ: level l quantizes residual / scales[l] as fsq_quantize, adds its codes * scales[l] to the
    output and takes them from the residual; see vqkernels.residual_fsq_quantize."""
    _checks.check_residual_fsq("residual_fsq_quantize", z, scales, levels)
    dt = _checks.compute_dtype(z, scales)
    residual, s = z.to(dt), scales.to(dt)
    out, indices = torch.zeros_like(residual), []
    for level in range(s.shape[0]):
        lv, codes = _fsq_levels_and_codes(residual / s[level], levels, symmetric, hard_clamp)
        q = codes * s[level]
        residual = residual - q
        out = out + q
        indices.append(_fsq_indices(lv, levels))
    idx = torch.stack(indices, 1) if indices else z.new_empty(z.shape[0], 0, dtype=torch.int64)
    return out.to(z.dtype).contiguous(), idx


def residual_fsq_quantize_backward(grad_quantized, z, scales, levels, symmetric=False, hard_clamp=False):
    """Straight-through gradient of residual_fsq_quantize: every level's fsq_quantize gradient at its input
    residual / scales[l] (the residual recomputed), times scales[l] on the way in and divided by it on the way
    out, summed from the last level to the first (as autograd sums them through the levels' loop); nothing flows
    through a residual's subtraction (the codes taken away are constants, as vector-quantize-pytorch detaches
    them)."""
    _checks.check_residual_fsq_backward("residual_fsq_quantize_backward", grad_quantized, z, scales, levels)
    dt = _checks.compute_dtype(z, scales, grad_quantized)
    g, residual, s = grad_quantized.to(dt), z.to(dt), scales.to(dt)
    grads = []
    for level in range(s.shape[0]):
        zl = residual / s[level]
        grads.append(_fsq_grad(g * s[level], zl, levels, symmetric, hard_clamp) / s[level])
        residual = residual - _fsq_levels_and_codes(zl, levels, symmetric, hard_clamp)[1] * s[level]
    total = grads.pop() if grads else torch.zeros_like(residual)
    for grad in reversed(grads):
        total = grad + total
    return total.to(z.dtype).contiguous()


def latent_quantize(z, values, levels):
    """Each value of z snapped to the nearest of its dimension's values; see vqkernels.latent_quantize."""
    _checks.check_latent_quantize("latent_quantize", z, values, levels)
    dt = _checks.compute_dtype(z, values)
    zs, v = z.to(dt), values.to(dt)
    nan = torch.isnan(zs)
    positions, codes, start = [], [], 0
    for j, count in enumerate(levels):
        own = v[start:start + count]
        pos = (zs[:, j, None] - own).abs().argmin(1)  # the first minimum; a NaN distance counts as the least
        positions.append(pos.masked_fill(nan[:, j], -1))
        codes.append(torch.where(nan[:, j], zs[:, j], own[pos]))
        start += count
    positions = torch.stack(positions, 1)
    indices = (positions * mixed_radix_basis(levels, z.device)).sum(1).masked_fill(nan.any(1), -1)
    return torch.stack(codes, 1), positions, indices


def lfq_quantize(x, codebook_scale=1.0):
    """Sign quantization with its commitment loss; see vqkernels.lfq_quantize."""
    _checks.check_lfq("lfq_quantize", x, _checks.LFQ_MAX_BITS)
    _checks.check_finite("lfq_quantize", "codebook_scale", codebook_scale)
    dt = _checks.compute_dtype(x)
    xs = x.to(dt)
    positive = xs > 0
    nan = torch.isnan(xs)
    scale = xs.new_full((), codebook_scale)  # half inputs: rounded to float32 first; no host-to-device copy
    codes = torch.where(positive, scale, -scale).to(x.dtype).masked_fill(nan, float("nan"))
    weights = 2 ** torch.arange(x.shape[1] - 1, -1, -1, device=x.device)  # the first column is the top bit
    indices = (positive.long() * weights).sum(1).masked_fill(nan.any(1), -1)
    commit = (xs - codes.to(dt)).square().mean() if x.numel() else torch.zeros((), dtype=dt, device=x.device)
    return codes, indices, commit


def _bit_logits(x, inv_temperature):
    """Logit of bit +1 per element: a code c in {-1, +1}^d has logit 2 * inv_temperature * <x, c>, so each bit
    is independent with log p(+1) - log p(-1) = 4 * inv_temperature * x_j."""
    return x.to(_checks.compute_dtype(x)) * (4.0 * inv_temperature)


def _binary_entropy(logits):
    """Entropy of sigmoid(l) without cancellation: softplus(-|l|) + |l| sigmoid(-|l|) (0 at |l| = inf)."""
    a = logits.abs()
    return F.softplus(-a) + torch.where(torch.isinf(a), 0.0, a * torch.sigmoid(-a))


def _binary_entropy_grad(logits):
    """d entropy(sigmoid(l)) / dl = -l sigmoid(l) sigmoid(-l) (0 at |l| = inf)."""
    return torch.where(torch.isinf(logits), 0.0, -logits * torch.sigmoid(logits) * torch.sigmoid(-logits))


def _code_probs(logits):
    """[N, 2**k]: probability of every sign pattern of the k bits (columns) of logits [N, k], the first
    column the top bit of the pattern's index: products of the per-bit probabilities."""
    p1, p0 = torch.sigmoid(logits), torch.sigmoid(-logits)
    probs = logits.new_ones(logits.shape[0], 1)
    for j in range(logits.shape[1]):
        probs = torch.stack([probs * p0[:, j:j + 1], probs * p1[:, j:j + 1]], 2).reshape(logits.shape[0], -1)
    return probs


def _code_probs_backward(logits, grad_probs):
    """Gradient wrt logits [N, k] of sum(grad_probs * _code_probs(logits)), in the log domain:
    d probs[a] / d l_j = probs[a] * (bit_j(a) - sigmoid(l_j)), so with w = grad_probs * probs it is
    sigmoid(-l_j) * sum_{bit_j(a) = 1} w[a] - sigmoid(l_j) * sum_{bit_j(a) = 0} w[a]: no division by a
    probability, and no cancellation between two nearly equal sums when the bit is nearly certain."""
    k = logits.shape[1]
    w = grad_probs * _code_probs(logits)
    shifts = torch.arange(k - 1, -1, -1, device=logits.device)
    bits = ((torch.arange(2 ** k, device=logits.device).unsqueeze(1) >> shifts) & 1).to(w.dtype)  # [2**k, k]
    return torch.sigmoid(-logits) * (w @ bits) - torch.sigmoid(logits) * (w @ (1 - bits))


def _row_weights(logits, weights):
    """(logits with the rows of weight 0 zeroed, so that a NaN there reaches nothing; the weights w [N] in logits'
    dtype, or None; the divisor: N without weights, else sum(w), or 1 where that is 0)."""
    if weights is None:
        return logits, None, logits.shape[0]
    w = weights.to(logits.dtype)
    total = w.sum()
    return logits.masked_fill((w == 0).unsqueeze(1), 0.0), w, torch.where(total == 0, 1.0, total)


def lfq_entropy(x, inv_temperature, weights=None):
    """LFQ's entropy terms through the two-half factorisation, no N x 2**d matrix; see vqkernels.lfq_entropy."""
    _checks.check_lfq_entropy("lfq_entropy", x, inv_temperature, weights)
    n, d = x.shape
    logits = _bit_logits(x, inv_temperature)
    if n == 0:
        zero = logits.new_zeros(())
        return zero, zero.clone(), logits.new_zeros(2 ** d)
    logits, w, total = _row_weights(logits, weights)
    half = d // 2
    top, rows = _code_probs(logits[:, :half]), _binary_entropy(logits).sum(1)
    if w is not None:
        top, rows = top * w.unsqueeze(1), rows * w
    avg_probs = (top.t() @ _code_probs(logits[:, half:])).reshape(-1) / total
    per_sample = rows.sum() / total
    codebook = -(avg_probs * avg_probs.clamp_min(LFQ_PROB_EPS).log()).sum()
    return per_sample, codebook, avg_probs


def lfq_entropy_backward(grad_per_sample_entropy, grad_codebook_entropy, grad_avg_probs, x, avg_probs,
                         inv_temperature, weights=None):
    """Gradient of lfq_entropy wrt x, through the same factorisation (two GEMMs of N x 2**d work)."""
    _checks.check_lfq_entropy_backward("lfq_entropy_backward", grad_per_sample_entropy, grad_codebook_entropy,
                                       grad_avg_probs, x, avg_probs, inv_temperature, weights)
    n, d = x.shape
    logits = _bit_logits(x, inv_temperature)
    if n == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    logits, w, total = _row_weights(logits, weights)
    dt, half = logits.dtype, d // 2
    avg = avg_probs.to(dt)
    # d codebook_entropy / d avg = -log(max(avg, eps)) - [avg >= eps] (torch's clamp_min passes the gradient at eps)
    g = grad_codebook_entropy.to(dt) * -(avg.clamp_min(LFQ_PROB_EPS).log() + (avg >= LFQ_PROB_EPS).to(dt))
    g = (g + grad_avg_probs.to(dt)).reshape(2 ** half, 2 ** (d - half)) / total
    top, bottom = logits[:, :half], logits[:, half:]
    grad_logits = torch.cat([_code_probs_backward(top, _code_probs(bottom) @ g.t()),
                             _code_probs_backward(bottom, _code_probs(top) @ g)], 1)
    grad_logits = grad_logits + grad_per_sample_entropy.to(dt) / total * _binary_entropy_grad(logits)
    if w is not None:  # row n counts w_n times (0 for the zeroed rows of weight 0, whatever their x)
        grad_logits = grad_logits * w.unsqueeze(1)
    return (grad_logits * (4.0 * inv_temperature)).to(x.dtype)


# Gumbel-softmax quantization and the rotation trick

GUMBEL_KL_EPS = 1e-10  # taming-transformers' GumbelQuantize: sum_k q_k log(q_k K + 1e-10)
ROTATION_EPS = 1e-6  # vector-quantize-pytorch's l2norm and safe_div


def _gumbel_scores(logits, gumbels, dt):
    """logits + gumbels in dt, and the first maximum of each row (-1 for a row holding a NaN)."""
    s = logits.to(dt) + gumbels.to(dt)
    idx = s.argmax(1).masked_fill(torch.isnan(s).any(1), -1)
    return s, idx


def _kl_terms(logits, dt):
    """q = softmax(logits) and the derivative f = d(q log(q K + eps))/dq, both [B, K] in dt."""
    q = torch.softmax(logits.to(dt), 1)
    a = q * logits.shape[1]
    return q, torch.log(a + GUMBEL_KL_EPS) + a / (a + GUMBEL_KL_EPS)


def gumbel_quantize(logits, codebook, gumbels, tau, hard):
    """Gumbel-softmax quantization with the KL-to-uniform term; see vqkernels.gumbel_quantize."""
    _checks.check_gumbel("gumbel_quantize", logits, codebook, gumbels, tau)
    n, k = logits.shape
    dt = _checks.compute_dtype(logits, codebook, gumbels)
    cb = codebook.to(dt)
    quantized = torch.empty(n, cb.shape[1], dtype=torch.promote_types(logits.dtype, codebook.dtype),
                            device=logits.device)
    indices = torch.empty(n, dtype=torch.int64, device=logits.device)
    kl = torch.zeros((), dtype=dt, device=logits.device)
    for s, e in _row_chunks(n, k):
        scores, idx = _gumbel_scores(logits[s:e], gumbels[s:e], dt)
        indices[s:e] = idx
        quantized[s:e] = lookup(cb, idx) if hard else torch.softmax(scores / tau, 1) @ cb
        q = torch.softmax(logits[s:e].to(dt), 1)
        kl = kl + (q * torch.log(q * k + GUMBEL_KL_EPS)).sum()
    return quantized, indices, kl / max(n, 1)


def gumbel_quantize_backward(grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau, hard):
    """Gradients of gumbel_quantize in logits and codebook, the softmaxes recomputed per chunk."""
    op = "gumbel_quantize_backward"
    _checks.check_gumbel_backward(op, grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau)
    n, k = logits.shape
    dt = _checks.compute_dtype(logits, codebook, gumbels)
    cb = codebook.to(dt)
    g = grad_quantized.to(dt)
    c = grad_kl.to(dt).reshape(()) / max(n, 1)
    grad_logits = torch.empty(n, k, dtype=dt, device=logits.device)
    grad_codebook = torch.zeros(cb.shape, dtype=dt, device=logits.device)
    for s, e in _row_chunks(n, k):
        scores, _ = _gumbel_scores(logits[s:e], gumbels[s:e], dt)
        y = torch.softmax(scores / tau, 1)
        dy = g[s:e] @ cb.t()
        grad = y * (dy - (y * dy).sum(1, keepdim=True)) / tau
        q, f = _kl_terms(logits[s:e], dt)
        # A zero grad_kl (kl unused) adds nothing, not even the NaN of a NaN row's KL term.
        kl_grad = torch.where(c != 0, c * q * (f - (q * f).sum(1, keepdim=True)), 0.0)
        grad_logits[s:e] = grad + kl_grad
        if hard:  # the value is the one-hot row: its gradient goes to the chosen code only
            idx = indices[s:e]
            valid = idx >= 0
            grad_codebook.index_add_(0, idx[valid], g[s:e][valid])
        else:
            grad_codebook.addmm_(y.t(), g[s:e])
    return grad_logits.to(logits.dtype), grad_codebook.to(codebook.dtype)


def rotation_trick(src, tgt):
    """The rotation trick's forward value: tgt itself; see vqkernels.rotation_trick."""
    _checks.check_rotation("rotation_trick", src, tgt)
    return tgt.clone(memory_format=torch.contiguous_format)


def _safe_unit(t):
    return t / t.norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)


def rotation_trick_backward(grad, src, tgt):
    """src's gradient through vector-quantize-pytorch's rotate_to: s (g - 2 (g.w) w + 2 (g.q) u)."""
    _checks.check_rotation_backward("rotation_trick_backward", grad, src, tgt)
    dt = _checks.compute_dtype(grad, src, tgt)
    e, t, g = src.to(dt), tgt.to(dt), grad.to(dt)
    u, q = _safe_unit(e), _safe_unit(t)
    w = _safe_unit(u + q)
    scale = t.norm(dim=1, keepdim=True) / e.norm(dim=1, keepdim=True).clamp_min(ROTATION_EPS)
    gw = (g * w).sum(1, keepdim=True)
    gq = (g * q).sum(1, keepdim=True)
    return (scale * (g - 2.0 * gw * w + 2.0 * gq * u)).to(src.dtype).contiguous()


# BinaryMapper's one-hot
def _code_bits(bits, device):
    """[2**bits, bits] 0 / 1 (int64): code c's bit b is (c >> b) & 1."""
    return (torch.arange(1 << bits, device=device).unsqueeze(-1) >> torch.arange(bits, device=device)) & 1


def binary_one_hot(logits, indices):
    """The float32 one-hot [N, 2**bits] of indices; see vqkernels.binary_one_hot."""
    _checks.check_binary_one_hot("binary_one_hot", logits, indices)
    codes = 1 << logits.shape[1]
    valid = (indices >= 0) & (indices < codes)
    if indices.device.type == "cpu":
        bad = (~valid).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise ValueError(f"vqkernels.binary_one_hot: indices must be in [0, 2**bits = {codes}), got "
                             f"{int(indices[row])} at row {row}")
    else:  # checked on the device: reading the indices back would synchronise every call
        torch._assert_async(valid.all(), f"vqkernels.binary_one_hot: indices must be in [0, 2**bits = {codes})")
    out = torch.zeros(logits.shape[0], codes, dtype=torch.float32, device=logits.device)
    return out.scatter_(1, indices.unsqueeze(-1), 1.0)


def binary_one_hot_backward(grad_one_hot, logits):
    """The gradient of sum_c grad_one_hot[n, c] G[n, c] for the joint code probabilities G[n, c] = prod_b p^c_b
    (1 - p)^(1 - c_b), p = sigmoid(logits): sum_c g G (c_b - p_b), G formed in row chunks (float32; float64 for
    float64 inputs)."""
    _checks.check_binary_one_hot_backward("binary_one_hot_backward", grad_one_hot, logits)
    dt = _checks.compute_dtype(grad_one_hot, logits)
    lg, g = logits.to(dt), grad_one_hot.to(dt)
    bits = _code_bits(logits.shape[1], logits.device)  # [2**bits, bits]
    out = []
    for start, stop in _row_chunks(lg.shape[0], bits.numel()):
        p, q = lg[start:stop].sigmoid(), (-lg[start:stop]).sigmoid()  # p and 1 - p, without cancellation
        joint = torch.where(bits.bool(), p.unsqueeze(1), q.unsqueeze(1)).prod(-1)  # G [rows, 2**bits]
        weighted = joint * g[start:stop]
        out.append(weighted @ bits.to(dt) - p * weighted.sum(-1, keepdim=True))
    grad = torch.cat(out) if out else lg.new_zeros(0, logits.shape[1])
    return grad.to(logits.dtype)


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
