"""``LatentQuantize``: a drop-in for vector-quantize-pytorch's ``LatentQuantize`` (1.32.0; Hsu et al. 2023,
"Disentanglement via Latent Quantization", arXiv:2305.18378) on :func:`vqkernels.latent_quantize`."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def _reject(option, value, why):
    raise ValueError(f"vqkernels.nn.LatentQuantize: {option}={value!r} is not supported ({why})")


class _FixedValues(nn.Module):
    """The per-dimension values when ``optimize_values`` is off: non-persistent buffers, so they follow
    ``.to()`` and stay out of the state_dict (vector-quantize-pytorch keeps a plain list of CPU tensors)."""

    def __init__(self, values):
        super().__init__()
        for i, v in enumerate(values):
            self.register_buffer(str(i), v, persistent=False)

    def __len__(self):
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())

    def __getitem__(self, i):
        return list(self._buffers.values())[i]


class LatentQuantize(nn.Module):
    """Latent quantization with vector-quantize-pytorch's interface: every latent dimension i snaps to the
    nearest of its own ``levels[i]`` values (initially evenly spaced in [-0.5, 0.5], zero included).

    Same constructor keywords and defaults, attributes (``codebook_size``, ``codebook_dim``,
    ``values_per_latent``, ``implicit_codebook``, the non-persistent ``_levels`` / ``_basis`` /
    loss-weight buffers), ``forward(z)`` on channel-first inputs [b, dim, ...] (a [b, dim] input is one
    token per sample) returning ``(quantized [b, dim, ...], indices int32 [b, ...] (or [b, ..., num_codebooks]),
    loss)``, ``quantize``, ``codes_to_indices``, ``indices_to_codes``, ``quantize_and_project``,
    ``commitment_loss`` and ``quantization_loss``, and ``state_dict`` keys (``values_per_latent.<i>`` with
    ``optimize_values``, ``project_in.*`` / ``project_out.*`` when ``dim`` differs from
    ``codebook_dim * num_codebooks``), so their checkpoints load.

    The search is one :func:`vqkernels.latent_quantize` call for every dimension (without theirs' tokens x
    levels distance matrices): the first minimum of ``|z - value|`` in the promoted dtype, theirs' argmin
    exactly, also where rounding makes the distances tie or cross next to a midpoint. The quantized output is
    theirs' straight-through ``z + sg(value - z)`` bit for bit, and the loss is theirs: in training
    ``commitment_loss_weight * mse(sg(z), out) + quantization_loss_weight * mse(sg(out), z)`` on the input and
    the output, 0 in eval. As there, the values get no gradient (they are reached only through the
    straight-through estimator), so with ``optimize_values`` they are parameters that do not move.

    Differences from vector-quantize-pytorch 1.32.0:

    * Indices are the mixed-radix index of the chosen value of every dimension (the first dimension varies
      fastest), which ``indices_to_codes`` inverts. Theirs truncates a float sum of the rescaled output, which
      is one too low for some tokens whenever a level gives values that are not exact binary fractions (6, 7,
      10-15, ...; e.g. 8% of the tokens of levels [6, 6, 6] at unit-scale inputs, 40% at larger ones): the
      same indices wherever theirs decodes to its own output. ``codes_to_indices`` rounds every dimension to its nearest
      level for the same reason.
    * A token holding a NaN gets index -1 (and NaN codes, as there); ``indices_to_codes`` gives NaN codes for
      indices outside [0, codebook_size) (theirs wraps them around).
    * ``in_place_codebook_optimizer`` raises ValueError: theirs fails every training forward with it
      (AttributeError: ``optimize_values`` is never stored), and an in-place step could not move the values,
      which get no gradient.
    * A loss weight of ``None`` turns that loss off (theirs fails to build a tensor from it); a weight of 0
      skips its term as there, but decided once at construction (theirs reads the buffer back each step).
    * Fixed values (``optimize_values=False``) are non-persistent buffers that follow ``.to()``.
    * Levels must be at least 2 (a level of 1 decodes to NaN there), ``codebook_dim`` must match a list of
      levels (theirs fails in forward otherwise), and ``codebook_size`` must fit the int32 indices. An empty
      batch is accepted (theirs' reshape fails on it).
    * ``keep_num_codebooks_dim=False`` with several codebooks keeps the dimension, as there (its check can
      never fire).
    """

    def __init__(self, levels, dim, commitment_loss_weight=0.1, quantization_loss_weight=0.1, num_codebooks=1,
                 codebook_dim=-1, keep_num_codebooks_dim=None, optimize_values=True,
                 in_place_codebook_optimizer=None):
        super().__init__()
        if in_place_codebook_optimizer is not None:
            _reject("in_place_codebook_optimizer", in_place_codebook_optimizer,
                    "vector-quantize-pytorch 1.32.0 raises AttributeError in every training forward with it, and "
                    "the values get no gradient for an optimizer to step")
        if isinstance(levels, int):
            if codebook_dim <= 0:
                _reject("codebook_dim", codebook_dim, "an int level needs the number of dimensions, codebook_dim > 0")
            levels = [levels] * codebook_dim
        levels = [int(lv) for lv in levels]
        if codebook_dim > 0 and codebook_dim != len(levels):
            _reject("codebook_dim", codebook_dim, f"it must equal the number of levels, {len(levels)}")
        if not levels or min(levels) < 2:
            _reject("levels", levels, "every dimension needs at least 2 values")
        if math.prod(levels) >= 2 ** 31:
            _reject("levels", levels, "the codebook size must fit the int32 indices")

        self.dim = dim
        self.levels = levels
        self.in_place_codebook_optimizer = None
        self.optimize_values = optimize_values
        for name, weight in (("commitment_loss_weight", commitment_loss_weight),
                             ("quantization_loss_weight", quantization_loss_weight)):
            self.register_buffer(name, torch.tensor(weight or 0.0, dtype=torch.float32), persistent=False)
        self._commitment_on = bool(commitment_loss_weight)
        self._quantization_on = bool(quantization_loss_weight)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor([math.prod(levels[:i]) for i in range(len(levels))]),
                             persistent=False)

        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim or num_codebooks > 1
        self.has_projections = dim != self.effective_codebook_dim
        self.project_in = nn.Linear(dim, self.effective_codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, dim) if self.has_projections else nn.Identity()
        self.codebook_size = math.prod(levels)

        # (k - L // 2) / (L // 2) / 2: linspace(-0.5, 0.5, L) for odd L, arange(L) / L - 0.5 for even L
        values = [torch.linspace(-0.5, 0.5, lv) if lv % 2 else torch.arange(lv) / lv - 0.5 for lv in levels]
        if optimize_values:
            self.values_per_latent = nn.ParameterList(nn.Parameter(v) for v in values)
        else:
            self.values_per_latent = _FixedValues(values)

    @property
    def implicit_codebook(self):
        """Every code of the grid, [codebook_size, codebook_dim] in index order (the initial values)."""
        return self._decode(torch.arange(self.codebook_size, device=self._levels.device))

    def quantization_loss(self, z, zhat, reduce="mean"):
        """mse(sg(zhat), z): its gradient goes to z."""
        return F.mse_loss(zhat.detach(), z, reduction=reduce)

    def commitment_loss(self, z, zhat, reduce="mean"):
        """mse(sg(z), zhat): its gradient goes to zhat."""
        return F.mse_loss(z.detach(), zhat, reduction=reduce)

    def _scale_and_shift(self, zhat_normalized):
        half_width = self._levels // 2
        return zhat_normalized * 2 * half_width + half_width

    def _scale_and_shift_inverse(self, zhat):
        half_width = self._levels // 2
        return (zhat - half_width) / half_width / 2

    def _decode(self, indices):
        """Codes [..., codebook_dim] of indices [...]: NaN outside [0, codebook_size)."""
        idx = indices.long().unsqueeze(-1)
        codes = self._scale_and_shift_inverse((idx // self._basis) % self._levels)
        return codes.masked_fill((idx < 0) | (idx >= self.codebook_size), float("nan"))

    def _search(self, z):
        """z [..., codebook_dim] -> (codes, straight-through as theirs, and the mixed-radix index of every token,
        int32 [...], -1 where z is NaN)."""
        if z.shape[-1] != self.codebook_dim:
            raise ValueError(f"vqkernels.nn.LatentQuantize: expected {self.codebook_dim} values in the last "
                             f"dimension, got shape {tuple(z.shape)}")
        table = torch.cat([v.detach() for v in self.values_per_latent])
        codes, _, indices = ops.latent_quantize(z.detach().reshape(-1, self.codebook_dim), table, self.levels)
        return z + (codes.reshape(z.shape) - z).detach(), indices.int().reshape(z.shape[:-1])

    def _indices_of_levels(self, level):
        """Mixed-radix index of levels [..., codebook_dim]: int32 [...], -1 where a level is -1."""
        return (level * self._basis).sum(-1).masked_fill((level < 0).any(-1), -1).int()

    def quantize(self, z):
        """Quantizes z [..., codebook_dim] to the nearest value per dimension (straight-through); same shape."""
        return self._search(z)[0]

    def codes_to_indices(self, zhat):
        """The index of codes zhat [..., codebook_dim] on the grid, each dimension rounded to its nearest
        level: int32 [...]."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"vqkernels.nn.LatentQuantize: codes must have {self.codebook_dim} values in the "
                             f"last dimension, got shape {tuple(zhat.shape)}")
        return self._indices_of_levels(self._scale_and_shift(zhat).round().long())

    def indices_to_codes(self, indices, project_out=True):
        """Codes of indices [b, ...] ([b, ..., num_codebooks] when keeping that dimension), projected out
        unless ``project_out`` is false, channel-first: [b, dim, ...]."""
        codes = self._decode(indices)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1)

    def _finish(self, codes, indices, spatial):
        """codes [b, n, c, d] and indices [b, n, c] -> (codes [b, n, c * d], output [b, dim, *spatial], indices)."""
        b = codes.shape[0]
        codes = codes.flatten(-2)
        out = self.project_out(codes).reshape(b, *spatial, self.dim).movedim(-1, 1)
        indices = indices.reshape(b, *spatial, self.num_codebooks)
        return codes, out, indices if self.keep_num_codebooks_dim else indices.squeeze(-1)

    def quantize_and_project(self, z, is_img_or_video, ps):
        """Theirs' tail of ``forward``: z [b, n, num_codebooks, codebook_dim] tokens and ``ps``, einops' packed
        shapes ([spatial shape]) -> (codes [b, n, num_codebooks * codebook_dim], output [b, dim, *spatial],
        indices). ``is_img_or_video`` is unused, as there."""
        codes, indices = self._search(z)
        return self._finish(codes, indices, tuple(ps[0]))

    def forward(self, z):
        """z [b, dim, ...] -> (quantized [b, dim, ...], indices [b, ...] (or [b, ..., num_codebooks]), loss)."""
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"vqkernels.nn.LatentQuantize: expected channel-first input [b, {self.dim}, ...], "
                             f"got shape {tuple(z.shape)}")
        b, spatial = z.shape[0], z.shape[2:]
        # channel-last tokens in their own memory, as theirs (einops' pack copies): the loss then adds up in
        # theirs' order
        tokens = self.project_in(z.movedim(1, -1).reshape(b, math.prod(spatial), self.dim).contiguous())
        codes, indices = self._search(tokens.unflatten(-1, (self.num_codebooks, self.codebook_dim)))
        _, out, indices = self._finish(codes, indices, spatial)
        if not self.training or not (self._commitment_on or self._quantization_on):
            return out, indices, torch.zeros((), device=self.commitment_loss_weight.device)
        loss = 0.0
        if self._commitment_on:
            loss = loss + self.commitment_loss_weight * self.commitment_loss(z, out)
        if self._quantization_on:
            loss = loss + self.quantization_loss_weight * self.quantization_loss(z, out)
        return out, indices, loss
