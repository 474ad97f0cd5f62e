"""``VectorQuantize``: the VQ-VAE / VQ-GAN / ViT-VQGAN quantizer layer on the fused ops."""

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import _dist
from ._layout import Layout
from ._options import reject_unsupported
from .codebook import Codebook

# vector-quantize-pytorch VectorQuantize options not implemented here, with their defaults.
_VQ_UNSUPPORTED = dict(
    layernorm_after_project_in=False, sync_kmeans=True,
    commitment_use_cross_entropy_loss=False, codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
    stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False, directional_reparam=False,
    directional_reparam_variance=5e-3, sync_affine_param=False, vq_bridge=None, manual_ema_update=False,
    in_place_codebook_optimizer=None, manual_in_place_optimizer_update=False, affine_param=False,
    affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, sync_update_v=0.0,
    return_zeros_for_masked_padding=True, route_gradients_to_input=True,
)
_FORWARD_UNSUPPORTED = dict(indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                            codebook_transform_fn=None, ema_update_weight=None,
                            accum_ema_update=False, ema_update=None)


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


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    ``forward(x)`` returns ``(quantized, indices, loss)`` with vector-quantize-pytorch's shapes:
    x [B, N, dim] (channel-last), [B, dim, N] with ``channel_last=False``, [B, dim, H, W] with
    ``accept_image_fmap=True``, [B, dim, T, H, W] with ``accept_3d_fmap=True`` (video), or [B, dim];
    indices [B, N] (or [B, H, W], [B, T, H, W], [B]), with a trailing
    head dimension when ``heads > 1``. ``loss`` is ``commitment_weight`` times the commitment
    loss in training and 0 in eval mode.

    Supported options (vector-quantize-pytorch's meaning and defaults): ``codebook_dim``
    (factorised codes with in/out projections), ``heads``, ``separate_codebook_per_head``,
    ``decay``, ``eps``, ``freeze_codebook``, ``kmeans_init``, ``kmeans_iters``,
    ``use_cosine_sim``, ``threshold_ema_dead_code``, ``channel_last``, ``accept_image_fmap``,
    ``commitment_weight``, ``rotation_trick`` (default on for dim > 1, as there), ``sync_codebook``
    (default: when torch.distributed runs with several ranks), ``ema_update``,
    ``learnable_codebook``, ``orthogonal_reg_weight`` with ``orthogonal_reg_active_codes_only`` and
    ``orthogonal_reg_max_codes`` (a random subset of that many codes each step, of the active ones with
    both), and forward's ``return_loss_breakdown``. Others raise unless given at their default.

    ``frozen_codebook``: a fixed [codebook_size, codebook_dim] table (e.g. a language model's
    word embeddings, LQAE / SPAE / UniCode) that is never updated and not part of the
    ``state_dict`` (the caller supplies it again when rebuilding the layer); the layer learns only
    its in/out projections from ``dim`` to the table's width.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False, decay=0.8,
                 eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, use_cosine_sim=False,
                 threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False, accept_3d_fmap=False,
                 commitment_weight=1.0,
                 rotation_trick=None, sync_codebook=None, ema_update=None, learnable_codebook=None,
                 orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 frozen_codebook=None, **unsupported):
        super().__init__()
        reject_unsupported("VectorQuantize", unsupported, _VQ_UNSUPPORTED)
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
        ema_update = True if ema_update is None else ema_update
        learnable_codebook = False if learnable_codebook is None else learnable_codebook
        if ema_update and learnable_codebook:
            raise ValueError("VectorQuantize: learnable_codebook is not compatible with ema_update")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("VectorQuantize: use_cosine_sim is not compatible with learnable_codebook")
        self.dim, self.heads, self.codebook_size = dim, heads, codebook_size
        self.separate_codebook_per_head = separate_codebook_per_head
        self._split_heads = separate_codebook_per_head and heads > 1  # one codebook per head, several heads
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        inner = self.codebook_dim * heads
        self.has_projections = inner != dim
        self.project_in = nn.Linear(dim, inner) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if self.has_projections else nn.Identity()
        self.commitment_weight = commitment_weight
        if orthogonal_reg_active_codes_only and self._split_heads:
            raise ValueError("VectorQuantize: orthogonal_reg_active_codes_only does not work with separate codebooks "
                             "per head (as in vector-quantize-pytorch)")
        if orthogonal_reg_max_codes is not None and orthogonal_reg_max_codes < 1:
            raise ValueError(f"VectorQuantize: orthogonal_reg_max_codes must be >= 1, got {orthogonal_reg_max_codes}")
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        self.learnable_codebook = learnable_codebook
        self.freeze_codebook = freeze_codebook
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("VectorQuantize: accept_image_fmap and accept_3d_fmap exclude each other")
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.use_cosine_sim = use_cosine_sim
        sync = _dist.distributed_ready() if sync_codebook is None else sync_codebook
        self._codebook = Codebook(self.codebook_dim, codebook_size,
                                  num_codebooks=heads if separate_codebook_per_head else 1,
                                  kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
                                  threshold_ema_dead_code=threshold_ema_dead_code,
                                  learnable_codebook=learnable_codebook, ema_update=ema_update,
                                  use_cosine_sim=use_cosine_sim, sync=sync, frozen=frozen_codebook)

    @property
    def codebook(self):
        """The codebook [K, D], or [heads, K, D] with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    def _head_rows(self, xin):
        """[B, N, heads * d] -> one [M, d] row matrix per codebook."""
        d = self.codebook_dim
        if self.separate_codebook_per_head:
            return [xin[..., h * d:(h + 1) * d].reshape(-1, d) for h in range(self.heads)]
        return [xin.reshape(-1, d)]

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

    def forward(self, x, freeze_codebook=None, return_loss_breakdown=False, **unsupported):
        reject_unsupported("VectorQuantize.forward", unsupported, _FORWARD_UNSUPPORTED)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        layout = Layout("VectorQuantize", x, self.dim, self.accept_image_fmap, self.channel_last, self.accept_3d_fmap)
        tokens = layout.tokens(x)
        b, n = tokens.shape[:2]
        cb = self._codebook
        rows = [cb.transform_input(r) for r in self._head_rows(self.project_in(tokens))]
        if self.training and cb.needs_init:
            cb.init_embed_([r.detach() for r in rows])
        quantized, indices, losses = [], [], []
        for h, r in enumerate(rows):
            updates = self.training and not freeze and cb.tracks_statistics
            embed = cb.embed[h] if self.learnable_codebook and not freeze else cb.embed[h].detach()
            if updates and self.learnable_codebook:
                embed = embed.clone()  # backward needs the codes this step used; updates write the Parameter
            q, idx, commit, codebook_loss = ops.vq_quantize(r, embed, cb.metric)
            if self.training:
                q = route_gradient(r, q, self.rotation_trick)
                losses.append(training_losses(commit, codebook_loss, 1.0, self.learnable_codebook and not freeze))
                if updates:
                    cb.update_(h, r, idx)
            quantized.append(q)
            indices.append(idx)
        if self._split_heads:
            q = torch.cat([t.reshape(b, n, self.codebook_dim) for t in quantized], dim=-1)
            idx = torch.stack([t.reshape(b, n) for t in indices], dim=-1)
        else:
            q = quantized[0].reshape(b, n, self.heads * self.codebook_dim)
            idx = indices[0].reshape(b, n, self.heads) if self.heads > 1 else indices[0].reshape(b, n)
        commitment = loss = orthogonal = zero = x.new_zeros((), dtype=torch.float32)
        if self.training and self.commitment_weight > 0:
            commitment = torch.stack(losses).mean()
            loss = commitment * self.commitment_weight
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = orthogonal_loss(self._codebook.embed, self._orthogonal_weights(idx))
            loss = loss + orthogonal * self.orthogonal_reg_weight
        out = layout.restore(self.project_out(q.to(x.dtype)))
        if not return_loss_breakdown:
            return out, layout.indices(idx), loss
        return out, layout.indices(idx), loss, LossBreakdown(commitment, zero, orthogonal, zero)

    def _codes(self, indices):
        """The codes of forward's ``indices``, channel-last: [..., heads * codebook_dim] with separate
        codebooks, [..., heads, codebook_dim] with heads sharing one (a single head: [..., codebook_dim])."""
        embed = self._codebook.embed
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
