"""``SimVQ`` (Zhu et al. 2024, arXiv:2411.02038): a frozen random codebook seen through a learned linear map, a
drop-in for vector-quantize-pytorch's (1.32.0) on :func:`vqkernels.vq_quantize`; and ``ResidualSimVQ``."""

import torch
from torch import nn

from .. import ops
from ._layout import ChannelFirst
from .residual import ResidualLevels


class SimVQ(nn.Module):
    """Vector quantization against ``code_transform(frozen_codebook)``: the frozen [codebook_size,
    frozen_codebook_dim] table (random normal / sqrt(dim), then ``init_fn``) is a buffer and only the transform
    (``nn.Linear(frozen_codebook_dim, dim, bias=False)`` unless ``codebook_transform`` is given) learns, through
    the fused op's codebook-loss gradient, so every code moves at each step.

    ``forward(x)`` [b, n, dim] (or [b, dim, ...] with ``channel_first``) returns ``(quantized, indices,
    commitment_weight * (mse(sg(x), q) + input_to_quantize_commit_loss_weight * mse(x, sg(q))))``, with the
    rotation trick (default) or the straight-through estimator, in training and eval, as there;
    ``indices_to_codes`` inverts it; the ``state_dict`` keys are theirs. The search never forms the N x K
    distance matrix (theirs runs ``torch.cdist``).
    """

    def __init__(self, dim, codebook_size, codebook_transform=None, init_fn=None, channel_first=False,
                 rotation_trick=True, input_to_quantize_commit_loss_weight=0.25, commitment_weight=1.0,
                 frozen_codebook_dim=None):
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"vqkernels.nn.SimVQ: codebook_size must be >= 1, got {codebook_size}")
        self.dim, self.codebook_size, self.channel_first = dim, codebook_size, channel_first
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        codebook = torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim ** -0.5
        codebook = codebook if init_fn is None else init_fn(codebook)
        self.code_transform = nn.Linear(frozen_codebook_dim, dim, bias=False) if codebook_transform is None \
            else codebook_transform
        self.register_buffer("frozen_codebook", codebook)
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight

    @property
    def codebook(self):
        """The codes [codebook_size, dim]: the transform of the frozen table."""
        return self.code_transform(self.frozen_codebook)

    def indices_to_codes(self, indices):
        """The codes of indices [b, ...] -> [b, ..., dim] ([b, dim, ...] with channel_first)."""
        codes = self.code_transform(self.frozen_codebook[indices])
        return codes.movedim(-1, 1) if self.channel_first else codes

    def forward(self, x):
        layout = ChannelFirst(x, self.channel_first)
        tokens = layout.tokens(x)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"vqkernels.nn.SimVQ: expected {self.dim} features, got shape {tuple(x.shape)}")
        rows = tokens.reshape(-1, self.dim)
        q, indices, commit, codebook_loss = ops.vq_quantize(rows, self.codebook, "l2")
        loss = codebook_loss + commit * self.input_to_quantize_commit_loss_weight
        # the op's quantized is straight-through already; the rotation trick reads the code without its gradient
        q = ops.rotation_trick(rows, q.detach()) if self.rotation_trick and rows.requires_grad else q
        out = layout.restore(q.reshape(tokens.shape))
        indices = indices.reshape(layout.spatial if self.channel_first else tokens.shape[:-1])
        return out, indices, loss * self.commitment_weight


class ResidualSimVQ(ResidualLevels):
    """Residual SimVQ, a drop-in for vector-quantize-pytorch's: ``num_quantizers`` :class:`SimVQ` levels, each
    quantizing what the previous ones left. ``forward(x)`` [b, n, dim] (or [b, dim, ...] with ``channel_first``)
    returns ``(quantized, indices [..., num_quantizers], losses [num_quantizers])`` (and every level's codes with
    ``return_all_codes``); quantize dropout as :class:`vqkernels.nn.ResidualFSQ`'s. Other keywords go to every
    level's SimVQ; the ``state_dict`` keys are theirs."""

    dropout_needs_grad = False  # their ResidualSimVQ drops levels in training whether gradients are on or not

    def __init__(self, *, dim, num_quantizers, codebook_size, heads=1, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, channel_first=False,
                 rotation_trick=True, **sim_vq_kwargs):
        super().__init__()
        if heads != 1:
            raise ValueError(f"vqkernels.nn.ResidualSimVQ: heads must be 1 (as there), got {heads}")
        self._setup("ResidualSimVQ", dim, dim, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                    quantize_dropout_multiple_of)
        self.channel_first = channel_first
        # the levels read tokens: the layout is handled here, once
        self.layers = nn.ModuleList(SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick,
                                          **sim_vq_kwargs) for _ in range(num_quantizers))
        self.codebook_size = codebook_size

    def get_codes_from_indices(self, indices):
        """Every level's codes [num_quantizers, b, ..., dim] ([num_quantizers, b, dim, ...] with channel_first)."""
        codes = super().get_codes_from_indices(indices)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices):
        return self.get_codes_from_indices(indices).sum(0)

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        layout = ChannelFirst(x, self.channel_first)
        out, indices, losses = self._quantize(layout.tokens(x), rand_quantize_dropout_fixed_seed)
        ret = (layout.restore(out), layout.indices(indices), losses)
        return ret if not return_all_codes else (*ret, self.get_codes_from_indices(ret[1]))
