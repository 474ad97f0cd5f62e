"""VAR's multi-scale residual quantizer (Tian et al. 2024, "Visual Autoregressive Modeling"),
``VectorQuantizer2`` of FoundationVision/VAR models/quant.py, on vqkernels.multiscale_quantize_step.

Per scale ``si`` with side ``pn`` (small to large; the last equals the feature map's H = W)::

    idx, h  = multiscale_quantize_step(f_rest, embedding, pn)   # area-downsample, nearest code, lookup
    h       = bicubic(h, (H, W))                                # not at the last scale
    h       = Phi_si(h) = h * (1 - r) + conv3x3(h) * r          # r = |quant_resi|
    f_hat  += h;   f_rest -= h
    loss   += beta * mse(sg(f_hat), f) + mse(f_hat, sg(f))

and ``loss /= SN``; the returned ``f_hat`` is straight-through, ``(sg(f_hat) - sg(f)) + f``.
Gradients reach the embedding (through the looked-up codes) and the Phi convolutions through
f_hat, and the encoder output ``f`` through the beta term and the straight-through output.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..ops import multiscale_quantize_step

_CUBIC_A = -0.75  # the cubic convolution parameter of PyTorch's (and OpenCV's) bicubic mode


def _cubic_weights(t):
    """The four cubic-convolution weights of the inputs at offsets -1, 0, 1, 2 from floor(x), t = x - floor(x)."""
    a = _CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


def _bicubic_rows(n_in, n_out):
    """[n_out][n_in] weights of F.interpolate(mode='bicubic', align_corners=False) along one
    axis: source x = (o + 0.5) * n_in / n_out - 0.5, indices clamped to the border."""
    rows = []
    for o in range(n_out):
        x = (o + 0.5) * (n_in / n_out) - 0.5
        base = math.floor(x)
        row = [0.0] * n_in
        for j, w in enumerate(_cubic_weights(x - base)):
            row[min(max(base - 1 + j, 0), n_in - 1)] += w
        rows.append(row)
    return rows


_BICUBIC_TENSORS = {}


def _bicubic_tensor(n_in, n_out, dtype, device):
    """_bicubic_rows as a tensor, kept per dtype and device in eager mode (never modified)."""
    if torch.compiler.is_compiling():  # traced into a graph constant
        return torch.tensor(_bicubic_rows(n_in, n_out), dtype=dtype, device=device)
    key = (n_in, n_out, dtype, device)
    if key not in _BICUBIC_TENSORS:
        _BICUBIC_TENSORS[key] = torch.tensor(_bicubic_rows(n_in, n_out), dtype=dtype, device=device)
    return _BICUBIC_TENSORS[key]


def upsample_bicubic(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bicubic')`` for x [B, C, h, w], as two matrix products.

    Bicubic interpolation is separable and linear, so it is ``Uy @ x @ Ux^T`` with fixed [H, h]
    and [W, w] weight matrices; as matrix products its forward and backward are several times
    faster on the CPU than PyTorch's interpolation kernels. Equal to F.interpolate up to
    rounding (the weights are computed in float64). Returns a contiguous [B, C, H, W].
    """
    b, c, h, w = x.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x.contiguous()
    uy = _bicubic_tensor(h, out_h, x.dtype, x.device)
    ux = _bicubic_tensor(w, out_w, x.dtype, x.device)
    t = x.reshape(b * c, h, w) @ ux.T  # [B * C, h, W]: one matrix product (rows folded)
    return torch.matmul(uy, t).view(b, c, out_h, out_w)  # uy broadcast over B * C


# ---------------------------------------------------------------------------------------
# Phi: the residual convolution applied to each scale's codes, and its three sharing schemes


class Phi(nn.Conv2d):
    """``h * (1 - r) + conv3x3(h) * r`` with r = |quant_resi| (VAR's ``Phi``)."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(in_channels=embed_dim, out_channels=embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _ticks(k):
    """Where the k Phis sit on [0, 1]: VAR's np.linspace rule (1/(3k) margins for k = 4, else 1/(2k))."""
    m = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(m, 1 - m, k)


class _TickIndexed:
    """Picks the Phi whose tick is nearest to a scale's position si / (SN - 1) in [0, 1] (ties: the first)."""

    def index(self, at_from_0_to_1: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))

    def extra_repr(self) -> str:
        return f"ticks={self.ticks}"


class PhiShared(nn.Module):
    """One Phi for every scale (share_quant_resi=1); state_dict ``qresi.*``."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def index(self, at_from_0_to_1: float) -> int:
        return 0

    def phi(self, i: int) -> nn.Module:
        return self.qresi

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(_TickIndexed, nn.Module):
    """K Phis spread over the scales (share_quant_resi=K > 1); state_dict ``qresi_ls.<i>.*``."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _ticks(len(qresi_ls))

    def phi(self, i: int) -> nn.Module:
        return self.qresi_ls[i]

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[self.index(at_from_0_to_1)]


class PhiNonShared(_TickIndexed, nn.ModuleList):
    """One Phi per scale (share_quant_resi=0); state_dict ``<i>.*``. Indexed by position in [0, 1]."""

    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.ticks = _ticks(len(qresi))

    def phi(self, i: int) -> nn.Module:
        return nn.ModuleList.__getitem__(self, i)

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.phi(self.index(at_from_0_to_1))


def _position(si: int, sn: int) -> float:
    """Scale si's position in [0, 1], si / (SN - 1) as VAR (0 for a single scale, where VAR divides by zero)."""
    return si / (sn - 1) if sn > 1 else 0.0


# ---------------------------------------------------------------------------------------


class MultiScaleVQ(nn.Module):
    """VAR's multi-scale residual vector quantizer (``VectorQuantizer2``), its forward fused.

    Constructor arguments, attributes and ``state_dict`` keys are VAR's, so a VAR checkpoint
    loads as is: ``embedding.weight`` [vocab_size, Cvae], ``ema_vocab_hit_SV`` [SN, vocab_size]
    and the Phi convolutions ``quant_resi.qresi.*`` (share_quant_resi=1),
    ``quant_resi.qresi_ls.<i>.*`` (share_quant_resi=K > 1, VAR's default K=4) or
    ``quant_resi.<i>.*`` (share_quant_resi=0: ``default_qresi_counts`` or SN of them); none when
    |quant_resi| <= 1e-6 (Phi is then the identity).

    Args:
        vocab_size: K, the number of codes.
        Cvae: the channel count C of the feature maps (the code dimension).
        using_znorm: search by cosine similarity (both sides l2-normalised) instead of l2.
        beta: weight of the commitment term mse(sg(f_hat), f).
        default_qresi_counts: number of Phis when share_quant_resi=0 (0: one per scale).
        v_patch_nums: the scales' sides, small to large; the last is the feature map's H = W.
        quant_resi: the Phi mixing ratio r (its absolute value is used).
        share_quant_resi: 0 non-shared, 1 shared, K > 1 partially shared (K Phis).

    Results: the indices are VAR's (the search is exact; only a near-tie within rounding could
    go the other way) and f_hat, the loss and the gradients agree with VAR's to rounding, the
    bicubic upsampling being :func:`upsample_bicubic` (F.interpolate's result up to rounding).
    Deviations from VAR: the codebook hit statistics ``ema_vocab_hit_SV`` are updated in every
    training forward (VAR updates them only under torch.distributed; hits are all-reduced when
    it is initialised), so ``ret_usages`` works in a single process too; ``record_hit`` is a
    tensor (VAR: a Python int), so a compiled forward does not recompile as it counts; a float64
    module computes in float64 (VAR always casts to float32); autocast is disabled for the
    input's device (VAR: CUDA only); a single scale sits at position 0 (VAR divides by zero).
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size: int = vocab_size
        self.Cvae: int = Cvae
        self.using_znorm: bool = using_znorm
        self.v_patch_nums: Tuple[int, ...] = tuple(v_patch_nums)
        if not self.v_patch_nums:
            raise ValueError("MultiScaleVQ: v_patch_nums must name at least one scale")

        self.quant_resi_ratio = quant_resi

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        sn = len(self.v_patch_nums)
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or sn)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        # The Phi of each training scale, fixed here so that forward stays free of numpy.
        self._phi_ids = tuple(self.quant_resi.index(_position(si, sn)) for si in range(sn))

        self.register_buffer("ema_vocab_hit_SV", torch.full((sn, vocab_size), fill_value=0.0))
        self.register_buffer("record_hit", torch.zeros((), dtype=torch.int64), persistent=False)

        self.beta: float = beta
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.prog_si = -1  # VAR's progressive training: the last scale in use (-1: all)

    def eini(self, eini: float) -> None:
        """VAR's embedding initialisation: truncated normal (std eini) if > 0, uniform +-|eini|/K if < 0."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    def extra_repr(self) -> str:
        return (f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}  |  S={len(self.v_patch_nums)}, "
                f"quant_resi={self.quant_resi_ratio}")

    @property
    def _metric(self) -> str:
        return "cosine" if self.using_znorm else "l2"

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.embedding.weight.dtype == torch.float64 else torch.float32

    def _phi(self, si: int) -> nn.Module:
        return self.quant_resi.phi(self._phi_ids[si])

    def _check_feature_map(self, f_BChw: torch.Tensor, last: Tuple[int, int]) -> None:
        if f_BChw.dim() != 4 or tuple(f_BChw.shape[2:]) != last:
            raise ValueError(f"MultiScaleVQ: f_BChw must be [B, C, H, W] with (H, W) = the last patch size {last}, "
                             f"got shape {tuple(f_BChw.shape)}")

    def _count_hits(self, indices: List[torch.Tensor]) -> None:
        """Fold every scale's code counts into ema_vocab_hit_SV with VAR's schedule: a copy while
        record_hit is 0, then 0.9 / 0.1 below 100 updates, then 0.99 / 0.01, where record_hit
        counts scales, not calls, as in VAR (scale si of this call sees record_hit + si). One
        histogram for all scales: code k of scale si in bin si * V + k, index -1 (a NaN cell) in
        a last bin that is dropped."""
        sn, v = len(indices), self.vocab_size
        bins = torch.cat([torch.where(idx >= 0, idx + si * v, sn * v).reshape(-1) for si, idx in enumerate(indices)])
        hits = torch.zeros(sn * v + 1, dtype=torch.float32, device=bins.device)
        hits = hits.index_add_(0, bins, torch.ones(bins.shape, dtype=torch.float32, device=bins.device))
        hits = hits[:-1].view(sn, v)
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hits)
        n = (self.record_hit + torch.arange(sn, device=bins.device)).unsqueeze(1)
        keep = torch.where(n == 0, 0.0, torch.where(n < 100, 0.9, 0.99))
        new = torch.where(n == 0, 1.0, torch.where(n < 100, 0.1, 0.01))
        self.ema_vocab_hit_SV.copy_(self.ema_vocab_hit_SV * keep + hits * new)
        self.record_hit.add_(sn)

    # ===================== forward: VQ-VAE training =====================
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False, ret_indices: bool = False):
        """Quantize f_BChw [B, Cvae, H, W] (H = W = v_patch_nums[-1]) scale by scale.

        Returns ``(f_hat, usages, mean_vq_loss)`` as VAR:
            f_hat: [B, Cvae, H, W] float32 (float64 for a float64 module), the sum of the scales'
                Phi outputs, straight-through: its gradient reaches f_BChw unchanged.
            usages: None, or with ``ret_usages`` the percentage of codes per scale whose hit
                EMA is at least 8% of a uniform share (a host sync: ``.item()`` per scale).
            mean_vq_loss: scalar, mean over scales of beta * mse(sg(f_hat), f) + mse(f_hat, sg(f)).
        With ``ret_indices`` (not in VAR) a fourth item: the codes of every scale, [B, pn * pn] each
        (as :meth:`f_to_idxBl_or_fhat` gives them), from this same pass.
        """
        dt = self._compute_dtype()
        f = f_BChw.to(dt)
        sn = len(self.v_patch_nums)
        self._check_feature_map(f, (self.v_patch_nums[-1],) * 2)
        H, W = f.shape[2], f.shape[3]
        f_no_grad = f.detach()
        weight = self.embedding.weight

        with torch.autocast(device_type=f.device.type, enabled=False):
            # VAR's loss per scale is beta * mse(sg(f_hat), f) + mse(f_hat, sg(f)): two equal values
            # m, m's gradient 2 (f_hat - f) / N to f_hat and beta times its negative to f. One
            # mse against target = sg(f) + beta * (f - sg(f)) (equal to f bit for bit; its
            # gradient reaches f times beta) has both gradients, and m + beta * sg(m) VAR's value.
            target = f_no_grad + (f - f_no_grad) * self.beta
            f_rest = f_no_grad
            f_hat = torch.zeros_like(f_no_grad)
            mean_vq_loss = f.new_zeros(())
            indices = []
            for si, pn in enumerate(self.v_patch_nums):
                idx, h = multiscale_quantize_step(f_rest, weight, pn, self._metric)
                indices.append(idx)
                if si != sn - 1:
                    h = upsample_bicubic(h, (H, W))
                h = self._phi(si)(h)
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                m = F.mse_loss(f_hat, target)
                mean_vq_loss = mean_vq_loss + (m + m.detach() * self.beta)
            mean_vq_loss = mean_vq_loss * (1.0 / sn)
            f_hat = (f_hat.detach() - f_no_grad) + f
            if self.training:
                self._count_hits(indices)

        usages = None
        if ret_usages:
            world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
            margin = world * (f.numel() / f.shape[1]) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(sn)]
        if ret_indices:
            return f_hat, usages, mean_vq_loss, [idx.reshape(idx.shape[0], -1) for idx in indices]
        return f_hat, usages, mean_vq_loss

    # ===================== helpers of VAR's VQVAE and VAR transformer =====================
    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> Union[List[torch.Tensor], torch.Tensor]:
        """f_hat from each scale's codes ms_h_BChw[si] [B, Cvae, pn, pn]: a list of the running
        f_hat after every scale, or only the last (``last_one``). ``all_to_max_scale=False`` is
        VAR's experimental variant that upsamples f_hat scale by scale instead of each h."""
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        sn = len(self.v_patch_nums)
        dt = self._compute_dtype()
        out: List[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=dt)
            for si in range(sn):
                h = ms_h_BChw[si]
                if si < sn - 1:
                    h = upsample_bicubic(h, (H, W))
                f_hat = f_hat + self._phi(si)(h)
                out.append(f_hat)
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=dt)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = upsample_bicubic(f_hat, (pn, pn)) + self._phi(si)(ms_h_BChw[si])
                out.append(f_hat)
        return f_hat if last_one else out

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
                           ) -> List[torch.Tensor]:
        """Quantize f_BChw scale by scale (sides ``v_patch_nums``, default the module's; an entry
        may be a pair (ph, pw); the last must be (H, W)). Returns per scale either the running
        f_hat [B, C, H, W] (``to_fhat``) or the indices [B, ph * pw]. No loss, no statistics."""
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        self._check_feature_map(f_BChw, patch_hws[-1])
        B, _, H, W = f_BChw.shape
        f_rest = f_BChw.detach()
        f_hat = torch.zeros_like(f_rest)
        sn = len(patch_hws)
        out: List[torch.Tensor] = []
        for si, (ph, pw) in enumerate(patch_hws):
            if 0 <= self.prog_si < si:
                break
            idx, h = multiscale_quantize_step(f_rest, self.embedding.weight, (ph, pw), self._metric)
            if si != sn - 1:
                h = upsample_bicubic(h, (H, W))
            h = self.quant_resi[_position(si, sn)](h)
            # VAR adds in place: sums in the promoted dtype, stored in f's
            f_hat = (f_hat + h).to(f_rest.dtype)
            f_rest = (f_rest - h.detach()).to(f_rest.dtype)
            out.append(f_hat if to_fhat else idx.reshape(B, ph * pw))
        return out

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """VAR's teacher-forcing input: from the indices [B, pn * pn] of every scale, the running
        f_hat area-downsampled to each next scale, channels last, concatenated:
        [B, sum(pn**2 for pn in v_patch_nums[1:]), Cvae] (None for a single scale)."""
        next_scales = []
        B = gt_ms_idx_Bl[0].shape[0]
        C = self.Cvae
        H = W = self.v_patch_nums[-1]
        sn = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=self._compute_dtype())
        pn_next = self.v_patch_nums[0]
        for si in range(sn - 1):
            if self.prog_si == 0 or (0 <= self.prog_si - 1 < si):
                break
            h = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn_next, pn_next)
            f_hat = f_hat + self._phi(si)(upsample_bicubic(h, (H, W)))
            pn_next = self.v_patch_nums[si + 1]
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            next_scales.append(nxt.view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """VAR inference: add scale si's codes h_BChw [B, C, pn, pn] into f_hat in place; return
        (f_hat, the next scale's input: f_hat area-downsampled to it, or f_hat after the last)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[_position(si, SN)](upsample_bicubic(h_BChw, (HW, HW))))
            nxt = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")
        f_hat.add_(self.quant_resi[_position(si, SN)](h_BChw))
        return f_hat, f_hat
