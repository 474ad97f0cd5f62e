"""``FSQ``: a drop-in for vector-quantize-pytorch's ``FSQ`` (1.32.0) on :func:`vqkernels.fsq_quantize`."""

import math

import torch
from torch import nn

from .. import _checks, ops
from ._layout import ChannelFirst


def _reject(option, value, why):
    raise ValueError(f"vqkernels.nn.FSQ: {option}={value!r} is not supported ({why})")


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023) with vector-quantize-pytorch's interface.

    Same constructor keywords, attributes, ``forward`` return ``(quantized, indices)`` (indices
    int32, ``None`` when ``return_indices=False``), ``indices_to_codes``, ``codes_to_indices``,
    ``indices_to_level_indices`` and ``state_dict`` keys (``project_in.*`` / ``project_out.*``
    when ``dim`` differs from ``len(levels) * num_codebooks``), so a vector-quantize-pytorch
    ``FSQ`` state_dict loads into it. The bound, rounding and indices are one fused op.

    ``preserve_symmetry`` (the symmetry-preserving quantizer of arXiv:2411.19842, levels of 2
    allowed), ``bound_hard_clamp`` (a clamp to [-1, 1] in place of tanh) and, with
    ``preserve_symmetry``, ``noise_dropout`` (in training, each code value is moved by a uniform
    offset in [-0.5, 0.5) with that probability, then clamped to [-1, 1]; the indices are those of
    the codes before the noise) behave as there, the first two inside the fused op.

    Differences: ``orthogonal_rotation`` raises ValueError when set (so do levels of 2 without
    ``preserve_symmetry``, as there, and levels above 1000, where its bound overshoots the outer
    level); ``scale`` is stored and unused, as there. Inputs of any rank
    are accepted (vector-quantize-pytorch needs 3 or more dimensions). A row holding a NaN
    gets index -1, and ``indices_to_codes`` turns indices outside [0, codebook_size) into NaN
    codes (vector-quantize-pytorch wraps them around).
    """

    def __init__(self, levels, dim=None, num_codebooks=1, keep_num_codebooks_dim=None, scale=None,
                 allowed_dtypes=(torch.float32, torch.float64), channel_first=False, projection_has_bias=True,
                 return_indices=True, force_quantization_f32=True, preserve_symmetry=False, noise_dropout=0.0,
                 bound_hard_clamp=False, orthogonal_rotation=False):
        super().__init__()
        if noise_dropout != 0.0 and not preserve_symmetry:
            _reject("noise_dropout", noise_dropout, "it needs preserve_symmetry, as in vector-quantize-pytorch")
        if not 0.0 <= noise_dropout <= 1.0:
            _reject("noise_dropout", noise_dropout, "a probability in [0, 1] is expected")
        if orthogonal_rotation:
            _reject("orthogonal_rotation", orthogonal_rotation, "no rotation is implemented")
        levels = [int(lv) for lv in levels]
        if 2 in levels and not preserve_symmetry:
            _reject("levels", levels, "vector-quantize-pytorch allows a level of 2 only with preserve_symmetry")
        _checks.check_levels("nn.FSQ", levels)
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("vqkernels.nn.FSQ: keep_num_codebooks_dim must be True when num_codebooks > 1")

        self.levels = levels
        self.preserve_symmetry, self.bound_hard_clamp = preserve_symmetry, bound_hard_clamp
        self.noise_dropout = noise_dropout
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor([math.prod(levels[:j]) for j in range(len(levels))],
                                                    dtype=torch.int32), persistent=False)
        self.scale = scale
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.return_indices = return_indices
        self.codebook_size = math.prod(levels)
        if return_indices:
            self.register_buffer("implicit_codebook", ops.fsq_indices_to_codes(
                torch.arange(self.codebook_size), levels, preserve_symmetry), persistent=False)
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = force_quantization_f32

    def indices_to_level_indices(self, indices):
        """The per-dimension level (0 .. L - 1) of every index: [...] -> [..., d] (int32)."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def codes_to_indices(self, zhat):
        """Index of every code zhat [..., d] (values k / (L // 2), or 2 k / (L - 1) - 1 with
        ``preserve_symmetry``): int32 [...]."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"vqkernels.nn.FSQ: codes must have {self.codebook_dim} values in the last "
                             f"dimension, got shape {tuple(zhat.shape)}")
        if self.preserve_symmetry:
            level = ((zhat + 1) / (2.0 / (self._levels - 1))).round().long()
        else:
            half_width = self._levels // 2
            level = (zhat * half_width + half_width).round().long()
        return (level * self._basis).sum(-1).int()

    def indices_to_codes(self, indices):
        """Codes of indices, projected out and channel-first when the input was: the inverse of forward."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = ops.fsq_indices_to_codes(indices, self.levels, self.preserve_symmetry)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def forward(self, z):
        """z [b, n, dim] (or [b, dim, ...] channel-first) -> (quantized like z, indices [b, n(, c)] or None)."""
        layout = ChannelFirst(z, z.ndim >= 4 or self.channel_first)
        z = layout.tokens(z)
        if z.shape[-1] != self.dim:
            raise ValueError(f"vqkernels.nn.FSQ: expected the feature dimension {self.dim}, got shape "
                             f"{tuple(z.shape)}")
        z = self.project_in(z)
        lead = z.shape[:-1]
        orig_dtype = z.dtype
        flat = z.reshape(-1, self.codebook_dim)
        if self.force_quantization_f32 and orig_dtype not in self.allowed_dtypes:
            flat = flat.float()
        codes, indices = ops.fsq_quantize(flat, self.levels, self.preserve_symmetry, self.bound_hard_clamp)
        if self.training and self.noise_dropout > 0:
            offset_here = torch.rand_like(codes) < self.noise_dropout
            codes = torch.where(offset_here, codes + (torch.rand_like(codes) - 0.5), codes).clamp(-1.0, 1.0)
        out = self.project_out(codes.reshape(*lead, self.effective_codebook_dim).to(orig_dtype))
        out, indices = layout.restore(out), layout.indices(indices.int().reshape(*lead, self.num_codebooks))
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices if self.return_indices else None
