"""Residual scalar quantizers, vector-quantize-pytorch's (1.32.0): ``ResidualFSQ`` / ``GroupedResidualFSQ`` on
:class:`vqkernels.nn.FSQ` (the fused :func:`vqkernels.fsq_quantize`) and ``ResidualLFQ`` / ``GroupedResidualLFQ``
on :class:`vqkernels.nn.LFQ` (:func:`vqkernels.lfq_quantize` and :func:`vqkernels.lfq_entropy`)."""

import inspect
import random

import torch
from torch import nn

from .. import ops
from ._layout import ChannelFirst
from .fsq import FSQ
from .lfq import LFQ
from .residual import Grouped, ResidualLevels

_FSQ_DEFAULTS = {name: p.default for name, p in inspect.signature(FSQ).parameters.items()}
# FSQ keywords that leave a level's quantization as it is here (its input is float32 or float64 and has len(levels)
# features already); any other one set away from its default runs the levels one by one.
_FUSED_FSQ_KEYWORDS = {"scale", "allowed_dtypes", "force_quantization_f32", "projection_has_bias"}


class ResidualFSQ(ResidualLevels):
    """Residual FSQ (Algorithm 1 of arXiv:2107.03312 with FSQ levels), a drop-in for vector-quantize-pytorch's.

    Level l quantizes ``residual / L**-l`` with a symmetry-preserving FSQ (``preserve_symmetry=True``,
    ``bound_hard_clamp`` by default, when the input is first soft-clamped to ``1 + 1 / (L - 1)``) and adds
    back ``codes * L**-l``. ``forward(x)`` returns ``(quantized, indices [..., num_quantizers])`` (and every
    level's scaled codes with ``return_all_codes``); with ``is_channel_first`` the input is [b, d, ...] and,
    as there, the indices [b, num_quantizers, ...]. Quantize dropout (training) keeps a random prefix of the
    levels and gives the others index -1; the draw is on the host (Python's ``random``, or
    ``rand_quantize_dropout_fixed_seed``), where vector-quantize-pytorch reads a device tensor back.
    Other keywords go to every level's :class:`FSQ`; the ``state_dict`` keys are theirs. The levels run in one fused
    op (:func:`vqkernels.residual_fsq_quantize`, the same bits as the level-by-level loop) unless a level keyword
    changes what a level does (``noise_dropout``, ``num_codebooks``, ``channel_first``, ``return_indices``, ...):
    those run level by level. One difference: with ``is_channel_first``, ``return_all_codes`` gives
    [num_quantizers, b, ..., d] (theirs reads its own [b, num_quantizers, ...] indices as if the levels were last).
    """

    def __init__(self, *, levels, num_quantizers, dim=None, is_channel_first=False, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, soft_clamp_input_value=None,
                 bound_hard_clamp=True, **kwargs):
        super().__init__()
        levels = [int(lv) for lv in levels]
        if min(levels) < 2:
            raise ValueError(f"vqkernels.nn.ResidualFSQ: every level must be at least 2, got {levels}")
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError("vqkernels.nn.ResidualFSQ: bound_hard_clamp sets its own soft_clamp_input_value")
        self._setup("ResidualFSQ", dim, len(levels), num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of)
        self.is_channel_first = is_channel_first
        self.levels = levels
        self.layers = nn.ModuleList(FSQ(levels=levels, dim=len(levels), preserve_symmetry=True,
                                        bound_hard_clamp=bound_hard_clamp, **kwargs) for _ in range(num_quantizers))
        self.codebook_size = self.layers[0].codebook_size
        self.bound_hard_clamp = bound_hard_clamp
        self.fused = all(k in _FUSED_FSQ_KEYWORDS or v == _FSQ_DEFAULTS[k] for k, v in kwargs.items())
        lv = torch.tensor(levels).float()
        self.register_buffer("scales", torch.stack([lv ** -level for level in range(num_quantizers)]),
                             persistent=False)
        if bound_hard_clamp:
            soft_clamp_input_value = 1 + 1 / (lv - 1)
        elif isinstance(soft_clamp_input_value, (list, tuple, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value, dtype=torch.float32)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)

    @property
    def channel_first(self):
        return self.is_channel_first

    @property
    def codebooks(self):
        """[num_quantizers, codebook_size, d]: every level's (unscaled) implicit codebook."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def _level_codebook(self, level):
        return self.layers[level].implicit_codebook * self.scales[level]

    def _level(self, level, residual, so_far):
        quantized, indices = self.layers[level](residual / self.scales[level])
        return quantized * self.scales[level], indices, residual.new_zeros(())

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        layout = ChannelFirst(x, self.is_channel_first)
        x = self._project_in(layout.tokens(x))
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value
            x = (x / clamp).tanh() * clamp
        if self.fused:
            out, indices = self._fused_levels(x, rand_quantize_dropout_fixed_seed)
        else:
            out, indices, _ = self._quantize(x, rand_quantize_dropout_fixed_seed)
        out = layout.restore(self.project_out(out))
        indices = layout.indices(indices)
        if self.is_channel_first:
            indices = indices.movedim(-1, 1)
        if not return_all_codes:
            return out, indices
        return out, indices, self.get_codes_from_indices(indices.movedim(1, -1) if self.is_channel_first else indices)

    def _fused_levels(self, x, seed):
        """``_quantize``'s (quantized, int32 indices) by one residual_fsq_quantize over the levels this step."""
        levels = self._levels_this_step(seed)
        z = x if x.dtype in (torch.float32, torch.float64) else x.float()  # as a level's residual / scale promotes
        out, indices = ops.residual_fsq_quantize(z.reshape(-1, z.shape[-1]), self.scales[:levels], self.levels,
                                                 True, self.bound_hard_clamp)
        indices = indices.int()
        if levels < self.num_quantizers:
            indices = torch.cat([indices, indices.new_full((indices.shape[0], self.num_quantizers - levels), -1)], 1)
        return out.reshape(z.shape), indices.reshape(*z.shape[:-1], self.num_quantizers)


class GroupedResidualFSQ(Grouped):
    """``groups`` independent :class:`ResidualFSQ` over equal slices of the features (vector-quantize-pytorch's
    ``GroupedResidualFSQ``): ``(quantized, indices [groups, ..., num_quantizers])``; with ``accept_image_fmap``
    the slices are taken on dim 1 and every group reads them channel-first. In training every group drops the
    same levels (one seed per step, as there)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        if accept_image_fmap:
            kwargs["is_channel_first"] = True
        super().__init__("vqkernels.nn.GroupedResidualFSQ", lambda d: ResidualFSQ(dim=d, **kwargs), dim, groups)
        self.accept_image_fmap = accept_image_fmap

    def forward(self, x, return_all_codes=False):
        seed = random.randrange(10_000) if self.training else None
        return super().forward(x, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)


class ResidualLFQ(ResidualLevels):
    """Residual LFQ, a drop-in for vector-quantize-pytorch's: level l is an :class:`LFQ` with
    ``codebook_scale=2**-l`` (and a soft clamp halved at every level) quantizing what the previous levels left.
    ``forward(x)`` [b, n, dim] returns ``(quantized, indices [b, n, num_quantizers], aux losses
    [num_quantizers])`` (and every level's codes with ``return_all_codes``). Quantize dropout as
    :class:`ResidualFSQ`'s. Other keywords go to every level's :class:`LFQ` (which refuses what it does not
    implement); ``forward``'s ``mask`` goes to every level (its aux losses leave masked tokens out, as there);
    the ``state_dict`` keys are theirs."""

    channel_first = False  # tokens [b, n, dim] only

    def __init__(self, *, dim, num_quantizers, codebook_size, quantize_dropout=False, quantize_dropout_cutoff_index=0,
                 quantize_dropout_multiple_of=1, soft_clamp_input_value=None, **kwargs):
        super().__init__()
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"vqkernels.nn.ResidualLFQ: codebook_size must be a power of 2 of at least 2, got "
                             f"{codebook_size}")
        codebook_dim = codebook_size.bit_length() - 1
        self._setup("ResidualLFQ", dim, codebook_dim, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of)
        clamps = [None if soft_clamp_input_value is None else soft_clamp_input_value * 0.5 ** level
                  for level in range(num_quantizers)]
        self.layers = nn.ModuleList(LFQ(dim=codebook_dim, codebook_scale=2.0 ** -level,
                                        soft_clamp_input_value=clamps[level], **kwargs)
                                    for level in range(num_quantizers))
        self.codebook_size = codebook_size

    def forward(self, x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        level_kwargs = {} if mask is None else dict(mask=mask)  # every level's LFQ leaves masked tokens out
        out, indices, losses = self._quantize(self._project_in(x), rand_quantize_dropout_fixed_seed, **level_kwargs)
        ret = (self.project_out(out), indices, losses)
        return ret if not return_all_codes else (*ret, self.get_codes_from_indices(indices))


class GroupedResidualLFQ(Grouped):
    """``groups`` independent :class:`ResidualLFQ` over equal slices of the features (vector-quantize-pytorch's
    ``GroupedResidualLFQ``): ``(quantized, indices [groups, ..., num_quantizers], losses [groups,
    num_quantizers])``. In training every group drops the same levels (one seed per step, as there)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        if accept_image_fmap:
            raise ValueError("vqkernels.nn.GroupedResidualLFQ: accept_image_fmap is not supported (ResidualLFQ reads "
                             "[b, n, dim] tokens)")
        super().__init__("vqkernels.nn.GroupedResidualLFQ", lambda d: ResidualLFQ(dim=d, **kwargs), dim, groups)
        self.accept_image_fmap = accept_image_fmap

    def forward(self, x, mask=None, return_all_codes=False):
        seed = random.randrange(10_000) if self.training else None
        return super().forward(x, mask=mask, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
