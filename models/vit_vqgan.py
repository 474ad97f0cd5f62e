"""ViT-VQGAN (Yu et al. 2021, "Vector-quantized Image Modeling with Improved VQGAN", arXiv:2110.04627).

A ViT encoder maps ``patch_size`` x ``patch_size`` patches to tokens (:mod:`models.vit`); each token
is projected to a low-dimensional space (``codebook_dim``, 32 in the paper: "factorized codes"),
l2-normalised and matched to l2-normalised codes ("l2-normalized codes": the Euclidean search on the
unit sphere is a cosine-similarity search), then projected back up; a ViT decoder maps the tokens
back to patches. Both ViTs end with the paper's Linear-tanh-Linear head and no output activation.
The loss is the paper's ImageNet combination:

    L = 1.0 * ||x - x_rec||^2 + 0.1 * perceptual + 0.1 * GAN + 0.0 * logit-laplace + L_VQ,
    L_VQ = beta * ||l2(z) - sg(l2(e))||^2,   beta = 0.25

Deviations (documented, all in the layer or the loss):
- Codebook learning: the paper learns the l2-normalised codebook by gradient (the VQ-VAE codebook
  term ``||sg(l2(z)) - l2(e)||^2``). ``vqkernels.nn.VectorQuantize`` offers cosine-similarity
  codebooks only with exponential-moving-average updates (``use_cosine_sim`` excludes
  ``learnable_codebook``), so here the codes are the l2-normalised EMA of the (normalised) tokens
  assigned to them (``decay``), the codebook term is replaced by that update and ``L_VQ`` is the
  commitment term alone. Codes start as normalised uniform draws, not the paper's normal ones.
- Discriminator: the paper uses StyleGAN's; this model uses taming's PatchGAN
  (:mod:`models.discriminator`) with the logistic ("vanilla", StyleGAN's) discriminator loss and
  taming's generator loss ``-mean(D(x_rec))`` at a fixed weight (``adaptive_weight`` switches to
  taming's adaptive one).
- Perceptual loss: LPIPS-VGG (:class:`models.losses.LPIPS`) when ``lpips_path`` names its weights,
  else off (a warning at construction); the paper's VGG perceptual loss is not further specified.
- The logit-laplace loss (weight 0.0 in the paper's configurations) is not implemented.
- ``dead_code_threshold`` (off in ``base``; the tiny preset's short CPU run uses it) restarts codes
  whose EMA count falls below it from the batch's tokens (vector-quantize-pytorch's option).
"""

from __future__ import annotations

from dataclasses import dataclass

from vqkernels.nn import VectorQuantize

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .losses import GANTokenizer, PerceptualGANLoss
from .tokenizer import StepOutput
from .vit import VIT_SIZES, ViTDecoder, ViTEncoder


@dataclass
class ViTVQGANConfig:
    resolution: int = 256
    in_channels: int = 3
    patch_size: int = 8
    enc_dim: int = 768            # ViT-B (models.vit.VIT_SIZES)
    enc_depth: int = 12
    enc_heads: int = 12
    enc_mlp_dim: int = 3072
    dec_dim: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    dec_mlp_dim: int = 3072
    pos_embed: str = "learned"    # learned | sincos
    codebook_size: int = 8192
    codebook_dim: int = 32        # the factorised lookup space
    beta: float = 0.25            # commitment weight
    decay: float = 0.99           # EMA decay of the codebook (see the module docstring)
    dead_code_threshold: float = 0.0  # codes whose EMA count falls below it restart from batch tokens (0: off)
    perceptual_weight: float = 0.1
    lpips_path: str = ""          # LPIPS weights (models.losses.load_lpips_state_dict); "" -> perceptual term off
    vgg_path: str = ""
    disc_weight: float = 0.1
    adaptive_weight: bool = False  # taming's adaptive GAN weight instead of the fixed disc_weight
    disc_start: int = 0
    disc_loss: str = "vanilla"    # vanilla (logistic, StyleGAN's) | hinge
    disc_num_layers: int = 3
    disc_ndf: int = 64


def vit_size(size: str, prefix: str) -> dict:
    """ViT-VQGAN's ``S`` / ``B`` / ``L`` widths as config fields ``<prefix>_dim``, ``_depth``, ``_heads``,
    ``_mlp_dim``."""
    dim, depth, heads, mlp_dim = VIT_SIZES[size]
    return {f"{prefix}_dim": dim, f"{prefix}_depth": depth, f"{prefix}_heads": heads, f"{prefix}_mlp_dim": mlp_dim}


def _check_config(cfg: ViTVQGANConfig) -> None:
    check_fields(cfg, at_least=dict.fromkeys(("codebook_size", "codebook_dim", "in_channels"), 1),
                 non_negative=("beta", "dead_code_threshold"), unit_open=("decay",))


class ViTVQGAN(GANTokenizer):
    """ViT encoder, factorised l2-normalised codebook, ViT decoder: one code per patch."""

    config_cls = ViTVQGANConfig

    def __init__(self, cfg: ViTVQGANConfig):
        super().__init__(cfg)
        _check_config(cfg)
        self.encoder = ViTEncoder(image_size=cfg.resolution, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                                  dim=cfg.enc_dim, depth=cfg.enc_depth, heads=cfg.enc_heads, mlp_dim=cfg.enc_mlp_dim,
                                  out_dim=cfg.enc_dim, pos_embed=cfg.pos_embed)
        self.quantize = VectorQuantize(cfg.enc_dim, cfg.codebook_size, codebook_dim=cfg.codebook_dim,
                                       use_cosine_sim=True, decay=cfg.decay, commitment_weight=cfg.beta,
                                       rotation_trick=False, threshold_ema_dead_code=cfg.dead_code_threshold)
        self.decoder = ViTDecoder(image_size=cfg.resolution, patch_size=cfg.patch_size, out_channels=cfg.in_channels,
                                  in_dim=cfg.enc_dim, dim=cfg.dec_dim, depth=cfg.dec_depth, heads=cfg.dec_heads,
                                  mlp_dim=cfg.dec_mlp_dim, pos_embed=cfg.pos_embed)
        self.loss = PerceptualGANLoss(
            pixel_loss="l2", perceptual_weight=cfg.perceptual_weight, lpips_path=cfg.lpips_path,
            vgg_path=cfg.vgg_path, disc_weight=cfg.disc_weight, adaptive=cfg.adaptive_weight,
            disc_start=cfg.disc_start, disc_loss=cfg.disc_loss, disc_in_channels=cfg.in_channels,
            disc_ndf=cfg.disc_ndf, disc_num_layers=cfg.disc_num_layers, owner=type(cfg).__name__)
        self.grid = self.encoder.grid

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        z_q, ids, vq_loss = self.quantize(self.encoder(x))
        recon = self.decoder(z_q)
        loss, logs = self.loss.generator_loss(x, recon, vq_loss, step, self.decoder.last_layer)
        return StepOutput(loss=loss, recon=recon, indices={"codes": ids.view(-1, self.grid, self.grid)}, logs=logs)

    def encode(self, x):
        _, ids, _ = self.quantize(self.encoder(x), freeze_codebook=True)
        return ids.view(-1, self.grid, self.grid)

    def decode(self, indices):
        return self.decoder(self.quantize.get_output_from_indices(indices.flatten(1)))

    def codebook_sizes(self):
        return {"codes": self.cfg.codebook_size}


Model = ViTVQGAN

PRESETS = {
    # 32x32 photos, 4x4 patches -> 8x8 codes on 2 CPU cores in about 3 minutes (held-out numbers: the zoo's
    # table in models/RESULTS.md). For the short run: lr 5e-4 (1e-3 trains worse), dead-code restarts
    # (without them the EMA codebook collapses to a few percent of its codes), and the GAN from step 1000
    # with taming's adaptive weight times 0.1 (a fixed 0.1 outweighs the small l2 loss); no LPIPS offline.
    "tiny": Preset(model=ViTVQGANConfig(resolution=32, patch_size=4, enc_dim=192, enc_depth=2, enc_heads=6,
                                        enc_mlp_dim=384, dec_dim=192, dec_depth=2, dec_heads=6, dec_mlp_dim=384,
                                        codebook_size=512, codebook_dim=32, decay=0.9, dead_code_threshold=1.0,
                                        perceptual_weight=0.0, adaptive_weight=True, disc_start=1000, disc_ndf=32,
                                        disc_num_layers=2),
                   train=TrainConfig(steps=1500, batch_size=16, lr=5e-4, betas=(0.9, 0.99), warmup_steps=50,
                                     grad_clip=1.0),
                   data=DataConfig(name="photos")),
    # ViT-VQGAN-Base at 256x256: ViT-B encoder and decoder, 8x8 patches -> 32x32 codes, K = 8192, codes of
    # 32 dims. Adam (0.9, 0.99), decoupled weight decay 1e-4, lr warmed up to 1e-4 over 50k steps, cosine
    # decay to 5e-5 at 500k steps, global batch 256 (here 32 x 8 accumulated micro-batches on one device).
    "base": Preset(model=ViTVQGANConfig(**vit_size("B", "enc"), **vit_size("B", "dec")),
                   train=TrainConfig(steps=500_000, batch_size=32, grad_accum=8, lr=1e-4, betas=(0.9, 0.99),
                                     weight_decay=1e-4, warmup_steps=50_000, min_lr_ratio=0.5, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
