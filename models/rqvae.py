"""RQ-VAE (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization"),
kakaobrain/rq-vae-transformer ``rqvae/models/rqvae``.

The VQGAN conv encoder (taming's layout, q / k / v attention) and a 1x1 ``quant_conv`` map an
image to an h x w x ``embed_dim`` feature map; every position is quantized to a stack of
``depth`` codes by residual quantization (:class:`vqkernels.nn.ResidualVQ`): code l is the
nearest to the residual left by codes 1..l-1, and the position's vector is their sum. One
codebook serves every depth (``shared_codebook``), updated by EMA (decay 0.99), with the codes
whose EMA count falls below one replaced by random vectors of the batch (RQ-VAE's
``restart_unused_codes``; ``threshold_ema_dead_code`` = 1). A 1x1 ``post_quant_conv`` and the
decoder reconstruct the image.

Tokens: ``encode`` gives the code stacks [B, h, w, depth]. ``StepOutput.indices`` and
``codebook_sizes`` are keyed by codebook: ``codes`` (all depths) for the shared codebook, ``level0``..
with one codebook per depth. The depths of a shared codebook draw on different parts of it (the
first on large vectors, the later ones on ever smaller residuals), so its usage is counted over all
depths: on the tiny preset's 2000 held-out images, depth 0 alone used 39% of the codes, depths 1-3
57-66%, all depths together 79%.

Loss (RQ-VAE's ``compute_loss`` and trainer): ``mse(x_hat, x) + beta * L_commit`` (``pixel_loss``
l2, or l1), with the cumulative commitment loss L_commit = mean_l mean || z - sg(q_1 + ... + q_l) ||^2
(the mean over depths of ResidualVQ's per-level losses), beta = 0.25; plus, where their weights are
non-zero, VQGAN's LPIPS and adaptive PatchGAN terms (:class:`models.losses.PerceptualGANLoss`), as
RQ-VAE's trainer adds them (perceptual 1.0, GAN 0.75 from the start, hinge, 2-layer PatchGAN).

Deviations: the codebook's EMA update follows the search of all depths (RQ-VAE updates it
between depths, so a later depth searches a codebook the earlier ones already moved); the
spatial code stacking of RQ-VAE (``code_shape`` coarser than ``latent_shape``) is not offered,
as none of its released configurations uses it; the discriminator's loss is not scaled by the GAN
weight (RQ-VAE backpropagates 0.75 x d_loss; under Adam a constant factor barely matters); the
tiny preset trains without the GAN and LPIPS terms (no LPIPS weights offline, 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from vqkernels.nn import ResidualVQ

from . import Preset
from .blocks import Decoder, Encoder, check_conv_fields
from .config import DataConfig, TrainConfig, check_fields
from .losses import ReconstructionLossConfig, ReconstructionTokenizer, perceptual_gan_loss
from .tokenizer import StepOutput

@dataclass
class RQVAEConfig(ReconstructionLossConfig):
    resolution: int = 32
    ch: int = 16
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)    # f = 2 ** (len(ch_mult) - 1); RQ-VAE: (1, 1, 2, 2, 4, 4), f = 32
    num_res_blocks: int = 1
    attn_resolutions: Tuple[int, ...] = ()     # RQ-VAE: (8,)
    dropout: float = 0.0
    z_channels: int = 64                       # encoder output width
    embed_dim: int = 16                        # code width (quant_conv: z_channels -> embed_dim); RQ-VAE: 256
    codebook_size: int = 512
    depth: int = 4                             # D, codes per position
    shared_codebook: bool = True
    decay: float = 0.99                        # EMA decay of the codebook
    threshold_ema_dead_code: float = 1.0       # restart codes whose EMA count is below this (0: off)
    kmeans_init: bool = False                  # k-means codebook init on the first batch (RQ-VAE: no)
    beta: float = 0.25                         # latent_loss_weight


def _check(cfg: RQVAEConfig) -> None:
    check_conv_fields(cfg)
    check_fields(cfg, at_least={"depth": 1, "codebook_size": 2, "embed_dim": 1},
                 non_negative=("beta", "threshold_ema_dead_code"), unit_open=("decay",))


class RQVAE(ReconstructionTokenizer):
    """RQ-VAE; ``encode`` gives the code stacks [B, h, w, depth]."""

    config_cls = RQVAEConfig

    def __init__(self, cfg: RQVAEConfig):
        super().__init__(cfg)
        _check(cfg)
        conv = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                    attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution, z_channels=cfg.z_channels)
        self.encoder = Encoder(in_channels=3, **conv)
        self.decoder = Decoder(out_ch=3, **conv)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantizer = ResidualVQ(dim=cfg.embed_dim, num_quantizers=cfg.depth, codebook_size=cfg.codebook_size,
                                    shared_codebook=cfg.shared_codebook, accept_image_fmap=True, decay=cfg.decay,
                                    threshold_ema_dead_code=cfg.threshold_ema_dead_code, kmeans_init=cfg.kmeans_init,
                                    commitment_weight=1.0, rotation_trick=False)
        self.loss = perceptual_gan_loss(cfg, "rqvae")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map that is quantized, [B, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def training_step(self, batch, step: int) -> StepOutput:
        x = self.inputs(batch)
        z_q, codes, commit = self.quantizer(self.features(x))
        recon = self.decode_features(z_q)
        commit_loss = commit.mean()
        loss, logs = self.objective(x, recon, self.cfg.beta * commit_loss, step)
        logs["commit_loss"] = commit_loss.detach()
        logs.update({f"commit_level{d}": c.detach() for d, c in enumerate(commit)})
        return StepOutput(loss=loss, recon=recon, indices=self._levels(codes), logs=logs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.features(x))[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode_features(self.quantizer.get_output_from_indices(indices))

    def _level_names(self) -> Tuple[str, ...]:
        """One name per codebook: ``codes`` for the shared one (all depths), else ``level0``.. per depth."""
        return ("codes",) if self.cfg.shared_codebook else tuple(f"level{d}" for d in range(self.cfg.depth))

    def _levels(self, codes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The code stacks [B, h, w, depth] keyed by codebook (a shared codebook's ids keep their depth axis)."""
        parts = (codes,) if self.cfg.shared_codebook else codes.unbind(-1)
        return dict(zip(self._level_names(), parts))

    def codebook_sizes(self) -> Dict[str, int]:
        return {name: self.cfg.codebook_size for name in self._level_names()}


Model = RQVAE

PRESETS = {
    # f = 8 and depth 4: 4 x 4 x 4 = 64 tokens an image, as a single-level VQ-VAE at f = 4 (8 x 8)
    "tiny": Preset(model=RQVAEConfig(),
                   train=TrainConfig(steps=2400, batch_size=16, lr=1e-3, warmup_steps=50),
                   data=DataConfig(name="photos")),
    # in256-rqvae-8x8x4.yaml: 256 -> 8 x 8 x 4 codes, K = 16384 shared; Adam 4e-5 (0.5, 0.9), 32 images per
    # GPU on 4 GPUs, 10 ImageNet epochs, warm-up 0.5 epoch, constant rate; VQGAN losses from the start
    "base": Preset(model=RQVAEConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                                     attn_resolutions=(8,), z_channels=256, embed_dim=256, codebook_size=16384,
                                     perceptual_weight=1.0, disc_weight=0.75, disc_start=0, disc_num_layers=2),
                   train=TrainConfig(steps=100000, batch_size=32, lr=4e-5, betas=(0.5, 0.9), warmup_steps=5000,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
