"""``ResidualVQ`` (RQ-VAE, SoundStream) and ``GroupedResidualVQ`` on the fused residual op."""

import inspect
import random

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._layout import Layout
from ._options import reject_unsupported
from .implicit_codebook import ImplicitCodebook
from .vq import VectorQuantize, directional_reparam, masked_mean, route_gradient, training_losses

_RVQ_UNSUPPORTED = dict(heads=1, separate_codebook_per_head=False)
DIVEQ_VARIANCE = 5e-3  # the noise variance of DiVeQ's output reparametrisation (vector-quantize-pytorch's default)
# What else ResidualVQ passes on to each level's VectorQuantize (as vector-quantize-pytorch does).
_LEVEL_KEYWORDS = set(inspect.signature(VectorQuantize).parameters) - set(_RVQ_UNSUPPORTED)
_VQ_DEFAULTS = {name: p.default for name, p in inspect.signature(VectorQuantize).parameters.items()}
# The level options the fused residual op honours; any other one set runs the levels one by one.
_FUSED_LEVEL_KEYWORDS = {"decay", "eps", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code", "commitment_weight",
                         "rotation_trick", "ema_update", "learnable_codebook", "freeze_codebook", "channel_last",
                         "accept_3d_fmap", "sync_codebook", "return_zeros_for_masked_padding", "sample_codebook_temp"}


def dropout_levels(num_quantizers, cutoff_index, multiple_of, rng=random):
    """Quantize dropout's number of levels to run this step: a random prefix ending at or after
    ``cutoff_index``, rounded up to a multiple of ``multiple_of`` (drawn on the host with Python's random,
    or ``rng``, so no tensor is read back)."""
    last = rng.randrange(cutoff_index, num_quantizers)
    if multiple_of != 1:
        last = min(num_quantizers, (last + 1 + multiple_of - 1) // multiple_of * multiple_of) - 1
    return last + 1


def _level_sizes(codebook_size, num_quantizers):
    """Every level's codebook size from one int and ``num_quantizers``, or from a per-level sequence (as
    vector-quantize-pytorch, where the sequence's length is the number of levels)."""
    if isinstance(codebook_size, int):
        if num_quantizers is None:
            raise TypeError("ResidualVQ: num_quantizers is required with one codebook_size "
                            "(or give a size per level)")
        return (codebook_size,) * num_quantizers
    sizes = tuple(int(k) for k in codebook_size)
    if num_quantizers is not None and num_quantizers != len(sizes):
        raise ValueError(f"ResidualVQ: num_quantizers={num_quantizers} differs from the {len(sizes)} per-level "
                         f"codebook sizes {sizes}")
    return sizes


class ResidualLevels(nn.Module):
    """What the layer-by-layer residual quantizers share (ResidualFSQ, ResidualLFQ, ResidualSimVQ; ResidualVQ
    runs its levels in one fused op instead): projections, ``layers`` quantizing in turn what the previous ones
    left, quantize dropout drawn on the host, and the codes of indices. A subclass gives
    ``_level(level, residual, so_far) -> (quantized, indices, loss)`` and ``_level_codebook(level)`` (scaled codes), by
    default the level's own call and ``codebook``."""

    quant_grad_frac = 0.0     # the share of a level's gradient the next residual keeps (vector-quantize-pytorch's)
    dropout_needs_grad = True  # quantize dropout only while gradients are on, as their scalar residual layers

    def _setup(self, owner, dim, codebook_dim, num_quantizers, quantize_dropout, cutoff_index, multiple_of):
        if num_quantizers < 1:
            raise ValueError(f"vqkernels.nn.{owner}: num_quantizers must be >= 1, got {num_quantizers}")
        if not 0 <= cutoff_index < num_quantizers:
            raise ValueError(f"vqkernels.nn.{owner}: quantize_dropout_cutoff_index must be in [0, "
                             f"{num_quantizers}), got {cutoff_index}")
        self.dim = codebook_dim if dim is None else dim
        self.has_projections = self.dim != codebook_dim
        self.project_in = nn.Linear(self.dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, self.dim) if self.has_projections else nn.Identity()
        self.num_quantizers = num_quantizers
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = cutoff_index
        self.quantize_dropout_multiple_of = multiple_of

    def _project_in(self, tokens):
        """Tokens [..., dim] into the levels' width, with a clear error for another feature count."""
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"vqkernels.nn.{type(self).__name__}: expected {self.dim} features, got shape "
                             f"{tuple(tokens.shape)}")
        return self.project_in(tokens)

    @property
    def codebooks(self):
        """[num_quantizers, codebook_size, d]: every level's codes (a tuple of them when their sizes differ)."""
        codes = tuple(self._level_codebook(level) for level in range(self.num_quantizers))
        return torch.stack(codes) if len({c.shape for c in codes}) == 1 else codes

    def _level_codebook(self, level):
        return self.layers[level].codebook

    def _level(self, level, residual, so_far, **level_kwargs):
        """(quantized, indices, loss) of ``level`` on ``residual``; ``so_far``: the previous levels' sum."""
        return tuple(self.layers[level](residual, **level_kwargs))

    def _levels_this_step(self, seed=None):
        if not (self.training and self.quantize_dropout and (torch.is_grad_enabled() or not self.dropout_needs_grad)):
            return self.num_quantizers
        rng = random if seed is None else random.Random(seed)
        return dropout_levels(self.num_quantizers, self.quantize_dropout_cutoff_index,
                              self.quantize_dropout_multiple_of, rng)

    def _quantize(self, x, seed=None, inputs=None, **level_kwargs):
        """(summed quantized [..., d], indices [..., num_quantizers] with -1 for dropped levels, losses); each
        level's input residual is appended to the list ``inputs`` when given."""
        levels = self._levels_this_step(seed)
        residual, out, indices, losses = x, 0.0, [], []
        frac = self.quant_grad_frac
        for level in range(self.num_quantizers):
            if level >= levels:
                indices.append(torch.full(x.shape[:-1], -1, dtype=indices[0].dtype, device=x.device))
                losses.append(losses[0].new_zeros(()))
                continue
            if inputs is not None:
                inputs.append(residual)
            quantized, idx, loss = self._level(level, residual, out, **level_kwargs)
            residual = residual - (quantized * frac + quantized.detach() * (1 - frac) if frac else quantized.detach())
            out = out + quantized
            indices.append(idx)
            losses.append(loss)
        return out, torch.stack(indices, dim=-1), torch.stack(losses, dim=-1)

    def get_codes_from_indices(self, indices):
        """Every level's scaled codes [num_quantizers, ..., d] of indices [..., q] (q <= num_quantizers; missing
        levels and index -1 give zeros)."""
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(f"vqkernels.nn.{type(self).__name__}: indices have {q} levels, the layer "
                             f"{self.num_quantizers}")
        return self._codes(indices, self.num_quantizers)

    def _codes(self, indices, num_levels):
        """[num_levels, ..., d]: the codes of the levels of ``indices`` [..., q], zeros for index -1 and for the
        levels past q."""
        q = indices.shape[-1]
        codes = []
        for level in range(num_levels):
            if level >= q:
                codes.append(torch.zeros_like(codes[0]))
                continue
            i = indices[..., level]
            codes.append(self._level_codebook(level)[i.clamp_min(0).long()].masked_fill((i < 0).unsqueeze(-1), 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices):
        """The summed scaled codes of indices [..., q], projected out."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))


class ResidualVQ(ResidualLevels):
    """Residual vector quantization, a drop-in for vector-quantize-pytorch's ``ResidualVQ``.

    All levels run in one fused op (:func:`vqkernels.residual_quantize`): each row's residual
    stays in cache across the levels. ``forward(x)`` returns ``(quantized, indices, losses)``:
    quantized in x's layout, indices [..., num_quantizers] (-1 for levels removed by quantize
    dropout), losses [num_quantizers] (``commitment_weight`` times the RQ-VAE commitment
    mean ||x - sg(q_1 + ... + q_l)||^2 of each level in training, zeros in eval mode).

    Gradients: the quantized sum is straight-through (or rotated onto x with
    ``rotation_trick``, on the sum); every level's commitment term reaches x (RQ-VAE's loss;
    vector-quantize-pytorch's per-level straight-through lets only the first level's reach x).

    Keywords: ``dim``, ``codebook_size`` (one int, or one per level: a sequence whose length gives
    ``num_quantizers``; levels of different sizes run in the same fused op, the smaller codebooks
    padded with rows of NaN, which are never chosen), ``num_quantizers``, ``codebook_dim``, ``shared_codebook``,
    ``quantize_dropout``, ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``,
    ``accept_image_fmap``, ``beam_size``, ``eval_beam_size``; every other keyword goes to each level's
    :class:`VectorQuantize` (e.g. ``decay, eps, kmeans_init, threshold_ema_dead_code, commitment_weight,
    rotation_trick, ema_update, learnable_codebook, freeze_codebook, channel_last``), which accepts or
    refuses it as it would on its own.

    ``quant_grad_frac > 0``, and any level option the fused op does not honour (``use_cosine_sim``,
    ``stochastic_sample_codes``, ``orthogonal_reg_weight``, ``affine_param``, ``directional_reparam``, the
    in-place optimizer, ... : everything but ``decay, eps, kmeans_init, kmeans_iters, threshold_ema_dead_code,
    commitment_weight, rotation_trick, ema_update, learnable_codebook, freeze_codebook, channel_last,
    sync_codebook``) run the levels one by one as vector-quantize-pytorch does (tokens [B, N, D] only): each
    level's :class:`VectorQuantize` quantizes what the previous levels left, the residual takes
    ``quant_grad_frac`` of the level's gradient, and ``losses`` are each level's own loss; a shared codebook
    gathers every level's statistics and is recomputed (and restarts dead codes) at the end of the step.
    Forward's ``sample_codebook_temp`` and ``rand_quantize_dropout_fixed_seed`` work on both paths.

    Beam search: the fused op keeps the beams of lowest total error. There, or with
    ``beam_score_quantizer_weights``, it runs as theirs instead: each level's VectorQuantize top-k, a beam's score
    minus the sum of its levels' per-token losses times the level weights; in training every level then learns
    from the winning beam's inputs (theirs updates only the first level there: it takes level 0 of its stacked
    inputs where it means beam 0).
    ``diveq=True`` (DiVeQ) runs there too: learned codes, no EMA or commitment loss, the levels' full gradient,
    and the output reparametrised along the direction to the input with noise (as theirs).
    ``implicit_neural_codebook=True`` (QINCo, with ``mlp_kwargs``: ``dim_hidden``, ``depth``) runs there as well:
    each level after the first transforms its learned codes with an MLP conditioned on the reconstruction so
    far; the search runs in row chunks without gradients and only the chosen codes are transformed again with
    gradients (:mod:`vqkernels.nn.implicit_codebook`), so memory stays O(chunk K D + N D) where theirs builds
    every token's codebook with autograd ([B, N, K, D]).

    Forward: ``mask`` [B, N] bool for padded token sequences (padded tokens: index -1 at every level, output 0
    or the input with ``return_zeros_for_masked_padding=False``, no loss, no codebook update; the fused path
    takes the losses over the unpadded rows from the chosen codes and hands the EMA kernel index -1), and
    ``return_all_codes`` (a fourth result, every level's codes [num_quantizers, ..., codebook_dim]).
    """

    dropout_needs_grad = False  # their ResidualVQ drops levels in training whether gradients are on or not

    def __init__(self, *, dim, codebook_size, num_quantizers=None, codebook_dim=None, shared_codebook=False,
                 quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
                 accept_image_fmap=False, beam_size=None, eval_beam_size=None, quant_grad_frac=0.0, diveq=False,
                 implicit_neural_codebook=False, mlp_kwargs=None, beam_score_quantizer_weights=None, **kwargs):
        super().__init__()
        reject_unsupported("ResidualVQ", {k: kwargs.pop(k) for k in list(kwargs) if k not in _LEVEL_KEYWORDS},
                           _RVQ_UNSUPPORTED)
        self.diveq = diveq
        if diveq:  # DiVeQ: learned codes, the levels' full gradient, the output reparametrised (as theirs)
            kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                          commitment_weight=0.0)
            quant_grad_frac = 1.0
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:  # QINCo: learned codes, transformed per token by the level's MLP
            kwargs.update(learnable_codebook=True, ema_update=False)
        sizes = _level_sizes(codebook_size, num_quantizers)
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("ResidualVQ: eval_beam_size needs beam_size")
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        self._setup("ResidualVQ", dim, self.codebook_dim, len(sizes), quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of)
        self.codebook_sizes = sizes
        self.codebook_size = sizes[0]  # the first level's, as vector-quantize-pytorch's property
        self.uniform_codebook_size = len(set(sizes)) == 1
        if shared_codebook and not self.uniform_codebook_size:
            raise ValueError(f"ResidualVQ: shared_codebook needs one codebook size, got per-level sizes {sizes}")
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = kwargs.get("accept_3d_fmap", False)  # the levels take it too (and check it)
        self.channel_last = kwargs.get("channel_last", True)
        self.return_zeros_for_masked_padding = kwargs.get("return_zeros_for_masked_padding", True)
        self.quant_grad_frac = quant_grad_frac
        level_options = sorted(k for k, v in kwargs.items()
                               if k not in _FUSED_LEVEL_KEYWORDS and v is not _VQ_DEFAULTS.get(k) and
                               not (isinstance(v, (bool, int, float)) and v == _VQ_DEFAULTS.get(k)))
        self.by_level = bool(level_options) or quant_grad_frac > 0 or implicit_neural_codebook
        if beam_score_quantizer_weights is not None and len(beam_score_quantizer_weights) != len(sizes):
            raise ValueError(f"ResidualVQ: beam_score_quantizer_weights needs one weight per level ({len(sizes)})")
        self.beam_score_weights = beam_score_quantizer_weights
        # beam search level by level, as theirs (VectorQuantize's topk per level, scores weighted per level)
        self.level_beam = self.by_level or beam_score_quantizer_weights is not None
        if (self.by_level and self.channel_first) or (self.level_beam and beam_size is not None and
                                                      (self.channel_first or implicit_neural_codebook)):
            raise ValueError(f"ResidualVQ: {', '.join(level_options) or 'quant_grad_frac / implicit_neural_codebook'} "
                             f"or a level-by-level beam search run for tokens [B, N, D] (a beam search not with "
                             f"implicit_neural_codebook)")
        if self.by_level and shared_codebook:  # as theirs: statistics per level, the codes and restarts at the end
            kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        self.layers = nn.ModuleList(
            VectorQuantize(dim=self.codebook_dim, codebook_size=size, accept_image_fmap=accept_image_fmap,
                           **kwargs) for size in sizes)
        self.mlps = nn.ModuleList(
            ImplicitCodebook(self.codebook_dim, l2norm_output=kwargs.get("use_cosine_sim", False), **(mlp_kwargs or {}))
            for _ in sizes[1:]) if implicit_neural_codebook else None
        self.shared_codebook = shared_codebook
        if shared_codebook:  # as vector-quantize-pytorch: every level holds the first level's codebook module
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        first = self.layers[0]
        self.commitment_weight, self.rotation_trick = first.commitment_weight, first.rotation_trick
        self.learnable_codebook, self.freeze_codebook = first.learnable_codebook, first.freeze_codebook

    def _stacked_codebooks(self, levels):
        """The first ``levels`` codebooks as one [levels, max K, D] tensor for the fused op, smaller ones padded
        with NaN rows (never chosen)."""
        embeds = [layer._codebook.embed[0] for layer in self.layers[:levels]]
        k = max(e.shape[0] for e in embeds)
        return torch.stack([e if e.shape[0] == k else F.pad(e, (0, 0, 0, k - e.shape[0]), value=float("nan"))
                            for e in embeds])

    @torch.no_grad()
    def _kmeans_init_levels(self, rows):
        """k-means init of the levels that need it, each from its own residual."""
        residual = rows.detach().float()
        for layer in self.layers:
            cb = layer._codebook
            if cb.needs_init:
                cb.init_embed_([residual])
            idx, _ = ops.nearest_code(residual, cb.embed[0])
            residual = residual - cb.embed[0][idx]

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=None, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        reject_unsupported("ResidualVQ.forward", dict(indices=indices), dict(indices=None))
        beams = beam_size if beam_size is not None else (self.beam_size if self.training else self.eval_beam_size)
        if self.level_beam and beams is not None and beams > 1:
            if self.mlps is not None:
                raise ValueError("ResidualVQ: beam search does not run with implicit_neural_codebook")
            result = self._forward_beam_by_level(x, freeze_codebook, mask, beams, rand_quantize_dropout_fixed_seed)
        elif self.by_level:
            result = self._forward_by_level(x, freeze_codebook, mask, sample_codebook_temp, rand_quantize_dropout_fixed_seed)
        else:  # no level samples or reads the temperature on this path
            result = self._forward_fused(x, mask, freeze_codebook, beam_size, rand_quantize_dropout_fixed_seed)
        if return_all_codes:  # every level's codes [num_quantizers, ..., codebook_dim] (zeros for index -1)
            return (*result, self.get_codes_from_indices(result[1]))
        return result

    def _forward_fused(self, x, mask, freeze_codebook, beam_size, seed):
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        layout = Layout("ResidualVQ", x, self.dim, self.accept_image_fmap, self.channel_last, self.accept_3d_fmap)
        tokens = layout.tokens(x)
        b, n = tokens.shape[:2]
        token_mask = self._token_mask(mask, layout, tokens)
        row_mask = None if token_mask is None else token_mask.reshape(-1)
        rows = self.project_in(tokens).reshape(-1, self.codebook_dim)
        if self.training and any(layer._codebook.needs_init for layer in self.layers):
            self._kmeans_init_levels(rows if row_mask is None else rows[row_mask])
        levels = self._levels_this_step(seed)
        if beam_size is None:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        cb0 = self.layers[0]._codebook
        updates = self.training and not freeze and cb0.tracks_statistics
        learn = self.learnable_codebook and not freeze
        if self.shared_codebook:
            codebooks = cb0.embed[0] if learn else cb0.embed[0].detach()
            if updates and self.learnable_codebook:
                codebooks = codebooks.clone()  # the levels' updates write the shared Parameter in place
        else:
            codebooks = self._stacked_codebooks(levels)
            codebooks = codebooks if learn else codebooks.detach()
        q, idx, commit, codebook_loss = ops.residual_quantize(rows, codebooks, levels, beam_size or 1)
        if row_mask is not None:
            idx = idx.masked_fill(~row_mask.unsqueeze(1), -1)
        if self.training:
            q = route_gradient(rows, q, self.rotation_trick)
            if row_mask is None:
                losses = training_losses(commit, codebook_loss, self.commitment_weight, learn)
            else:
                losses = self._masked_losses(rows, codebooks, idx, row_mask.float(), learn)
            if updates:
                self._update_codebooks(rows, codebooks.detach(), idx, row_mask)
        else:
            losses = commit.new_zeros(levels, dtype=torch.float32)
        if levels < self.num_quantizers:
            idx = torch.cat([idx, idx.new_full((idx.shape[0], self.num_quantizers - levels), -1)], dim=1)
            losses = torch.cat([losses, losses.new_zeros(self.num_quantizers - levels)])
        out = self.project_out(q.reshape(b, n, self.codebook_dim).to(x.dtype))
        out = self._pad_masked(out, tokens, token_mask)
        return layout.restore(out), layout.indices(idx.reshape(b, n, self.num_quantizers)), losses

    def _token_mask(self, mask, layout, tokens):
        """forward's ``mask`` as a [B, N] bool tensor (None without one); tokens only, as vector-quantize-pytorch."""
        if mask is None:
            return None
        b, n = tokens.shape[:2]
        if layout.image or layout.only_one:
            raise ValueError("ResidualVQ: mask works with sequences of tokens, not feature maps or single tokens")
        if mask.shape != (b, n) or mask.dtype != torch.bool:
            raise ValueError(f"ResidualVQ: mask must be a bool [B={b}, N={n}] tensor, got {mask.dtype} of shape "
                             f"{tuple(mask.shape)}")
        return mask

    def _pad_masked(self, out, tokens, token_mask):
        """Outputs [B, N, dim] of padded tokens: 0, or the input with return_zeros_for_masked_padding=False."""
        if token_mask is None:
            return out
        keep = token_mask.unsqueeze(-1)
        return out.masked_fill(~keep, 0.0) if self.return_zeros_for_masked_padding else torch.where(keep, out, tokens)

    def _masked_losses(self, rows, codebooks, idx, weights, learn):
        """The fused op's per-level losses over the unpadded rows only: the commitment mean ||r_l - sg(q_l)||^2
        (r_l = x - sg(q_1 + ... + q_{l-1})) reaching x, and for learned codebooks the codebook term
        ||q_l - sg(r_l)||^2 reaching level l's codes; computed from the chosen codes, O(N D) per level."""
        residual = rows.detach().float()
        losses = []
        for level in range(idx.shape[1]):
            book = codebooks if codebooks.dim() == 2 else codebooks[level]
            q = book.index_select(0, idx[:, level].clamp(min=0)).float()
            nxt = residual - q.detach()
            commit = masked_mean((rows.float() - rows.detach().float() + nxt).square(), weights)
            codebook_term = masked_mean((residual - q).square(), weights) if learn else commit
            losses.append(training_losses(commit, codebook_term, self.commitment_weight, learn))
            residual = nxt
        return torch.stack(losses)

    def _forward_by_level(self, x, freeze_codebook, mask, sample_codebook_temp, seed):
        """vector-quantize-pytorch's level loop (cosine levels, or a residual that keeps quant_grad_frac of the
        gradient): (quantized, indices [B, N, num_quantizers], every level's own loss)."""
        layout = Layout("ResidualVQ", x, self.dim)  # tokens [B, N, dim], checked
        token_mask = self._token_mask(mask, layout, x)
        xin = self.project_in(x)
        inputs = []
        out, indices, losses = self._quantize(xin, seed, inputs, freeze_codebook=freeze_codebook, mask=token_mask,
                                              sample_codebook_temp=sample_codebook_temp)
        if self.shared_codebook and self.training:
            self._finish_shared_step(inputs, token_mask)
        if self.diveq:
            out = directional_reparam(xin, out, DIVEQ_VARIANCE)
        return self._pad_masked(self.project_out(out), x, token_mask), indices, losses

    def _level(self, level, residual, so_far, freeze_codebook=None, mask=None, sample_codebook_temp=None):
        if self.mlps is None or level == 0:
            return super()._level(level, residual, so_far, freeze_codebook=freeze_codebook, mask=mask,
                                  sample_codebook_temp=sample_codebook_temp)
        return self._implicit_level(level, residual, so_far, freeze_codebook, mask)

    def _implicit_level(self, level, residual, so_far, freeze_codebook, mask):
        """A QINCo level: the nearest of the codes transformed under ``so_far`` (searched in chunks without
        gradients), the chosen ones transformed again with gradients (to the codes, the MLP and ``so_far``);
        then as a VectorQuantize level with a learned codebook: rotation / straight-through to the residual,
        the commitment mse with gradients to both sides, statistics for dead-code restart."""
        layer, mlp = self.layers[level], self.mlps[level - 1]
        cb = layer._codebook
        d = self.codebook_dim
        freeze = layer.freeze_codebook if freeze_codebook is None else freeze_codebook
        rows = cb.transform_input(residual).reshape(-1, d)
        condition = so_far.reshape(-1, d)
        embed = layer._embed(0, not freeze)
        idx = mlp.search(rows.detach(), condition.detach(), embed.detach(), cb.metric)
        codes = mlp(embed.index_select(0, idx), condition)
        row_mask = None if mask is None else mask.reshape(-1)
        if row_mask is not None:
            idx = idx.masked_fill(~row_mask, -1)
        loss = residual.new_zeros((), dtype=torch.float32)
        q = codes
        if layer.training:
            err = (codes.float() - rows.float()).square()
            if layer.has_commitment_loss:
                commit = err.mean() if row_mask is None else masked_mean(err, row_mask.float())
                loss = commit * layer.commitment_weight
            q = layer._route(rows, rows + (codes - rows).detach(), codes)
            if cb.tracks_statistics and not freeze:
                cb.update_(0, rows, idx, valid=row_mask)
        q = q.reshape(residual.shape).to(residual.dtype)  # as the other levels: the residual's dtype
        if mask is not None:
            q = q.masked_fill(~mask.unsqueeze(-1), 0.0) if layer.return_zeros_for_masked_padding else \
                torch.where(mask.unsqueeze(-1), q, residual)
        return q, idx.reshape(residual.shape[:-1]), loss

    def _codes(self, indices, num_levels):
        if self.mlps is None:
            return super()._codes(indices, num_levels)
        codes, so_far = [], 0.0
        for level in range(num_levels):
            i = indices[..., level] if level < indices.shape[-1] else torch.full_like(indices[..., 0], -1)
            code = self._level_codebook(level)[i.clamp_min(0).long()]
            if level > 0:
                code = self.mlps[level - 1](code, torch.as_tensor(so_far).to(code).expand_as(code))
            code = code.masked_fill((i < 0).unsqueeze(-1), 0.0)
            so_far = so_far + code
            codes.append(code)
        return torch.stack(codes)

    def _forward_beam_by_level(self, x, freeze_codebook, mask, beam_size, seed):
        """vector-quantize-pytorch's beam search: each level's VectorQuantize gives every beam's ``beam_size``
        nearest codes with their per-token losses; a beam's score is minus the sum of its levels' losses times
        ``beam_score_quantizer_weights``; the best ``beam_size`` beams go on (the best one after the last level).
        In training the levels' codebooks then learn from the winning beam's inputs and codes."""
        layout = Layout("ResidualVQ", x, self.dim)  # tokens [B, N, dim], checked
        token_mask = self._token_mask(mask, layout, x)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        xin = self.project_in(x)
        b, n, d = xin.shape
        levels = self._levels_this_step(seed)
        weights = self.beam_score_weights or [1.0] * self.num_quantizers
        frac = self.quant_grad_frac
        residual, out = xin.unsqueeze(2), torch.zeros_like(xin).unsqueeze(2)  # [b, n, beams, d]
        scores = xin.new_zeros(b, n, 1, dtype=torch.float32)
        inputs, codes, losses = xin.new_zeros(b, n, 1, 0, d), xin.new_zeros(b, n, 1, 0, dtype=torch.long), \
            xin.new_zeros(b, n, 1, 0, dtype=torch.float32)
        for level in range(levels):
            j = residual.shape[2]
            inputs = torch.cat([inputs, residual.unsqueeze(3)], dim=3)
            level_mask = None if token_mask is None else token_mask.repeat_interleave(j, dim=1)
            q, idx, loss = self.layers[level](residual.reshape(b, n * j, d), topk=beam_size, mask=level_mask,
                                              freeze_codebook=freeze_codebook)
            k = idx.shape[-1]
            q, idx, loss = q.reshape(b, n, j, k, d), idx.reshape(b, n, j, k), loss.reshape(b, n, j, k)
            scores = (scores.unsqueeze(-1) - loss * weights[level]).reshape(b, n, j * k)
            step = q * frac + q.detach() * (1 - frac) if frac else q.detach()
            residual = (residual.unsqueeze(3) - step).reshape(b, n, j * k, d)
            out = (out.unsqueeze(3) + q).reshape(b, n, j * k, d)
            codes = torch.cat([codes.unsqueeze(3).expand(b, n, j, k, level), idx.unsqueeze(-1)], -1).reshape(
                b, n, j * k, level + 1)
            losses = torch.cat([losses.unsqueeze(3).expand(b, n, j, k, level), loss.unsqueeze(-1)], -1).reshape(
                b, n, j * k, level + 1)
            inputs = inputs.unsqueeze(3).expand(b, n, j, k, level + 1, d).reshape(b, n, j * k, level + 1, d)
            keep = beam_size if level < levels - 1 else 1
            if scores.shape[-1] > keep:
                scores, chosen = scores.topk(keep, dim=-1)
                residual, out, codes, losses = (
                    t.gather(2, chosen.view(b, n, keep, 1).expand(b, n, keep, t.shape[-1]))
                    for t in (residual, out, codes, losses))
                inputs = inputs.gather(2, chosen.view(b, n, keep, 1, 1).expand(b, n, keep, level + 1, d))
        out, codes, losses, inputs = out[:, :, 0], codes[:, :, 0], losses[:, :, 0], inputs[:, :, 0]
        if token_mask is None:
            level_losses = losses.mean((0, 1))
        else:
            level_losses = (losses * token_mask.unsqueeze(-1)).sum((0, 1)) / token_mask.sum().clamp(min=1e-4)
        if self.training and not freeze:
            for level in range(levels):
                self.layers[level].update_indices(inputs[:, :, level], codes[..., level], mask=token_mask)
            if self.shared_codebook:
                self._finish_shared_step(list(inputs.unbind(2)), token_mask)
        if levels < self.num_quantizers:
            codes = torch.cat([codes, codes.new_full((b, n, self.num_quantizers - levels), -1)], dim=-1)
            level_losses = torch.cat([level_losses, level_losses.new_zeros(self.num_quantizers - levels)])
        return self._pad_masked(self.project_out(out), x, token_mask), codes, level_losses

    def _finish_shared_step(self, inputs, token_mask):
        """The end of a level-by-level step on the shared codebook (vector-quantize-pytorch's order): codes from
        the statistics every level gathered, the in-place optimizer's step, then dead-code restart from the
        inputs of all levels (the unpadded ones)."""
        first = self.layers[0]
        if first.ema_update:
            first.update_ema()
        first.update_in_place_optimizer()
        rows = torch.cat([first._codebook.transform_input(r).reshape(-1, self.codebook_dim) for r in inputs])
        valid = None if token_mask is None else token_mask.reshape(-1).repeat(len(inputs))
        first._codebook.expire_(0, rows, valid)

    @torch.no_grad()
    def _update_codebooks(self, rows, codebooks, idx, row_mask=None):
        """EMA update (and dead-code restart from the unpadded rows) of each level from its own residual input."""
        residual = rows.detach().float()
        for level in range(idx.shape[1]):
            used = codebooks if codebooks.dim() == 2 else codebooks[level]
            self.layers[level]._codebook.update_(0, residual, idx[:, level], valid=row_mask)
            residual = residual - used.float().index_select(0, idx[:, level].clamp_min(0))  # (2.4x faster than [])

    def get_codes_from_indices(self, indices):
        """Codes of the levels of ``indices`` [..., q], [q, ..., codebook_dim] (zeros where an index is -1)."""
        return self._codes(indices, indices.shape[-1])

    @property
    def channel_first(self):
        """Whether inputs and outputs carry the features on dim 1."""
        return self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last

    def get_output_from_indices(self, indices):
        """The layer's output for ``indices`` [..., num_quantizers]: summed codes, out projection."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        return out.movedim(-1, 1) if self.channel_first else out


class Grouped(nn.Module):
    """``groups`` independent residual quantizers (``make(dim // groups)``) over equal slices of the feature
    dimension: their outputs side by side, their other results stacked (indices [groups, ...], ...)."""

    def __init__(self, owner, make, dim, groups):
        super().__init__()
        if dim % groups:
            raise ValueError(f"{owner}: dim={dim} is not divisible by groups={groups}")
        self.owner, self.dim, self.groups = owner, dim, groups
        self.rvqs = nn.ModuleList(make(dim // groups) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self):
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self):
        return 1 if self.rvqs[0].channel_first else -1

    def forward(self, x, **kwargs):
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"{self.owner}: expected {self.dim} features on dim {self.split_dim}, "
                             f"got shape {tuple(x.shape)}")
        outs = [rvq(chunk, **kwargs) for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, *rest = zip(*outs)
        return (torch.cat(quantized, dim=self.split_dim), *(torch.stack(r) for r in rest))

    def get_codes_from_indices(self, indices):
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices):
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)],
                         dim=self.split_dim)


class GroupedResidualVQ(Grouped):
    """``groups`` independent :class:`ResidualVQ` over equal slices of the feature dimension
    (vector-quantize-pytorch's ``GroupedResidualVQ``). Returns ``(quantized, indices [groups, ...,
    num_quantizers], losses [groups, num_quantizers])``."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__("GroupedResidualVQ", lambda d: ResidualVQ(dim=d, accept_image_fmap=accept_image_fmap, **kwargs),
                         dim, groups)
        self.accept_image_fmap = accept_image_fmap
