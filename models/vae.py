"""Gaussian VAE (Kingma & Welling 2014, arXiv:1312.6114): the baseline without a quantizer.

The encoder gives a diagonal Gaussian posterior ``N(mean, exp(logvar))`` per latent element; training
decodes a reparameterised sample and minimises, per image and divided by its number of pixel
values, the squared reconstruction error plus ``kl_weight`` times the KL divergence to
``N(0, I)`` summed over the latent elements (a beta-VAE weighting; a small weight keeps
reconstructions sharp). The convolution stacks are taming's / latent-diffusion's
(:class:`models.blocks.Encoder` with ``double_z``, :class:`models.blocks.Decoder`) with
latent-diffusion's ``AutoencoderKL`` 1x1 ``quant_conv`` (2 z_channels -> 2 embed_dim) and
``post_quant_conv`` (embed_dim -> z_channels), under the same names, and its posterior's
``logvar`` clamp to [-30, 20].

There are no codes: :meth:`encode` returns the posterior mean latent (float ``[B, embed_dim, h,
w]``), :meth:`decode` takes such a latent, and :meth:`codebook_sizes` is empty.

Deviations from latent-diffusion's KL autoencoder: a mean squared error instead of its L1 +
LPIPS loss with a learned log-variance, and no discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .blocks import Decoder, Encoder, check_conv_fields
from .config import DataConfig, TrainConfig, check_fields
from .tokenizer import StepOutput, Tokenizer


@dataclass
class VAEConfig:
    resolution: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)   # downsampling 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = ()
    z_channels: int = 4
    embed_dim: int = 4            # latent channels
    dropout: float = 0.0
    kl_weight: float = 1e-6       # beta: the KL term's weight (latent-diffusion's kl_weight)


def _check_config(cfg: VAEConfig) -> None:
    check_conv_fields(cfg)
    check_fields(cfg, at_least={"embed_dim": 1}, non_negative=("kl_weight",))
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"VAEConfig: dropout must be in [0, 1), got {cfg.dropout}")


class VAE(Tokenizer):
    """A continuous-latent autoencoder with a Gaussian posterior (no codebook)."""

    config_cls = VAEConfig

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        _check_config(cfg)
        blocks = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                      attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution, z_channels=cfg.z_channels,
                      dropout=cfg.dropout)
        self.encoder = Encoder(in_channels=cfg.in_channels, double_z=True, **blocks)
        self.decoder = Decoder(out_ch=cfg.in_channels, **blocks)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def posterior(self, x: torch.Tensor):
        """(mean, logvar) of the posterior, each [B, embed_dim, h, w]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = self.decode(z)
        rec_loss = F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / x.shape[0]  # per image
        loss = rec_loss + self.cfg.kl_weight * kl / x[0].numel()
        return StepOutput(loss=loss, recon=recon, logs={"rec_loss": rec_loss.detach(), "kl": kl.detach()})

    def encode(self, x):
        """The posterior mean latent (float; this model has no codes)."""
        return self.posterior(x)[0]

    def decode(self, indices):
        """Images from latents [B, embed_dim, h, w] (what :meth:`encode` returns)."""
        return self.decoder(self.post_quant_conv(indices))


Model = VAE

PRESETS = {
    # 32x32 photos -> an 8x8x4 latent on 2 CPU cores in a few minutes.
    "tiny": Preset(model=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, kl_weight=1e-4),
                   train=TrainConfig(steps=1500, batch_size=32, lr=1e-3, betas=(0.9, 0.999), warmup_steps=50,
                                     grad_clip=1.0),
                   data=DataConfig(name="photos")),
    # latent-diffusion's KL-f8 autoencoder (its models/first_stage_models/kl-f8/config.yaml: 256x256 ->
    # 32x32x4, ch 128, ch_mult 1,2,4,4, 2 res blocks, only the middle attention, kl_weight 1e-6, batch 4,
    # base lr 4.5e-6 per image: 1.8e-5 on one GPU; Adam (0.5, 0.9)). The step count is ours.
    "base": Preset(model=VAEConfig(resolution=256),
                   train=TrainConfig(steps=500_000, batch_size=4, lr=1.8e-5, betas=(0.5, 0.9), warmup_steps=0,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
