"""``VectorQuantize``: the VQ-VAE / VQ-GAN / ViT-VQGAN quantizer layer on the fused ops."""

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import _dist, _scores
from ._layout import Layout
from .codebook import Codebook

# forward(..., return_loss_breakdown=True)'s fourth result, vector-quantize-pytorch's fields: the unweighted
# commitment and orthogonal-regularisation losses (0 in eval mode); the other two are options not implemented here (0).
LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


def orthogonal_loss(codebook, weights):
    """Eq. (2) of arXiv:2112.00384 as vector-quantize-pytorch computes it, over the codes of ``weights`` [H, K]
    (1 for a code taking part, 0 otherwise; n codes of each head): sum_ij cos(c_i, c_j)^2 / (H n^2) - 1 / n.
    Computed as ||N^T W N||_F^2 with the normalised codes N, so memory is D x D per head, not K x K, and
    the count n stays a tensor (no host synchronisation)."""
    normed = F.normalize(codebook.float(), dim=-1)
    gram = normed.transpose(1, 2) @ (normed * weights.unsqueeze(-1))
    n = weights.sum(-1).amax()
    return gram.pow(2).sum() / (codebook.shape[0] * n * n) - 1 / n


def training_losses(commit, codebook_loss, weight, learnable):
    """The layer loss from a quantize op's two losses: ``weight * commit``, plus, for a codebook
    learned by gradient, the codebook term's gradient without changing the value (as
    vector-quantize-pytorch's mse(q, x) with gradients to both sides)."""
    loss = commit * weight
    if learnable:
        loss = loss + (codebook_loss - codebook_loss.detach()) * weight
    return loss


def route_gradient(x, quantized, rotation_trick):
    """The training output: the rotation trick, or the straight-through one the op already gives."""
    if rotation_trick and x.requires_grad:
        return ops.rotation_trick(x, quantized.detach())
    return quantized


def directional_reparam(src, tgt, variance):
    """vector-quantize-pytorch's directional reparametrisation: ``src`` moved by |tgt - src| along the
    direction of tgt - src, perturbed by Gaussian noise of ``variance`` (a detached unit vector), so
    gradients reach ``src`` and, through the distance, ``tgt``."""
    error = tgt - src
    direction = F.normalize(error + variance ** 0.5 * torch.randn_like(error), dim=-1).detach()
    return src + direction * error.norm(dim=-1, keepdim=True)


def quantize_to(r, codes, idx):
    """vq_quantize's four results for rows r and codes chosen elsewhere (sampled, or from per-row codebooks):
    the straight-through output, the indices, the commitment and the codebook mse terms."""
    q = r + (codes - r).detach()
    commit = (r.float() - codes.detach().float()).square().mean()
    codebook_loss = (codes.float() - r.detach().float()).square().mean()
    return q, idx, commit, codebook_loss


def masked_mean(values, weights):
    """Mean of ``values`` [M, ...] over the rows of weight 1 (``weights`` [M], 0 / 1); 0 when no row
    counts. Nothing is read back."""
    per_row = values.flatten(1) if values.dim() > 1 else values.unsqueeze(1)  # [M, ...] -> [M, elements], M may be 0
    total = weights.sum() * per_row.shape[1]
    kept = torch.where(weights > 0, per_row.sum(-1) * weights, 0.0)  # a NaN in a padded row stays out
    return kept.sum() / total.clamp(min=1)


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    ``forward(x)`` returns ``(quantized, indices, loss)`` with vector-quantize-pytorch's shapes:
    x [B, N, dim] (channel-last), [B, dim, N] with ``channel_last=False``, [B, dim, H, W] with
    ``accept_image_fmap=True``, [B, dim, T, H, W] with ``accept_3d_fmap=True`` (video), or [B, dim];
    indices [B, N] (or [B, H, W], [B, T, H, W], [B]), with a trailing
    head dimension when ``heads > 1``. ``loss`` is ``commitment_weight`` times the commitment
    loss in training and 0 in eval mode.

    Every vector-quantize-pytorch 1.32 keyword is taken, with its meaning and default: ``codebook_dim``
    (factorised codes with in/out projections, ``layernorm_after_project_in``), ``heads``,
    ``separate_codebook_per_head``, ``decay``, ``eps``, ``freeze_codebook``, ``kmeans_init``, ``kmeans_iters``,
    ``use_cosine_sim``, ``threshold_ema_dead_code``, ``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``,
    ``commitment_weight``, ``rotation_trick`` (default on for dim > 1, as there), ``directional_reparam`` (with
    ``directional_reparam_variance``), ``straight_through`` (the Gumbel one-hot's gradient, which reaches the rows
    only with ``route_gradients_to_input=False``, as theirs), ``route_gradients_to_input``, ``sync_update_v``,
    ``sync_codebook`` (default: when torch.distributed runs with several ranks; ``sync_kmeans=False`` keeps k-means
    init and dead-code restart on each rank's own rows), ``ema_update``, ``manual_ema_update`` (then
    :meth:`update_ema` recomputes the codes), ``learnable_codebook``, ``in_place_codebook_optimizer`` (with
    ``manual_in_place_optimizer_update`` and :meth:`update_in_place_optimizer`), ``vq_bridge`` (a module applied to
    the codebook before every search, learned with it; also applied by get_codes_from_indices, where theirs
    returns the raw codes), ``affine_param`` (with its two decays and ``sync_affine_param``: codes searched after an
    affine map onto running batch statistics), ``orthogonal_reg_weight`` with ``orthogonal_reg_active_codes_only``
    and ``orthogonal_reg_max_codes`` (a random subset of that many codes each step, of the active ones with both),
    ``stochastic_sample_codes`` with ``sample_codebook_temp`` (in training, codes drawn from softmax(-distance /
    temperature) with theirs' scores and Gumbel noise), ``commitment_use_cross_entropy_loss``,
    ``codebook_diversity_loss_weight`` / ``codebook_diversity_temperature``, ``return_zeros_for_masked_padding``.
    What theirs reads from the full [N, K] scores (sampling, the cross-entropy commitment, the diversity loss, the
    Gumbel straight-through gradient) runs here in checkpointed row chunks (:mod:`vqkernels.nn._scores`).

    Forward options: ``mask`` [B, N] bool or ``lens`` [B] for padded sequences (padded tokens neither
    update the codebook nor count in the losses; their output is 0, or the input with
    ``return_zeros_for_masked_padding=False``, and their index -1), ``topk`` (the k nearest codes per
    token: quantized [..., k, dim], indices [..., k] and a per-token loss [..., k]; no codebook update),
    ``freeze_codebook``, ``ema_update`` (False: no EMA step this call), ``ema_update_weight`` (a [K] /
    [heads, K] per-code rate factor, or a callable of the step's sums and counts — called per codebook,
    with [1, K, D] and [1, K]), ``accum_ema_update`` (collect this step's statistics for the next
    update), ``sample_codebook_temp``, ``codebook_transform_fn`` (per-token codebooks the caller's function
    builds whole, as theirs), ``indices`` (returns ``(quantized, cross-entropy of the scores to those codes)`` as
    theirs), ``return_loss_breakdown``. :meth:`update_indices` updates the codebook from given codes.

    ``frozen_codebook``: a fixed [codebook_size, codebook_dim] table (e.g. a language model's
    word embeddings, LQAE / SPAE / UniCode) that is never updated and not part of the
    ``state_dict`` (the caller supplies it again when rebuilding the layer); the layer learns only
    its in/out projections from ``dim`` to the table's width.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
                 eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, use_cosine_sim=False,
                 threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False, accept_3d_fmap=False,
                 commitment_weight=1.0, rotation_trick=None, directional_reparam=False,
                 directional_reparam_variance=5e-3, sync_codebook=None, ema_update=None, manual_ema_update=False,
                 learnable_codebook=None, in_place_codebook_optimizer=None, manual_in_place_optimizer_update=False,
                 orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 return_zeros_for_masked_padding=True, route_gradients_to_input=True, stochastic_sample_codes=False,
                 sample_codebook_temp=1.0, layernorm_after_project_in=False, vq_bridge=None, sync_update_v=0.0,
                 straight_through=False, commitment_use_cross_entropy_loss=False, codebook_diversity_loss_weight=0.0,
                 codebook_diversity_temperature=100.0, affine_param=False, affine_param_batch_decay=0.99,
                 affine_param_codebook_decay=0.9, sync_affine_param=False, sync_kmeans=True, frozen_codebook=None):
        super().__init__()
        if frozen_codebook is not None:
            if frozen_codebook.dim() != 2 or frozen_codebook.shape[0] != codebook_size:
                raise ValueError(f"VectorQuantize: frozen_codebook must be [codebook_size={codebook_size}, E], "
                                 f"got shape {tuple(frozen_codebook.shape)}")
            if heads != 1:
                raise ValueError("VectorQuantize: frozen_codebook works with heads=1")
            if codebook_dim not in (None, frozen_codebook.shape[1]):
                raise ValueError(f"VectorQuantize: codebook_dim={codebook_dim} differs from the frozen table's "
                                 f"width {frozen_codebook.shape[1]}")
            codebook_dim = frozen_codebook.shape[1]
            if ema_update or learnable_codebook or kmeans_init or threshold_ema_dead_code:
                raise ValueError("VectorQuantize: a frozen_codebook is never updated (no ema_update, "
                                 "learnable_codebook, kmeans_init or threshold_ema_dead_code)")
            ema_update, learnable_codebook = False, False
        ema_update = not (directional_reparam or vq_bridge is not None) if ema_update is None else ema_update
        learnable_codebook = (directional_reparam or vq_bridge is not None) if learnable_codebook is None \
            else learnable_codebook
        if vq_bridge is not None and (ema_update or not learnable_codebook):
            raise ValueError("VectorQuantize: vq_bridge needs learnable_codebook=True and ema_update=False")
        if not 0.0 <= sync_update_v <= 1.0 or (sync_update_v > 0 and not learnable_codebook):
            raise ValueError("VectorQuantize: sync_update_v must be in [0, 1], and > 0 needs learnable_codebook=True")
        rotation_trick = (not directional_reparam and dim > 1) if rotation_trick is None else rotation_trick
        if ema_update and learnable_codebook:
            raise ValueError("VectorQuantize: learnable_codebook is not compatible with ema_update")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("VectorQuantize: use_cosine_sim is not compatible with learnable_codebook")
        if rotation_trick + directional_reparam + straight_through > 1:
            raise ValueError("VectorQuantize: rotation_trick, directional_reparam and straight_through exclude each other")
        if straight_through and learnable_codebook:
            raise ValueError("VectorQuantize: straight_through does not work with learnable_codebook (as theirs)")
        if directional_reparam and threshold_ema_dead_code == 0:
            raise ValueError("VectorQuantize: directional_reparam needs dead-code restart (threshold_ema_dead_code > 0)")
        if in_place_codebook_optimizer is not None and not learnable_codebook:
            raise ValueError("VectorQuantize: in_place_codebook_optimizer needs learnable_codebook=True")
        self.dim, self.heads, self.codebook_size = dim, heads, codebook_size
        self.separate_codebook_per_head = separate_codebook_per_head
        self._split_heads = separate_codebook_per_head and heads > 1  # one codebook per head, several heads
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        inner = self.codebook_dim * heads
        self.has_projections = inner != dim
        self.project_in = nn.Identity()
        if self.has_projections:  # with the LayerNorm, theirs' Sequential names: project_in.0 / project_in.1
            self.project_in = nn.Sequential(nn.Linear(dim, inner), nn.LayerNorm(inner)) if layernorm_after_project_in \
                else nn.Linear(dim, inner)
        self.project_out = nn.Linear(inner, dim) if self.has_projections else nn.Identity()
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        if orthogonal_reg_active_codes_only and self._split_heads:
            raise ValueError("VectorQuantize: orthogonal_reg_active_codes_only does not work with separate codebooks "
                             "per head (as in vector-quantize-pytorch)")
        if orthogonal_reg_max_codes is not None and orthogonal_reg_max_codes < 1:
            raise ValueError(f"VectorQuantize: orthogonal_reg_max_codes must be >= 1, got {orthogonal_reg_max_codes}")
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.rotation_trick = rotation_trick
        self.directional_reparam, self.directional_reparam_variance = directional_reparam, directional_reparam_variance
        self.route_gradients_to_input = route_gradients_to_input
        self.stochastic_sample_codes, self.sample_codebook_temp = stochastic_sample_codes, sample_codebook_temp
        self.sync_update_v = sync_update_v
        self.straight_through = straight_through
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.learnable_codebook = learnable_codebook
        self.freeze_codebook = freeze_codebook
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("VectorQuantize: accept_image_fmap and accept_3d_fmap exclude each other")
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.use_cosine_sim = use_cosine_sim
        sync = _dist.distributed_ready() if sync_codebook is None else sync_codebook
        # The codes are a Parameter (vector-quantize-pytorch's layout) when learned by gradient, and also with the
        # orthogonal regulariser, whose gradient reaches them beside the EMA updates.
        self._codebook = Codebook(self.codebook_dim, codebook_size,
                                  num_codebooks=heads if separate_codebook_per_head else 1,
                                  kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
                                  threshold_ema_dead_code=threshold_ema_dead_code,
                                  learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0,
                                  ema_update=ema_update, use_cosine_sim=use_cosine_sim, sync=sync,
                                  frozen=frozen_codebook, manual_ema_update=manual_ema_update, sync_kmeans=sync_kmeans)
        self._codebook.vq_bridge = vq_bridge  # theirs keeps the bridge in its codebook: _codebook.vq_bridge.*
        if affine_param:
            if use_cosine_sim:
                raise ValueError("VectorQuantize: affine_param works with the euclidean codebook only (as theirs)")
            self._codebook.enable_affine(affine_param_batch_decay, affine_param_codebook_decay, sync_affine_param)
        self.in_place_codebook_optimizer = (in_place_codebook_optimizer(self._codebook.parameters())
                                            if in_place_codebook_optimizer is not None else None)
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

    @property
    def codebook(self):
        """The codebook [K, D], or [heads, K, D] with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes):
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes.unsqueeze(0))

    @property
    def ema_update(self):
        return self._codebook.ema_update

    def update_ema(self):
        """With ``manual_ema_update``: recompute the codes from the EMA statistics gathered so far."""
        self._codebook.update_ema()

    def update_in_place_optimizer(self):
        """One step of the in-place codebook optimizer (after its backward), then its gradients cleared;
        gradients are averaged over the ranks first when the codebook is synchronised."""
        if self.in_place_codebook_optimizer is None:
            return
        if self._codebook.sync:
            for param in self._codebook.parameters():
                if param.grad is not None:
                    _dist.all_reduce_mean_(param.grad)
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def _head_rows(self, xin):
        """[B, N, heads * d] -> one [M, d] row matrix per codebook."""
        d = self.codebook_dim
        if self.separate_codebook_per_head:
            return [xin[..., h * d:(h + 1) * d].reshape(-1, d) for h in range(self.heads)]
        return [xin.reshape(-1, d)]

    def _rows(self, tokens):
        """The codebook rows of tokens [B, N, dim]: the in projection, the heads split, l2-normalised
        for cosine codebooks."""
        return [self._codebook.transform_input(r) for r in self._head_rows(self.project_in(tokens))]

    def _row_mask(self, token_mask):
        """[B, N] token mask -> the [M] mask of one codebook's rows (the heads' rows of a token
        follow each other when the heads share one codebook)."""
        if token_mask is None:
            return None
        if self._split_heads or self.heads == 1:
            return token_mask.reshape(-1)
        return token_mask.unsqueeze(-1).expand(*token_mask.shape, self.heads).reshape(-1)

    def _token_mask(self, mask, lens, layout, tokens):
        """forward's ``mask`` / ``lens`` as a [B, N] bool mask (None without either)."""
        if mask is not None and lens is not None:
            raise ValueError("VectorQuantize: pass mask or lens, not both")
        if mask is None and lens is None:
            return None
        if layout.image or layout.only_one:
            raise ValueError("VectorQuantize: mask / lens work with sequences of tokens, not feature maps or "
                             "single tokens (as in vector-quantize-pytorch)")
        b, n = tokens.shape[:2]
        if lens is not None:
            return torch.arange(n, device=tokens.device) < lens.to(tokens.device).unsqueeze(-1)
        if mask.shape != (b, n) or mask.dtype != torch.bool:
            raise ValueError(f"VectorQuantize: mask must be a bool [B={b}, N={n}] tensor, got "
                             f"{mask.dtype} of shape {tuple(mask.shape)}")
        return mask

    def _orthogonal_weights(self, indices):
        """[H, K] 1 / 0: the codes in the orthogonal regulariser this step (all, the ones ``indices`` used, and
        at most ``orthogonal_reg_max_codes`` of them drawn at random), without reading anything back."""
        embed = self._codebook.embed
        weights = torch.ones(embed.shape[:2], device=embed.device)
        if self.orthogonal_reg_active_codes_only:
            # slot 0 takes the -1 of a row that chose no code
            used = torch.zeros(self.codebook_size + 1, device=embed.device).index_fill_(0, indices.reshape(-1) + 1, 1.0)
            weights = weights * used[1:]
        if self.orthogonal_reg_max_codes is not None and self.orthogonal_reg_max_codes < self.codebook_size:
            keys = torch.rand(self.codebook_size, device=embed.device).masked_fill(weights[0] == 0, 2.0)
            rank = keys.argsort().argsort()  # a uniform random order of the taking-part codes first
            weights = weights * (rank < self.orthogonal_reg_max_codes)
        return weights

    def _embed(self, h, learn):
        """The codes of codebook h handed to the ops, with gradients when learned this step, through the
        ``vq_bridge`` when there is one. In training a Parameter codebook is copied: this step's update or
        optimizer may write it in place before the backward, which needs the codes it searched."""
        embed = self._codebook.embed
        if self.training and isinstance(embed, nn.Parameter):
            embed = embed.clone()
        embed = embed if learn else embed.detach()
        if self._codebook.vq_bridge is not None:
            embed = self._codebook.vq_bridge(embed)
        return self._codebook.affine_codes(h, embed[h]) if self._codebook.affine else embed[h]

    def _route(self, r, q, codes):
        """The training output of rows r quantized to q (the op's straight-through result) with the chosen
        codes ``codes`` (carrying the codebook's gradient when it is learned): the rotation trick, the
        directional reparametrisation or straight-through; the bare codes without routing to the input."""
        if not (self.route_gradients_to_input and r.requires_grad):
            return codes
        if self.rotation_trick:
            return ops.rotation_trick(r, q.detach())
        if self.directional_reparam:
            return directional_reparam(r, codes, self.directional_reparam_variance)
        return q

    def _in_place_step(self, rows, row_mask, freeze, temperature):
        """vector-quantize-pytorch's in-place codebook optimisation: search, the codes' mse to the
        (detached) rows backpropagated into the codebook, one optimizer step (unless manual); the
        statistics of this search update the codebook as a normal step would. Returns the loss."""
        cb = self._codebook
        losses = []
        for h, r in enumerate(rows):
            embed = cb.embed[h]
            if temperature > 0:
                idx = _scores.sample_codes(r.detach(), embed.detach(), cb.metric, temperature)
            else:
                _, idx, _, _ = ops.vq_quantize(r.detach(), embed.detach(), cb.metric)
            codes = embed.index_select(0, idx)
            err = (codes.float() - r.detach().float()).square()
            losses.append(err.mean() if row_mask is None else masked_mean(err, row_mask.float()))
            if cb.tracks_statistics and not freeze:
                cb.update_(h, r, idx if row_mask is None else idx.masked_fill(~row_mask, -1), valid=row_mask)
        loss = torch.stack(losses).mean()
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss.detach()

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        layout = Layout("VectorQuantize", x, self.dim, self.accept_image_fmap, self.channel_last, self.accept_3d_fmap)
        tokens = layout.tokens(x)
        b, n = tokens.shape[:2]
        token_mask = self._token_mask(mask, lens, layout, tokens)
        row_mask = self._row_mask(token_mask)
        weights = None if row_mask is None else row_mask.float()
        cb = self._codebook
        rows = self._rows(tokens)
        if self.training and cb.needs_init:
            cb.init_embed_([r.detach() if row_mask is None else r.detach()[row_mask] for r in rows])
        if cb.affine:
            cb.update_affine_(rows, weights, self.training)
        sample_temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        temperature = sample_temp if self.stochastic_sample_codes and self.training else 0.0
        if topk is not None:
            if temperature > 0:
                raise ValueError("VectorQuantize: topk does not sample (stochastic_sample_codes) here")
            return self._forward_topk(x, layout, tokens, rows[0], token_mask, int(topk), freeze, return_loss_breakdown)
        zero = x.new_zeros((), dtype=torch.float32)
        inplace_loss = zero
        in_place = self.in_place_codebook_optimizer is not None and self.training and not freeze
        if in_place:
            inplace_loss = self._in_place_step(rows, row_mask, freeze, temperature)
        learn = self.learnable_codebook and not freeze
        quantized, chosen, losses, diversity, given = [], [], [], 0.0, []
        for h, r in enumerate(rows):
            updates = self.training and not freeze and cb.tracks_statistics and not in_place
            embed = self._embed(h, learn)
            chosen_codes = None  # the chosen codes with their gradients, where not the codebook's rows
            if codebook_transform_fn is not None:
                q, idx, commit, codebook_loss, chosen_codes = self._transformed_quantize(r, embed, codebook_transform_fn)
            elif temperature > 0:
                q, idx, commit, codebook_loss = self._sampled_quantize(r, embed, temperature)
            else:
                q, idx, commit, codebook_loss = ops.vq_quantize(r, embed, cb.metric)
            if row_mask is not None:
                idx = idx.masked_fill(~row_mask, -1)
            if self.training:
                if chosen_codes is not None:
                    codes = chosen_codes
                else:
                    codes = embed.index_select(0, idx.clamp(min=0)) if learn else q.detach()
                if row_mask is not None:
                    commit = masked_mean((r.float() - codes.detach().float()).square(), weights)
                    codebook_loss = masked_mean((codes.float() - r.detach().float()).square(), weights) if learn \
                        else commit
                if self.commitment_use_cross_entropy_loss:  # to the codes chosen (padded rows -1: ignored)
                    total, count = _scores.cross_entropy_to_codes(r, embed, idx, cb.metric)
                    losses.append(total / count.clamp(min=1))
                else:
                    losses.append(training_losses(commit, codebook_loss, 1.0, learn))
                if self.codebook_diversity_loss_weight > 0:
                    diversity = diversity + _scores.position_mean_probs(
                        r, embed, self._positions(r.shape[0], n), n, cb.metric, self.codebook_diversity_temperature)
                routed = self.route_gradients_to_input and r.requires_grad
                q = self._route(r, q, codes)
                if self.straight_through and not routed and sample_temp > 0:  # theirs' Gumbel one-hot's gradient
                    q = q + _scores.gumbel_straight_through(r, embed, cb.metric, sample_temp)
                if self.sync_update_v > 0:  # (21) of the vqtorch draft, as theirs: v more of the gradient
                    q = q + self.sync_update_v * (q - q.detach())
                if updates:
                    cb.update_(h, r, idx, valid=row_mask, ema_update=ema_update is not False,
                               weight=ema_update_weight, accumulate=accum_ema_update)
            if indices is not None:
                targets = indices[..., h] if self._split_heads else indices
                given.append(_scores.cross_entropy_to_codes(r, embed, targets.reshape(-1).long(), cb.metric))
            quantized.append(q)
            chosen.append(idx)
        if self._split_heads:
            q = torch.cat([t.reshape(b, n, self.codebook_dim) for t in quantized], dim=-1)
            idx = torch.stack([t.reshape(b, n) for t in chosen], dim=-1)
        else:
            q = quantized[0].reshape(b, n, self.heads * self.codebook_dim)
            idx = chosen[0].reshape(b, n, self.heads) if self.heads > 1 else chosen[0].reshape(b, n)
        commitment = loss = orthogonal = diversity_loss = zero
        if self.training and self.codebook_diversity_loss_weight > 0:
            avg = diversity / len(rows)
            diversity_loss = (avg * avg.clamp(min=1e-5).log()).sum(-1).mean()  # minus theirs' entropy
            loss = loss + diversity_loss * self.codebook_diversity_loss_weight
        if self.training and self.has_commitment_loss:
            commitment = torch.stack(losses).mean()
            loss = loss + commitment * self.commitment_weight
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = orthogonal_loss(self._codebook.embed, self._orthogonal_weights(idx))
            loss = loss + orthogonal * self.orthogonal_reg_weight
        out = self._pad_masked(self.project_out(q.to(x.dtype)), tokens, token_mask)
        out, idx = layout.restore(out), layout.indices(idx)
        if indices is not None:  # theirs' cross-entropy of the scores to the given codes (after the layer's step)
            return out, sum(t for t, _ in given) / sum(c for _, c in given).clamp(min=1)
        if not return_loss_breakdown:
            return out, idx, loss
        return out, idx, loss, LossBreakdown(commitment, diversity_loss, orthogonal, inplace_loss)

    def _positions(self, num_rows, n):
        """Each row's sequence position in [0, n): the rows of a codebook are (batch, token[, head])."""
        rows = torch.arange(num_rows, device=self._codebook.embed.device)
        return (rows if self._split_heads else rows // self.heads) % max(n, 1)

    def _transformed_quantize(self, r, embed, transform):
        """vq_quantize's four results against per-row codebooks: ``transform(codes [1, K, d])`` returns
        [1, ..., K, d] codes for each row (theirs' ``codebook_transform_fn``, e.g. an MLP conditioned per token),
        which the caller has built whole; the nearest of each row's own codes, scored as theirs (l2: the pairwise
        distance with its 1e-6 eps; cosine: normalised codes), straight-through output, mse terms, chosen codes."""
        codes = transform(embed.unsqueeze(0))
        if codes.numel() != r.shape[0] * embed.numel():
            raise ValueError(f"VectorQuantize: codebook_transform_fn must return {embed.shape[0]} codes of width "
                             f"{embed.shape[1]} for each of the {r.shape[0]} rows, got shape {tuple(codes.shape)}")
        codes = codes.reshape(r.shape[0], embed.shape[0], -1)
        if self._codebook.use_cosine_sim:
            codes = F.normalize(codes, dim=-1)
            idx = (codes * r.unsqueeze(1)).sum(-1).argmax(-1)
        else:
            idx = (-F.pairwise_distance(r.unsqueeze(1), codes)).argmax(-1)
        chosen = codes.gather(1, idx.view(-1, 1, 1).expand(-1, 1, codes.shape[-1])).squeeze(1)
        return (*quantize_to(r, chosen, idx), chosen)

    def _sampled_quantize(self, r, embed, temperature):
        """vq_quantize's four results with sampled codes (:func:`sample_codes`) instead of the nearest:
        straight-through output, the commitment and codebook mse terms."""
        idx = _scores.sample_codes(r.detach(), embed.detach(), self._codebook.metric, temperature)
        return quantize_to(r, embed.index_select(0, idx), idx)

    def _pad_masked(self, out, tokens, token_mask):
        """Outputs [B, N, ..., dim] of padded tokens: 0, or the input with return_zeros_for_masked_padding=False."""
        if token_mask is None:
            return out
        keep = token_mask.reshape(*token_mask.shape, *([1] * (out.dim() - 2)))
        if self.return_zeros_for_masked_padding:
            return out.masked_fill(~keep, 0.0)
        return torch.where(keep, out, tokens.reshape(*tokens.shape[:2], *([1] * (out.dim() - 3)), tokens.shape[-1]))

    def _forward_topk(self, x, layout, tokens, r, token_mask, k, freeze, return_loss_breakdown):
        """forward with ``topk``: each token's k nearest codes, nearest first, with a per-token-and-code
        commitment loss [B, N, k] (the loss is this tensor times ``commitment_weight``); the codebook
        is not updated. One codebook only (heads=1), as vector-quantize-pytorch."""
        if self.heads != 1 or k < 1 or (self.in_place_codebook_optimizer is not None and self.training):
            raise ValueError("VectorQuantize: topk works with heads=1, topk >= 1 and no in-place codebook optimizer")
        k = min(k, self.codebook_size)
        b, n = tokens.shape[:2]
        learn = self.learnable_codebook and not freeze
        embed = self._embed(0, learn)
        idx, _ = ops.nearest_code_topk(r.detach(), embed.detach(), k, self._codebook.metric)  # [M, k]
        codes = embed[idx]  # [M, k, d]
        rk = r.unsqueeze(1).expand_as(codes)
        commit = (codes.detach().float() - rk.float()).square().mean(-1)  # [M, k]
        q = codes.detach()
        if self.training:
            if learn:
                commit = commit + (codes.float() - rk.detach().float()).square().mean(-1) - commit.detach()
            straight = rk + (q - rk).detach()
            flat = self._route(rk.reshape(-1, self.codebook_dim), straight.reshape(-1, self.codebook_dim),
                               codes.reshape(-1, self.codebook_dim))
            q = flat.reshape(codes.shape)
        commit = commit.reshape(b, n, k)
        idx = idx.reshape(b, n, k)
        if token_mask is not None:
            commit = commit.masked_fill(~token_mask.unsqueeze(-1), 0.0)
            idx = idx.masked_fill(~token_mask.unsqueeze(-1), -1)
        zero = x.new_zeros((), dtype=torch.float32)
        loss = commit * self.commitment_weight if self.has_commitment_loss else commit
        orthogonal = zero
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = orthogonal_loss(self._codebook.embed, self._orthogonal_weights(idx))
            loss = loss + orthogonal * self.orthogonal_reg_weight
        out = self._pad_masked(self.project_out(q.reshape(b, n, k, -1).to(x.dtype)), tokens, token_mask)
        out, idx, loss = layout.restore(out), layout.indices(idx), layout.indices(loss)
        if not return_loss_breakdown:
            return out, idx, loss
        return out, idx, loss, LossBreakdown(commit if self.training else zero, zero, orthogonal, zero)

    @torch.no_grad()
    def update_indices(self, x, indices, mask=None):
        """Updates the codebook (EMA statistics, codes, dead-code restart) from inputs ``x`` and codes
        ``indices`` chosen elsewhere, in forward's layouts (vector-quantize-pytorch's
        ``update_indices`` / ``update_ema_indices``); index -1 and masked tokens count nowhere."""
        layout = Layout("VectorQuantize", x, self.dim, self.accept_image_fmap, self.channel_last, self.accept_3d_fmap)
        tokens = layout.tokens(x)
        b, n = tokens.shape[:2]
        row_mask = self._row_mask(self._token_mask(mask, None, layout, tokens))
        idx = indices.reshape(b, n, -1)
        rows = self._rows(tokens)
        for h, r in enumerate(rows):
            codes = (idx[..., h] if self._split_heads else idx).reshape(-1).long()
            if row_mask is not None:
                codes = codes.masked_fill(~row_mask, -1)
            self._codebook.update_(h, r, codes, valid=row_mask)

    update_ema_indices = update_indices

    def _codes(self, indices):
        """The codes of forward's ``indices``, channel-last: [..., heads * codebook_dim] with separate
        codebooks, [..., heads, codebook_dim] with heads sharing one (a single head: [..., codebook_dim])."""
        embed = self._codebook.embed
        if self._codebook.vq_bridge is not None:
            embed = self._codebook.vq_bridge(embed)
        if self._split_heads:
            return torch.cat([embed[h][indices[..., h]] for h in range(self.heads)], dim=-1)
        return embed[0][indices]

    @property
    def channel_first(self):
        """Whether inputs and outputs carry the features on dim 1."""
        return self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last

    def get_codes_from_indices(self, indices):
        """The codes (before the out projection) of ``indices`` as returned by forward, in the
        input layout: [..., heads * codebook_dim] ([..., heads, codebook_dim] when the heads share one
        codebook, as vector-quantize-pytorch), channels first for images / channel_last=False."""
        codes = self._codes(indices)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def get_output_from_indices(self, indices):
        """The layer's output for ``indices`` (forward's output in eval mode, in the input's layout): the
        heads' codes side by side, through the out projection."""
        codes = self._codes(indices)
        if self.heads > 1 and not self.separate_codebook_per_head:
            codes = codes.flatten(-2)
        out = self.project_out(codes)
        return out.movedim(-1, 1) if self.channel_first else out
