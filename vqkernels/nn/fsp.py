"""``FSP``: a drop-in for vector-quantize-pytorch's ``FSP`` (1.32.0; finite scalar perturbation,
arXiv:2602.17133).

FSP is not FSQ's quantizer: every scalar goes through a CDF activation to [0, 1] and takes the midpoint
``(floor(L * p) + 0.5) / L`` of its bin (FSQ rounds a scaled tanh to the levels' integers), so no
vqkernels op computes it; the layer is plain PyTorch. Its training step still differs from theirs: the
straight-through and perturbation chain is one autograd node (its backward one division, or none), the
statistics regulariser differentiates only the terms that carry weight, and the indices are integer sums.
"""

import math

import torch
from torch import nn

_UNIT_STD = 0.28867513459481287  # standard deviation of U(0, 1): dividing by it gives q_z unit variance
_SQRT2 = math.sqrt(2.0)


def _fail(message):
    raise ValueError(f"vqkernels.nn.FSP: {message}")


# CDF activations (-inf, inf) -> [0, 1] and their inverses (0, 1) -> (-inf, inf), written as the same
# floating-point operations as vector-quantize-pytorch's so that the values agree bit for bit.
CDF_ACTIVATIONS = {
    "tanh": (lambda z: (torch.tanh(z) + 1.0) / 2.0,
             lambda p: torch.arctanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / _SQRT2)) / 2.0,
               lambda p: torch.erfinv(2.0 * p - 1.0) * _SQRT2),
    "laplace": (lambda z: 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z)))),
                lambda p: -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5))),
    "cauchy": (lambda z: torch.arctan(z) / torch.pi + 0.5,
               lambda p: torch.tan((p - 0.5) * torch.pi)),
}

# vector-quantize-pytorch's VectorNorm presets: (target, weight) of the mean, variance, skewness and kurtosis
VECTOR_NORM_PRESETS = {
    "none": ((0.0, 0.0), (1.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
    "var": ((0.0, 0.1), (1.0, 0.07), (0.0, 0.0), (0.0, 0.0)),
    "kurt": ((0.0, 0.1), (1.0, 0.07), (0.0, 0.06), (0.0, 0.05)),
    "var_tanh": ((0.0, 0.1), (0.8225, 0.07), (0.0, 0.0), (0.0, 0.0)),
    "var_sigmoid": ((0.0, 0.1), (3.29, 0.07), (0.0, 0.0), (0.0, 0.0)),
    "var_laplace": ((0.0, 0.1), (2.0, 0.07), (0.0, 0.0), (0.0, 0.0)),
}


class VectorNorm(nn.Module):
    """FSP's statistical regulariser on the projected tokens z [N, d]: per dimension the batch mean,
    unbiased variance, skewness and excess kurtosis, and the loss
    ``sum_k l{k}_weight * mean_d((stat_k - l{k}_target) ** 2)`` (k = 1..4 in that order).

    ``forward(z)`` returns ``(loss, {"mean", "variance", "skewness", "kurtosis"})``, the statistics
    [d] all differentiable. A term whose weight is 0 is left out of the loss (theirs adds it times 0:
    the same value, without its backward); the mean term is always kept, so the loss stays on the graph.
    The loss is NaN for fewer than 2 tokens (the unbiased variance), as there.
    """

    def __init__(self, l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_target=0.0, l3_weight=0.06,
                 l4_target=0.0, l4_weight=0.05, eps=1e-8):
        super().__init__()
        self.l1_target, self.l1_weight = l1_target, l1_weight
        self.l2_target, self.l2_weight = l2_target, l2_weight
        self.l3_target, self.l3_weight = l3_target, l3_weight
        self.l4_target, self.l4_weight = l4_target, l4_weight
        self.eps = eps

    @classmethod
    def build(cls, name):
        if name not in VECTOR_NORM_PRESETS:
            _fail(f"vector_norm={name!r} is not a preset; the presets are {list(VECTOR_NORM_PRESETS)}")
        (t1, w1), (t2, w2), (t3, w3), (t4, w4) = VECTOR_NORM_PRESETS[name]
        return cls(t1, w1, t2, w2, t3, w3, t4, w4)

    def forward(self, z):
        variance, mean = torch.var_mean(z, dim=0, correction=1)
        std = variance.sqrt().clamp_min(self.eps)
        z_scores = (z - mean) / std
        stats = {"mean": mean, "variance": variance, "skewness": z_scores.pow(3).mean(0),
                 "kurtosis": z_scores.pow(4).mean(0) - 3.0}
        terms = zip(stats.values(), (self.l1_target, self.l2_target, self.l3_target, self.l4_target),
                    (self.l1_weight, self.l2_weight, self.l3_weight, self.l4_weight))
        loss = None
        for k, (stat, target, weight) in enumerate(terms):
            if weight != 0 or k == 0:
                term = ((stat - target) ** 2).mean() * weight
                loss = term if loss is None else loss + term
        return loss, stats


class _Standardise(torch.autograd.Function):
    """``(q - 0.5) / std(U(0, 1))`` of the detached bin values ``q``, in ``act``'s dtype; the gradient
    reaches ``act`` as if ``q`` were ``act`` (every branch of FSP's forward passes it unchanged)."""

    @staticmethod
    def forward(ctx, act, q):
        return ((q - 0.5) / _UNIT_STD).to(act.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad / _UNIT_STD, None


class _StraightThrough(torch.autograd.Function):
    """``z + (value - z)`` (theirs' ``z + (value - z).detach()``, same bits) with the gradient of ``z``."""

    @staticmethod
    def forward(ctx, z, value):
        return (z + (value - z)).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FSP(nn.Module):
    """Finite scalar perturbation with vector-quantize-pytorch's interface.

    Every dimension j of the (projected) token goes through the CDF activation ``act_name`` to p in
    [0, 1] and is quantized to its bin's midpoint ``(floor(L_j * min(p, 1 - eps)) + 0.5) / L_j``, then
    standardised, ``(q - 0.5) / 0.2887`` (or mapped back through the inverse CDF with ``need_inv_act``,
    straight-through to the projected input). In training with ``quantize_rate < 1``, each value is,
    with probability ``1 - quantize_rate``, the unquantized p moved by a uniform offset of at most half a
    bin (kept only when it stays inside (0, 1)) instead of its bin's midpoint; eval mode always quantizes.
    The random draws are theirs, call for call, so the same seed gives the same bits (ours are drawn in
    row-major token order; theirs follow the memory layout of the activations, the same unless, without
    projections, the input's [N, dim] view is dense but not row-major, e.g. a transposed 2-D input).

    Same constructor keywords and defaults, attributes (``codebook_dim``, ``codebook_size``, ``dim``,
    ``has_projections``, ``act_func`` / ``inv_act_func``, ``quantize_rate``, ``vector_norm``, the
    non-persistent ``_levels`` / ``_basis``), methods (``quantize_act_value``, ``level_indices_to_indices``,
    ``indices_to_level_indices``, ``indices_to_act_value``, ``indices_to_codes``) and ``state_dict`` keys
    (``project_in.*`` / ``project_out.*`` when ``dim != len(levels)``), so their checkpoints load.
    ``forward(z, eps=None)`` takes [..., dim] (channel-first [b, dim, ...]) and returns ``(quantized like z,
    indices int32 [...], norm_loss, {"level_indices": float [..., d], "norm_info": the four statistics,
    "p_accept_prob": share of offsets kept (training with quantize_rate < 1)})``.

    Differences from vector-quantize-pytorch 1.32.0: indices are summed in integers (theirs sums the float
    level indices, wrong in bfloat16 past 256 codes and in float32 past 2**24); a row holding a NaN gets
    index -1, and ``indices_to_act_value`` / ``indices_to_codes`` give NaN for indices outside
    [0, codebook_size) (theirs wraps them around), as :class:`vqkernels.nn.FSQ`; the quantized output is in
    the projected input's dtype (theirs promotes a half-precision input to float32 in training, which
    then fails in a half-precision ``project_out``), and ``indices_to_codes`` in ``project_out``'s;
    no tokens give empty outputs and the NaN statistics and loss of an empty batch (theirs fails to
    reshape); invalid options and inputs raise ValueError where theirs asserts.
    """

    def __init__(self, levels, dim=None, channel_first=False, projection_has_bias=True, act_name="tanh",
                 quantize_rate=0.0, need_inv_act=False, vector_norm="var_tanh"):
        super().__init__()
        if not 0.0 <= quantize_rate <= 1.0:
            _fail(f"quantize_rate must be in [0, 1], got {quantize_rate}")
        if act_name not in CDF_ACTIVATIONS:
            _fail(f"act_name={act_name!r} is not a CDF activation; they are {list(CDF_ACTIVATIONS)}")
        levels = [int(lv) for lv in levels]
        if not levels or min(levels) < 1:
            _fail(f"levels must be a non-empty list of positive integers, got {levels}")
        if math.prod(levels) >= 2 ** 31:
            _fail(f"the codebook size, prod(levels) = {math.prod(levels)}, must fit int32 indices")

        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.tensor([math.prod(levels[:j]) for j in range(len(levels))],
                                                    dtype=torch.int32), persistent=False)
        self.codebook_size = math.prod(levels)
        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.act_name = act_name
        self.act_func, self.inv_act_func = CDF_ACTIVATIONS[act_name]
        self.need_inv_act = need_inv_act
        self.quantize_rate = quantize_rate
        self.vector_norm = VectorNorm.build(vector_norm)

    def _bins(self, act_z, eps):
        """(bin midpoints, bin numbers) of detached activations, as floats of act_z's dtype."""
        level_indices = (act_z.clamp_max(1.0 - eps) * self._levels).floor()
        return (level_indices + 0.5) / self._levels, level_indices

    @staticmethod
    def _uniform(act):
        """U[0, 1) of act's shape, drawn in row-major order (theirs' ``rand_like`` of its contiguous [N, d]
        activations; a compiled graph may lay ``act`` out otherwise, which would move ``rand_like``'s draws)."""
        return torch.rand(act.shape, dtype=act.dtype, device=act.device)

    def quantize_act_value(self, act_z, eps):
        """Bin midpoints of activations in [0, 1] (straight-through to ``act_z``) and the bin numbers."""
        q, level_indices = self._bins(act_z.detach(), eps)
        return act_z + (q - act_z).detach(), level_indices

    def level_indices_to_indices(self, level_indices):
        """Mixed-radix index (first dimension fastest) of bin numbers [..., d]: int32 [...]; -1 where a
        bin number is NaN."""
        indices = (level_indices.int() * self._basis).sum(-1, dtype=torch.int32)
        if level_indices.is_floating_point():
            indices = indices.masked_fill(level_indices.isnan().any(-1), -1)
        return indices

    def indices_to_level_indices(self, indices):
        """Bin number of every dimension: [...] -> [..., d] (integers; wrapped around outside the codebook)."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def indices_to_act_value(self, indices):
        """Bin midpoints in [0, 1] of indices: [...] -> float32 [..., d]; NaN for indices outside the codebook."""
        valid = ((indices >= 0) & (indices < self.codebook_size)).unsqueeze(-1)
        level_indices = self.indices_to_level_indices(indices).float()
        return ((level_indices + 0.5) / self._levels).masked_fill(~valid, float("nan"))

    def indices_to_codes(self, indices, eps=1e-6):
        """Quantized vectors of indices (eval-mode forward output), projected out, channel-first if the layer is."""
        q_act_z = self.indices_to_act_value(indices)
        if self.need_inv_act:
            codes = self.inv_act_func(q_act_z.clamp(eps, 1.0 - eps))
        else:
            codes = (q_act_z - 0.5) / _UNIT_STD
        if self.has_projections:
            codes = self.project_out(codes.to(self.project_out.weight.dtype))
        return codes.movedim(-1, 1) if self.channel_first else codes

    def forward(self, z, eps=None):
        eps = eps or torch.finfo(z.dtype).eps
        shape = tuple(z.shape)
        if self.channel_first:
            if z.dim() < 2:
                _fail(f"channel_first expects [b, dim, ...] inputs, got shape {shape}")
            z = z.movedim(1, -1)
        if z.dim() == 0 or z.shape[-1] != self.dim:
            _fail(f"expected the feature dimension {self.dim}, got shape {shape}"
                  + (" (channel_first: the features are dimension 1)" if self.channel_first else ""))
        lead = z.shape[:-1]
        z = self.project_in(z.reshape(-1, self.dim))
        norm_loss, norm_info = self.vector_norm(z)
        act_z = self.act_func(z)

        act = act_z.detach()
        q, level_indices = self._bins(act, eps)
        q = act + (q - act)
        info = {}
        if self.training and self.quantize_rate < 1.0:
            proposal = act + (1.0 / (self._levels * 2)) * (self._uniform(act) * 2.0 - 1.0)
            accept = (proposal > 0.0) & (proposal < 1.0)
            info["p_accept_prob"] = accept.float().mean()
            perturbed = torch.where(accept, proposal, act)
            q = torch.where(self._uniform(act) > self.quantize_rate, perturbed, q)

        if self.need_inv_act:
            q_z = _StraightThrough.apply(z, self.inv_act_func(q.clamp(eps, 1.0 - eps)))
        else:
            q_z = _Standardise.apply(act_z, q)
        indices = self.level_indices_to_indices(level_indices)
        q_z = self.project_out(q_z).reshape(*lead, self.dim)
        if self.channel_first:
            q_z = q_z.movedim(-1, 1)
        return q_z, indices.reshape(lead), norm_loss, {
            "level_indices": level_indices.reshape(*lead, self.codebook_dim), "norm_info": norm_info, **info}
