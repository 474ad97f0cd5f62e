"""The originals' quantizers in plain PyTorch: the baselines ``python -m models.bench`` swaps into
the model suite's tokenizers in place of our layers (VAR's own loop is
:func:`vqkernels.bench_var.plain_var_quantize`).

* :class:`PlainVectorQuantizer`: taming-transformers' ``VectorQuantizer2`` forward;
* :class:`PlainGumbelQuantize`: taming's ``GumbelQuantize`` forward (``F.gumbel_softmax``, the
  product with the codebook, the KL term);
* :func:`plain_gumbel_quantize`: :func:`vqkernels.gumbel_quantize` (DALL-E's dVAE) as the same
  arithmetic on the caller's noise;
* :class:`PlainMultiScaleVQ`: VAR's ``VectorQuantizer2`` training forward with its code-hit EMA.

Each keeps the constructor and state of the layer it stands in for, so it loads our model's state;
none calls a ``torch.ops.vqkernels`` op.
"""

import torch
import torch.nn.functional as F

from .bench_var import plain_var_quantize
from .nn import GumbelQuantize, MultiScaleVQ, VectorQuantizer
from .reference import GUMBEL_KL_EPS


class PlainVectorQuantizer(VectorQuantizer):
    """taming-transformers' ``VectorQuantizer2`` forward in plain PyTorch (constructor and state are
    those of :class:`vqkernels.nn.VectorQuantizer`, a drop-in for it)."""

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat, weight = z.view(-1, self.e_dim), self.embedding.weight
        d = (z_flat ** 2).sum(dim=1, keepdim=True) + (weight ** 2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", z_flat,
                                                                                                    weight.t())
        ids = torch.argmin(d, dim=1)
        z_q = self.embedding(ids).view(z.shape)
        commit, codebook = torch.mean((z_q.detach() - z) ** 2), torch.mean((z_q - z.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            ids = ids.view(z.shape[:3])
        return z_q, loss, (None, None, ids)


def _kl_to_uniform(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """taming's KL term: sum_k q_k log(q_k K + 1e-10) over ``dim``, mean over the rest, q = softmax(logits)."""
    qy = F.softmax(logits, dim=dim)
    return torch.sum(qy * torch.log(qy * logits.shape[dim] + GUMBEL_KL_EPS), dim=dim).mean()


class PlainGumbelQuantize(GumbelQuantize):
    """taming-transformers' ``GumbelQuantize`` forward in plain PyTorch (F.gumbel_softmax draws the
    noise as :class:`vqkernels.nn.GumbelQuantize` does, so a seeded step samples the same codes)."""

    def forward(self, z, temp=None, return_logits=False):
        hard = self.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        logits = self.proj(z)
        soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
        z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, self.embed.weight)
        diff = self.kl_weight * _kl_to_uniform(logits, 1)
        ind = soft_one_hot.argmax(dim=1)
        if not self.use_vqinterface:
            return z_q, diff, ind
        if return_logits:
            return z_q, diff, (None, None, ind), logits
        return z_q, diff, (None, None, ind)


def plain_gumbel_quantize(logits, codebook, gumbels, tau=1.0, hard=False):
    """:func:`vqkernels.gumbel_quantize` in plain PyTorch: ``F.gumbel_softmax``'s arithmetic on the
    given noise (softmax((logits + g) / tau), straight-through one-hot when ``hard``), the product with
    the codebook, the first maximum and taming's KL term."""
    y = ((logits + gumbels) / tau).softmax(dim=1)
    ids = y.argmax(dim=1)
    if hard:
        y = torch.zeros_like(y).scatter_(1, ids[:, None], 1.0) - y.detach() + y
    return y @ codebook, ids, _kl_to_uniform(logits, 1)


class PlainMultiScaleVQ(MultiScaleVQ):
    """VAR's ``VectorQuantizer2`` training forward, its per-scale loop in plain PyTorch
    (:func:`vqkernels.bench_var.plain_var_quantize`), with VAR's code-hit EMA (which VAR keeps under
    torch.distributed and :class:`MultiScaleVQ` in every training step). ``f_to_idxBl_or_fhat`` gives
    the indices by the same loop; its other uses are not part of a training step."""

    def forward(self, f_BChw, ret_usages=False, ret_indices=False):
        if ret_usages:
            raise ValueError("PlainMultiScaleVQ: ret_usages is not part of the benchmarked step")
        f_hat, loss, idx_Bl, hits = plain_var_quantize(f_BChw, self.embedding, self.quant_resi, self.v_patch_nums,
                                                  self.beta, self.using_znorm)
        if self.training:
            for si, hit_V in enumerate(hits):
                n = int(self.record_hit)
                if n == 0:
                    self.ema_vocab_hit_SV[si].copy_(hit_V)
                else:
                    keep, new = (0.9, 0.1) if n < 100 else (0.99, 0.01)
                    self.ema_vocab_hit_SV[si].mul_(keep).add_(hit_V.mul(new))
                self.record_hit += 1
        return (f_hat, None, loss, idx_Bl) if ret_indices else (f_hat, None, loss)

    def f_to_idxBl_or_fhat(self, f_BChw, to_fhat, v_patch_nums=None):
        if to_fhat:
            raise ValueError("PlainMultiScaleVQ: to_fhat is not part of the benchmarked step")
        with torch.no_grad():
            return plain_var_quantize(f_BChw, self.embedding, self.quant_resi, v_patch_nums or self.v_patch_nums,
                                      self.beta, self.using_znorm)[2]
