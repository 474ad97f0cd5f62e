"""``VectorQuantizer``: the VQ-VAE / VQGAN quantizer with a gradient-learned codebook, a drop-in for
taming-transformers' ``VectorQuantizer2`` (which ``taming.models.vqgan`` imports as
``VectorQuantizer``): the same constructor, ``embedding.weight`` state_dict key, forward and return
convention, with the search, lookup and both losses fused in :func:`vqkernels.vq_quantize`.
"""

from torch import nn

from ..ops import vq_quantize


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of ``[B, C, H, W]`` features with an ``nn.Embedding`` codebook.

    The loss is the VQ-VAE objective (van den Oord et al. 2017): with ``legacy=False``,
    ``beta * ||z - sg(z_q)||^2 + ||sg(z) - z_q||^2`` (commitment weighted by beta, the VQ-VAE
    paper's form); with ``legacy=True`` (taming's default, kept for its checkpoints' training
    recipe) beta weights the codebook term instead. Both terms are means over all elements.
    ``z_q`` is straight-through: its gradient reaches ``z`` unchanged; the codebook learns only
    through the loss.

    Args:
        n_e: number of codes K.
        e_dim: code width, the channels C of the input.
        beta: the weight described above.
        sane_index_shape: return indices as [B, H, W] (else flat [B*H*W], as taming).
        legacy: taming's term weighting (see above).
        remap, unknown_index: taming's index remapping; not supported (remap must be None).

    ``forward(z)`` returns ``(z_q, loss, (None, None, indices))`` as taming. Ties go to the lowest
    index (taming's argmin agrees except on near-ties within rounding); a position holding a NaN
    gets index -1 and a NaN ``z_q``.
    """

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        if remap is not None:
            raise ValueError("vqkernels.nn.VectorQuantizer: remap (taming's index remapping) is not supported; "
                             "pass remap=None")
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("vqkernels.nn.VectorQuantizer: temp, rescale_logits and return_logits exist only for "
                             "interface compatibility with GumbelQuantize (leave them at their defaults)")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"vqkernels.nn.VectorQuantizer: z must be [B, {self.e_dim}, H, W], got {tuple(z.shape)}")
        b, c, h, w = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, c)
        quantized, indices, commit, codebook = vq_quantize(rows, self.embedding.weight)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = quantized.view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        if self.sane_index_shape:
            indices = indices.view(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape):
        """The codes of ``indices``; with ``shape`` = (B, H, W, C) as ``[B, C, H, W]``, else [..., C]."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
