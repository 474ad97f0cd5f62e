"""What vector-quantize-pytorch computes from the full [N, K] score matrix (minus the Euclidean distance, or
the cosine similarity): code sampling, the cross-entropy to codes, the codebook-diversity entropy and the
Gumbel straight-through gradient. Here each runs over chunks of rows, and a chunk's [rows, K] intermediates
are recomputed in the backward instead of kept (activation checkpointing), so no [N, K] tensor is ever
whole; nothing is read back to the host."""

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 22  # scores per chunk (16 MiB of float32)
# scores per chunk of the sampler, whose dozen elementwise passes then stay in a core's L2 (1 MiB of float32):
# twice as fast as 16 MiB chunks at 1024 tokens x 1024 codes, 10% at 16 x 1024 tokens (2 threads, Zen 5)
SAMPLE_CHUNK_ELEMENTS = 1 << 18


def scores(rows, codes, metric, codes_sq=None):
    """vector-quantize-pytorch's logits for rows [M, d] and codes [K, d]: l2, minus its cdist (the square root
    of the expanded squared distance clamped at 1e-8); cosine, the dot product of the (normalised) inputs.
    ``codes_sq``: the codes' squared norms when the caller has them. Without a gradient to record, the same
    operations run in place on one buffer (the same bits)."""
    rows, codes = rows.float(), codes.float()
    dots = rows @ codes.T
    if metric == "cosine":
        return dots
    s = rows.square().sum(-1, keepdim=True) + (codes.square().sum(-1) if codes_sq is None else codes_sq)
    if dots.requires_grad:  # autograd keeps sqrt's result: out of place
        return -(s + dots * -2).clamp(min=1e-8).sqrt()
    return s.add_(dots.mul_(-2)).clamp_(min=1e-8).sqrt_().neg_()


def _chunks(num_rows, num_codes, elements=None):
    step = max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(num_codes, 1))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _checkpointed(fn, *args):
    """fn(*args), its intermediates recomputed in the backward when anything needs a gradient."""
    if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sample_codes(rows, codes, metric, temperature):
    """One code per row drawn from softmax(scores / temperature) by the Gumbel-max trick with theirs' noise
    (-log(-log(u)), logs clamped at 1e-20), drawn in row order as theirs' [N, K] draw. Returns [M] indices.
    Theirs' operations, each in place on two buffers a chunk: the draws are theirs, bit for bit."""
    codes = codes.float()
    codes_sq = codes.square().sum(-1)
    chosen = []
    for start, stop in _chunks(rows.shape[0], codes.shape[0], SAMPLE_CHUNK_ELEMENTS):
        s = scores(rows[start:stop], codes, metric, codes_sq)
        noise = torch.rand_like(s).clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
        chosen.append(s.div_(temperature).add_(noise).argmax(-1))
    if not chosen:
        return torch.empty(0, dtype=torch.int64, device=rows.device)
    return torch.cat(chosen)


def _row_cross_entropy(rows, codes, targets, metric):
    s = scores(rows, codes, metric)
    picked = s.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(targets >= 0, torch.logsumexp(s, -1) - picked, 0.0)


def cross_entropy_to_codes(rows, codes, targets, metric):
    """(sum, count) over the rows with a target (>= 0; -1 is ignored, as theirs' ignore_index) of the
    cross-entropy of the scores against ``targets`` [M]."""
    total = rows.new_zeros((), dtype=torch.float32)
    for start, stop in _chunks(rows.shape[0], codes.shape[0]):
        total = total + _checkpointed(_row_cross_entropy, rows[start:stop], codes, targets[start:stop], metric).sum()
    return total, (targets >= 0).sum()


def _position_probs(rows, codes, positions, num_positions, metric, scale):
    probs = torch.softmax(scores(rows, codes, metric) * scale, -1)
    return probs.new_zeros(num_positions, codes.shape[0]).index_add(0, positions, probs)


def position_mean_probs(rows, codes, positions, num_positions, metric, scale):
    """softmax(scores * scale) of each row averaged over the rows of each sequence position: ``positions`` [M]
    in [0, num_positions) -> [num_positions, K] (theirs' mean over batch and heads of its [.., n, K] probs)."""
    total = 0.0
    for start, stop in _chunks(rows.shape[0], codes.shape[0]):
        total = total + _checkpointed(_position_probs, rows[start:stop], codes, positions[start:stop],
                                      num_positions, metric, scale)
    counts = torch.bincount(positions, minlength=num_positions).clamp(min=1)
    return total / counts.unsqueeze(-1)


def _soft_codes(rows, codes, metric, temperature):
    return torch.softmax(scores(rows, codes, metric) / temperature, -1) @ codes.float()


def gumbel_straight_through(rows, codes, metric, temperature):
    """softmax(scores / temperature) @ codes minus its detached self: zero in value, the gradient theirs' Gumbel
    straight-through one-hot passes to the rows (and codes) [M, d]."""
    parts = [_checkpointed(_soft_codes, rows[start:stop], codes, metric, temperature)
             for start, stop in _chunks(rows.shape[0], codes.shape[0])]
    soft = torch.cat(parts) if parts else rows.new_zeros(0, codes.shape[1])
    return soft - soft.detach()
