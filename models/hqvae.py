"""HQ-VAE, the two-level tokenizer of You et al. 2022 ("Locally Hierarchical Auto-Regressive Modeling
for Image Generation", NeurIPS 2022; kakaobrain/hqtransformer ``SimRQGAN2Generator`` with
``upsample: pixelshuffle``, the configuration its HQ-Transformer results use).

The VQGAN conv encoder (taming's layout) and a 1x1 ``quant_conv_b`` give bottom-resolution
features h (h x w x ``embed_dim``). The top level folds h to half resolution by pixel-unshuffle
(space-to-depth: 2 x 2 positions -> 4 * embed_dim channels) and quantizes it with the top codebook;
its codes pixel-shuffled back to h x w are the coarse reconstruction. The bottom level quantizes
the residual h - pixel_shuffle(q_top) with the bottom codebook. The decoder takes both:
``post_quant_conv_b`` mixes the concatenation [pixel_shuffle(q_top), q_bottom] into its input.
Both codebooks are EMA ones (decay 0.99) with beta = 0.25 commitment losses.

Gradients, as in the reference: the top codes are straight-through, so pixel_shuffle(q_top) varies
with h exactly as h does and the residual carries no gradient to the encoder; the encoder learns
through the top path (decoder and top commitment), the bottom codebook follows the residuals.

Loss: mse(x_hat, x) + the two commitment losses (kakaobrain's ``codebook_weight`` 1), plus VQGAN's
LPIPS and adaptive PatchGAN terms where their weights are non-zero (the reference: perceptual 1.0,
GAN 0.75 from the start, hinge, a 2-layer PatchGAN; :class:`models.losses.PerceptualGANLoss`).

Deviations: dead-code restart (``threshold_ema_dead_code``, off in the reference) is offered and on
in the tiny preset, which trains without the LPIPS and GAN terms (no LPIPS weights offline); the
reference's PatchGAN normalises with GroupNorm (``norm_type: gn``), models.discriminator's with
BatchNorm; the reference's 4x4 stride-2 first convolution (``use_init_downsample``) is an extra
encoder / decoder level here (``ch_mult`` (1, 1, 2, 4, 4) instead of (1, 2, 4, 4)), whose layout also
puts attention in the encoder at ``attn_resolutions`` (the reference's encoder never reaches side 16
in its bookkeeping, so has none). The issue cites Takida et al. 2023 (also named HQ-VAE: stochastic
quantization); the architecture it describes, a pixel-unshuffle top level and a residual bottom
level, is this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.nn import VectorQuantize

from . import Preset
from .blocks import Decoder, Encoder, check_conv_fields
from .config import DataConfig, TrainConfig, check_fields
from .losses import ReconstructionLossConfig, ReconstructionTokenizer, perceptual_gan_loss
from .tokenizer import StepOutput


@dataclass
class HQVAEConfig(ReconstructionLossConfig):
    resolution: int = 32
    ch: int = 16
    ch_mult: Tuple[int, ...] = (1, 2, 4)       # bottom codes at resolution / 2 ** (len(ch_mult) - 1); top at half
    num_res_blocks: int = 1
    attn_resolutions: Tuple[int, ...] = ()
    dropout: float = 0.0
    z_channels: int = 64                       # encoder output width
    embed_dim: int = 16                        # bottom code width; the top codes are 4 * embed_dim wide
    codebook_size_top: int = 512
    codebook_size_bottom: int = 512
    decay: float = 0.99                        # EMA decay of both codebooks
    threshold_ema_dead_code: float = 1.0       # restart codes whose EMA count is below this (0: off, the reference)
    beta: float = 0.25                         # commitment weight of each level


def _ema_codebook(dim: int, codebook_size: int, cfg: HQVAEConfig) -> VectorQuantize:
    return VectorQuantize(dim, codebook_size, decay=cfg.decay, threshold_ema_dead_code=cfg.threshold_ema_dead_code,
                          commitment_weight=cfg.beta, accept_image_fmap=True, rotation_trick=False)


class HQVAE(ReconstructionTokenizer):
    """Two code maps: ``top`` (h / 2 x w / 2) and ``bottom`` (h x w)."""

    config_cls = HQVAEConfig

    def __init__(self, cfg: HQVAEConfig):
        super().__init__(cfg)
        check_conv_fields(cfg)
        check_fields(cfg, at_least={"embed_dim": 1, "codebook_size_top": 2, "codebook_size_bottom": 2},
                     non_negative=("beta", "threshold_ema_dead_code"), unit_open=("decay",))
        f = 2 ** (len(cfg.ch_mult) - 1)
        if cfg.resolution % (2 * f):
            raise ValueError(f"hqvae: resolution {cfg.resolution} must be a multiple of 2 * 2 ** (len(ch_mult) - 1) = "
                             f"{2 * f} (the top codes are at half the bottom codes' side)")
        conv = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                    attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution, z_channels=cfg.z_channels)
        self.encoder = Encoder(in_channels=3, **conv)
        self.decoder = Decoder(out_ch=3, **conv)
        self.quant_conv_b = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize_t = _ema_codebook(4 * cfg.embed_dim, cfg.codebook_size_top, cfg)
        self.quantize_b = _ema_codebook(cfg.embed_dim, cfg.codebook_size_bottom, cfg)
        self.post_quant_conv_b = nn.Conv2d(2 * cfg.embed_dim, cfg.z_channels, 1)
        self.loss = perceptual_gan_loss(cfg, "hqvae")

    def _quantize(self, x):
        """(top codes, bottom codes, top ids, bottom ids, both commitment losses)."""
        h = self.quant_conv_b(self.encoder(x))
        q_t, ids_t, loss_t = self.quantize_t(F.pixel_unshuffle(h, 2))
        q_b, ids_b, loss_b = self.quantize_b(h - F.pixel_shuffle(q_t, 2))
        return q_t, q_b, ids_t, ids_b, loss_t + loss_b

    def _decode(self, q_t: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv_b(torch.cat([F.pixel_shuffle(q_t, 2), q_b], dim=1)))

    def training_step(self, batch, step: int) -> StepOutput:
        x = self.inputs(batch)
        q_t, q_b, ids_t, ids_b, vq_loss = self._quantize(x)
        recon = self._decode(q_t, q_b)
        loss, logs = self.objective(x, recon, vq_loss, step)
        return StepOutput(loss=loss, recon=recon, indices={"top": ids_t, "bottom": ids_b}, logs=logs)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _, _, ids_t, ids_b, _ = self._quantize(x)
        return ids_t, ids_b

    def decode(self, indices) -> torch.Tensor:
        ids_t, ids_b = indices
        return self._decode(self.quantize_t.get_output_from_indices(ids_t),
                            self.quantize_b.get_output_from_indices(ids_b))

    def codebook_sizes(self) -> Dict[str, int]:
        return {"top": self.cfg.codebook_size_top, "bottom": self.cfg.codebook_size_bottom}


Model = HQVAE

PRESETS = {
    # 8 x 8 bottom + 4 x 4 top codes (80 tokens), as VQ-VAE-2's tiny preset
    "tiny": Preset(model=HQVAEConfig(),
                   train=TrainConfig(steps=2400, batch_size=16, lr=1e-3, warmup_steps=50),
                   data=DataConfig(name="photos")),
    # hqvae-pixelshuffle-top8x8-epoch15.yaml: 256 -> 16 x 16 bottom + 8 x 8 top codes, K = 8192 each,
    # embed_dim 256, z_channels 256; Adam 4e-5 (0.5, 0.9), batch 128, 15 ImageNet epochs, warm-up 0.5 epoch
    "base": Preset(model=HQVAEConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 4, 4), num_res_blocks=2,
                                     attn_resolutions=(16,), z_channels=256, embed_dim=256,
                                     codebook_size_top=8192, codebook_size_bottom=8192, threshold_ema_dead_code=0.0,
                                     perceptual_weight=1.0, disc_weight=0.75, disc_start=0, disc_num_layers=2),
                   train=TrainConfig(steps=150000, batch_size=128, lr=4e-5, betas=(0.5, 0.9), warmup_steps=5000,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
