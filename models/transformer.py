"""Transformer blocks the generators share: pre-LayerNorm self-attention blocks (minGPT's layout, as
taming-transformers' GPT) that attend causally, by block or fully, and read and grow a
:class:`models.sampling.KVCache` when sampling autoregressively. Blocks built with ``cross=True`` add a
pre-LayerNorm cross-attention sub-layer between self-attention and the MLP (the original Transformer
decoder's order, as Parti's decoder and Muse's layers): the queries are the sequence, the keys / values a
``context`` [B, S, D] (an encoded text) under a key padding mask [B, S]; :meth:`Transformer.context_kv`
projects a context into every layer's keys / values once, so an autoregressive decoder does not redo it at
each step."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

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


ContextKV = Tuple[torch.Tensor, torch.Tensor]   # a context's keys and values [B, H, S, D / H]


class CrossAttention(nn.Module):
    """Multi-head attention of the sequence (``q``) to a context (``kv`` fused, ``proj`` out). ``mask``: bool
    [B, S] (True: a real context position; padding is never attended to) or None."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of the {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def context_kv(self, context: torch.Tensor) -> ContextKV:
        """The keys and values of ``context`` [B, S, C]."""
        b, s, c = context.shape
        k, v = self.kv(context).view(b, s, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, context_kv: ContextKV, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k, v = context_kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """``x + attn(ln1(x))``, with ``cross=True`` then ``x + cross_attn(ln_cross(x), context)``, then
    ``x + mlp(ln2(x))`` (GELU MLP of ``mlp_ratio`` times the width)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, bias: bool = True,
                 cross: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, bias)
        if cross:
            self.ln_cross = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, heads, dropout, bias)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias),
                                 nn.Dropout(dropout))

    def forward(self, x, mask=None, causal=False, cache=None, layer=0, context_kv=None, context_mask=None):
        x = x + self.attn(self.ln1(x), mask, causal, cache, layer)
        if context_kv is not None:
            x = x + self.cross_attn(self.ln_cross(x), context_kv, context_mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """``depth`` :class:`Block` s and a final LayerNorm ``ln_f`` (none with ``final_norm=False``:
    RQ-Transformer's ``AttentionStack``); :meth:`new_cache` gives the cache its :meth:`forward` fills.
    With ``cross=True`` every block also attends to a ``context`` (required then, refused otherwise)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 bias: bool = True, final_norm: bool = True, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, bias, cross) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def context_kv(self, context: torch.Tensor) -> List[ContextKV]:
        """Every layer's cross-attention keys / values of ``context`` [B, S, D], for :meth:`forward`."""
        if not self.cross:
            raise ValueError("this Transformer has no cross-attention (cross=False): it takes no context")
        return [block.cross_attn.context_kv(context) for block in self.blocks]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False,
                cache: Optional[KVCache] = None, context: Union[torch.Tensor, List[ContextKV], None] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``context``: [B, S, D], or its :meth:`context_kv`; ``context_mask`` bool [B, S] (True: real)."""
        if self.cross != (context is not None):
            raise ValueError("a cross-attention Transformer needs a context" if self.cross
                             else "this Transformer has no cross-attention (cross=False): it takes no context")
        kvs = (self.context_kv(context) if isinstance(context, torch.Tensor) else context) if self.cross \
            else [None] * len(self.blocks)
        for i, (block, kv) in enumerate(zip(self.blocks, kvs)):
            x = block(x, mask, causal, cache, i, kv, context_mask)
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
