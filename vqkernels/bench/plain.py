"""The originals' quantizers in plain PyTorch: the baselines ``python -m models.bench`` swaps into
the model suite's tokenizers in place of our layers, and ``python -m vqkernels.bench.var`` times
against ours.

* :func:`plain_var_quantize`: VAR's per-scale ``VectorQuantizer2`` loop (the tests' reference
  re-implementation of VAR too);
* :class:`PlainVectorQuantizer`: taming-transformers' ``VectorQuantizer2`` forward;
* :class:`PlainGumbelQuantize`: taming's ``GumbelQuantize`` forward (``F.gumbel_softmax``, the
  product with the codebook, the KL term);
* :func:`plain_gumbel_quantize`: :func:`vqkernels.gumbel_quantize` (DALL-E's dVAE) as the same
  arithmetic on the caller's noise;
* :class:`PlainMultiScaleVQ`: VAR's ``VectorQuantizer2`` training forward with its code-hit EMA.

Each keeps the constructor and state of the layer it stands in for, so it loads our model's state;
none calls a ``torch.ops.vqkernels`` op.
"""

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GumbelQuantize, MultiScaleVQ, VectorQuantizer
from ..reference import GUMBEL_KL_EPS


def plain_var_quantize(f_BChw: torch.Tensor, embedding: nn.Embedding, quant_resi, v_patch_nums: Sequence[int],
                       beta: float = 0.25, using_znorm: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """VAR's per-scale quantizer loop in plain PyTorch, with VAR's arithmetic.

    ``quant_resi`` is indexed like VAR's, by the scale's position si / (SN - 1). Works in the
    embedding's dtype (VAR: float32). A side may be a pair (ph, pw), as in VAR's
    f_to_idxBl_or_fhat; the last must be (H, W). Returns ``(f_hat, mean_vq_loss, idx_Bl, hits)``: the
    straight-through f_hat, the loss, per scale the indices [B, pn * pn] and the code counts.
    """
    f = f_BChw.to(embedding.weight.dtype)
    B, C, H, W = f.shape
    f_no_grad = f.detach()
    f_rest = f_no_grad.clone()
    f_hat = torch.zeros_like(f_rest)
    mean_vq_loss = 0.0
    sn = len(v_patch_nums)
    idx_Bl, hits = [], []
    codes = embedding.weight.data
    for si, pn in enumerate(v_patch_nums):
        ph, pw = (pn, pn) if isinstance(pn, int) else pn
        rest = F.interpolate(f_rest, size=(ph, pw), mode="area") if si != sn - 1 else f_rest
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        if using_znorm:
            idx_N = torch.argmax(F.normalize(rest_NC, dim=-1) @ F.normalize(codes.T, dim=0), dim=1)
        else:
            d_no_grad = torch.sum(rest_NC.square(), dim=1, keepdim=True) + torch.sum(codes.square(), dim=1)
            d_no_grad.addmm_(rest_NC, codes.T, alpha=-2, beta=1)
            idx_N = torch.argmin(d_no_grad, dim=1)
        hits.append(idx_N.bincount(minlength=codes.shape[0]).float())
        idx_Bl.append(idx_N.view(B, ph * pw))
        h = embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
        if si != sn - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = quant_resi[si / (sn - 1)](h.contiguous())
        f_hat = f_hat + h
        f_rest -= h
        mean_vq_loss += F.mse_loss(f_hat.detach(), f).mul_(beta) + F.mse_loss(f_hat, f_no_grad)
    mean_vq_loss *= 1.0 / sn
    f_hat = (f_hat.detach() - f_no_grad).add_(f)
    return f_hat, mean_vq_loss, idx_Bl, hits


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
    (:func:`plain_var_quantize`), with VAR's code-hit EMA (which VAR keeps under
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
