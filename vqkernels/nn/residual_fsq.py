"""``ResidualFSQ`` and ``GroupedResidualFSQ``: residual finite scalar quantization (vector-quantize-pytorch's,
1.32.0) on :class:`vqkernels.nn.FSQ`, hence on the fused :func:`vqkernels.fsq_quantize`."""

import random

import torch
from torch import nn

from ._layout import ChannelFirst
from .fsq import FSQ
from .residual import Grouped, dropout_levels


class ResidualFSQ(nn.Module):
    """Residual FSQ (Algorithm 1 of arXiv:2107.03312 with FSQ levels), a drop-in for vector-quantize-pytorch's.

    Level l quantizes ``residual / L**-l`` with a symmetry-preserving FSQ (``preserve_symmetry=True``,
    ``bound_hard_clamp`` by default, when the input is first soft-clamped to ``1 + 1 / (L - 1)``) and adds
    back ``codes * L**-l``. ``forward(x)`` returns ``(quantized, indices [..., num_quantizers])`` (and every
    level's scaled codes with ``return_all_codes``); with ``is_channel_first`` the input is [b, d, ...] and,
    as there, the indices [b, num_quantizers, ...]. Quantize dropout (training) keeps a random prefix of the
    levels and gives the others index -1; the draw is on the host (Python's ``random``, or
    ``rand_quantize_dropout_fixed_seed``), where vector-quantize-pytorch reads a device tensor back.
    Other keywords go to every level's :class:`FSQ`; the ``state_dict`` keys are theirs. One difference: with
    ``is_channel_first``, ``return_all_codes`` gives [num_quantizers, b, ..., d] (theirs reads its own
    [b, num_quantizers, ...] indices as if the levels were last).
    """

    def __init__(self, *, levels, num_quantizers, dim=None, is_channel_first=False, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, soft_clamp_input_value=None,
                 bound_hard_clamp=True, **kwargs):
        super().__init__()
        levels = [int(lv) for lv in levels]
        if min(levels) < 2:
            raise ValueError(f"vqkernels.nn.ResidualFSQ: every level must be at least 2, got {levels}")
        if num_quantizers < 1:
            raise ValueError(f"vqkernels.nn.ResidualFSQ: num_quantizers must be >= 1, got {num_quantizers}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(f"vqkernels.nn.ResidualFSQ: quantize_dropout_cutoff_index must be in [0, "
                             f"{num_quantizers}), got {quantize_dropout_cutoff_index}")
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError("vqkernels.nn.ResidualFSQ: bound_hard_clamp sets its own soft_clamp_input_value")
        codebook_dim = len(levels)
        self.dim = codebook_dim if dim is None else dim
        self.has_projections = self.dim != codebook_dim
        self.project_in = nn.Linear(self.dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, self.dim) if self.has_projections else nn.Identity()
        self.is_channel_first = self.channel_first = is_channel_first
        self.num_quantizers, self.levels = num_quantizers, levels
        self.layers = nn.ModuleList(FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True,
                                        bound_hard_clamp=bound_hard_clamp, **kwargs) for _ in range(num_quantizers))
        self.codebook_size = self.layers[0].codebook_size
        lv = torch.tensor(levels).float()
        self.register_buffer("scales", torch.stack([lv ** -level for level in range(num_quantizers)]),
                             persistent=False)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            soft_clamp_input_value = 1 + 1 / (lv - 1)
        elif isinstance(soft_clamp_input_value, (list, tuple, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value, dtype=torch.float32)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)

    @property
    def codebooks(self):
        """[num_quantizers, codebook_size, d]: every level's (unscaled) implicit codebook."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices):
        """Every level's scaled codes [num_quantizers, ..., d] of indices [..., q] (q <= num_quantizers; missing
        levels and index -1 give zeros)."""
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(f"vqkernels.nn.ResidualFSQ: indices have {q} levels, the layer {self.num_quantizers}")
        codes = []
        for level, (layer, scale) in enumerate(zip(self.layers, self.scales)):
            if level >= q:
                codes.append(codes[0].new_zeros(codes[0].shape))
                continue
            i = indices[..., level]
            c = layer.implicit_codebook[i.clamp_min(0).long()].masked_fill((i < 0).unsqueeze(-1), 0.0)
            codes.append(c * scale)
        return torch.stack(codes)

    def get_output_from_indices(self, indices):
        """The summed scaled codes of indices [..., q], projected out."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        layout = ChannelFirst(x, self.is_channel_first)
        x = self.project_in(layout.tokens(x))
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value
            x = (x / clamp).tanh() * clamp
        levels = self.num_quantizers
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            rng = random if rand_quantize_dropout_fixed_seed is None else random.Random(rand_quantize_dropout_fixed_seed)
            levels = dropout_levels(self.num_quantizers, self.quantize_dropout_cutoff_index,
                                    self.quantize_dropout_multiple_of, rng)
        residual, out, all_indices = x, 0.0, []
        for level, (layer, scale) in enumerate(zip(self.layers, self.scales)):
            if level >= levels:
                all_indices.append(torch.full(x.shape[:-1], -1, dtype=torch.int32, device=x.device))
                continue
            quantized, indices = layer(residual / scale)
            quantized = quantized * scale
            residual = residual - quantized.detach()
            out = out + quantized
            all_indices.append(indices)
        out = layout.restore(self.project_out(out))
        indices = layout.indices(torch.stack(all_indices, dim=-1))
        if self.is_channel_first:
            indices = indices.movedim(-1, 1)
        if not return_all_codes:
            return out, indices
        return out, indices, self.get_codes_from_indices(indices.movedim(1, -1) if self.is_channel_first else indices)


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
