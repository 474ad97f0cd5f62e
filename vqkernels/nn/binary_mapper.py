"""``BinaryMapper`` (Fleuret 2025, arXiv:2510.17558): ``bits`` logits per token sampled as independent bits and
returned as a one-hot over the ``2**bits`` codes, a drop-in for vector-quantize-pytorch's (1.32.0).

The one-hot and its straight-through gradient are :func:`vqkernels.binary_one_hot`; the sampling and the aux loss are
plain torch."""

from math import log

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

NAT = log(2)  # one bit, in nats: the default kl_loss_threshold


class _BitEntropy(torch.autograd.Function):
    """The entropy of one bit with logit l, -(p log p + (1 - p) log(1 - p)) with p = sigmoid(l), written with one
    log: log(1 + e) + |l| e / (1 + e), e = exp(-|l|) (theirs takes two log-sigmoids; torch's CPU log-sigmoid and
    log1p are not vectorised and cost about 40 times a sigmoid; log(1 + e) errs by at most half an ulp of 1, absolute);
    the gradient by hand, -l p (1 - p) = -l e / (1 + e)^2. NaN for an infinite logit, as theirs."""

    @staticmethod
    def forward(ctx, logits):
        a = logits.abs()
        e = torch.exp(-a)
        d = 1.0 + e
        ctx.save_for_backward(logits, e, d)
        return torch.log(d) + a * (e / d)

    @staticmethod
    def backward(ctx, grad):
        logits, e, d = ctx.saved_tensors
        return grad * -logits * (e / d.square())


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
    adds G - sg(G), off by float32 rounding), and G is never formed: the backward contracts the gradient with
    the tables of the low and the high half of the bits (theirs: two einsums over a [2**bits, bits] table and an
    exp, in the forward). With no tokens the reduced aux loss is 0 (theirs: NaN, the mean of nothing). ``codes``
    is built on request, not a buffer. ``forward`` needs bits <= 30 (a one-hot row of 2**bits floats; ValueError
    above); ``log_prob``, ``calc_aux_loss`` and ``binary_entropy`` take any bits up to 62.
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
        codes = torch.arange(self.num_codes, device=self.power_two.device)
        return (codes.unsqueeze(-1) & self.power_two) != 0

    def binary_entropy(self, logits):
        """The entropy (nats) of the independent bits with logits [..., bits], summed over the bits -> [...]."""
        return _BitEntropy.apply(logits).sum(dim=-1)

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
        # the one-hot, whose gradient (straight-through) is that of the joint code probabilities
        one_hot = ops.binary_one_hot(flat if straight_through else flat.detach(), indices)
        aux_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else self.zero

        one_hot = one_hot.reshape(*lead, self.num_codes)
        if return_indices:
            return one_hot, indices.reshape(lead), aux_loss
        return one_hot, aux_loss
