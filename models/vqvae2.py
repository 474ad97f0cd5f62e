"""VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
arXiv:1906.00446): a two-level hierarchy of EMA codebooks.

The structure is rosinality's ``vq-vae-2-pytorch`` (module names included): ``enc_b`` downsamples
the image 4x, ``enc_t`` 2x more; the top code map quantizes ``quantize_conv_t(enc_t)``; ``dec_t``
decodes the top codes 2x up, and the bottom code map quantizes ``quantize_conv_b(cat(dec_t(q_t),
enc_b))``; the decoder ``dec`` reconstructs from ``cat(upsample_t(q_t), q_b)``, ``upsample_t`` a
4x4 stride-2 transposed convolution. Both codebooks are the Sonnet EMA ones of :mod:`models.vqvae`
(decay 0.99, no codebook loss); the loss is the mean squared error plus beta = 0.25 times each
level's commitment term (rosinality: ``mse + 0.25 * (diff_t + diff_b)``).

The parameters carry rosinality's names and shapes, in its order (checked against its ``vqvae.py``;
with its codebooks copied in, the codes and reconstructions agree). Deviations: the codebooks are
:class:`vqkernels.nn.VectorQuantize` ones, so their buffers are ``quantize_t._codebook.embed``
[1, K, D] (and ``cluster_size``, ``embed_avg``) rather than rosinality's ``quantize_t.embed``
[D, K]; their initial state is vector-quantize-pytorch's; optional dead-code restarts
(``dead_code_threshold``, see :mod:`models.vqvae`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .config import DataConfig, TrainConfig
from .tokenizer import StepOutput, Tokenizer
from .vqvae import VQVAEDecoder, VQVAEEncoder, check_vq_config, lookup, quantize, vq_layer


@dataclass
class VQVAE2Config:
    resolution: int = 32          # a multiple of 8: bottom codes at resolution / 4, top at resolution / 8
    in_channels: int = 3
    hidden: int = 128             # channels of the convolution stacks
    res_channels: int = 32        # hidden channels of the residual blocks
    num_res_blocks: int = 2
    embed_dim: int = 64           # code width D of both levels
    codebook_size: int = 512      # K of each level
    beta: float = 0.25            # commitment weight
    decay: float = 0.99           # EMA decay
    eps: float = 1e-5             # EMA Laplace smoothing
    dead_code_threshold: float = 0.0  # codes whose EMA count falls below it restart (0: off)


class VQVAE2(Tokenizer):
    """Two code maps: ``top`` (resolution / 8) and ``bottom`` (resolution / 4)."""

    config_cls = VQVAE2Config

    def __init__(self, cfg: VQVAE2Config):
        super().__init__(cfg)
        check_vq_config(cfg, 8)
        ch, d, res = cfg.hidden, cfg.embed_dim, (cfg.res_channels, cfg.num_res_blocks)
        self.enc_b = VQVAEEncoder(cfg.in_channels, ch, *res, stride=4)
        self.enc_t = VQVAEEncoder(ch, ch, *res, stride=2)
        self.quantize_conv_t = nn.Conv2d(ch, d, 1)
        self.quantize_t = vq_layer(cfg, ema=True)
        self.dec_t = VQVAEDecoder(d, d, ch, *res, stride=2)
        self.quantize_conv_b = nn.Conv2d(d + ch, d, 1)
        self.quantize_b = vq_layer(cfg, ema=True)
        self.upsample_t = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.dec = VQVAEDecoder(2 * d, cfg.in_channels, ch, *res, stride=4)

    def _quantize(self, x):
        """(q_t, q_b, ids_t, ids_b, commitment loss of both levels)."""
        enc_b = self.enc_b(x)
        q_t, ids_t, loss_t = quantize(self.quantize_t, self.quantize_conv_t(self.enc_t(enc_b)))
        q_b, ids_b, loss_b = quantize(self.quantize_b, self.quantize_conv_b(torch.cat([self.dec_t(q_t), enc_b], 1)))
        return q_t, q_b, ids_t, ids_b, loss_t + loss_b

    def _decode(self, q_t, q_b):
        return self.dec(torch.cat([self.upsample_t(q_t), q_b], 1))

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        q_t, q_b, ids_t, ids_b, vq_loss = self._quantize(x)
        recon = self._decode(q_t, q_b)
        rec_loss = F.mse_loss(recon, x)
        return StepOutput(loss=rec_loss + vq_loss, recon=recon, indices={"top": ids_t, "bottom": ids_b},
                          logs={"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach()})

    def encode(self, x):
        _, _, ids_t, ids_b, _ = self._quantize(x)
        return ids_t, ids_b

    def decode(self, indices):
        ids_t, ids_b = indices
        return self._decode(lookup(self.quantize_t, ids_t), lookup(self.quantize_b, ids_b))

    def codebook_sizes(self):
        return {"top": self.cfg.codebook_size, "bottom": self.cfg.codebook_size}


Model = VQVAE2

PRESETS = {
    # 32x32 photos -> 4x4 top and 8x8 bottom codes on 2 CPU cores in a few minutes; D = 8 and dead-code
    # restarts (not in the paper) for codebook usage.
    "tiny": Preset(model=VQVAE2Config(hidden=64, res_channels=32, embed_dim=8, codebook_size=512,
                                      dead_code_threshold=1.0),
                   train=TrainConfig(steps=2500, batch_size=32, lr=3e-4, betas=(0.9, 0.999), warmup_steps=50,
                                     grad_clip=0.0),
                   data=DataConfig(name="photos")),
    # The paper's ImageNet 256x256 model (its appendix table: 32x32 and 64x64 codes, 128 hidden and
    # 64 residual units, 2 residual layers, K = 512, D = 64, beta 0.25, batch 128); Adam 3e-4 is
    # rosinality's training script's.
    "base": Preset(model=VQVAE2Config(resolution=256, hidden=128, res_channels=64, embed_dim=64, codebook_size=512),
                   train=TrainConfig(steps=2_207_444, batch_size=128, lr=3e-4, betas=(0.9, 0.999), warmup_steps=0,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
