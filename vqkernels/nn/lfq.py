"""``LFQ``: a drop-in for vector-quantize-pytorch's ``LFQ`` (1.32.0) on :func:`vqkernels.lfq_quantize`
and :func:`vqkernels.lfq_entropy`."""

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, ops
from ._layout import ChannelFirst

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])


def _reject(option, value, why):
    raise ValueError(f"vqkernels.nn.LFQ: {option}={value!r} is not supported ({why})")


class LFQ(nn.Module):
    """Lookup-free quantization (Yu et al. 2023) with vector-quantize-pytorch's interface.

    Same keyword-only constructor, attributes, ``forward(x, inv_temperature=100.,
    return_loss_breakdown=False, mask=None)`` returning ``Return(quantized, indices, entropy_aux_loss)``
    (plus ``LossBreakdown(per_sample_entropy, batch_entropy, commitment)`` on request),
    ``indices_to_codes`` and ``state_dict`` keys (the persistent ``mask`` buffer, and
    ``project_in.*`` / ``project_out.*`` with projections), so a vector-quantize-pytorch ``LFQ``
    state_dict loads into it.

    In training the entropy terms come from :func:`vqkernels.lfq_entropy`, which never forms the
    tokens x 2**d probability matrix (vector-quantize-pytorch does, and the 2**d x d codebook):
    d = 16 with thousands of tokens fits in a few MB. The per-sample entropy is the exact one,
    where vector-quantize-pytorch clamps every code probability at 1e-5 inside the log: it is
    higher by at most 2**d * 1e-5 / e per token (see lfq_entropy); the batch entropy and its
    clamp are the same. The codes are exactly +-codebook_scale (or the spherical value) also in
    training (there x + (q - x).detach(), which can differ from q in the last bit).

    ``spherical`` (binary spherical quantization, arXiv:2406.07548): the inputs are l2-normalised per
    codebook and scaled by ``codebook_scale``, the codes are +-codebook_scale / sqrt(d), and the
    entropy reads the normalised codebook. ``frac_per_sample_entropy`` < 1: both entropies read a
    random subset of floor(frac * tokens) of the tokens each step, uniform without replacement
    (drawn on the device from random keys, so nothing is read back); this module needs it for no
    memory saving, it is there for parity.

    ``mask`` (bool, the tokens' shape: [b, n] for [b, n, dim] inputs, [b, h * w] for channel-first
    [b, dim, h, w] ones, as there): in training the tokens where it is False count nowhere in the
    aux loss. The per-sample entropy is the mean over the kept tokens, the batch entropy that of
    their average code distribution (per codebook), the commitment loss the mean over the kept
    tokens' elements. It reaches :func:`vqkernels.lfq_entropy` as 0/1 row weights and the
    commitment loss is a masked mean, so nothing is read back to the host (vector-quantize-pytorch
    selects the tokens with ``x[mask]``, which does). With ``frac_per_sample_entropy`` < 1 the random
    subset is floor(frac * kept) of the kept tokens. The quantized output and the indices are those
    of every token, masked or not, as there; eval mode ignores the mask, as there (here its dtype and
    shape are still checked). Where
    vector-quantize-pytorch 1.32.0 differs: its masked path folds the codebook axis into the tokens
    (``x[mask]`` is [m, c, d] and its rearrange reads c as the sequence axis), so its batch entropy
    there is the average of per-(token, codebook) entropies, i.e. equal to the per-sample entropy,
    and its entropy loss is (1 - diversity_gamma) times the per-sample entropy (0 by default); and
    with ``frac_per_sample_entropy`` < 1 it draws (token, codebook) pairs. Here the batch entropy is the one it computes without a mask, on the
    kept tokens alone (what ``x[mask]`` intends), and the subset is of tokens, as without a mask. A
    mask keeping no token gives zero losses (there: NaN). A mask on another device than x is copied
    to x's (for a CPU mask and a CUDA x that copy waits for the GPU: create it on x's device).

    Not supported (ValueError when set): ``straight_through_activation`` other than identity,
    ``cosine_sim_project_in``, ``orthogonal_rotation`` and ``force_quantization_f32=False``. The
    inputs may have any rank. A token holding a NaN gets index -1 and NaN codes (there: index bit 0
    and -codebook_scale in eval).
    """

    def __init__(self, *, dim=None, codebook_size=None, entropy_loss_weight=0.1, commitment_loss_weight=0.0,
                 diversity_gamma=1.0, straight_through_activation=None, num_codebooks=1,
                 keep_num_codebooks_dim=None, codebook_scale=1.0, frac_per_sample_entropy=1.0, has_projections=None,
                 projection_has_bias=True, soft_clamp_input_value=None, cosine_sim_project_in=False,
                 cosine_sim_project_in_scale=None, channel_first=None, experimental_softplus_entropy_loss=False,
                 entropy_loss_offset=5.0, spherical=False, force_quantization_f32=True, orthogonal_rotation=False):
        super().__init__()
        if straight_through_activation is not None and not isinstance(straight_through_activation, nn.Identity):
            _reject("straight_through_activation", straight_through_activation, "the straight-through is the identity")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"vqkernels.nn.LFQ: frac_per_sample_entropy must be in (0, 1], got "
                             f"{frac_per_sample_entropy}")
        if cosine_sim_project_in:
            _reject("cosine_sim_project_in", cosine_sim_project_in, "only a linear project_in is implemented")
        if cosine_sim_project_in_scale is not None:
            _reject("cosine_sim_project_in_scale", cosine_sim_project_in_scale, "it needs cosine_sim_project_in")
        if orthogonal_rotation:
            _reject("orthogonal_rotation", orthogonal_rotation, "no rotation is implemented")
        if not force_quantization_f32:
            _reject("force_quantization_f32", force_quantization_f32,
                    "the quantization always runs in float32 (float64 inputs too)")
        if dim is None and codebook_size is None:
            raise ValueError("vqkernels.nn.LFQ: either dim or codebook_size must be given")
        codebook_size = 2 ** dim if codebook_size is None else codebook_size
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"vqkernels.nn.LFQ: codebook_size must be a power of 2 of at least 2, got {codebook_size}")
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > _checks.LFQ_ENTROPY_MAX_BITS:
            raise ValueError(f"vqkernels.nn.LFQ: codebook_size must be at most 2**{_checks.LFQ_ENTROPY_MAX_BITS}, "
                             f"got 2**{codebook_dim}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(f"vqkernels.nn.LFQ: soft_clamp_input_value ({soft_clamp_input_value}) must be at least "
                             f"codebook_scale ({codebook_scale})")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("vqkernels.nn.LFQ: keep_num_codebooks_dim must be True when num_codebooks > 1")

        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        codebook_dims = codebook_dim * num_codebooks
        self.dim = codebook_dims if dim is None else dim
        self.has_projections = self.dim != codebook_dims if has_projections is None else has_projections
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.spherical = spherical
        self.force_quantization_f32 = force_quantization_f32
        # bit weights of the index, the first code dimension the top bit (persistent, as there)
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def dtype(self):
        """The dtype of codes made from indices (float32 unless the module was converted)."""
        return self.zero.dtype

    def _code_value(self):
        """The codes' magnitude: codebook_scale, or with ``spherical`` the l2-normalised code times
        codebook_scale, rounded as vector-quantize-pytorch's float32 l2norm gives it (~ codebook_scale / sqrt(d))."""
        if not self.spherical:
            return self.codebook_scale
        code = torch.full((self.codebook_dim,), float(self.codebook_scale))
        return float(F.normalize(code, dim=-1)[0] * self.codebook_scale)

    def _codes_of(self, indices, value=None):
        """[..., codebook_dim] codes (+-``value``, codebook_scale by default) of integer indices [...]."""
        bits = (indices.unsqueeze(-1).long() & self.mask) != 0
        return (bits.to(self.dtype) * 2 - 1) * (self.codebook_scale if value is None else value)

    @property
    def codebook(self):
        """All codebook_size codes [codebook_size, codebook_dim] (+-codebook_scale, also with ``spherical``, as
        there), built on request (not stored)."""
        return self._codes_of(torch.arange(self.codebook_size, device=self.mask.device))

    def indices_to_codes(self, indices, project_out=True):
        """Codes of indices (optionally projected out), channel-first when the input was."""
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        should_transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self._codes_of(indices, self._code_value()).flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if should_transpose:
            codes = codes.movedim(-1, 1)
        return codes

    def _entropy_weights(self, keep, num_tokens, device):
        """Row weights of the entropy terms (None: every token counts once): the kept tokens (``keep``
        [num_tokens] bool, or None for all), and with ``frac_per_sample_entropy`` < 1 a uniform random subset of
        floor(frac * kept) of them: every token a uniform key, the masked-out ones' keys past all others,
        the subset the tokens of key rank below that count (all on the device: nothing is read back)."""
        if self.frac_per_sample_entropy == 1:
            return None if keep is None else keep.float()
        keys = torch.rand(num_tokens, device=device)
        if keep is None:
            count = int(num_tokens * self.frac_per_sample_entropy)
        else:
            keys = keys.masked_fill(~keep, 2.0)
            count = (keep.sum(dtype=torch.float64) * self.frac_per_sample_entropy).floor()
        return (keys.argsort().argsort() < count).float()

    @staticmethod
    def _masked_commitment(tokens, codes, keep):
        """mean((tokens - sg(codes))**2) over the kept tokens' elements (0 when none is kept); the masked-out
        tokens reach neither the value nor the gradient, whatever they hold."""
        diff = torch.where(keep[:, None, None], tokens - codes.detach().view_as(tokens), 0.0)
        count = keep.sum() * (tokens.shape[1] * tokens.shape[2])
        return diff.square().sum() / count.clamp_min(1)

    def forward(self, x, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
        """x [b, n, dim] (or [b, dim, ...] channel-first) -> Return(quantized, indices, aux_loss); ``mask``
        (bool, the tokens' shape, or [b] for whole samples) leaves its False tokens out of the aux loss."""
        layout = ChannelFirst(x, x.ndim >= 4 if self.channel_first is None else self.channel_first)
        x = layout.tokens(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"vqkernels.nn.LFQ: expected the feature dimension {self.dim}, got shape "
                             f"{tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:mask.dim()] or mask.dim() == 0):
            raise ValueError(f"vqkernels.nn.LFQ: mask must be a bool tensor of the tokens' shape {tuple(x.shape[:-1])}"
                             f" ([b, n] for [b, n, dim] inputs, [b, h * w] for channel-first [b, dim, h, w] ones) or "
                             f"a leading part of it ([b]: whole samples), got {mask.dtype} of shape {tuple(mask.shape)}")
        if mask is not None:  # a mask of whole samples (theirs indexes the leading dimensions with it)
            mask = mask.reshape(*mask.shape, *([1] * (x.dim() - 1 - mask.dim()))).expand(x.shape[:-1])
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        lead = x.shape[:-1]
        orig_dtype = x.dtype
        tokens = x.float().reshape(-1, self.num_codebooks, self.codebook_dim)
        if self.spherical:
            tokens = F.normalize(tokens, dim=-1) * self.codebook_scale
        codes, indices, commit_loss = ops.lfq_quantize(tokens.reshape(-1, self.codebook_dim), self._code_value())
        if not self.training:
            codes = codes.detach()  # as there: in eval the output carries no gradient to x
        keep = None if mask is None else mask.to(tokens.device).reshape(-1)

        if self.training:
            weights = self._entropy_weights(keep, tokens.shape[0], tokens.device)
            terms = [ops.lfq_entropy(tokens[:, c], inv_temperature * self._code_value(), weights)
                     for c in range(self.num_codebooks)]
            per_sample_entropy = torch.stack([t[0] for t in terms]).mean()
            codebook_entropy = torch.stack([t[1] for t in terms]).mean()
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
        else:
            entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero
        if not (self.training and self.commitment_loss_weight > 0):
            commit_loss = self.zero
        elif keep is not None:
            commit_loss = self._masked_commitment(tokens, codes, keep)

        quantized = layout.restore(self.project_out(codes.reshape(*lead, self.num_codebooks * self.codebook_dim).to(orig_dtype)))
        indices = layout.indices(indices.reshape(*lead, self.num_codebooks))
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(quantized, indices, aux_loss)
        if return_loss_breakdown:
            return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)
        return ret
