"""Shared convolutional building blocks: the taming-transformers / latent-diffusion ResNet
encoder and decoder (GroupNorm, swish, self-attention at low resolution), in the module layout
of both taming's ``taming.modules.diffusionmodules.model`` and VAR's ``models/basic_vae.py``,
so their checkpoints load into the models built from these blocks.

The two layouts differ only in the attention block: taming's has separate ``q``, ``k``, ``v``
1x1 convolutions (:class:`AttnBlock`), VAR's one fused ``qkv`` (:class:`FusedAttnBlock`); VAR
puts attention in every block of the lowest level (taming: at ``attn_resolutions``, which
expresses the same thing) and can drop the middle attention (``mid_attn=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_fields


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as taming's ``Normalize`` (eps 1e-6); ``groups`` is lowered to divide ``channels``."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad right / bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    """norm - swish - conv - norm - swish - dropout - conv, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = normalize(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


def _spatial_attention(q, k, v):
    """Single-head softmax attention over the H * W positions of [B, C, H, W] maps (scale C^-1/2)."""
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
    return out.transpose(2, 3).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """taming's self-attention block: ``q``, ``k``, ``v`` and ``proj_out`` 1x1 convolutions."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        return x + self.proj_out(_spatial_attention(self.q(h), self.k(h), self.v(h)))


class FusedAttnBlock(nn.Module):
    """VAR's self-attention block: one ``qkv`` 1x1 convolution and ``proj_out``."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        return x + self.proj_out(_spatial_attention(q, k, v))


_ATTENTION = {"taming": AttnBlock, "var": FusedAttnBlock}


def _attn_block(kind: str, channels: int, norm_groups: int) -> nn.Module:
    if kind not in _ATTENTION:
        raise ValueError(f"attention layout must be one of {sorted(_ATTENTION)}, got {kind!r}")
    return _ATTENTION[kind](channels, norm_groups)


def _check_resolution(resolution: int, levels: int, who: str) -> None:
    factor = 2 ** (levels - 1)
    if resolution % factor:
        raise ValueError(f"{who}: resolution {resolution} is not divisible by the downsampling factor {factor} "
                         f"(2 ** (len(ch_mult) - 1)); choose data.resolution as a multiple of {factor}")


class Encoder(nn.Module):
    """Images [B, in_channels, R, R] -> features [B, z_channels (x2 with double_z), R / f, R / f],
    f = 2 ** (len(ch_mult) - 1); attention in the blocks at side ``attn_resolutions``."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), resolution: int = 256, in_channels: int = 3,
                 z_channels: int = 256, double_z: bool = False, dropout: float = 0.0, attention: str = "taming",
                 mid_attn: bool = True, norm_groups: int = 32):
        super().__init__()
        _check_resolution(resolution, len(ch_mult), "Encoder")
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attn_block(attention, block_in, norm_groups))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = _attn_block(attention, block_in, norm_groups) if mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.norm_out = normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn):
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z_channels, R / f, R / f] -> images [B, out_ch, R, R] (the mirror of :class:`Encoder`,
    ``num_res_blocks + 1`` blocks per level)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), resolution: int = 256, out_ch: int = 3,
                 z_channels: int = 256, dropout: float = 0.0, attention: str = "taming", mid_attn: bool = True,
                 norm_groups: int = 32, tanh_out: bool = False):
        super().__init__()
        _check_resolution(resolution, len(ch_mult), "Decoder")
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = _attn_block(attention, block_in, norm_groups) if mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attn_block(attention, block_in, norm_groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output convolution's weight (the adaptive GAN weight's reference)."""
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn):
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


@dataclass
class ConvStackConfig:
    """The fields of a taming-style conv encoder / decoder pair (:mod:`models.blocks`)."""
    resolution: int = 32
    ch: int = 64
    ch_mult: Tuple[int, ...] = (1, 2, 2)      # token grid: resolution / 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1
    attn_resolutions: Tuple[int, ...] = ()
    mid_attn: bool = True                     # attention in the middle blocks (taming; MaskGIT-style ResNets: no)
    dropout: float = 0.0


@dataclass
class ConvAEConfig(ConvStackConfig):
    """The image autoencoder fields of the language-vocabulary tokenizers (LQAE, SPAE, UniCode)."""
    in_channels: int = 3


def check_conv_fields(cfg) -> None:
    """ValueErrors naming the field for a config's conv stack fields (``ch``, ``num_res_blocks``,
    ``ch_mult`` and, where the config has them, ``z_channels`` and ``in_channels``)."""
    at_least = {k: 1 for k in ("ch", "num_res_blocks", "z_channels", "in_channels") if hasattr(cfg, k)}
    check_fields(cfg, at_least=at_least, multipliers=("ch_mult",))


def conv_autoencoder(cfg: ConvStackConfig, channels: int, z_channels: int) -> Tuple[Encoder, Decoder]:
    """The encoder (``channels`` -> ``z_channels`` features) and decoder (back) of ``cfg``."""
    check_conv_fields(cfg)
    if min(channels, z_channels) < 1:
        raise ValueError(f"{type(cfg).__name__}: the autoencoder's channels ({channels}) and feature width "
                         f"({z_channels}) must be >= 1")
    conv = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                attn_resolutions=cfg.attn_resolutions, mid_attn=cfg.mid_attn, resolution=cfg.resolution,
                z_channels=z_channels)
    return Encoder(in_channels=channels, **conv), Decoder(out_ch=channels, **conv)


def token_grid(cfg: ConvStackConfig) -> int:
    """The side of the encoder's output grid."""
    return cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
