"""Image and codebook metrics shared by the trainer and the evaluator.

Images are compared in [0, 1] (a model's [-1, 1] pictures through :func:`to_unit`). SSIM follows
Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True``: an 11-tap Gaussian
window (sigma 1.5), sample covariances, K1 = 0.01, K2 = 0.03, the mean over the pixels whose
window lies inside the image, then over channels.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

PSNR_MSE_FLOOR = 1e-10  # identical images score 100 dB instead of infinity, so means stay finite


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A [-1, 1] picture as [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair [B, C, H, W] in [0, 1] (peak 1): [B]."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    mse = (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(PSNR_MSE_FLOOR))


def _gaussian_window(sigma: float, radius: int, dtype, device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-t * t / (2 * sigma * sigma))
    return (w / w.sum()).to(dtype=dtype, device=device)


def _blur(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode filtering of [N, 1, H, W] with the 1-D window ``w``."""
    k = w.numel()
    x = F.conv2d(x, w.view(1, 1, k, 1))
    return F.conv2d(x, w.view(1, 1, 1, k))


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """Structural similarity of each image pair [B, C, H, W] in [0, 1] (data range 1): [B].

    Equal to ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, data_range=1,
    channel_axis=0)`` per image: scikit-image filters the whole image and then drops ``radius``
    border pixels, which is the same as filtering only where the window fits (valid mode).
    """
    if min(a.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"ssim needs images of at least {2 * radius + 1} pixels a side, got {tuple(a.shape[-2:])}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    bsz, c, h, w_ = a.shape
    x = a.to(dtype).reshape(bsz * c, 1, h, w_)
    y = b.to(dtype).reshape(bsz * c, 1, h, w_)
    w = _gaussian_window(sigma, radius, dtype, a.device)
    mu_x, mu_y = _blur(x, w), _blur(y, w)
    n = (2 * radius + 1) ** 2
    cov_norm = n / (n - 1)  # sample covariance, as scikit-image's use_sample_covariance=True
    var_x = cov_norm * (_blur(x * x, w) - mu_x * mu_x)
    var_y = cov_norm * (_blur(y * y, w) - mu_y * mu_y)
    cov = cov_norm * (_blur(x * y, w) - mu_x * mu_y)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).view(bsz, c).mean(1)


def bits_per_image(indices: Dict[str, torch.Tensor], sizes: Dict[str, int]) -> float:
    """Bits a model's codes take per image: the sum over levels of tokens per image times log2 K.
    ``indices`` are one batch's ids per level ([B, ...])."""
    return sum(indices[k][0].numel() * math.log2(sizes[k]) for k in sizes)


class CodebookStats:
    """Code counts per level, accumulated on the device without host syncs (ids < 0 are skipped).

    :meth:`summary` (optionally summing the counts over ranks) gives per level ``usage`` (the
    fraction of codes used at least once), ``perplexity`` (exp of the entropy of the code
    frequencies; K when all codes are equally used) and ``dead`` (codes never used).
    """

    def __init__(self, sizes: Dict[str, int], device=None):
        self.sizes = dict(sizes)
        self.counts = {k: torch.zeros(n, dtype=torch.int64, device=device) for k, n in self.sizes.items()}

    def update(self, indices: Dict[str, torch.Tensor]):
        for k, counts in self.counts.items():
            ids = indices[k].detach().reshape(-1).to(counts.device)
            valid = (ids >= 0).to(torch.int64)
            counts.index_add_(0, ids.clamp_min(0), valid)

    def reset(self):
        for counts in self.counts.values():
            counts.zero_()

    def summary(self, all_reduce: bool = False) -> Dict[str, Dict[str, float]]:
        if not self.counts:
            return {}
        flat = torch.cat(list(self.counts.values()))
        if all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.clone()
            dist.all_reduce(flat)
        out = {}
        for k, counts in zip(self.counts, flat.split(list(self.sizes.values()))):
            out[k] = codebook_summary(counts)
        return out


def codebook_summary(counts: torch.Tensor) -> Dict[str, float]:
    """``codes`` (K), ``usage``, ``perplexity``, ``dead`` and ``tokens`` of one level's code counts [K]."""
    counts = counts.double()
    total = counts.sum()
    p = counts / total.clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    used = (counts > 0).sum()
    vals = torch.stack([used / counts.numel(), entropy.exp(), counts.numel() - used, total]).tolist()
    return {"codes": counts.numel(), "usage": vals[0], "perplexity": vals[1] if vals[3] > 0 else 0.0,
            "dead": int(vals[2]), "tokens": int(vals[3])}


def flatten_codebook_summary(summary: Dict[str, Dict[str, float]], prefix: str = "") -> Dict[str, float]:
    """``{level: {usage, perplexity, dead}}`` as flat log keys ``<prefix>usage/<level>`` etc."""
    return {f"{prefix}{name}/{level}": vals[name] for level, vals in summary.items()
            for name in ("usage", "perplexity", "dead")}


def mean_usage(summary: Dict[str, Dict[str, float]]) -> Optional[float]:
    """The mean usage over levels (None without codebooks)."""
    vals = [v["usage"] for v in summary.values()]
    return sum(vals) / len(vals) if vals else None
