"""Gumbel-softmax quantizer layer (DALL-E dVAE / taming-transformers ``GumbelQuantize``).

A drop-in for ``taming.modules.vqvae.quantize.GumbelQuantize``: the same constructor
arguments, ``state_dict`` keys (``proj.weight``, ``proj.bias``, ``embed.weight``), forward
and return convention (taming's, not vector-quantize-pytorch's), with the softmax, the
codebook product and the KL term fused in :func:`vqkernels.gumbel_quantize`.
"""

import torch
from torch import nn

from ..ops import gumbel_quantize


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantization of ``[B, C, H, W]`` features (Jang et al. 2016, arXiv:1611.01144).

    ``proj`` (a 1x1 convolution) turns the features into logits over ``n_embed`` codes; a
    Gumbel-softmax sample at temperature ``temp`` mixes the codebook ``embed.weight``
    ``[n_embed, embedding_dim]`` (``hard``: the sampled code itself, straight-through). In
    training ``hard`` is ``straight_through``, in eval always True.

    Args:
        num_hiddens: channels C of the input.
        embedding_dim: D, the channels of the output.
        n_embed: K, the number of codes.
        straight_through: hard samples (straight-through gradient) in training.
        kl_weight: weight of the KL divergence of softmax(logits) to the uniform prior.
        temp_init: the default temperature (the attribute ``temperature``, which training
            code may anneal).
        use_vqinterface: return ``(z_q, diff, (None, None, ind))`` rather than ``(z_q, diff, ind)``.
        remap: not supported (taming's index remapping); anything but None raises ValueError.

    ``forward(z, temp=None, return_logits=False)`` returns ``z_q`` ``[B, D, H, W]``, ``diff``
    (``kl_weight`` times the KL term, a scalar; float32 for half inputs) and ``ind`` int64
    ``[B, H, W]``, plus the logits ``[B, K, H, W]`` when ``return_logits`` (only with
    ``use_vqinterface``, as in taming). The noise comes from torch's generator exactly as in
    ``F.gumbel_softmax``, so a seeded run draws the same sample as taming's, and the results
    match taming's up to rounding: the hard ``z_q`` is the codebook row itself (taming
    multiplies it by ``1 - y + y``), the soft one and ``diff`` are summed in another order,
    and ``ind`` is the first maximum of logits + noise (taming's argmax of the sample can
    differ on near-ties). ``z_q`` is a channels-first view of a channels-last result. Not
    rounding: a position whose logits + noise hold a NaN gets index -1 and a NaN ``z_q``
    (taming: the NaN's index), and ``get_codebook_entry`` keeps the embedding's dtype.
    """

    def __init__(self, num_hiddens, embedding_dim, n_embed, straight_through=True, kl_weight=5e-4, temp_init=1.0,
                 use_vqinterface=True, remap=None):
        super().__init__()
        if remap is not None:
            raise ValueError("vqkernels.nn.GumbelQuantize: remap (taming's index remapping) is not supported; "
                             "pass remap=None")
        self.embedding_dim = embedding_dim
        self.n_embed = n_embed
        self.straight_through = straight_through
        self.temperature = temp_init
        self.kl_weight = kl_weight
        self.use_vqinterface = use_vqinterface
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z, temp=None, return_logits=False):
        hard = self.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        logits = self.proj(z)  # [B, K, H, W]
        # Gumbel(0, 1) noise drawn as F.gumbel_softmax draws it, in logits' layout.
        gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
        b, k, h, w = logits.shape
        rows = logits.permute(0, 2, 3, 1).reshape(-1, k)
        quantized, indices, kl = gumbel_quantize(rows, self.embed.weight, gumbels.permute(0, 2, 3, 1).reshape(-1, k),
                                                 temp, hard)
        z_q = quantized.view(b, h, w, self.embedding_dim).permute(0, 3, 1, 2)
        diff = self.kl_weight * kl
        ind = indices.view(b, h, w)
        if not self.use_vqinterface:
            return z_q, diff, ind
        if return_logits:
            return z_q, diff, (None, None, ind), logits
        return z_q, diff, (None, None, ind)

    def get_codebook_entry(self, indices, shape):
        """The codes of ``indices`` (flat, ``B*H*W`` of them) as ``[B, D, H, W]``; ``shape`` is (B, H, W, C)."""
        b, h, w, _ = shape
        if indices.numel() != b * h * w:
            raise ValueError(f"vqkernels.nn.GumbelQuantize.get_codebook_entry: {indices.numel()} indices for shape "
                             f"{tuple(shape)}, which needs B*H*W = {b * h * w}")
        return self.embed.weight[indices.reshape(b, h, w)].permute(0, 3, 1, 2)
