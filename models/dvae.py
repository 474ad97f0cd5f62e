"""DALL-E's discrete VAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv:2102.12092).

The encoder outputs logits over K codes per position (K = 8192, a 32x32 grid at 256x256); training
maximises the evidence lower bound with the Gumbel-softmax relaxation: a sample
``y = softmax((logits + g) / tau)`` (soft in the forward and backward passes) goes through the
decoder, whose first layer, a 1x1 convolution, is the codebook (``y @ W^T + b``). The loss, per
image and divided by its number of pixel values, is

    NLL_logit-Laplace(x | decoder) + beta * sum_positions KL(softmax(logits) || uniform(K))

with the temperature ``tau`` annealed from 1 to 1/16 and ``beta`` ramped from 0 to 6.6 (the
paper: over the first 150k and 5k updates; cosine curves). The decoder outputs ``mu`` and
``ln b`` per pixel value of the logit-Laplace distribution on pixels mapped to
``(1 - 2 eps) x + eps`` (eps = 0.1)::

    -ln p(x) = ln(2 b) + ln(x (1 - x)) + |logit(x) - mu| / b

and the reconstruction is the mapped-back ``sigmoid(mu)``. Encoding takes the argmax of the
logits, decoding feeds the one-hot codes (the codebook rows) to the decoder, as ``dall_e``'s
usage notebook.

Module layout: :class:`Encoder` and :class:`Decoder` are openai/DALL-E's ``dall_e`` package
modules with their parameter names (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``,
... , ``blocks.output.conv.b``), so ``encoder.load_state_dict(dall_e_encoder.state_dict())`` loads
the released weights (at ``group_count = 4``). Both quantization paths go through
:func:`vqkernels.gumbel_quantize` with the decoder's input convolution as the codebook.

Deviations: ``group_count`` is configurable (DALL-E: 4; the tiny preset uses 3 for 4x
downsampling); the paper's step-size schedule is left to the trainer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels import gumbel_quantize

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .tokenizer import StepOutput, Tokenizer


class Conv2d(nn.Module):
    """DALL-E's convolution: weight ``w`` ~ N(0, 1 / (n_in kw^2)), bias ``b`` = 0, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=(n_in * kw ** 2) ** -0.5))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class Block(nn.Module):
    """DALL-E's ``EncoderBlock`` / ``DecoderBlock``: ``id_path(x) + res_path(x) / n_layers^2``, the
    residual path four ReLU-convolutions of widths ``n_out // 4`` and kernel sizes ``kernels``
    (encoder 3, 3, 3, 1; decoder 1, 3, 3, 3); ``id_path`` a 1x1 convolution when the width changes."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths, n_layers, kernels, resample: nn.Module = None, resample_name: str = ""):
    """A ``group_i``: blocks ``block_1``, ... of widths ``widths[0] -> widths[1] -> ...``, then ``resample``."""
    layers = [(f"block_{i + 1}", Block(widths[i], widths[i + 1], n_layers, kernels)) for i in range(len(widths) - 1)]
    if resample is not None:
        layers.append((resample_name, resample))
    return nn.Sequential(OrderedDict(layers))


class Encoder(nn.Module):
    """Images [B, C, R, R] (mapped pixels) -> logits [B, vocab_size, R / f, R / f], f = 2 ** (group_count - 1):
    a 7x7 convolution, ``group_count`` groups of blocks (widths n_hid * 1, 2, 4, ...), each but the last
    ending with a 2x2 max pool, then ReLU and a 1x1 convolution to the logits."""

    def __init__(self, group_count: int, n_hid: int, n_blk_per_group: int, input_channels: int, vocab_size: int):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        layers = [("input", Conv2d(input_channels, n_hid, 7))]
        for g in range(group_count):
            n_in, n_out = n_hid * 2 ** max(g - 1, 0), n_hid * 2 ** g
            pool = nn.MaxPool2d(kernel_size=2) if g < group_count - 1 else None
            layers.append((f"group_{g + 1}", _group([n_in] + [n_out] * n_blk_per_group, n_layers, (3, 3, 3, 1),
                                                    pool, "pool")))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_hid * 2 ** (group_count - 1), vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    """Codes -> logit-Laplace statistics [B, 2 * output_channels, R, R] (``mu``, then ``ln b``): the
    1x1 input convolution from ``vocab_size`` one-hot channels (the codebook, :attr:`codebook`),
    ``group_count`` groups of blocks (widths n_hid * ..., 4, 2, 1), each but the last ending with a
    nearest 2x upsampling, then ReLU and a 1x1 convolution."""

    def __init__(self, group_count: int, n_init: int, n_hid: int, n_blk_per_group: int, output_channels: int,
                 vocab_size: int):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        layers = [("input", Conv2d(vocab_size, n_init, 1))]
        for g in range(group_count):
            n_in, n_out = n_init if g == 0 else n_hid * 2 ** (group_count - g), n_hid * 2 ** (group_count - 1 - g)
            up = nn.Upsample(scale_factor=2, mode="nearest") if g < group_count - 1 else None
            layers.append((f"group_{g + 1}", _group([n_in] + [n_out] * n_blk_per_group, n_layers, (1, 3, 3, 3),
                                                    up, "upsample")))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def codebook(self) -> torch.Tensor:
        """The input convolution's weight as a codebook [vocab_size, n_init]."""
        return self.blocks.input.w[:, :, 0, 0].t()

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The statistics from codebook mixtures [B, n_init, h, w] (the input convolution's product
        with the one-hot / relaxed codes, before its bias)."""
        return self.blocks[1:](codes + self.blocks.input.b.view(1, -1, 1, 1))

    def forward(self, z):
        return self.blocks(z)


def cosine_ramp(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` (and after) along half a cosine."""
    if step >= steps:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise -ln p(x) of the logit-Laplace distribution (x in (0, 1), location mu, log-scale ln b)."""
    logit = torch.log(x) - torch.log1p(-x)
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (logit - mu).abs() * torch.exp(-log_b)


@dataclass
class DVAEConfig:
    resolution: int = 32
    in_channels: int = 3
    group_count: int = 4          # downsampling 2 ** (group_count - 1)
    n_hid: int = 256              # the first group's width (a multiple of 4)
    n_blk_per_group: int = 2
    n_init: int = 128             # the codebook width (the decoder input convolution's output)
    vocab_size: int = 8192        # K
    kl_weight: float = 6.6        # beta, the KL term's final weight
    kl_warmup_steps: int = 5000   # beta ramps from 0 over these steps
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_anneal_steps: int = 150_000
    logit_laplace_eps: float = 0.1


def _check_config(cfg: DVAEConfig) -> None:
    factor = 2 ** (cfg.group_count - 1) if cfg.group_count >= 1 else 1
    if cfg.resolution <= 0 or cfg.resolution % factor:
        raise ValueError(f"DVAEConfig: resolution {cfg.resolution} must be a positive multiple of the downsampling "
                         f"factor {factor} (2 ** (group_count - 1))")
    check_fields(cfg, at_least=dict.fromkeys(("in_channels", "group_count", "n_blk_per_group", "n_init", "vocab_size"), 1),
                 non_negative=("kl_weight", "kl_warmup_steps", "tau_anneal_steps"))
    if cfg.n_hid < 4 or cfg.n_hid % 4:
        raise ValueError(f"DVAEConfig: n_hid must be a positive multiple of 4 (blocks use n_out // 4), got {cfg.n_hid}")
    if not (cfg.tau_start > 0 and cfg.tau_end > 0):
        raise ValueError(f"DVAEConfig: tau_start and tau_end must be > 0, got {cfg.tau_start}, {cfg.tau_end}")
    if not 0.0 < cfg.logit_laplace_eps < 0.5:
        raise ValueError(f"DVAEConfig: logit_laplace_eps must be in (0, 0.5), got {cfg.logit_laplace_eps}")


class DVAE(Tokenizer):
    """DALL-E's dVAE: one code map of ``vocab_size`` codes at resolution / 2 ** (group_count - 1)."""

    config_cls = DVAEConfig

    def __init__(self, cfg: DVAEConfig):
        super().__init__(cfg)
        _check_config(cfg)
        self.encoder = Encoder(cfg.group_count, cfg.n_hid, cfg.n_blk_per_group, cfg.in_channels, cfg.vocab_size)
        self.decoder = Decoder(cfg.group_count, cfg.n_init, cfg.n_hid, cfg.n_blk_per_group, cfg.in_channels,
                               cfg.vocab_size)

    # ---- schedules ----
    def temperature(self, step: int) -> float:
        return cosine_ramp(step, self.cfg.tau_start, self.cfg.tau_end, self.cfg.tau_anneal_steps)

    def beta(self, step: int) -> float:
        return cosine_ramp(step, 0.0, self.cfg.kl_weight, self.cfg.kl_warmup_steps)

    # ---- pixels ----
    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> [eps, 1 - eps] (DALL-E's map_pixels of [0, 1] pixels)."""
        eps = self.cfg.logit_laplace_eps
        return (1 - 2 * eps) * (x + 1) / 2 + eps

    def unmap_pixels(self, stats: torch.Tensor) -> torch.Tensor:
        """The decoder statistics' ``sigmoid(mu)`` back to [-1, 1] images (DALL-E's unmap_pixels)."""
        eps = self.cfg.logit_laplace_eps
        mu = stats[:, :self.cfg.in_channels]
        return ((torch.sigmoid(mu) - eps) / (1 - 2 * eps)).clamp(0, 1) * 2 - 1

    # ---- training ----
    def _logit_rows(self, x):
        logits = self.encoder(self.map_pixels(x))
        b, k, h, w = logits.shape
        return logits.permute(0, 2, 3, 1).reshape(-1, k), (b, h, w)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        rows, (b, h, w) = self._logit_rows(x)
        gumbels = -torch.empty_like(rows).exponential_().log()
        tau, beta = self.temperature(step), self.beta(step)
        soft, ids, kl = gumbel_quantize(rows, self.decoder.codebook, gumbels, tau, hard=False)
        stats = self.decoder.from_codes(soft.view(b, h, w, -1).permute(0, 3, 1, 2))
        c = self.cfg.in_channels
        nll = logit_laplace_nll(self.map_pixels(x), stats[:, :c], stats[:, c:]).mean()
        # The ELBO per pixel value: the KL is summed over the h * w positions of each image.
        loss = nll + beta * kl * (h * w) / x[0].numel()
        logs = {"nll": nll.detach(), "kl": kl.detach(), "tau": x.new_tensor(tau), "beta": x.new_tensor(beta)}
        return StepOutput(loss=loss, recon=self.unmap_pixels(stats), indices={"codes": ids.view(b, h, w)}, logs=logs)

    # ---- tokens ----
    def encode(self, x):
        rows, (b, h, w) = self._logit_rows(x)
        # argmax of the logits: the op's hard path with zero noise
        _, ids, _ = gumbel_quantize(rows, self.decoder.codebook, torch.zeros_like(rows), 1.0, hard=True)
        return ids.view(b, h, w)

    def decode(self, indices):
        codes = F.embedding(indices, self.decoder.codebook).permute(0, 3, 1, 2)
        return self.unmap_pixels(self.decoder.from_codes(codes))

    def codebook_sizes(self):
        return {"codes": self.cfg.vocab_size}


Model = DVAE

PRESETS = {
    # 32x32 photos -> 8x8 codes of K = 256 on 2 CPU cores; the schedules shortened to the step count. With
    # K = 512 fewer than half the codes win an argmax on held-out images after this short run (47%; a slower
    # tau anneal or a larger KL weight lowered it further), with 256 more than half do, at the same PSNR.
    "tiny": Preset(model=DVAEConfig(group_count=3, n_hid=32, n_blk_per_group=1, n_init=64, vocab_size=256,
                                    kl_warmup_steps=100, tau_anneal_steps=500),
                   train=TrainConfig(steps=1800, batch_size=32, lr=1e-3, betas=(0.9, 0.999), warmup_steps=50,
                                     grad_clip=0.0),
                   data=DataConfig(name="photos")),
    # The paper's dVAE: 256x256 -> 32x32 codes, K = 8192, n_hid 256, 2 blocks per group; AdamW
    # (0.9, 0.999), weight decay 1e-4, batch 512, 3M updates, step size 1e-4 annealed to 1.25e-6.
    "base": Preset(model=DVAEConfig(resolution=256),
                   train=TrainConfig(steps=3_000_000, batch_size=512, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4,
                                     warmup_steps=0, min_lr_ratio=0.0125, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
