"""VAR's multi-scale VQ-VAE (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction"), FoundationVision/VAR ``models/vqvae.py``.

An image is encoded by the VQGAN / latent-diffusion conv encoder (VAR's layout: fused ``qkv``
attention in every block of the lowest level and in the middle), a ``quant_conv``, and quantized
by :class:`vqkernels.nn.MultiScaleVQ` (VAR's ``VectorQuantizer2``) into K token maps of sides
``v_patch_nums`` (1, 2, ..., 16): scale k quantizes the area-downsampled residual, its codes are
bicubic-upsampled and mixed by a Phi convolution, summed into f_hat, which ``post_quant_conv``
and the decoder turn back into the image. The module names, shapes and state_dict keys are VAR's:
the ``base`` preset is ``vae_ch160v4096z32`` (``build_vae_var``: V=4096, Cvae=32, ch=160,
share_quant_resi=4), so VAR's released checkpoint loads into it as is with ``load_state_dict``
(which, as VAR's, also takes a checkpoint of another scale count; the training-only ``loss.*``
modules, when the GAN terms are on, are the only keys such a checkpoint lacks, and are allowed
to be missing).

Training: VAR did not release its VQ-VAE training code; its paper trains with
||x - x_hat||^2 + ||f - f_hat||^2 + lambda_P L_P + lambda_G L_G (VQGAN's perceptual and
adversarial terms), the f term being the quantizer's loss (beta = 0.25 on the commitment side).
Here: the L2 reconstruction plus the quantizer's loss (weight ``vq_weight``), and VQGAN's LPIPS
and adaptive PatchGAN terms (:class:`models.losses.PerceptualGANLoss`) where their weights are
non-zero: the base preset takes VQGAN's ImageNet values (perceptual 1.0, GAN 0.8, 3-layer PatchGAN),
the tiny one trains without them (no LPIPS weights offline, 2 CPU cores) and searches by cosine
(``using_znorm``, a VAR option; VAR's checkpoint searches by l2), which keeps the codebook in use.

Tokens: ``encode`` gives the ids of all scales, small to large, as one sequence [B, L] (VAR's
``gt_BL``, L = sum(pn ** 2)); the scales share one codebook, which is one level (``codes``).

Deviations: ``test_mode`` (VAR: eval mode and frozen parameters at construction) is not an option:
a model here trains, and freezing is the caller's; StepOutput.indices come from a second,
no-grad search of the same features (MultiScaleVQ.forward does not return its indices); widths
below 32 (the tiny preset) normalise with fewer GroupNorm groups (:func:`models.blocks.normalize`;
VAR's fixed 32 groups need widths that are multiples of 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vqkernels.nn import MultiScaleVQ

from . import Preset
from .blocks import Decoder, Encoder, check_conv_fields
from .config import DataConfig, TrainConfig, check_fields
from .losses import ReconstructionLossConfig, ReconstructionTokenizer, perceptual_gan_loss
from .tokenizer import StepOutput


@dataclass
class VarVQVAEConfig(ReconstructionLossConfig):
    """VAR's VQVAE arguments (its names), the conv layout, and the training loss weights."""
    resolution: int = 32                       # image side: v_patch_nums[-1] * 2 ** (len(ch_mult) - 1)
    vocab_size: int = 512                      # V, codes in the one codebook all scales share
    z_channels: int = 16                       # Cvae, the code (and feature) width; VAR: 32
    ch: int = 16                               # VAR: 160
    ch_mult: Tuple[int, ...] = (1, 2, 4)       # VAR: (1, 1, 2, 2, 4), a x16 downsampling
    num_res_blocks: int = 1                    # VAR: 2
    dropout: float = 0.0
    using_sa: bool = True                      # attention in every block of the lowest level
    using_mid_sa: bool = True                  # attention in the middle block
    beta: float = 0.25                         # commitment weight inside the quantizer's loss
    using_znorm: bool = False                  # cosine (True) or l2 code search
    quant_conv_ks: int = 3                     # kernel of quant_conv / post_quant_conv
    quant_resi: float = 0.5                    # Phi(h) = (1 - r) h + r conv3x3(h)
    share_quant_resi: int = 4                  # 0: a Phi per scale, 1: one Phi, K > 1: K Phis
    default_qresi_counts: int = 0              # Phis when share_quant_resi = 0 (0: one per scale)
    v_patch_nums: Tuple[int, ...] = (1, 2, 4, 8)  # token map sides, small to large
    eini: float = 0.0                          # codebook init: > 0 trunc-normal std, < 0 uniform +-|eini|/V, 0 N(0, 1)
    vq_weight: float = 1.0                     # weight of the quantizer's loss


def _check(cfg: VarVQVAEConfig) -> None:
    """ValueError naming the option for a configuration VAR's VQVAE cannot take."""
    check_conv_fields(cfg)
    check_fields(cfg, at_least={"vocab_size": 2}, non_negative=("beta", "vq_weight"))
    pns = tuple(cfg.v_patch_nums)
    if not pns or any(p < 1 for p in pns) or any(a >= b for a, b in zip(pns, pns[1:])):
        raise ValueError(f"var_vqvae: v_patch_nums must be increasing positive sides, got {pns}")
    f = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.resolution != pns[-1] * f:
        raise ValueError(f"var_vqvae: resolution {cfg.resolution} must equal v_patch_nums[-1] * 2 ** (len(ch_mult) - 1)"
                         f" = {pns[-1]} * {f} = {pns[-1] * f}; change resolution, v_patch_nums or ch_mult")
    if cfg.quant_conv_ks < 1 or cfg.quant_conv_ks % 2 == 0:
        raise ValueError(f"var_vqvae: quant_conv_ks must be odd and positive, got {cfg.quant_conv_ks}")
    if cfg.share_quant_resi < 0:
        raise ValueError(f"var_vqvae: share_quant_resi must be >= 0, got {cfg.share_quant_resi}")


def _conv_layout(cfg: VarVQVAEConfig) -> dict:
    """The Encoder / Decoder keywords giving VAR's layout (basic_vae.py): attention in the lowest
    level only, expressed as the side of that level."""
    lowest = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
    return dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                z_channels=cfg.z_channels, resolution=cfg.resolution, attention="var", mid_attn=cfg.using_mid_sa,
                attn_resolutions=(lowest,) if cfg.using_sa else ())


class VarVQVAE(ReconstructionTokenizer):
    """VAR's VQVAE; ``encode`` gives the tokens of all scales as one sequence [B, L] (VAR's ``gt_BL``),
    ``img_to_idxBl`` the list of each scale's [B, pn * pn]."""

    config_cls = VarVQVAEConfig

    def __init__(self, cfg: VarVQVAEConfig):
        super().__init__(cfg)
        _check(cfg)
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        layout = _conv_layout(cfg)
        self.encoder = Encoder(in_channels=3, double_z=False, **layout)
        self.decoder = Decoder(out_ch=3, **layout)
        self.vocab_size = cfg.vocab_size
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.quantize = MultiScaleVQ(vocab_size=cfg.vocab_size, Cvae=cfg.z_channels, using_znorm=cfg.using_znorm,
                                     beta=cfg.beta, default_qresi_counts=cfg.default_qresi_counts,
                                     v_patch_nums=cfg.v_patch_nums, quant_resi=cfg.quant_resi,
                                     share_quant_resi=cfg.share_quant_resi)
        self.quantize.eini(cfg.eini)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)
        self.loss = perceptual_gan_loss(cfg, "var_vqvae")  # after VAR's modules: their keys come first

    # ---- VAR's interface ----
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f = quant_conv(encoder(x)), [B, Cvae, pn_K, pn_K]."""
        return self.quant_conv(self.encoder(x))

    def decode_features(self, f_hat: torch.Tensor) -> torch.Tensor:
        """decoder(post_quant_conv(f_hat)); f_hat, which the quantizer keeps in float32, is cast to the
        convolutions' dtype (a bf16 / fp16 model outside autocast)."""
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype)))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """The image of a quantized feature map f_hat [B, Cvae, pn_K, pn_K], clamped to [-1, 1]."""
        return self.decode_features(f_hat).clamp_(-1, 1)

    def img_to_idxBl(self, x: torch.Tensor, v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
                     ) -> List[torch.Tensor]:
        """VAR's tokens of images x: per scale the code ids [B, pn * pn] (sides ``v_patch_nums``)."""
        return self.quantize.f_to_idxBl_or_fhat(self.features(x), to_fhat=False, v_patch_nums=v_patch_nums)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Images from each scale's codes [B, Cvae, pn, pn]: the last, or one per running f_hat."""
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor], same_shape: bool, last_one: bool = False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Images from VAR's tokens (per scale [B, pn * pn]); ``same_shape`` upsamples every scale's codes
        to the largest (VAR's training and inference), else f_hat grows scale by scale."""
        b = ms_idx_Bl[0].shape[0]
        ms_h = []
        for idx in ms_idx_Bl:
            pn = round(idx.shape[1] ** 0.5)
            ms_h.append(self.quantize.embedding(idx).transpose(1, 2).reshape(b, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h, all_to_max_scale=same_shape, last_one=last_one)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As VAR: a checkpoint's ``quantize.ema_vocab_hit_SV`` of another scale count is replaced by ours.
        A VAR checkpoint (no ``loss.*`` keys) loads strictly into a model with the GAN terms on: only the
        training-only loss modules may then be missing."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        if not (strict and self.loss is not None and not any(k.startswith("loss.") for k in state_dict)):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("loss.")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"var_vqvae: checkpoint keys do not match VAR's VQVAE: missing {missing[:6]}, "
                               f"unexpected {result.unexpected_keys[:6]}")
        return result

    # ---- the contract ----
    def training_step(self, batch, step: int) -> StepOutput:
        x = self.inputs(batch)
        f = self.features(x)
        f_hat, _, vq_loss, ms_idx_Bl = self.quantize(f, ret_indices=True)
        recon = self.decode_features(f_hat)
        loss, logs = self.objective(x, recon, self.cfg.vq_weight * vq_loss, step)
        logs["vq_loss"] = vq_loss.detach()
        return StepOutput(loss=loss, recon=recon, indices={"codes": torch.cat(ms_idx_Bl, dim=1)}, logs=logs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of every scale, small to large, in one sequence [B, sum(pn ** 2)] (VAR's ``gt_BL``)."""
        return torch.cat(self.img_to_idxBl(x), dim=1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        ms_idx_Bl = torch.split(indices, [pn * pn for pn in self.cfg.v_patch_nums], dim=1)
        return self.idxBl_to_img(ms_idx_Bl, same_shape=True, last_one=True)

    def codebook_sizes(self) -> Dict[str, int]:
        """One codebook, shared by the scales: one level."""
        return {"codes": self.V}


Model = VarVQVAE

PRESETS = {
    # 32 -> scales 1, 2, 4, 8 (85 tokens, one shared codebook of 512)
    "tiny": Preset(model=VarVQVAEConfig(using_znorm=True),
                   train=TrainConfig(steps=2200, batch_size=16, lr=1e-3, warmup_steps=50),
                   data=DataConfig(name="photos")),
    # vae_ch160v4096z32 (build_vae_var's VQVAE). VAR trains it on OpenImages with VQGAN's losses and gives
    # no optimisation settings: these are VQGAN's ImageNet ones (models.vqgan's base preset), LPIPS
    # needing lpips_path
    "base": Preset(model=VarVQVAEConfig(resolution=256, vocab_size=4096, z_channels=32, ch=160,
                                        ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                        v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                        perceptual_weight=1.0, disc_weight=0.8, disc_start=250001, disc_num_layers=3),
                   train=TrainConfig(steps=500_000, batch_size=12, lr=5.4e-5, betas=(0.5, 0.9), warmup_steps=0,
                                     min_lr_ratio=1.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
