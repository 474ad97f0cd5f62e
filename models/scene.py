"""Make-A-Scene's VQ-SEG (Gafni et al. 2022, "Make-A-Scene: Scene-Based Text-to-Image Generation with
Human Priors", arXiv:2203.13131): a VQ tokenizer of semantic scene maps.

VQ-SEG is a VQ-VAE / VQGAN-style autoencoder whose input and output are multi-channel segmentation
maps: one-hot class channels (Make-A-Scene: 133 panoptic + 20 human-parsing + 5 face-parsing
classes) and one edge channel marking the boundaries between classes and instances. It is trained
to reconstruct the map with a weighted binary cross-entropy per channel and pixel, plus the VQ
loss; no perceptual or adversarial term.

Here the input is ``batch["scene"]`` (int64 [B, R, R], a class per pixel, 0 the background; the
``shapes`` data set): :meth:`SceneTokenizer.inputs` builds ``num_classes`` one-hot channels and the
edge channel (pixels whose class differs from a 4-neighbour's; the maps carry no instance ids, so
touching shapes of one class share an edge-free border). A class id outside [0, num_classes) gives
an all-zero one-hot column (no check, which would read the map back to the host). The decoder's
logits are trained with ``mean(w_c * BCE(logit, target))`` (``class_weights`` w_c per channel, the
edge channel last; empty: all 1) and the reconstruction is ``sigmoid(logits)``, maps in [0, 1]
like the input. ``to_rgb`` paints each pixel's most likely class (white background, distinct
colours) and darkens edge pixels, for grids and the evaluator's PSNR. Training logs the pixel
accuracy and the mean IoU (over the classes present in the batch) of the most likely class.

The codebook is ``vqkernels.nn.VectorQuantize`` with the EMA update and dead-code restarts
(VQ-VAE's appendix, Jukebox), a 1x1 ``quant_conv`` / ``post_quant_conv`` around it as in VQGAN.

Guesses: the weights of Make-A-Scene's BCE and VQ-SEG's sizes are not given here; ``base`` takes
VQGAN's 256x256 -> 16x16 conv stacks, 1024 codes of width 256 and the paper's 158 + 1 channels.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.nn import VectorQuantize

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .blocks import ConvStackConfig, conv_autoencoder
from .tokenizer import StepOutput, Tokenizer


@dataclass
class SceneConfig(ConvStackConfig):
    num_classes: int = 5                     # one-hot class channels (shapes: background + 4 kinds); + 1 edge channel
    class_weights: Tuple[float, ...] = ()    # BCE weight per channel (num_classes + 1, edge last); empty: all 1
    embed_dim: int = 64
    codebook_size: int = 256
    beta: float = 0.25                       # commitment weight
    decay: float = 0.99                      # EMA decay of the codebook
    dead_code_threshold: float = 1.0         # codes whose EMA count falls below it restart from the batch (0: off)


def class_colours(n: int) -> torch.Tensor:
    """[n, 3] colours in [-1, 1]: white for class 0, saturated hues a golden-ratio turn apart for the rest."""
    rgb = [(1.0, 1.0, 1.0)] + [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.9) for k in range(n - 1)]
    return torch.tensor(rgb[:n]) * 2 - 1


def edges(scene: torch.Tensor) -> torch.Tensor:
    """bool [B, R, R]: pixels whose class differs from one of their 4 neighbours'."""
    out = torch.zeros_like(scene, dtype=torch.bool)
    dy = scene[:, 1:, :] != scene[:, :-1, :]
    dx = scene[:, :, 1:] != scene[:, :, :-1]
    out[:, 1:, :] |= dy
    out[:, :-1, :] |= dy
    out[:, :, 1:] |= dx
    out[:, :, :-1] |= dx
    return out


def _check(cfg: SceneConfig) -> None:
    check_fields(cfg, at_least={"num_classes": 2, "embed_dim": 1, "codebook_size": 2},
                 non_negative=("beta", "dead_code_threshold"), unit_open=("decay",))
    if cfg.class_weights and (len(cfg.class_weights) != cfg.num_classes + 1 or min(cfg.class_weights) < 0):
        raise ValueError(f"SceneConfig: class_weights needs num_classes + 1 = {cfg.num_classes + 1} non-negative "
                         f"weights (the edge channel last), got {cfg.class_weights}")


class SceneTokenizer(Tokenizer):
    """VQ-SEG: one-hot scene maps + edges -> conv encoder -> VQ -> conv decoder -> per-channel logits."""

    config_cls = SceneConfig

    def __init__(self, cfg: SceneConfig):
        super().__init__(cfg)
        _check(cfg)
        self.channels = cfg.num_classes + 1
        z = cfg.embed_dim
        self.encoder, self.decoder = conv_autoencoder(cfg, self.channels, z)
        self.quant_conv = nn.Conv2d(z, z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.quantize = VectorQuantize(z, cfg.codebook_size, decay=cfg.decay, commitment_weight=cfg.beta,
                                       threshold_ema_dead_code=cfg.dead_code_threshold, rotation_trick=False,
                                       accept_image_fmap=True)
        weights = torch.tensor(cfg.class_weights or (1.0,) * self.channels)
        self.register_buffer("class_weights", weights.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("colours", class_colours(cfg.num_classes), persistent=False)

    def inputs(self, batch):
        """The one-hot class channels and the edge channel of ``batch["scene"]``: float [B, num_classes + 1, R, R]."""
        if "scene" not in batch:
            raise ValueError("the scene tokenizer needs scene maps (batch['scene']): train it on data.name=shapes")
        scene = batch["scene"]
        classes = torch.arange(self.cfg.num_classes, device=scene.device).view(1, -1, 1, 1)
        onehot = scene.unsqueeze(1) == classes
        return torch.cat([onehot, edges(scene).unsqueeze(1)], dim=1).float()

    def to_rgb(self, x):
        """Colours of the most likely class per pixel, edge pixels (probability > 0.5) darkened: [B, 3, R, R]."""
        rgb = self.colours.to(x.dtype)[x[:, :self.cfg.num_classes].argmax(1)].permute(0, 3, 1, 2)
        edge = (x[:, self.cfg.num_classes:] > 0.5).to(x.dtype)
        return (rgb - edge * (rgb + 1) * 0.5).clamp(-1, 1)

    def bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mean over batch, channels and pixels of w_c * BCE(sigmoid(logits), target)."""
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (per * self.class_weights.to(per.dtype)).mean()

    def segmentation_scores(self, logits: torch.Tensor, scene: torch.Tensor):
        """(pixel accuracy, mean IoU over the classes present in prediction or truth) of the argmax class."""
        pred = logits[:, :self.cfg.num_classes].argmax(1)
        accuracy = (pred == scene).float().mean()
        classes = torch.arange(self.cfg.num_classes, device=scene.device).view(-1, 1, 1, 1)
        p, t = pred.unsqueeze(0) == classes, scene.unsqueeze(0) == classes
        inter, union = (p & t).flatten(1).sum(1).float(), (p | t).flatten(1).sum(1).float()
        present = (union > 0).float()
        miou = (inter / union.clamp_min(1) * present).sum() / present.sum().clamp_min(1)
        return accuracy, miou

    def _logits(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        z_q, ids, vq_loss = self.quantize(self.quant_conv(self.encoder(x)))
        logits = self._logits(z_q)
        rec_loss = self.bce(logits, x)
        accuracy, miou = self.segmentation_scores(logits.detach(), batch["scene"])
        return StepOutput(loss=rec_loss + vq_loss, recon=torch.sigmoid(logits), indices={"codes": ids},
                          logs={"bce_loss": rec_loss.detach(), "vq_loss": vq_loss.detach(), "pixel_acc": accuracy,
                                "miou": miou})

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))[1]

    def decode(self, indices):
        return torch.sigmoid(self._logits(self.quantize.get_output_from_indices(indices)))

    def codebook_sizes(self):
        return {"codes": self.cfg.codebook_size}


Model = SceneTokenizer

PRESETS = {
    # shapes' 5 classes + edges at 32x32 -> 8x8 codes.
    "tiny": Preset(model=SceneConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=32, codebook_size=256),
                   train=TrainConfig(steps=1500, batch_size=32, lr=1e-3, betas=(0.9, 0.99), warmup_steps=50),
                   data=DataConfig(name="shapes")),
    # Make-A-Scene's 133 + 20 + 5 classes and the edge channel; VQGAN's 256x256 -> 16x16 stacks (guessed sizes).
    "base": Preset(model=SceneConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                     attn_resolutions=(16,), num_classes=158, embed_dim=256, codebook_size=1024),
                   train=TrainConfig(steps=500_000, batch_size=64, lr=4.5e-6 * 64, betas=(0.5, 0.9)),
                   data=DataConfig(name="shapes")),
}
