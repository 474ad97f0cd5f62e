"""VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis", arXiv:2012.09841),
as taming-transformers' ``taming.models.vqgan.VQModel`` and its ``GumbelVQ`` variant.

The forward is taming's: ``encoder`` (ResNet blocks with attention, :class:`models.blocks.Encoder`)
-> ``quant_conv`` (1x1, z_channels -> embed_dim) -> ``quantize`` -> ``post_quant_conv`` (1x1) ->
``decoder``. ``quantize`` is :class:`vqkernels.nn.VectorQuantizer` (taming's ``VectorQuantizer2``:
beta 0.25, ``legacy`` beta placement, codebook learned by gradient) or, with ``quantizer: gumbel``,
:class:`vqkernels.nn.GumbelQuantize` (taming's ``GumbelQuantize``) fed by ``quant_conv`` exactly as
in taming (``GumbelVQ`` keeps ``VQModel.encode``; the encoder's output does not reach the
quantizer's ``proj`` directly). ``GumbelVQ`` anneals the temperature with taming's
``LambdaWarmUpCosineScheduler`` at every training step (:func:`gumbel_temperature`; its KL weight
defaults to 1e-8). The loss is :class:`models.losses.PerceptualGANLoss` in taming's
``VQLPIPSWithDiscriminator`` form (L1 + LPIPS, PatchGAN hinge loss with the adaptive weight and
``disc_start``; codebook weight 1).

Checkpoints: the state_dict keys and shapes are ``VQModel``'s (``encoder.*``, ``decoder.*``,
``loss.perceptual_loss.*``, ``loss.discriminator.main.*``, ``quantize.embedding.weight`` or
``quantize.proj.*`` / ``quantize.embed.weight``, ``quant_conv.*``, ``post_quant_conv.*``), so the
``state_dict`` of a taming ``.ckpt`` loads with ``strict=True`` into a model whose LPIPS is built
(``lpips_path`` set: the ``.ckpt`` itself serves when it loads with ``weights_only``, else its
``state_dict`` saved alone).
Without LPIPS weights the perceptual term is off and ``loss.perceptual_loss.*`` (33 keys: weight
and bias of the 13 VGG16 convolutions, the 5 linear heads, ``scaling_layer.shift/scale``) are the
only keys such a ``.ckpt`` has that this model lacks: load with ``strict=False``.

Deviations: ``remap``, ``colorize_nlabels`` and ``disc_conditional`` are not offered (VQModel never
passes a condition to its loss); ``norm_groups`` (taming: 32 GroupNorm groups) is a field, since at
the tiny preset's widths 32 groups are single channels, which train far slower; the Gumbel
quantizer's ``proj`` takes ``embed_dim`` channels (taming builds it for ``z_channels`` and so only
runs with ``embed_dim == z_channels``, where both agree); ``encode`` of the Gumbel variant returns
the most likely code (argmax of the logits, zero noise) where taming samples, so tokens are
deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from vqkernels import gumbel_quantize
from vqkernels.nn import GumbelQuantize, VectorQuantizer

from . import Preset
from .blocks import Decoder, Encoder, check_conv_fields
from .config import DataConfig, TrainConfig, check_fields
from .losses import GANTokenizer, PerceptualGANLoss
from .tokenizer import StepOutput

QUANTIZERS = ("vq", "gumbel")


@dataclass
class VQGANConfig:
    resolution: int = 256
    in_channels: int = 3
    # taming's ddconfig
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)   # downsampling factor 2 ** (len - 1)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    dropout: float = 0.0
    z_channels: int = 256
    norm_groups: int = 32         # GroupNorm groups (taming: 32); lowered to divide the channels
    # quantizer
    embed_dim: int = 256
    n_embed: int = 1024
    quantizer: str = "vq"         # vq (VQModel) | gumbel (GumbelVQ)
    beta: float = 0.25            # vq: VectorQuantizer2's beta
    legacy: bool = True           # vq: taming's default beta placement (beta weights the codebook term)
    kl_weight: float = 1e-8       # gumbel: GumbelVQ's KL weight
    temp_warmup_steps: int = 0    # gumbel: LambdaWarmUpCosineScheduler(warm_up_steps, ...)
    temp_decay_steps: int = 1000001  # max_decay_steps
    temp_start: float = 0.9       # lr_start
    temp_max: float = 0.9         # lr_max
    temp_min: float = 1e-6        # lr_min
    # loss (VQLPIPSWithDiscriminator)
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_path: str = ""          # LPIPS weights (models.losses.load_lpips_state_dict); "" -> perceptual term off
    vgg_path: str = ""            # torchvision VGG16 weights, when lpips_path holds only the linear heads
    disc_start: int = 250001
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    disc_loss: str = "hinge"      # hinge | vanilla
    disc_num_layers: int = 3
    disc_ndf: int = 64


def gumbel_temperature(step: int, cfg: VQGANConfig) -> float:
    """taming's ``LambdaWarmUpCosineScheduler`` as GumbelVQ uses it for the temperature: linear from
    ``temp_start`` to ``temp_max`` over ``temp_warmup_steps``, then a cosine from ``temp_max`` to
    ``temp_min`` reached at ``temp_decay_steps``, constant after."""
    if step < cfg.temp_warmup_steps:
        return (cfg.temp_max - cfg.temp_start) / cfg.temp_warmup_steps * step + cfg.temp_start
    t = min((step - cfg.temp_warmup_steps) / (cfg.temp_decay_steps - cfg.temp_warmup_steps), 1.0)
    return cfg.temp_min + 0.5 * (cfg.temp_max - cfg.temp_min) * (1 + math.cos(t * math.pi))


def _check_config(cfg: VQGANConfig) -> None:
    name = type(cfg).__name__
    if cfg.quantizer not in QUANTIZERS:
        raise ValueError(f"{name}: quantizer must be one of {QUANTIZERS}, got {cfg.quantizer!r}")
    check_conv_fields(cfg)
    check_fields(cfg, at_least=dict.fromkeys(("norm_groups", "embed_dim", "n_embed"), 1),
                 non_negative=("beta", "kl_weight"))
    if cfg.quantizer == "gumbel" and not (cfg.temp_decay_steps > cfg.temp_warmup_steps >= 0 and cfg.temp_min > 0):
        raise ValueError(f"{name}: the Gumbel temperature schedule needs temp_decay_steps > temp_warmup_steps >= 0 "
                         f"and temp_min > 0")


class VQGAN(GANTokenizer):
    """taming's VQModel / GumbelVQ: f = 2 ** (len(ch_mult) - 1) downsampling to one code per position."""

    config_cls = VQGANConfig

    def __init__(self, cfg: VQGANConfig):
        super().__init__(cfg)
        _check_config(cfg)
        dd = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                  attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution, z_channels=cfg.z_channels,
                  dropout=cfg.dropout, attention="taming", norm_groups=cfg.norm_groups)
        # attribute order = taming's, so state_dict() lists the keys in a taming checkpoint's order
        self.encoder = Encoder(in_channels=cfg.in_channels, **dd)
        self.decoder = Decoder(out_ch=cfg.in_channels, **dd)
        self.loss = PerceptualGANLoss(
            pixel_loss="l1", perceptual_weight=cfg.perceptual_weight, lpips_path=cfg.lpips_path,
            vgg_path=cfg.vgg_path, disc_weight=cfg.disc_weight, adaptive=True, disc_start=cfg.disc_start,
            disc_factor=cfg.disc_factor, disc_loss=cfg.disc_loss, disc_in_channels=cfg.in_channels,
            disc_ndf=cfg.disc_ndf, disc_num_layers=cfg.disc_num_layers, codebook_weight=cfg.codebook_weight,
            owner=type(cfg).__name__)
        if cfg.quantizer == "gumbel":
            self.quantize = GumbelQuantize(cfg.embed_dim, cfg.embed_dim, n_embed=cfg.n_embed,
                                           kl_weight=cfg.kl_weight, temp_init=1.0)
        else:
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.beta, legacy=cfg.legacy,
                                            sane_index_shape=True)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def gumbel(self) -> bool:
        return self.cfg.quantizer == "gumbel"

    def _quantize(self, h, step: int):
        """``(z_q, quantizer loss, ids [B, h, w])`` of pre-quantization features in training."""
        if self.gumbel:
            z_q, loss, (_, _, ids) = self.quantize(h, temp=gumbel_temperature(step, self.cfg))
        else:
            z_q, loss, (_, _, ids) = self.quantize(h)
        return z_q, loss, ids

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """taming's ``VQModel.decode``: post_quant_conv, then the decoder."""
        return self.decoder(self.post_quant_conv(z_q))

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        z_q, qloss, ids = self._quantize(self.quant_conv(self.encoder(x)), step)
        recon = self.decode_latent(z_q)
        loss, logs = self.loss.generator_loss(x, recon, qloss, step, self.decoder.last_layer)
        if self.gumbel:
            logs["temperature"] = qloss.new_tensor(gumbel_temperature(step, self.cfg))
        return StepOutput(loss=loss, recon=recon, indices={"codes": ids}, logs=logs)

    def encode(self, x):
        h = self.quant_conv(self.encoder(x))
        if not self.gumbel:
            return self.quantize(h)[2][2]
        logits = self.quantize.proj(h)
        b, k, hh, ww = logits.shape
        rows = logits.permute(0, 2, 3, 1).reshape(-1, k)
        # the most likely code: the op's hard path with zero noise
        _, ids, _ = gumbel_quantize(rows, self.quantize.embed.weight, torch.zeros_like(rows), 1.0, hard=True)
        return ids.view(b, hh, ww)

    def decode(self, indices):
        b, h, w = indices.shape
        z_q = self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.cfg.embed_dim))
        return self.decode_latent(z_q)

    def codebook_sizes(self):
        return {"codes": self.cfg.n_embed}


Model = VQGAN

PRESETS = {
    # 32x32 photos -> 8x8 codes on 2 CPU cores in about 3 minutes; no LPIPS weights offline, so L1 + GAN.
    # Narrow (ch 16), so GroupNorm over all channels of a layer (norm_groups 1: taming's 32 groups would be
    # single channels); 8-dim codes and 128 of them keep more codes in use under taming's quantizer, which
    # has no restarts; the PatchGAN joins for the last 30% of the steps with taming's adaptive weight x 0.1.
    # The Gumbel temperature (quantizer: gumbel) anneals 0.9 -> 0.1 over the run. Held-out numbers: the zoo's
    # table in models/RESULTS.md.
    "tiny": Preset(model=VQGANConfig(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                                     z_channels=64, norm_groups=1, embed_dim=8, n_embed=128, temp_decay_steps=2000,
                                     temp_min=0.1, perceptual_weight=0.0, disc_start=1400, disc_weight=0.1,
                                     disc_ndf=16, disc_num_layers=2),
                   train=TrainConfig(steps=2000, batch_size=16, lr=1e-3, betas=(0.5, 0.9), warmup_steps=50,
                                     grad_clip=0.0),
                   data=DataConfig(name="photos")),
    # taming's configs/imagenet_vqgan.yaml (the released vqgan_imagenet_f16_1024): 256x256 -> 16x16 codes,
    # K = 1024, D = 256, disc_start 250001, disc_weight 0.8. Adam (0.5, 0.9), constant lr =
    # base_learning_rate 4.5e-6 x batch 12 (taming scales by GPUs x batch; here one process), no clipping.
    # taming's config gives no step count; 500k steps covers the GAN phase. Needs lpips_path for LPIPS.
    "base": Preset(model=VQGANConfig(),
                   train=TrainConfig(steps=500_000, batch_size=12, lr=5.4e-5, betas=(0.5, 0.9), warmup_steps=0,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
    # the released vqgan_gumbel_f8 (OpenImages): f8, K = 8192, GumbelVQ temperature 0.9 -> 1e-6 over 1M steps.
    "gumbel_f8": Preset(model=VQGANConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), n_embed=8192,
                                          quantizer="gumbel"),
                        train=TrainConfig(steps=1_000_000, batch_size=12, lr=5.4e-5, betas=(0.5, 0.9),
                                          warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0),
                        data=DataConfig(name="photos")),
}
