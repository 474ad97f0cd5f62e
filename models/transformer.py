"""Transformer blocks the generators share: pre-LayerNorm self-attention blocks (minGPT's layout, as
taming-transformers' GPT) that attend causally, by block or fully, and read and grow a
:class:`models.sampling.KVCache` when sampling autoregressively."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_fields
from .sampling import KVCache, causal_mask


class SelfAttention(nn.Module):
    """Multi-head self-attention (``qkv`` fused, ``proj`` out). ``mask``: bool [T, S] (True: may attend)
    or None (every query sees every key); ``causal=True`` builds the causal mask, shifted by what the
    cache already holds. With ``cache`` the new keys / values are appended to layer ``layer``'s and the
    queries attend to all of them."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of the {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        offset = 0
        if cache is not None:
            offset = 0 if cache.keys[layer] is None else cache.keys[layer].shape[-2]
            k, v = cache.update(layer, k, v)
        if causal:
            mask = causal_mask(t, x.device, offset) if mask is None else mask & causal_mask(t, x.device, offset)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (GELU MLP of ``mlp_ratio`` times the width)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, bias)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias),
                                 nn.Dropout(dropout))

    def forward(self, x, mask=None, causal=False, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), mask, causal, cache, layer)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """``depth`` :class:`Block` s and a final LayerNorm ``ln_f`` (none with ``final_norm=False``:
    RQ-Transformer's ``AttentionStack``); :meth:`new_cache` gives the cache its :meth:`forward` fills."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 bias: bool = True, final_norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, bias) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, mask, causal, cache, i)
        return self.ln_f(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """minGPT's initialisation: normal(0, std) linear and embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_transformer_fields(cfg, depth_fields: Tuple[str, ...], rates: Tuple[str, ...] = ("dropout",)) -> None:
    """ValueErrors naming the config class and the field for the fields every generator's transformer
    has: ``dim`` and ``heads`` and the layer counts ``depth_fields`` (each >= 1), ``dim`` a multiple of
    ``heads``, ``mlp_ratio`` > 0 and the dropout ``rates`` in [0, 1)."""
    name = type(cfg).__name__
    check_fields(cfg, at_least=dict.fromkeys(("dim", "heads") + tuple(depth_fields), 1), non_negative=rates)
    if cfg.dim % cfg.heads:
        raise ValueError(f"{name}: dim ({cfg.dim}) must be a multiple of heads ({cfg.heads})")
    if not cfg.mlp_ratio > 0:
        raise ValueError(f"{name}: mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    for key in rates:
        if not getattr(cfg, key) < 1:
            raise ValueError(f"{name}: {key} must be in [0, 1), got {getattr(cfg, key)}")
