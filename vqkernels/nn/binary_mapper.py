"""``BinaryMapper`` (Fleuret 2025, arXiv:2510.17558): ``bits`` logits per token sampled as independent bits and
returned as a one-hot over the ``2**bits`` codes, a drop-in for vector-quantize-pytorch's (1.32.0).

No vqkernels op computes any of it: it is plain torch here, with a hand-written backward for the straight-through
(:class:`_JointProbStraightThrough`)."""

from math import log

import torch
import torch.nn.functional as F
from torch import nn

NAT = log(2)  # one bit, in nats: the default kl_loss_threshold
CHUNK_ELEMENTS = 1 << 18  # joint probabilities per chunk of rows in the straight-through's backward (1 MiB of float32)


def _one_hot(indices, num_codes):
    """float32 one-hot [..., num_codes] of indices [...] (a scatter: no check of the indices, so no host read)."""
    out = torch.zeros((*indices.shape, num_codes), dtype=torch.float32, device=indices.device)
    return out.scatter_(-1, indices.unsqueeze(-1), 1.0)


def _code_bits(power_two):
    """The bits of every code [2**bits, bits] (bool): code c has bit b set where c & 2**b."""
    codes = torch.arange(2 ** power_two.numel(), device=power_two.device)
    return (codes.unsqueeze(-1) & power_two) != 0


def _joint_probs(logits):
    """G [N, 2**bits] of logits [N, bits]: G[n, c] = prod_b p_nb**c_b (1 - p_nb)**(1 - c_b), p = sigmoid(logits),
    code c's bit b being c & 2**b. The outer product of the joint tables of the top and bottom halves of the bits
    (each built bit by bit, doubling): one pass over [N, 2**bits] and no exp. A product of ``bits`` factors in
    [0, 1] errs by about ``bits`` ulps relative; theirs' exp of a sum of log-sigmoids by about |log G| ulps."""
    probs = (logits.sigmoid(), (-logits).sigmoid())  # p, 1 - p without cancellation

    def table(first, stop):  # over bits first..stop-1, index sum_b 2**(b - first) c_b
        joint = logits.new_ones(logits.shape[0], 1)
        for b in reversed(range(first, stop)):  # each new bit is the lowest so far
            joint = torch.stack([joint * probs[1][:, b:b + 1], joint * probs[0][:, b:b + 1]], dim=-1).flatten(1)
        return joint

    half = logits.shape[-1] // 2
    return (table(half, logits.shape[-1]).unsqueeze(-1) * table(0, half).unsqueeze(-2)).flatten(1)


class _JointProbStraightThrough(torch.autograd.Function):
    """The one-hot [N, 2**bits] (float32) of ``indices`` [N] whose gradient is that of the joint code
    probabilities G (:func:`_joint_probs`) of ``logits`` [N, bits]: what ``one_hot + G - sg(G)`` computes, with the
    exact one-hot values and without forming G in the forward (the backward rebuilds it from the saved logits)."""

    @staticmethod
    def forward(ctx, logits, indices, power_two):
        ctx.save_for_backward(logits, power_two)
        return _one_hot(indices, 2 ** power_two.numel())

    @staticmethod
    def backward(ctx, grad):
        logits, power_two = ctx.saved_tensors
        work = torch.promote_types(logits.dtype, torch.float32)
        lg = logits.to(work)
        codes = _code_bits(power_two)
        # [2**bits, bits + 1]: the bits of each code, then a column of ones
        reader = torch.cat([codes, codes.new_ones(codes.shape[0], 1)], dim=-1).to(work)
        # dG_c / dl_b = G_c (c_b - p_b): sum_c grad_c G_c c_b - p_b sum_c grad_c G_c, both sums from one product,
        # in row chunks whose [rows, 2**bits] products stay in a core's L2
        step = max(1, CHUNK_ELEMENTS >> power_two.numel())
        parts = [_joint_probs(lg[start:start + step]).mul_(grad[start:start + step].to(work)) @ reader
                 for start in range(0, lg.shape[0], step)]
        sums = torch.cat(parts) if parts else lg.new_zeros(0, reader.shape[1])
        grad_logits = sums[:, :-1] - lg.sigmoid() * sums[:, -1:]
        return grad_logits.to(logits.dtype), None, None


class BinaryMapper(nn.Module):
    """Maps logits [..., bits] to a sampled one-hot [..., 2**bits] with vector-quantize-pytorch's interface.

    Each bit b of a token is drawn from Bernoulli(sigmoid(logits_b / temperature)) (``prob.bernoulli()``, so the
    same generator state draws the same bits as theirs), or is ``prob > 0.5`` with ``deterministic`` (default in
    eval with ``deterministic_on_eval``); the code index is ``sum_b 2**b bit_b``. ``forward`` returns ``(one_hot,
    aux_kl_loss)``, or ``(one_hot, indices, aux_kl_loss)`` with ``return_indices``. In training (or with
    ``straight_through``) the one-hot carries the gradient of the joint code probabilities (the straight-through
    of the paper); the aux loss (training, or ``calc_aux_loss``) is ``relu(bits * ln 2 - H(bits) -
    kl_loss_threshold)``, the KL from the uniform code distribution above a threshold, mean over the tokens
    unless ``reduce_aux_kl_loss=False``. ``log_prob`` gives the log probability of given codes, ``calc_aux_loss``
    and ``binary_entropy`` the loss and the entropy alone. There are no parameters nor persistent buffers (the
    ``state_dict`` is empty, as theirs).

    Differences: the one-hot is float32 (as theirs) for every logits dtype, and the straight-through also works
    for float16 / bfloat16 / float64 logits (theirs' einsum then fails on mixed dtypes; the gradient is computed
    in float32, float64 for float64, and returned in the logits' dtype); its values are exactly 0 and 1 (theirs
    adds G - sg(G), off by float32 rounding), and G is only formed in the backward, as a product of the bit
    probabilities (theirs: two einsums over a [2**bits, bits] table and an exp, in the forward). With no tokens
    the reduced aux loss is 0 (theirs: NaN, the mean of nothing). ``codes`` is built on request, not a buffer.
    """

    def __init__(self, bits=1, kl_loss_threshold=NAT, deterministic_on_eval=False):
        super().__init__()
        if not 1 <= bits <= 62:
            raise ValueError(f"vqkernels.nn.BinaryMapper: bits must be in [1, 62] (int64 indices), got {bits}")
        self.bits = bits
        self.num_codes = 2 ** bits
        self.kl_loss_threshold = kl_loss_threshold
        self.deterministic_on_eval = deterministic_on_eval
        self.register_buffer("power_two", 2 ** torch.arange(bits), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def codes(self):
        """The bits of every code [num_codes, bits] (bool), code c's bit b being c & 2**b."""
        return _code_bits(self.power_two)

    def binary_entropy(self, logits):
        """The entropy (nats) of the independent bits with logits [..., bits], summed over the bits -> [...]."""
        prob = logits.sigmoid()
        return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)

    def calc_aux_loss(self, logits, reduce_aux_kl_loss=True):
        """relu(KL(bits || uniform) - kl_loss_threshold) per token [...] of logits [..., bits], or its mean."""
        loss = F.relu(self.bits * NAT - self.binary_entropy(logits) - self.kl_loss_threshold)
        if not reduce_aux_kl_loss:
            return loss
        return loss.mean() if loss.numel() else loss.sum()

    def log_prob(self, logits, *, indices=None, one_hot=None, sum_bits=True):
        """log P(code) under logits [..., bits] of the codes ``indices`` [...] (or the argmax of ``one_hot``
        [..., num_codes]): [...], or per bit [..., bits] with ``sum_bits=False``."""
        if (indices is None) == (one_hot is None):
            raise ValueError("vqkernels.nn.BinaryMapper: log_prob takes either indices or one_hot")
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        bits = (indices.reshape(logits.shape[:-1]).unsqueeze(-1) & self.power_two) != 0
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    def forward(self, logits, temperature=1.0, straight_through=None, calc_aux_loss=None, deterministic=None,
                return_indices=False, reduce_aux_kl_loss=True):
        """logits [..., bits] -> (one_hot [..., num_codes], [indices [...],] aux_kl_loss)."""
        if logits.ndim == 0 or logits.shape[-1] != self.bits:
            raise ValueError(f"vqkernels.nn.BinaryMapper: expected logits with a last dimension of {self.bits}, got "
                             f"shape {tuple(logits.shape)}")
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        lead = logits.shape[:-1]
        flat = logits.reshape(-1, self.bits)
        prob = (flat / temperature).sigmoid()
        sampled = prob > 0.5 if deterministic else prob.bernoulli()
        indices = (sampled.long() * self.power_two).sum(dim=-1)
        if straight_through:
            one_hot = _JointProbStraightThrough.apply(flat, indices, self.power_two)
        else:
            one_hot = _one_hot(indices, self.num_codes)
        aux_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else self.zero

        one_hot = one_hot.reshape(*lead, self.num_codes)
        if return_indices:
            return one_hot, indices.reshape(lead), aux_loss
        return one_hot, aux_loss
