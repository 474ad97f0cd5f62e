"""A small Vision Transformer encoder and decoder (Dosovitskiy et al. 2020, arXiv:2010.11929) for
image tokenizers, as ViT-VQGAN (Yu et al. 2021, arXiv:2110.04627) uses them.

:class:`ViTEncoder`: non-overlapping ``patch_size`` patches -> a stride-``patch_size`` convolution
(the patch embedding) -> plus position embeddings -> pre-norm Transformer blocks -> LayerNorm ->
an output head. :class:`ViTDecoder`: tokens -> a linear input projection -> plus position
embeddings -> blocks -> LayerNorm -> a head to ``patch_size^2 * C`` values per token, regrouped
into the image. Both heads are ViT-VQGAN's "two-layer feed-forward network with a tanh activation
in the middle" and no activation at the output (:class:`TanhHead`).

Blocks: ``x + attn(LN(x))``, ``x + mlp(LN(x))``, multi-head attention through
``F.scaled_dot_product_attention``, a GELU MLP. Position embeddings are learned (ViT; truncated
normal, std 0.02) or fixed 2-D sine-cosine (MAE's, not saved in the state_dict). Linear weights are
initialised truncated-normal (std 0.02) with zero biases, LayerNorms to identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POS_EMBEDS = ("learned", "sincos")

# ViT-VQGAN's Table 1: (model dim, blocks, heads, MLP hidden dim) of its Small / Base / Large ViTs.
VIT_SIZES = {"S": (512, 8, 8, 2048), "B": (768, 12, 12, 3072), "L": (1280, 32, 16, 5120)}


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings ``[h * w, dim]`` (row-major positions): half the
    channels encode the row, half the column, each as sin / cos of ``pos / 10000^(i / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"sincos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` and ``proj`` linear layers, softmax scale head_dim^-1/2."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """A pre-norm Transformer block: attention and a GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TanhHead(nn.Module):
    """ViT-VQGAN's output head: Linear -> tanh -> Linear (no output activation)."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class _ViT(nn.Module):
    """What the encoder and decoder share: the token grid, position embeddings, blocks, final norm."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 pos_embed: str, who: str):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"{who}: resolution {image_size} is not divisible by the patch size {patch_size}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"{who}: pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if min(dim, depth, heads, mlp_dim) < 1:
            raise ValueError(f"{who}: dim, depth, heads and mlp_dim must be >= 1")
        self.grid = image_size // patch_size
        self.patch_size = patch_size
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, self.grid ** 2, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_2d(dim, self.grid, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def transform(self, tokens):
        x = tokens + self.pos_embed.to(tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ViTEncoder(_ViT):
    """Images [B, in_channels, R, R] -> tokens [B, (R / patch_size)^2, out_dim], row-major."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int = 3, dim: int, depth: int, heads: int,
                 mlp_dim: int, out_dim: int, pos_embed: str = "learned"):
        super().__init__(image_size, patch_size, dim, depth, heads, mlp_dim, pos_embed, "ViTEncoder")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.head = TanhHead(dim, mlp_dim, out_dim)
        self.apply(_init_weights)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        return self.head(self.transform(tokens))


class ViTDecoder(_ViT):
    """Tokens [B, (R / patch_size)^2, in_dim] -> images [B, out_channels, R, R]."""

    def __init__(self, *, image_size: int, patch_size: int, out_channels: int = 3, in_dim: int, dim: int, depth: int,
                 heads: int, mlp_dim: int, pos_embed: str = "learned"):
        super().__init__(image_size, patch_size, dim, depth, heads, mlp_dim, pos_embed, "ViTDecoder")
        self.out_channels = out_channels
        self.proj_in = nn.Linear(in_dim, dim)
        self.head = TanhHead(dim, mlp_dim, patch_size * patch_size * out_channels)
        self.apply(_init_weights)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output layer's weight (the adaptive GAN weight's reference)."""
        return self.head.fc2.weight

    def forward(self, tokens):
        b, n, _ = tokens.shape
        if n != self.grid ** 2:
            raise ValueError(f"ViTDecoder: expected {self.grid ** 2} tokens, got {n}")
        patches = self.head(self.transform(self.proj_in(tokens)))  # [B, N, p * p * C]
        g, p, c = self.grid, self.patch_size, self.out_channels
        return patches.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
