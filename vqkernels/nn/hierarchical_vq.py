"""``HierarchicalVQ``: multi-scale residual vector quantization of sequences, images and videos,
a drop-in for vector-quantize-pytorch's ``HierarchicalVQ``, on :class:`vqkernels.nn.VectorQuantize`.

Per level l (scales coarse to fine)::

    down_l  = adaptive_avg_pool(residual, scale_l)          # masked average with a mask
    q_l     = VectorQuantize(down_l)                          # the shared codebook or level l's
    h_l     = phi(interpolate(q_l, full size))                # linear / bilinear / trilinear, then
                                                              # phi(h) = lerp(h, conv3(h), quant_resi)
    reconstruction += h_l;   residual -= h_l

The commitment loss is the mean of the levels' losses; nested dropout keeps, in training, the
reconstruction after a random level (and the mean of the kept levels' losses).
"""

import random

import torch
import torch.nn.functional as F
from torch import nn

from .vq import VectorQuantize

_MASK_EPS = 1e-6        # the clamp of the pooled mask that divides a level's masked sums (theirs)
_IDENTITY_RATIO = 1e-8  # phi is the identity at |quant_resi| at or below this (theirs)


def level_shape(scale, spatial_dims):
    """A scale (an int, or one size per spatial dimension) as the level's spatial shape."""
    shape = (scale,) * spatial_dims if isinstance(scale, int) else tuple(int(s) for s in scale)
    if len(shape) != spatial_dims:
        raise ValueError(f"HierarchicalVQ: scale {scale!r} must give {spatial_dims} sizes (one per spatial dimension)")
    return shape


@torch.compiler.disable  # run eagerly: Python's random traced by torch.compile is not drawn afresh per call
def draw_cutoff(num_levels, probability, min_levels, rng=random):
    """Nested dropout's host draw, as vector-quantize-pytorch's ``sample_nested_cutoff`` from a ``random.Random``
    in the same state: with ``probability``, the last level kept, uniform from ``min_levels - 1`` to
    ``num_levels - 2``; else None (every level). Python's ``random`` (or ``rng``): nothing is read back."""
    if rng.random() >= probability:
        return None
    return rng.randrange(min_levels - 1, num_levels - 1)


class ResidualConv(nn.Module):
    """phi: ``lerp(h, conv(h), |ratio|)`` with a size-3 'same' convolution of ``spatial_dims`` dimensions; the
    identity for a ratio of (almost) 0, the convolution then kept unused (theirs: checkpoints carry it). Under
    autocast the convolution's result is cast back to h's dtype (theirs fails there: lerp of two dtypes)."""

    def __init__(self, dim, spatial_dims, ratio):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1](dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(ratio))

    def forward(self, h):
        if self.resi_ratio <= _IDENTITY_RATIO:
            return h
        return h.lerp(self.conv(h).to(h.dtype), self.resi_ratio)  # under autocast the conv's dtype differs


class HierarchicalVQ(nn.Module):
    """Multi-scale residual VQ (vector-quantize-pytorch's ``HierarchicalVQ``: keywords, defaults, results and
    ``state_dict`` keys are theirs, so their checkpoints load).

    Inputs: [B, dim, L] sequences, [B, dim, H, W] with ``accept_image_fmap``, [B, dim, T, H, W] with
    ``accept_3d_fmap`` (features last, [B, ..., dim], with ``channel_first=False``). ``scales``: each level's
    spatial size, coarse to fine (non-decreasing; an int for every spatial dimension or one per dimension);
    the input may have any spatial size, each level pools to its own.

    ``forward(x, mask=None, lens=None, return_cutoff=False)`` returns ``(reconstruction, indices, loss)``:
    the reconstruction in x's layout, a tuple with every level's indices [B, *scale], the mean of the
    levels' commitment losses (0 in eval mode); with ``return_cutoff`` a fourth item, the last level nested
    dropout kept (None: all). ``mask`` [B, *spatial] bool (or ``lens`` [B] for sequences): a level's token
    averages the valid positions of its window and counts as valid when any is (else index -1, no update, no
    loss); padded positions of the reconstruction are 0.

    Every level runs every training step (each updates its codebook); nested dropout (``nested_dropout``
    the probability, ``nested_dropout_min_levels`` the fewest levels kept) only cuts the reconstruction and
    the loss. Its draw is made on the host from Python's ``random`` (theirs seeds a ``random.Random`` from
    torch's generator on x's device, read back, all-reduced across ranks: here each rank draws from its own
    Python ``random``; every level runs either way, so ranks never wait on each other).

    ``shared_codebook``: one :class:`VectorQuantize` (``vq``) for every level, else one per level (``vqs``,
    ``codebook_size`` may then give one size per level). ``quant_resi`` / ``share_quant_resi``: phi's ratio
    and sharing (1: one phi, ``phi_shared``; K > 1: K phis, ``phi_levels``, level l taking phi
    ``round(l / (levels - 1) * (K - 1))``; 0 or less: one per level). The codebook keywords (``decay``,
    ``commitment_weight``, ``rotation_trick``, ``kmeans_init``, ``kmeans_iters``, ``threshold_ema_dead_code``,
    ``orthogonal_reg_*``, ``sync_codebook``, ``stochastic_sample_codes`` with ``sample_codebook_temp``, which
    forward's ``sample_codebook_temp`` overrides) go to every :class:`VectorQuantize`, which refuses what it
    does not support.
    """

    def __init__(self, *, dim, codebook_size, scales, shared_codebook=True, channel_first=True, sync_codebook=None,
                 decay=0.99, commitment_weight=1.0, rotation_trick=False, kmeans_init=True, kmeans_iters=10,
                 threshold_ema_dead_code=2, stochastic_sample_codes=False, sample_codebook_temp=0.1,
                 orthogonal_reg_weight=0.0, orthogonal_reg_max_codes=128, orthogonal_reg_active_codes_only=False,
                 quant_resi=0.5, share_quant_resi=1, nested_dropout=0.0, nested_dropout_min_levels=1,
                 accept_image_fmap=False, accept_3d_fmap=False):
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("HierarchicalVQ: accept_image_fmap and accept_3d_fmap exclude each other")
        if not 0.0 <= nested_dropout <= 1.0:
            raise ValueError(f"HierarchicalVQ: nested_dropout must be in [0, 1], got {nested_dropout}")
        if nested_dropout_min_levels < 1:
            raise ValueError(f"HierarchicalVQ: nested_dropout_min_levels must be >= 1, got {nested_dropout_min_levels}")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        shapes = tuple(level_shape(scale, spatial_dims) for scale in scales)
        if not shapes or any(s < 1 for shape in shapes for s in shape):
            raise ValueError(f"HierarchicalVQ: scales must name at least one level, all sizes >= 1, got {scales!r}")
        if any(a > b for prev, curr in zip(shapes, shapes[1:]) for a, b in zip(prev, curr)):
            raise ValueError(f"HierarchicalVQ: scales must be non-decreasing, got {scales!r}")
        sizes = (codebook_size,) * len(shapes) if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != len(shapes):
            raise ValueError(f"HierarchicalVQ: {len(sizes)} codebook sizes for {len(shapes)} levels")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"HierarchicalVQ: a shared codebook needs one codebook size, got {sizes}")

        self.dim, self.spatial_dims, self.channel_first = dim, spatial_dims, channel_first
        self.scales, self.level_shapes, self.num_levels = tuple(scales), shapes, len(shapes)
        self.codebook_sizes = sizes
        self.nested_dropout, self.nested_dropout_min_levels = nested_dropout, nested_dropout_min_levels

        def make_vq(size):
            return VectorQuantize(dim=dim, codebook_size=size, decay=decay, commitment_weight=commitment_weight,
                                  rotation_trick=rotation_trick, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                                  threshold_ema_dead_code=threshold_ema_dead_code,
                                  stochastic_sample_codes=stochastic_sample_codes,
                                  sample_codebook_temp=sample_codebook_temp,
                                  orthogonal_reg_weight=orthogonal_reg_weight,
                                  orthogonal_reg_max_codes=orthogonal_reg_max_codes,
                                  orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
                                  sync_codebook=sync_codebook, channel_last=True)

        self.vq = make_vq(sizes[0]) if shared_codebook else None
        self.vqs = None if shared_codebook else nn.ModuleList(make_vq(size) for size in sizes)

        if share_quant_resi == 1:
            self.phi_shared, self.phi_levels = ResidualConv(dim, spatial_dims, quant_resi), None
            self._phi_ids = (0,) * self.num_levels
        else:
            count = self.num_levels if share_quant_resi <= 0 else min(self.num_levels, int(share_quant_resi))
            if count < 1:
                raise ValueError(f"HierarchicalVQ: share_quant_resi={share_quant_resi} gives no phi")
            self.phi_shared = None
            self.phi_levels = nn.ModuleList(ResidualConv(dim, spatial_dims, quant_resi) for _ in range(count))
            # level l's phi: its position l / (levels - 1) on the phis (Python's round, as theirs)
            self._phi_ids = tuple(round(level / max(self.num_levels - 1, 1) * (count - 1))
                                  for level in range(self.num_levels))

    def get_vq(self, level_index):
        """The :class:`VectorQuantize` of a level (the shared one with ``shared_codebook``)."""
        return self.vq if self.vq is not None else self.vqs[level_index]

    def sample_nested_cutoff(self):
        """This forward's nested dropout cutoff: the last level kept, or None (every level: in eval mode, without
        nested dropout, or when ``nested_dropout_min_levels`` keeps them all)."""
        if not self.training or self.nested_dropout <= 0 or self.nested_dropout_min_levels >= self.num_levels:
            return None
        return draw_cutoff(self.num_levels, self.nested_dropout, self.nested_dropout_min_levels)

    def _phi(self, level):
        return self.phi_shared if self.phi_shared is not None else self.phi_levels[self._phi_ids[level]]

    def _pool(self, residual, shape, mask):
        """The residual [B, C, *full] averaged to the level's ``shape`` (over the valid positions with ``mask``
        [B, 1, *full] of 0 / 1) and the level's [B, n] token mask (None without a mask)."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.spatial_dims - 1]
        if mask is None:
            return (residual if tuple(residual.shape[2:]) == shape else pool(residual, shape)), None
        pooled_mask = pool(mask, shape)
        down = pool(residual * mask, shape) / pooled_mask.clamp(min=_MASK_EPS)
        return down, (pooled_mask > 0).reshape(mask.shape[0], -1)

    def _expand(self, q, full_shape, level):
        """A level's codes [B, C, *scale] at the input's spatial size, through the level's phi."""
        if tuple(q.shape[2:]) != full_shape:
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            q = F.interpolate(q, size=full_shape, mode=mode, align_corners=False)
        return self._phi(level)(q)

    def _channel_first_input(self, x):
        """x as [B, dim, *spatial], with a clear error for another rank or feature count."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1 if self.channel_first else -1] != self.dim:
            spatial = ("L", "H, W", "T, H, W")[self.spatial_dims - 1]
            layout = f"[B, dim, {spatial}]" if self.channel_first else f"[B, {spatial}, dim]"
            raise ValueError(f"HierarchicalVQ: expects {layout} inputs with dim={self.dim}, got shape {tuple(x.shape)}")
        x = x if self.channel_first else x.movedim(-1, 1)
        if 0 in x.shape[2:]:
            raise ValueError(f"HierarchicalVQ: every spatial size must be >= 1 (the levels pool from them), got shape "
                             f"{tuple(x.shape)}")
        return x

    def _full_mask(self, mask, lens, x):
        """forward's ``mask`` / ``lens`` as a bool [B, *spatial] mask (None without either)."""
        if mask is not None and lens is not None:
            raise ValueError("HierarchicalVQ: pass mask or lens, not both")
        spatial = tuple(x.shape[2:])
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("HierarchicalVQ: lens works with 1-D sequences only (use mask)")
            return torch.arange(spatial[0], device=x.device) < lens.to(x.device).unsqueeze(-1)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *spatial)):
            raise ValueError(f"HierarchicalVQ: mask must be a bool [B, *spatial] = {[x.shape[0], *spatial]} tensor, "
                             f"got {mask.dtype} of shape {tuple(mask.shape)}")
        return None if mask is None else mask.to(x.device)

    def forward(self, x, indices=None, mask=None, lens=None, sample_codebook_temp=None, return_cutoff=False):
        if indices is not None:
            raise ValueError("HierarchicalVQ: forward does not reconstruct from indices (as theirs); "
                             "use get_output_from_indices")
        x = self._channel_first_input(x)
        mask = self._full_mask(mask, lens, x)
        full_shape = tuple(x.shape[2:])
        weights = None if mask is None else mask.unsqueeze(1).to(x.dtype)
        cutoff = self.sample_nested_cutoff()

        temperature = {} if sample_codebook_temp is None else dict(sample_codebook_temp=sample_codebook_temp)
        residual, reconstruction, kept = x, None, None
        all_indices, losses = [], []
        for level, shape in enumerate(self.level_shapes):
            down, level_mask = self._pool(residual, shape, weights)
            b, c = down.shape[:2]
            q, idx, loss = self.get_vq(level)(down.flatten(2).transpose(1, 2), mask=level_mask, **temperature)
            h = self._expand(q.transpose(1, 2).reshape(b, c, *shape), full_shape, level)
            reconstruction = h if reconstruction is None else reconstruction + h
            residual = residual - h
            all_indices.append(idx.reshape(b, *shape))
            losses.append(loss)
            if level == cutoff:
                kept = reconstruction

        if cutoff is not None:
            reconstruction, losses = kept, losses[:cutoff + 1]
        loss = torch.stack(losses).mean()
        if mask is not None:
            reconstruction = reconstruction.masked_fill(~mask.unsqueeze(1), 0.0)
        if not self.channel_first:
            reconstruction = reconstruction.movedim(1, -1)
        if return_cutoff:
            return reconstruction, tuple(all_indices), loss, cutoff
        return reconstruction, tuple(all_indices), loss

    def get_output_from_indices(self, indices, full_shape=None):
        """The reconstruction (forward's in eval mode, no mask) from every level's indices [B, *scale] (index -1: a
        zero code, phi then adding only its bias, as theirs), at spatial size ``full_shape`` (default: the finest
        scale)."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"HierarchicalVQ: indices must be a tuple / list of {self.num_levels} levels' indices")
        full_shape = self.level_shapes[-1] if full_shape is None else level_shape(full_shape, self.spatial_dims)
        reconstruction = None
        for level, (idx, shape) in enumerate(zip(indices, self.level_shapes)):
            if idx.dim() != self.spatial_dims + 1 or tuple(idx.shape[1:]) != shape:
                raise ValueError(f"HierarchicalVQ: level {level}'s indices must be [B, {', '.join(map(str, shape))}], "
                                 f"got shape {tuple(idx.shape)}")
            flat = idx.reshape(idx.shape[0], -1)
            q = self.get_vq(level).get_output_from_indices(flat).masked_fill((flat == -1).unsqueeze(-1), 0.0)
            h = self._expand(q.transpose(1, 2).reshape(idx.shape[0], self.dim, *shape), full_shape, level)
            reconstruction = h if reconstruction is None else reconstruction + h
        return reconstruction if self.channel_first else reconstruction.movedim(1, -1)
