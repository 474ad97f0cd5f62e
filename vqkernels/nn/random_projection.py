"""``RandomProjectionQuantizer`` (BEST-RQ, Chiu et al. 2022, arXiv:2202.01855): frozen random projections
and frozen random cosine codebooks that turn features into training targets, a drop-in for
vector-quantize-pytorch's (1.32.0) on :class:`vqkernels.nn.VectorQuantize`."""

import torch
import torch.nn.functional as F
from torch import nn

from .vq import VectorQuantize


class RandomProjectionQuantizer(nn.Module):
    """``forward(x [b, n, dim])`` returns the target indices [b, n] ([b, n, num_codebooks] with several
    codebooks); ``forward(x, indices)`` returns the cross-entropy of the codes' cosine similarities (the
    logits) against ``indices`` (-1 ignored), as there. The projections [num_codebooks, dim, codebook_dim]
    (Xavier normal), the layer norm without affine parameters and the codebooks never train (the inner
    :class:`VectorQuantize`, cosine, one codebook per head, always runs in eval mode). Other keywords go to
    that VectorQuantize. The index path runs the fused search; the loss path forms the [N, K] logits it needs.
    """

    def __init__(self, *, dim, codebook_size, codebook_dim, num_codebooks=1, norm=True, **kwargs):
        super().__init__()
        self.num_codebooks = num_codebooks
        projections = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(projections)
        self.register_buffer("rand_projs", projections)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.vq = VectorQuantize(dim=codebook_dim * num_codebooks, heads=num_codebooks, codebook_size=codebook_size,
                                 use_cosine_sim=True, separate_codebook_per_head=True, **kwargs)

    def forward(self, x, indices=None):
        x = torch.einsum("bnd,hde->bnhe", self.norm(x), self.rand_projs).flatten(2)
        self.vq.eval()
        if indices is None:
            return self.vq(x)[1]
        vq = self.vq
        rows = vq.project_in(x).unflatten(-1, (vq.heads, vq.codebook_dim))  # [b, n, heads, d]
        logits = torch.einsum("bnhd,hkd->bknh", vq._codebook.transform_input(rows), vq._codebook.embed)
        target = indices if indices.dim() == 3 else indices.unsqueeze(-1)
        return F.cross_entropy(logits, target, ignore_index=-1)
