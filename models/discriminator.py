"""taming-transformers' PatchGAN discriminator (``taming.modules.discriminator.model``), the
pix2pix ``NLayerDiscriminator`` (Isola et al. 2017, arXiv:1611.07004) its VQGAN uses.

Layout and keys as taming's (``main.<i>.*``): a 4x4 stride-2 convolution and LeakyReLU(0.2);
``n_layers - 1`` blocks of a 4x4 stride-2 convolution without bias, BatchNorm and LeakyReLU
(widths ``ndf * min(2^n, 8)``); one such block with stride 1; a 4x4 stride-1 convolution to one
logit per patch. taming's ActNorm option is not provided. BatchNorm runs in train mode in both GAN
passes (batch statistics); under DistributedDataParallel each rank normalises with its own batch's
statistics and keeps its own running averages (no SyncBatchNorm), as taming's Lightning DDP runs did.
"""

from __future__ import annotations

from torch import nn


def weights_init(m: nn.Module) -> None:
    """taming's init: convolutions N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """[B, input_nc, H, W] images -> [B, 1, h, w] patch logits (h = H / 2^n_layers - 2 for H >= 2^(n+2))."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)
