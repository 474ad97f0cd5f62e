"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning", arXiv:1711.00937).

The paper's image model: an encoder of two stride-2 4x4 convolutions and two residual blocks
(ReLU, 3x3 conv, ReLU, 1x1 conv), a nearest-code quantizer with a straight-through gradient, and
a decoder of two residual blocks and two stride-2 4x4 transposed convolutions. The loss is

    ||x - D(z_q)||^2 + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2,   beta = 0.25

(reconstruction as a mean squared error in [-1, 1], both VQ terms means over elements). With
``ema: true`` the codebook is instead the exponential moving average of the encoder outputs
assigned to each code (the paper's appendix, DeepMind Sonnet's ``VectorQuantizerEMA``: decay 0.99,
cluster sizes Laplace-smoothed with eps 1e-5) and the loss has no codebook term.

The convolution stacks (:class:`VQVAEEncoder`, :class:`VQVAEDecoder`) are DeepMind's published
VQ-VAE example's (Sonnet ``vqvae_example``; rosinality's ``vq-vae-2-pytorch`` uses the same): the
first stride-2 convolution has ``hidden // 2`` channels, a 3x3 convolution follows the strided
ones, and a ReLU ends the encoder; a 1x1 convolution (``pre_vq_conv``) maps to the code width.
Their ``blocks`` keep rosinality's ``nn.Sequential`` indices. :mod:`models.vqvae2` builds on them.

Deviations: the EMA codebook starts as vector-quantize-pytorch's (uniform codes, cluster sizes 1,
sums equal to the codes) rather than Sonnet's zero statistics with zero-debiased averages; the
update rule itself is Sonnet's (:func:`vqkernels.ema_update_`). ``dead_code_threshold`` > 0 (EMA
only; off by default and in ``base``) adds random restarts (Dhariwal et al. 2020, Jukebox): a code
whose EMA count falls below it is replaced by a random encoder output of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.nn import VectorQuantize, VectorQuantizer

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .tokenizer import StepOutput, Tokenizer


class ResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (the paper's residual block; rosinality's ``conv`` indices)."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(res_channels, channels, 1))

    def forward(self, x):
        return x + self.conv(x)


def _check_stride(stride: int, who: str) -> None:
    if stride not in (2, 4):
        raise ValueError(f"{who}: stride must be 2 or 4, got {stride}")


class VQVAEEncoder(nn.Module):
    """[B, in_channels, H, W] -> [B, hidden, H / stride, W / stride] (stride 4 or 2): 4x4 stride-2
    convolutions (the first to ``hidden // 2``), a 3x3 convolution, residual blocks, a ReLU."""

    def __init__(self, in_channels: int, hidden: int, res_channels: int, num_res_blocks: int, stride: int):
        super().__init__()
        _check_stride(stride, "VQVAEEncoder")
        layers = [nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1), nn.ReLU()]
        if stride == 4:
            layers += [nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
                       nn.Conv2d(hidden, hidden, 3, padding=1)]
        else:
            layers.append(nn.Conv2d(hidden // 2, hidden, 3, padding=1))
        layers += [ResBlock(hidden, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return self.blocks(x)


class VQVAEDecoder(nn.Module):
    """[B, in_channels, h, w] -> [B, out_channels, h * stride, w * stride] (stride 4 or 2): a 3x3
    convolution, residual blocks, a ReLU, 4x4 stride-2 transposed convolutions (via ``hidden // 2``)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, res_channels: int, num_res_blocks: int,
                 stride: int):
        super().__init__()
        _check_stride(stride, "VQVAEDecoder")
        layers = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        if stride == 4:
            layers += [nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
                       nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)]
        else:
            layers.append(nn.ConvTranspose2d(hidden, out_channels, 4, stride=2, padding=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, z):
        return self.blocks(z)


def vq_layer(cfg, ema: bool) -> nn.Module:
    """The VQ-VAE quantizer of ``[B, embed_dim, h, w]`` maps for a VQ-VAE config: with ``ema`` the
    Sonnet EMA codebook (loss ``beta`` x commitment; optionally with dead-code restarts), else a
    codebook learned by gradient (codebook + ``beta`` x commitment)."""
    if ema:
        return VectorQuantize(cfg.embed_dim, cfg.codebook_size, decay=cfg.decay, eps=cfg.eps,
                              commitment_weight=cfg.beta, accept_image_fmap=True, rotation_trick=False,
                              threshold_ema_dead_code=cfg.dead_code_threshold)
    return VectorQuantizer(cfg.codebook_size, cfg.embed_dim, beta=cfg.beta, sane_index_shape=True, legacy=False)


def quantize(layer: nn.Module, z: torch.Tensor):
    """``(z_q, ids [B, h, w], loss)`` of a :func:`vq_layer` layer."""
    if isinstance(layer, VectorQuantize):
        return layer(z)
    z_q, loss, (_, _, ids) = layer(z)
    return z_q, ids, loss


def lookup(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The codes ``[B, dim, h, w]`` of ids ``[B, h, w]`` in a :func:`vq_layer` layer."""
    if isinstance(layer, VectorQuantize):
        return layer.get_output_from_indices(ids)
    return layer.embedding(ids).permute(0, 3, 1, 2)


def check_vq_config(cfg, factor: int) -> None:
    """ValueErrors for the fields the VQ-VAE systems share (``factor``: the total downsampling)."""
    if cfg.resolution <= 0 or cfg.resolution % factor:
        raise ValueError(f"{type(cfg).__name__}: resolution {cfg.resolution} must be a positive multiple of the "
                         f"downsampling factor {factor}")
    check_fields(cfg, at_least=dict.fromkeys(("in_channels", "hidden", "res_channels", "embed_dim", "codebook_size"), 1),
                 non_negative=("num_res_blocks", "beta"), unit_open=("decay",))
    if cfg.hidden % 2:
        raise ValueError(f"{type(cfg).__name__}: hidden must be even (the first convolution has hidden // 2 "
                         f"channels), got {cfg.hidden}")
    if cfg.eps <= 0:
        raise ValueError(f"{type(cfg).__name__}: eps must be > 0, got {cfg.eps}")
    if cfg.dead_code_threshold < 0 or (cfg.dead_code_threshold > 0 and not getattr(cfg, "ema", True)):
        raise ValueError(f"{type(cfg).__name__}: dead_code_threshold must be >= 0 and needs the EMA codebook "
                         f"(ema: true), got {cfg.dead_code_threshold}")


@dataclass
class VQVAEConfig:
    resolution: int = 32
    in_channels: int = 3
    hidden: int = 128             # channels of the convolution stacks
    res_channels: int = 32        # hidden channels of the residual blocks
    num_res_blocks: int = 2
    embed_dim: int = 64           # code width D
    codebook_size: int = 512      # K
    beta: float = 0.25            # commitment weight
    ema: bool = False             # Sonnet's EMA codebook instead of the codebook loss
    decay: float = 0.99           # EMA decay (ema only)
    eps: float = 1e-5             # EMA Laplace smoothing (ema only)
    dead_code_threshold: float = 0.0  # ema only: codes whose EMA count falls below it restart (0: off)


class VQVAE(Tokenizer):
    """The VQ-VAE image model: 4x downsampling to one code per position."""

    config_cls = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig):
        super().__init__(cfg)
        check_vq_config(cfg, 4)
        self.encoder = VQVAEEncoder(cfg.in_channels, cfg.hidden, cfg.res_channels, cfg.num_res_blocks, 4)
        self.pre_vq_conv = nn.Conv2d(cfg.hidden, cfg.embed_dim, 1)
        self.quantize = vq_layer(cfg, cfg.ema)
        self.decoder = VQVAEDecoder(cfg.embed_dim, cfg.in_channels, cfg.hidden, cfg.res_channels,
                                    cfg.num_res_blocks, 4)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        z_q, ids, vq_loss = quantize(self.quantize, self.pre_vq_conv(self.encoder(x)))
        recon = self.decoder(z_q)
        rec_loss = F.mse_loss(recon, x)
        return StepOutput(loss=rec_loss + vq_loss, recon=recon, indices={"codes": ids},
                          logs={"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach()})

    def encode(self, x):
        return quantize(self.quantize, self.pre_vq_conv(self.encoder(x)))[1]

    def decode(self, indices):
        return self.decoder(lookup(self.quantize, indices))

    def codebook_sizes(self):
        return {"codes": self.cfg.codebook_size}


Model = VQVAE

PRESETS = {
    # 32x32 photos -> 8x8 codes on 2 CPU cores in a few minutes: the EMA codebook, D = 8 and dead-code
    # restarts (not in the paper) for codebook usage.
    "tiny": Preset(model=VQVAEConfig(hidden=64, res_channels=32, embed_dim=8, codebook_size=512, ema=True,
                                     dead_code_threshold=1.0),
                   train=TrainConfig(steps=2500, batch_size=32, lr=3e-4, betas=(0.9, 0.999), warmup_steps=50,
                                     grad_clip=0.0),
                   data=DataConfig(name="photos")),
    # The paper's ImageNet model: 128x128 -> 32x32 codes, K = 512, 256 hidden units, Adam 2e-4,
    # batch 128, 250k steps. D = 64 is Sonnet's example's (the paper does not give D for ImageNet).
    "base": Preset(model=VQVAEConfig(resolution=128, hidden=256, res_channels=256, embed_dim=64, codebook_size=512),
                   train=TrainConfig(steps=250_000, batch_size=128, lr=2e-4, betas=(0.9, 0.999), warmup_steps=0,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
