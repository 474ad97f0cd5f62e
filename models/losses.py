"""The losses the GAN tokenizers share: taming-transformers' ``VQLPIPSWithDiscriminator``
(Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis", arXiv:2012.09841)
as one module, :class:`PerceptualGANLoss`, with its LPIPS perceptual metric (:class:`LPIPS`,
Zhang et al. 2018, in taming's module layout) and its PatchGAN (:mod:`models.discriminator`).

The generator's loss, in taming's order of operations::

    rec  = |x - x_rec|                   (l1; ViT-VQGAN: (x - x_rec)^2, l2)
    rec  = rec + perceptual_weight * LPIPS(x, x_rec)      # [B,3,H,W] + [B,1,1,1], broadcast
    nll  = mean(rec)                     # a mean over every element (taming: torch.mean, not a sum)
    g    = -mean(D(x_rec))
    w    = clamp(|grad_last nll| / (|grad_last g| + 1e-4), 0, 1e4) * disc_weight   (adaptive)
           or disc_weight                                                         (fixed)
    loss = nll + w * adopt_weight(disc_factor, step, disc_start) * g + codebook_weight * codebook_loss

``grad_last`` is the gradient with respect to the decoder's last layer's weight, taken with
``torch.autograd.grad`` (it does not touch ``.grad``); without autograd (no_grad / inference)
``w`` is 0, as taming's ``except RuntimeError`` branch in eval. The discriminator's loss is
``adopt_weight(disc_factor, step, disc_start) * d_loss(D(x), D(sg(x_rec)))`` with the hinge
``0.5 (mean relu(1 - real) + mean relu(1 + fake))`` or vanilla ``0.5 (mean softplus(-real) +
mean softplus(fake))`` d-loss. Both passes run the discriminator before ``disc_start`` too (with
factor 0), as taming does, so its BatchNorm statistics and every logged value exist from step 0.

Perceptual weights: LPIPS needs an ImageNet-trained VGG16 and LPIPS' linear heads, which nothing
here downloads. ``lpips_path`` (and ``vgg_path``) name local files (:func:`load_lpips_state_dict`
lists the layouts); with ``perceptual_weight > 0`` and no file the perceptual term is OFF (weight
0) and constructing the module warns. It is never replaced by an untrained network: a random VGG16
is not LPIPS, and at 32x32, batch 16 its forward + backward takes 0.38 CPU-seconds (one AMD EPYC
core), about three times a whole tiny VQGAN or ViT-VQGAN training step (0.12-0.16 s): the tiny
presets train with the perceptual term off.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .discriminator import NLayerDiscriminator, weights_init
from .tokenizer import Tokenizer

# torchvision's VGG16 ``features``: conv widths and "M" (2x2 max-pool), each conv followed by a ReLU.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: ``features[:4]``, ``[4:9]``, ``[9:16]``,
# ``[16:23]``, ``[23:30]`` (taming's vgg16.slice1..slice5, which keep torchvision's indices).
_SLICE_ENDS = (4, 9, 16, 23, 30)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, else ``weight`` (taming's GAN start)."""
    return value if step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: ``clamp(|dnll/dW| / (|dg/dW| + 1e-4), 0, 1e4)``
    (detached) times ``disc_weight``, W the decoder's last layer; 0 without autograd."""
    if not (torch.is_grad_enabled() and last_layer.requires_grad and g_loss.requires_grad):
        return nll_loss.new_zeros(())
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


class ScalingLayer(nn.Module):
    """LPIPS' input normalisation: ``(x - shift) / scale`` for images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """LPIPS' linear head of one layer: ``model`` = Dropout (index 0), 1x1 conv to one channel without
    bias (index 1, hence the key ``lin<k>.model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` up to relu5_3, cut into ``slice1`` .. ``slice5`` that keep
    torchvision's layer indices as module names; ``forward`` returns the five slices' outputs."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        start = 0
        for s, end in enumerate(_SLICE_ENDS, 1):
            piece = nn.Sequential()
            for i in range(start, end):
                piece.add_module(str(i), layers[i])
            setattr(self, f"slice{s}", piece)
            start = end

    def forward(self, x):
        outs = []
        for s in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{s}")(x)
            outs.append(x)
        return outs


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """The LPIPS-VGG distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
    as a Perceptual Metric", arXiv:1801.03924) in taming's ``taming.modules.losses.lpips.LPIPS``
    layout: ``scaling_layer``, ``net.slice1..5`` (VGG16) and ``lin0..lin4``. ``forward(x, y)``
    is ``[B, 1, 1, 1]``: the sum over the five taps of the spatial mean of ``lin_k((u_k(x) -
    u_k(y))^2)``, u_k the channel-unit-normalised features. Every parameter is frozen. The heads'
    Dropout (p = 0.5) acts in train mode: taming builds its LPIPS in eval mode, but Lightning's
    ``model.train()`` switches it back, so taming's training runs it with dropout, and so do we.

    Built with random weights; :meth:`from_files` loads real ones.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, lpips_path: str, vgg_path: str = "") -> "LPIPS":
        model = cls()
        model.load_state_dict(load_lpips_state_dict(lpips_path, vgg_path))
        return model

    def forward(self, x, y):
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_channels(a) - _unit_channels(b)) ** 2
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file (loaded with ``weights_only``) or a safetensors file;
    a checkpoint dict holding ``state_dict`` gives that entry."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (or a checkpoint with a 'state_dict' entry)")
    return obj


def load_lpips_state_dict(lpips_path: str, vgg_path: str = "") -> Dict[str, torch.Tensor]:
    """The state dict of :class:`LPIPS` from local files. ``lpips_path`` holds one of:

    - a taming VQGAN checkpoint (``torch.save`` of a dict whose ``state_dict`` has the keys
      ``loss.perceptual_loss.*``): its perceptual loss is taken;
    - an :class:`LPIPS` state dict (keys ``net.slice<s>.<i>.weight/bias``, ``lin<k>.model.1.weight``,
      optionally ``scaling_layer.shift/scale``), a ``torch.save`` or ``.safetensors`` file;
    - the linear heads only, ``lin<k>.model.1.weight`` [1, C, 1, 1]: taming's ``vgg.pth``, which is
      richzhang/PerceptualSimilarity's ``weights/v0.1/vgg.pth`` (also shipped in the ``lpips`` pip
      package); then ``vgg_path`` must name torchvision's ImageNet VGG16 state dict
      (``vgg16-397923af.pth``, keys ``features.<i>.weight/bias``; the classifier is ignored).

    A ``state_dict`` entry of a checkpoint dict is unwrapped; files load with ``weights_only=True``
    (a Lightning ``.ckpt`` holding pickled objects: save its ``state_dict`` entry alone first).
    """
    sd = _load_tensors(lpips_path)
    prefix = "loss.perceptual_loss."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if k.startswith(("net.", "lin", "scaling_layer."))}
    if not any(k.startswith("net.") for k in sd):
        if not vgg_path:
            raise ValueError(f"{lpips_path} holds no VGG16 weights (net.*): name torchvision's vgg16 state dict "
                             f"(vgg16-397923af.pth) in vgg_path")
        sd.update(_vgg_from_torchvision(_load_tensors(vgg_path), vgg_path))
    expected = LPIPS().state_dict()
    sd = {**{k: v for k, v in expected.items() if k.startswith("scaling_layer.")}, **sd}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LPIPS weights from {lpips_path}{' + ' + vgg_path if vgg_path else ''}: missing keys "
                         f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}")
    bad = [k for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"LPIPS weights from {lpips_path}: wrong shapes for {bad[:6]}")
    return sd


def _vgg_from_torchvision(sd: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """``features.<i>.*`` (torchvision VGG16) as ``net.slice<s>.<i>.*``."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "features" or len(parts) != 3:
            continue
        i = int(parts[1])
        if i >= _SLICE_ENDS[-1]:
            continue
        s = next(n for n, end in enumerate(_SLICE_ENDS, 1) if i < end)
        out[f"net.slice{s}.{i}.{parts[2]}"] = value
    if not out:
        raise ValueError(f"{path}: no torchvision VGG16 'features.<i>.weight' keys")
    return out


class PerceptualGANLoss(nn.Module):
    """Reconstruction (l1 or l2) + LPIPS + PatchGAN loss with taming's adaptive weight and GAN start;
    see the module docstring for the formulas. Submodules ``perceptual_loss`` (:class:`LPIPS`, only
    when weights are given) and ``discriminator`` (:class:`NLayerDiscriminator`, taming's
    ``weights_init``), so a taming checkpoint's ``loss.*`` keys load into a model holding this module
    as ``loss``.

    Args:
        pixel_loss: "l1" (taming) or "l2" (ViT-VQGAN).
        perceptual_weight: LPIPS weight (taming 1.0); forced to 0, with a warning, without ``lpips_path``.
        lpips_path, vgg_path: local LPIPS weights (:func:`load_lpips_state_dict`).
        disc_weight: the GAN term's weight (taming 0.8 for ImageNet; its default 1.0).
        adaptive: scale the GAN term by taming's adaptive weight (else a fixed ``disc_weight``).
        disc_start: the step from which the GAN terms count (taming's ``disc_start``).
        disc_factor: the GAN terms' factor after ``disc_start``.
        disc_loss: "hinge" or "vanilla" discriminator loss.
        disc_in_channels, disc_ndf, disc_num_layers: the PatchGAN's input channels, width, depth.
        codebook_weight: weight of the quantizer's loss.
        owner: the model's name, for messages.
    """

    def __init__(self, *, pixel_loss: str = "l1", perceptual_weight: float = 1.0, lpips_path: str = "",
                 vgg_path: str = "", disc_weight: float = 1.0, adaptive: bool = True, disc_start: int = 0,
                 disc_factor: float = 1.0, disc_loss: str = "hinge", disc_in_channels: int = 3, disc_ndf: int = 64,
                 disc_num_layers: int = 3, codebook_weight: float = 1.0, owner: str = "model"):
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"{owner}: pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"{owner}: disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        for name, value in (("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
                            ("disc_factor", disc_factor), ("codebook_weight", codebook_weight),
                            ("disc_start", disc_start)):
            if value < 0:
                raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
        if disc_ndf < 1 or disc_num_layers < 1:
            raise ValueError(f"{owner}: disc_ndf and disc_num_layers must be >= 1, got {disc_ndf}, {disc_num_layers}")
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0 and lpips_path:
            self.perceptual_loss = LPIPS.from_files(lpips_path, vgg_path)
        elif perceptual_weight > 0:
            warnings.warn(f"{owner}: perceptual term OFF (perceptual_weight {perceptual_weight} -> 0): no LPIPS "
                          f"weights given (set lpips_path, see models.losses.load_lpips_state_dict)", stacklevel=3)
            self.perceptual_weight = 0.0
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers).apply(weights_init)
        self.disc_weight, self.adaptive = disc_weight, adaptive
        self.disc_start, self.disc_factor = disc_start, disc_factor
        self.d_loss = D_LOSSES[disc_loss]
        self.codebook_weight = codebook_weight

    def _pixel(self, x, recon):
        diff = x.contiguous() - recon.contiguous()
        return diff.abs() if self.pixel_loss == "l1" else diff ** 2

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, codebook_loss: torch.Tensor, step: int,
                       last_layer: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The autoencoder's loss and its logs (``pixel_loss``, ``p_loss``, ``nll_loss``, ``g_loss``,
        ``d_weight``, ``disc_factor``, ``quant_loss``). ``last_layer``: the decoder's output weight
        (needed with ``adaptive``)."""
        pixel = self._pixel(x, recon)
        rec = pixel
        p_loss = pixel.new_zeros(())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(x.contiguous(), recon.contiguous())
            rec = rec + self.perceptual_weight * p_loss
        nll = rec.mean()
        g_loss = -self.discriminator(recon.contiguous()).mean()
        if self.adaptive:
            if last_layer is None:
                raise ValueError("PerceptualGANLoss: the adaptive weight needs the decoder's last layer")
            d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
        else:
            d_weight = nll.new_tensor(self.disc_weight)
        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        loss = nll + d_weight * factor * g_loss + self.codebook_weight * codebook_loss.mean()
        logs = {"pixel_loss": pixel.detach().mean(), "p_loss": p_loss.detach().mean(), "nll_loss": nll.detach(),
                "g_loss": g_loss.detach(), "d_weight": d_weight.detach(), "disc_factor": nll.new_tensor(factor),
                "quant_loss": codebook_loss.detach().mean()}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int
                           ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``x`` and detached ``recon``, and its logs (mean logits)."""
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(recon.contiguous().detach())
        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        d_loss = factor * self.d_loss(logits_real, logits_fake)
        return d_loss, {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}


class GANTokenizer(Tokenizer):
    """A tokenizer whose :class:`PerceptualGANLoss` is ``self.loss`` (None: no GAN): its discriminator is the
    trainer's second optimizer's, and the discriminator pass is the loss module's on ``inputs(batch)``."""

    loss: Optional[PerceptualGANLoss]

    def discriminator_parameters(self):
        return [] if self.loss is None else list(self.loss.discriminator.parameters())

    def discriminator_loss(self, batch, out, step):
        if self.loss is None:
            return super().discriminator_loss(batch, out, step)
        return self.loss.discriminator_loss(self.inputs(batch), out.recon, step)


_PIXEL_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}


@dataclass
class ReconstructionLossConfig:
    """The loss fields of the conv tokenizers trained as VQGAN (RQ-VAE, HQ-VAE, VAR's VQVAE): a pixel
    loss, and where their weights are non-zero VQGAN's LPIPS and adaptive PatchGAN terms
    (:class:`models.losses.PerceptualGANLoss`; LPIPS needs local weights, ``lpips_path``)."""
    pixel_loss: str = "l2"                     # l2 (mse) | l1
    perceptual_weight: float = 0.0             # LPIPS weight (0: off; on only with lpips_path)
    lpips_path: str = ""
    vgg_path: str = ""
    disc_weight: float = 0.0                   # adaptive GAN weight (0: no discriminator)
    disc_start: int = 0                        # step from which the GAN terms count
    disc_loss: str = "hinge"
    disc_num_layers: int = 2
    disc_ndf: int = 64


def perceptual_gan_loss(cfg: ReconstructionLossConfig, owner: str) -> Optional[PerceptualGANLoss]:
    """VQGAN's loss module for ``cfg``, or None when neither the perceptual nor the GAN term is on."""
    if cfg.pixel_loss not in _PIXEL_LOSSES:
        raise ValueError(f"{owner}: pixel_loss must be one of {sorted(_PIXEL_LOSSES)}, got {cfg.pixel_loss!r}")
    if cfg.perceptual_weight <= 0 and cfg.disc_weight <= 0:
        return None
    return PerceptualGANLoss(pixel_loss=cfg.pixel_loss, perceptual_weight=cfg.perceptual_weight,
                             lpips_path=cfg.lpips_path, vgg_path=cfg.vgg_path, disc_weight=cfg.disc_weight,
                             adaptive=True, disc_start=cfg.disc_start, disc_loss=cfg.disc_loss,
                             disc_num_layers=cfg.disc_num_layers, disc_ndf=cfg.disc_ndf, owner=owner)


class ReconstructionTokenizer(GANTokenizer):
    """A tokenizer whose loss is the pixel loss plus its quantizer's loss, with VQGAN's perceptual and
    GAN terms when ``self.loss`` (from :func:`perceptual_gan_loss`) is set; the decoder is ``self.decoder``."""

    loss: Optional[PerceptualGANLoss]

    def objective(self, x: torch.Tensor, recon: torch.Tensor, quant_loss: torch.Tensor, step: int
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(the generator's loss, its logs: ``pixel_loss``, ``quant_loss`` and the GAN terms' when on)."""
        if self.loss is not None:
            return self.loss.generator_loss(x, recon, quant_loss, step, self.decoder.last_layer)
        pixel = _PIXEL_LOSSES[self.cfg.pixel_loss](recon, x)
        return pixel + quant_loss, {"pixel_loss": pixel.detach(), "quant_loss": quant_loss.detach()}
