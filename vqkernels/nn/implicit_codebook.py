"""QINCo's implicit neural codebook (Huijben et al. 2024, arXiv:2401.14732): a residual level's codes are
transformed by an MLP conditioned on what the previous levels reconstructed, so every token sees its own
codebook. vector-quantize-pytorch builds all of them at once ([B, N, K, D], with autograd through every
one); here the search runs in row chunks without gradients, and only the chosen codes are transformed again
with gradients, which gives the same values and gradients in O(chunk K D + N D) memory."""

import torch
import torch.nn.functional as F
from torch import nn

# transformed code entries per search chunk (1 MiB of float32, a core's L2, where the MLP's activations then stay):
# a QINCo step (3 levels x 256 codes, dim 32) at 1024 tokens 206 -> 90 ms, at 16 x 1024 tokens 2.1 -> 1.5 s against
# 16 MiB chunks (2 threads, Zen 5)
SEARCH_CHUNK_ELEMENTS = 1 << 18


class ImplicitCodebook(nn.Module):
    """vector-quantize-pytorch's ``MLP`` of ``ResidualVQ(implicit_neural_codebook=True)``, same parameters
    and names: ``proj_in`` (2 dim -> dim) on [condition, code], then ``depth`` residual blocks
    Linear-SiLU-Linear, l2-normalised outputs for cosine codebooks."""

    def __init__(self, dim, dim_hidden=None, depth=4, l2norm_output=False):
        super().__init__()
        hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
                                    for _ in range(depth))
        self.l2norm_output = l2norm_output

    def forward(self, codes, condition):
        """``codes`` [..., d] transformed under ``condition`` [..., d] (broadcast against each other)."""
        codes, condition = torch.broadcast_tensors(codes, condition)
        h = self.proj_in(torch.cat((condition, codes), dim=-1))
        for block in self.layers:
            h = block(h) + h
        return F.normalize(h, dim=-1) if self.l2norm_output else h

    @torch.no_grad()
    def search(self, rows, condition, embed, metric):
        """Each row's nearest transformed code: ``rows`` and ``condition`` [M, d], ``embed`` [K, d] -> [M]
        indices, as vector-quantize-pytorch scores them (l2: the pairwise distance with its 1e-6 eps; cosine:
        the dot product of normalised codes), a chunk of rows at a time."""
        k, d = embed.shape
        step = max(1, SEARCH_CHUNK_ELEMENTS // max(k * d, 1))
        chosen = []
        for start in range(0, rows.shape[0], step):
            r = rows[start:start + step].unsqueeze(1)
            codes = self(embed.unsqueeze(0), condition[start:start + step].unsqueeze(1))  # [c, K, d]
            if metric == "cosine":
                score = (F.normalize(codes, dim=-1) * r).sum(-1)
            else:
                score = -F.pairwise_distance(r, codes)
            chosen.append(score.argmax(-1))
        if not chosen:
            return torch.empty(0, dtype=torch.int64, device=rows.device)
        return torch.cat(chosen)
