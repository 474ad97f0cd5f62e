"""The PixelCNN priors of the VQ-VAE systems: generators of a trained tokenizer's code maps, in raster order.

``vqvae``: a gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders", arXiv:1606.05328) over the VQ-VAE's code map, the prior of the VQ-VAE paper (van den Oord
et al. 2017, arXiv:1711.00937): codes embedded by an ``nn.Embedding``; a vertical stack (an n x n
convolution over the rows above) and a horizontal stack (a 1 x n convolution over the positions to the
left in the row) in every layer, the vertical stack feeding the horizontal one through a 1x1
convolution; gated activations ``tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h)``, ``V h`` the class
bias (a label embedding, one row per class and one for the null class ``num_classes`` of classifier-free
guidance); a residual 1x1 convolution in the horizontal stack; mask 'A' (the current position hidden)
in the first layer, 'B' (the current position's own features seen) in the others. The layer follows
the paper's figure 2 as ritheshkumar95/pytorch-vqvae ``modules.py`` (``GatedMaskedConv2d``) builds it:
the vertical kernel is ``(n // 2 + 1) x n`` over rows ``i - n // 2 .. i`` and the horizontal one
``1 x (n // 2 + 1)`` over columns ``j - n // 2 .. j``; mask 'A' zeroes the vertical kernel's last row and
the horizontal kernel's last column (the paper's down and right shifts), so the vertical stack at row i
sees only rows above i and feeds the horizontal stack with no further shift; the first layer has no
horizontal residual (it would pass the current code through). Output: 1x1 convolution, ReLU, 1x1
convolution to the K logits (ritheshkumar95's ``output_conv``).

``vqvae2``: the VQ-VAE-2 priors (Razavi et al. 2019, arXiv:1906.00446), as rosinality/vq-vae-2-pytorch
``pixelsnail.py`` builds them, both class-conditional:

* the top prior, a PixelSNAIL (Chen et al. 2018) over the top code map: an "above" convolution
  (``(n // 2) x n`` shifted down one row) plus a "left" convolution (``((n + 1) // 2) x (n // 2)``
  shifted right one column) of the code embeddings; blocks of gated residual blocks (ELU, causal n x n
  convolution, ELU, dropout, causal n x n convolution to twice the width, GLU, residual) whose causal
  convolutions hide the current position and those right of it in the current row, each block ending
  in causal multi-head self-attention over the raster positions (its input a gated 1x1 residual block
  of the codes, the residual blocks' output and two coordinate channels, the "background"), merged by
  a gated residual block taking the attention's output as an auxiliary input; then
  ``top_out_res_blocks`` 1x1 gated residual blocks, ELU and a 1x1 convolution to the logits;
* the bottom prior, a gated PixelCNN (the ``vqvae`` one) over the bottom map, conditioned on the top
  codes: a conditioning stack (embedding, n x n convolution, gated residual blocks: rosinality's
  ``CondResNet``) over the top map, upsampled (nearest) to the bottom map's size, enters every gated
  layer's gates through a 1x1 convolution (the paper's location-dependent ``V * s``).

Sampling is raster order, one position at a time: each step reruns the network on the rows up to the
current one (the rows below cannot change the current position's logits). A PixelCNN has no key /
value cache, and the top prior's attention is recomputed with the convolutions, so ``use_cache`` has
no effect: ``use_cache=False`` draws the same tokens. ``vqvae2`` samples the top map, then the bottom
map given it. Guidance, when asked for, runs the conditional and null-class batches together and
mixes their logits (:func:`models.sampling.guide`; the ``linear`` schedule ramps over the positions of
both maps).

Deviations: codes enter every network through an ``nn.Embedding`` (rosinality's PixelSNAIL convolves
one-hot maps; an embedding followed by the first convolutions is a factorisation of that); no weight
normalisation (rosinality and PixelSNAIL use it on every layer); PyTorch's default initialisation. The
PixelSNAIL attention is :class:`models.transformer.SelfAttention` (queries, keys and values from one
input, a 1x1 projection of the key block's output) with ``causal=True``, a position attending to itself
and those before it. The original PixelSNAIL (neocxi/pixelsnail-public) takes keys and values from
(the input, the block's output, the background) and queries from (the block's output, the background)
under a strictly causal mask; here the key block reads the embedding of the previous code in raster
order in place of the position's own code, which with the diagonal allowed gives the same context:
every code before the position, the last codes of the row above included (rosinality's key block reads
the block's input features instead, so a position near the start of a row never sees the codes of the
row above beyond the convolutions' reach; the tests check that this blind spot is absent here). The
class conditioning of both VQ-VAE-2 priors (rosinality's have none) adds a label embedding to the gates
of every masked gated block. The bottom prior is the gated PixelCNN (the paper's bottom prior has no
attention; rosinality's is a PixelSNAIL without attention). The two priors of ``vqvae2``, trained
separately in the paper, train here in one step on the token-weighted mean of their cross-entropies
(they share no parameter, so with Adam this is the same as two runs, gradient clipping and Adam's
epsilon aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .generator import ConditionConfig, Generator
from .sampling import SamplingConfig, guidance_scale, guide, sample_logits, with_null_labels
from .tokenizer import StepOutput
from .transformer import SelfAttention


# ---------------------------------------------------------------- building blocks

class MaskedConv2d(nn.Conv2d):
    """A convolution padded by ``pad`` (left, right, top, bottom) before it runs, its kernel multiplied
    by a fixed 0 / 1 ``mask`` (kernel-shaped; a buffer outside the state_dict)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 pad: Tuple[int, int, int, int], mask: Optional[torch.Tensor] = None):
        super().__init__(in_channels, out_channels, kernel_size)
        self.pad = pad
        self.register_buffer("mask", torch.ones(kernel_size) if mask is None else mask, persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def gate(x: torch.Tensor) -> torch.Tensor:
    """The gated activation ``tanh(a) * sigmoid(b)`` of ``x = [a, b]`` split on the channels."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated PixelCNN layer: (vertical, horizontal) -> (vertical, horizontal), all [B, dim, h, w].

    ``mask_type`` 'A' (the first layer: neither stack sees the current position) or 'B'. Conditioning:
    ``label`` (a class id per sample: an embedding of both stacks' gate biases) and ``cond`` (a
    [B, cond_channels, h, w] map, through a 1x1 convolution)."""

    def __init__(self, dim: int, kernel: int, mask_type: str, num_labels: int = 0, cond_channels: int = 0):
        super().__init__()
        half = kernel // 2
        v_mask, h_mask = torch.ones(half + 1, kernel), torch.ones(1, half + 1)
        if mask_type == "A":
            v_mask[-1] = 0      # rows strictly above the current one
            h_mask[:, -1] = 0   # columns strictly left of the current one
        self.residual = mask_type == "B"
        self.v_conv = MaskedConv2d(dim, 2 * dim, (half + 1, kernel), (half, half, half, 0), v_mask)
        self.h_conv = MaskedConv2d(dim, 2 * dim, (1, half + 1), (half, 0, 0, 0), h_mask)
        self.v_to_h = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.h_out = nn.Conv2d(dim, dim, 1)
        self.label = nn.Embedding(num_labels, 4 * dim) if num_labels else None
        self.cond = nn.Conv2d(cond_channels, 4 * dim, 1, bias=False) if cond_channels else None

    def forward(self, v, h, label=None, cond=None):
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre)
        bias = 0
        if self.label is not None:
            bias = self.label(label)[:, :, None, None]
        if self.cond is not None:
            bias = bias + self.cond(cond)
        if self.label is not None or self.cond is not None:
            v_bias, h_bias = bias.chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        out = self.h_out(gate(h_pre))
        return gate(v_pre), (h + out if self.residual else out)


class GatedPixelCNN(nn.Module):
    """Code ids [B, h, w] -> logits [B, K, h, w]; the logits at a position depend only on the codes
    before it in raster order (and on ``label`` [B] / the map ``cond``)."""

    def __init__(self, codebook_size: int, dim: int, layers: int, kernel: int, out_hidden: int,
                 num_labels: int = 0, cond_channels: int = 0):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, dim)
        self.layers = nn.ModuleList(GatedLayer(dim, kernel, "A" if i == 0 else "B", num_labels, cond_channels)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.Conv2d(dim, out_hidden, 1), nn.ReLU(), nn.Conv2d(out_hidden, codebook_size, 1))

    def forward(self, ids, label=None, cond=None):
        x = self.embed(ids).permute(0, 3, 1, 2)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, label, cond)
        return self.head(h)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[..., :-1]


def causal_conv(in_channels: int, out_channels: int, kernel: int) -> MaskedConv2d:
    """PixelSNAIL's ``causal`` n x n convolution: rows i - n + 1 .. i, its last row (the current one)
    only left of the current column."""
    mask = torch.ones(kernel, kernel)
    mask[-1, kernel // 2:] = 0
    return MaskedConv2d(in_channels, out_channels, (kernel, kernel), (kernel // 2, kernel // 2, kernel - 1, 0), mask)


class GatedResBlock(nn.Module):
    """PixelSNAIL's gated residual block: ``x + GLU(conv2(dropout(ELU(conv1(ELU(x)) + aux_conv(ELU(aux)))))
    + cond + label)``, the convolutions causal (:func:`causal_conv`) or ordinary ones ('same' padding)."""

    def __init__(self, channels: int, hidden: int, kernel: int, causal: bool, dropout: float,
                 aux_channels: int = 0, num_labels: int = 0):
        super().__init__()
        if causal:
            self.conv1, self.conv2 = causal_conv(channels, hidden, kernel), causal_conv(hidden, 2 * channels, kernel)
        else:
            self.conv1 = nn.Conv2d(channels, hidden, kernel, padding=kernel // 2)
            self.conv2 = nn.Conv2d(hidden, 2 * channels, kernel, padding=kernel // 2)
        self.aux_conv = nn.Conv2d(aux_channels, hidden, 1) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.label = nn.Embedding(num_labels, 2 * channels) if num_labels else None

    def forward(self, x, aux=None, label=None):
        out = self.conv1(F.elu(x))
        if self.aux_conv is not None:
            out = out + self.aux_conv(F.elu(aux))
        out = self.conv2(self.dropout(F.elu(out)))
        if self.label is not None:
            out = out + self.label(label)[:, :, None, None]
        return x + F.glu(out, dim=1)


class PixelBlock(nn.Module):
    """A PixelSNAIL block: causal gated residual blocks, then causal self-attention over the raster
    positions merged in by a 1x1 gated residual block. The attention's input at a position is a gated
    1x1 block of (the embedding of the previous code in raster order, the residual blocks' output, the
    background)."""

    def __init__(self, channels: int, res_channels: int, kernel: int, res_blocks: int, attn_dim: int, heads: int,
                 dropout: float, num_labels: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(GatedResBlock(channels, res_channels, kernel, True, dropout,
                                                      num_labels=num_labels) for _ in range(res_blocks))
        self.key_block = GatedResBlock(2 * channels + 2, channels, 1, False, dropout)
        self.attn_in = nn.Conv2d(2 * channels + 2, attn_dim, 1)
        self.attention = SelfAttention(attn_dim, heads, dropout)
        self.out_block = GatedResBlock(channels, channels, 1, False, dropout, aux_channels=attn_dim)

    def forward(self, x, previous, background, label=None):
        out = x
        for block in self.res_blocks:
            out = block(out, label=label)
        key = self.attn_in(self.key_block(torch.cat([previous, out, background], 1)))
        b, c, h, w = key.shape
        attended = self.attention(key.flatten(2).transpose(1, 2), causal=True)
        return self.out_block(out, attended.transpose(1, 2).reshape(b, c, h, w))


class PixelSNAIL(nn.Module):
    """PixelSNAIL over a [B, h, w] code map (h <= ``shape[0]`` rows: the sampler passes the rows so far)
    -> logits [B, K, h, w], each position's from the codes before it in raster order and ``label``."""

    def __init__(self, codebook_size: int, shape: Tuple[int, int], channels: int, kernel: int, blocks: int,
                 res_blocks: int, res_channels: int, attn_dim: int, heads: int, dropout: float, out_res_blocks: int,
                 num_labels: int = 0):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        half = kernel // 2
        # rosinality's "horizontal" (rows above, after the down shift) and "vertical" (up-left, right shift)
        self.above = MaskedConv2d(channels, channels, (half, kernel), (half, half, half - 1, 0))
        self.left = MaskedConv2d(channels, channels, ((kernel + 1) // 2, half), (half - 1, 0, (kernel + 1) // 2 - 1, 0))
        h, w = shape
        rows = ((torch.arange(h).float() - h / 2) / h).view(1, 1, h, 1).expand(1, 1, h, w)
        cols = ((torch.arange(w).float() - w / 2) / w).view(1, 1, 1, w).expand(1, 1, h, w)
        self.register_buffer("background", torch.cat([rows, cols], 1), persistent=False)
        self.blocks = nn.ModuleList(PixelBlock(channels, res_channels, kernel, res_blocks, attn_dim, heads, dropout,
                                               num_labels) for _ in range(blocks))
        self.out_blocks = nn.ModuleList(GatedResBlock(channels, res_channels, 1, False, dropout)
                                        for _ in range(out_res_blocks))
        self.out = nn.Conv2d(channels, codebook_size, 1)

    def forward(self, ids, label=None):
        b, h, w = ids.shape
        x = self.embed(ids).permute(0, 3, 1, 2)
        out = shift_down(self.above(x)) + shift_right(self.left(x))
        previous = F.pad(x.flatten(2), (1, 0))[..., :-1].view_as(x)   # the code before each position
        background = self.background[:, :, :h, :w].expand(b, -1, -1, -1)
        for block in self.blocks:
            out = block(out, previous, background, label)
        for block in self.out_blocks:
            out = block(out)
        return self.out(F.elu(out))


class ConditionStack(nn.Module):
    """rosinality's ``CondResNet`` on the top codes: embedding, n x n convolution, gated residual blocks,
    then a nearest upsampling to the bottom map's size: [B, ht, wt] -> [B, channels, hb, wb]."""

    def __init__(self, codebook_size: int, channels: int, kernel: int, res_blocks: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, channels)
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.blocks = nn.ModuleList(GatedResBlock(channels, channels, kernel, False, dropout) for _ in range(res_blocks))

    def forward(self, top, size: Tuple[int, int]):
        x = self.conv(self.embed(top).permute(0, 3, 1, 2))
        for block in self.blocks:
            x = block(x)
        return F.interpolate(x, size=size, mode="nearest")


# ---------------------------------------------------------------- raster sampling

def sample_raster(logits_of: Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor],
                  shape: Tuple[int, int], n: int, labels: Optional[torch.Tensor], num_classes: int,
                  params: SamplingConfig, generator: torch.Generator, device, start: int = 0,
                  total: Optional[int] = None) -> torch.Tensor:
    """A code map [n, h, w] drawn in raster order. ``logits_of(ids, labels, rows)`` gives the logits
    [B, K, rows, w] of the first ``rows`` rows ``ids`` [B, rows, w] (B = n, or 2n with guidance: the
    conditional batch, then the null-class one). ``start`` / ``total``: the map's first position among
    all the positions sampled, for the guidance schedule."""
    h, w = shape
    total = h * w if total is None else total
    guided = params.cfg is not None
    if guided:
        labels = with_null_labels(labels, num_classes)
    ids = torch.zeros(n, h, w, dtype=torch.long, device=device)
    for i in range(h):
        for j in range(w):
            rows = ids[:, :i + 1]
            logits = logits_of(torch.cat([rows, rows]) if guided else rows, labels, i + 1)[:, :, i, j]
            if guided:
                cond, uncond = logits.chunk(2)
                progress = (start + i * w + j) / max(total - 1, 1)
                logits = guide(cond, uncond, guidance_scale(params.cfg, params.cfg_schedule, progress))
            ids[:, i, j] = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
    return ids


def _null_labels(labels: Optional[torch.Tensor], n: int, num_classes: int, device) -> Optional[torch.Tensor]:
    """The labels to condition on: None for an unconditional model, the null class when none are given."""
    if num_classes == 0:
        return None
    if labels is None:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    return labels.to(device=device, dtype=torch.long)


def _check_kernel(cfg, field: str, minimum: int) -> None:
    k = getattr(cfg, field)
    if not isinstance(k, int) or k < minimum or k % 2 == 0:
        raise ValueError(f"{type(cfg).__name__}: {field} must be an odd integer >= {minimum}, got {k!r}")


# ---------------------------------------------------------------- vqvae: the gated PixelCNN prior

@dataclass
class PixelCNNConfig(ConditionConfig):
    """The gated PixelCNN prior of the VQ-VAE's code map."""
    dim: int = 64                 # channels of both stacks (the paper's hidden units)
    layers: int = 8               # gated layers: the first with mask 'A', the others 'B'
    kernel: int = 5               # filter size n: n x n vertical, 1 x n horizontal (odd)
    out_hidden: int = 256         # channels of the output head's hidden 1x1 convolution


class PixelCNNPrior(Generator):
    """The VQ-VAE paper's prior: a class-conditional gated PixelCNN over the [h, w] code map of a
    ``models.vqvae`` tokenizer (``prior``'s state_dict keys). ``use_cache`` has no effect (a PixelCNN
    has no kv-cache: every step reruns the convolutions)."""

    config_cls = PixelCNNConfig

    def __init__(self, cfg: PixelCNNConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        check_fields(cfg, at_least={"dim": 1, "layers": 1, "out_hidden": 1})
        _check_kernel(cfg, "kernel", 3)
        side = tokenizer.cfg.resolution // 4
        self.shape, self.codebook_size = (side, side), tokenizer.cfg.codebook_size
        self.prior = GatedPixelCNN(self.codebook_size, cfg.dim, cfg.layers, cfg.kernel, cfg.out_hidden,
                                   num_labels=cfg.num_classes + 1 if cfg.num_classes else 0)

    def forward_logits(self, ids: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [B, K, h, w] of code maps ``ids`` [B, h, w] (teacher forcing)."""
        return self.prior(ids, _null_labels(labels, ids.shape[0], self.num_classes, ids.device))

    def training_step(self, batch, step) -> StepOutput:
        ids = self.tokens(batch)
        loss = F.cross_entropy(self.forward_logits(ids, self.labels(batch)), ids)
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach()})

    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> torch.Tensor:
        device = self.prior.embed.weight.device
        labels = _null_labels(labels, n, self.num_classes, device)
        return sample_raster(lambda ids, lab, rows: self.prior(ids, lab), self.shape, n, labels, self.num_classes,
                             params, generator, device)


# ---------------------------------------------------------------- vqvae2: top PixelSNAIL, bottom gated PixelCNN

@dataclass
class VQVAE2PriorConfig(ConditionConfig):
    """The two VQ-VAE-2 priors: PixelSNAIL over the top map, a gated PixelCNN over the bottom map given
    the top one."""
    top_channels: int = 64        # PixelSNAIL width (rosinality: channel)
    top_res_channels: int = 64    # hidden width of its gated residual blocks (res_channel)
    top_kernel: int = 5           # its causal convolutions' size (odd)
    top_blocks: int = 2           # PixelSNAIL blocks, each ending in attention (n_block)
    top_res_blocks: int = 2       # gated residual blocks per block (n_res_block)
    top_out_res_blocks: int = 0   # 1x1 gated residual blocks before the output (n_out_res_block)
    top_attn_dim: int = 32        # attention width (rosinality: channel // 2)
    top_heads: int = 4            # attention heads (rosinality: 8)
    dropout: float = 0.1          # dropout of the PixelSNAIL and conditioning-stack blocks and attention
    bottom_dim: int = 64          # gated PixelCNN width of the bottom prior
    bottom_layers: int = 8        # its gated layers
    bottom_kernel: int = 5        # its filter size (odd)
    bottom_out_hidden: int = 256  # its output head's hidden channels
    cond_channels: int = 64       # width of the conditioning stack over the top codes (cond_res_channel)
    cond_res_blocks: int = 2      # its gated residual blocks (n_cond_res_block)
    cond_kernel: int = 3          # its convolutions' size (odd; rosinality: cond_res_kernel 3)


class VQVAE2Prior(Generator):
    """The VQ-VAE-2 hierarchical prior over a ``models.vqvae2`` tokenizer's (top, bottom) code maps:
    ``top`` (PixelSNAIL), ``bottom`` (gated PixelCNN) and ``condition`` (the top codes' conditioning
    stack). The loss is the mean cross-entropy over all tokens of both maps (each map's weighted by its
    token count); ``top_nll`` and ``bottom_nll`` are logged. ``use_cache`` has no effect (the attention
    is recomputed with the convolutions at every step)."""

    config_cls = VQVAE2PriorConfig

    def __init__(self, cfg: VQVAE2PriorConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        check_fields(cfg, at_least=dict.fromkeys(("top_channels", "top_res_channels", "top_blocks", "top_attn_dim",
                                                  "top_heads", "bottom_dim", "bottom_layers", "bottom_out_hidden",
                                                  "cond_channels"), 1),
                     non_negative=("top_res_blocks", "top_out_res_blocks", "cond_res_blocks"))
        _check_kernel(cfg, "top_kernel", 3)
        _check_kernel(cfg, "bottom_kernel", 3)
        _check_kernel(cfg, "cond_kernel", 1)
        if cfg.top_attn_dim % cfg.top_heads:
            raise ValueError(f"{type(cfg).__name__}: top_attn_dim {cfg.top_attn_dim} must be a multiple of "
                             f"top_heads {cfg.top_heads}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"{type(cfg).__name__}: dropout must be in [0, 1), got {cfg.dropout}")
        res = tokenizer.cfg.resolution
        self.top_shape, self.bottom_shape = (res // 8, res // 8), (res // 4, res // 4)
        self.codebook_size = tokenizer.cfg.codebook_size
        labels = cfg.num_classes + 1 if cfg.num_classes else 0
        self.top = PixelSNAIL(self.codebook_size, self.top_shape, cfg.top_channels, cfg.top_kernel, cfg.top_blocks,
                              cfg.top_res_blocks, cfg.top_res_channels, cfg.top_attn_dim, cfg.top_heads, cfg.dropout,
                              cfg.top_out_res_blocks, labels)
        self.condition = ConditionStack(self.codebook_size, cfg.cond_channels, cfg.cond_kernel, cfg.cond_res_blocks,
                                        cfg.dropout)
        self.bottom = GatedPixelCNN(self.codebook_size, cfg.bottom_dim, cfg.bottom_layers, cfg.bottom_kernel,
                                    cfg.bottom_out_hidden, labels, cfg.cond_channels)

    def forward_logits(self, ids: Sequence[torch.Tensor], labels: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(top logits [B, K, ht, wt], bottom logits [B, K, hb, wb]) of code maps (top, bottom)."""
        top, bottom = ids
        labels = _null_labels(labels, top.shape[0], self.num_classes, top.device)
        cond = self.condition(top, bottom.shape[-2:])
        return self.top(top, labels), self.bottom(bottom, labels, cond)

    def training_step(self, batch, step) -> StepOutput:
        top, bottom = self.tokens(batch)
        top_logits, bottom_logits = self.forward_logits((top, bottom), self.labels(batch))
        top_nll = F.cross_entropy(top_logits, top)
        bottom_nll = F.cross_entropy(bottom_logits, bottom)
        n_top, n_bottom = top[0].numel(), bottom[0].numel()
        loss = (top_nll * n_top + bottom_nll * n_bottom) / (n_top + n_bottom)
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach(), "top_nll": top_nll.detach(),
                                                       "bottom_nll": bottom_nll.detach()})

    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        device = self.bottom.embed.weight.device
        labels = _null_labels(labels, n, self.num_classes, device)
        n_top, n_bottom = self.top_shape[0] * self.top_shape[1], self.bottom_shape[0] * self.bottom_shape[1]
        top = sample_raster(lambda ids, lab, rows: self.top(ids, lab), self.top_shape, n, labels, self.num_classes,
                            params, generator, device, 0, n_top + n_bottom)
        cond = self.condition(top, self.bottom_shape)
        if params.cfg is not None:
            cond = torch.cat([cond, cond])
        return top, sample_raster(lambda ids, lab, rows: self.bottom(ids, lab, cond[:, :, :rows]), self.bottom_shape,
                                  n, labels, self.num_classes, params, generator, device, n_top, n_top + n_bottom)


MODELS = {"vqvae": PixelCNNPrior, "vqvae2": VQVAE2Prior}

_DIGITS = DataConfig(name="digits", hflip=False)

PRESETS = {
    "vqvae": {
        # 8x8 codes of the tiny digits tokenizer, K = 512, on one CPU thread in about 4 minutes.
        "tiny": Preset(model=PixelCNNConfig(dim=64, layers=8, kernel=5, out_hidden=256),
                       train=TrainConfig(steps=1000, batch_size=32, lr=1e-3, betas=(0.9, 0.999), warmup_steps=50,
                                         grad_clip=1.0),
                       data=_DIGITS),
        # The VQ-VAE paper's ImageNet prior shape (32x32 codes of 128x128 images, K = 512, 1000 classes)
        # with the size of the conditional PixelCNN paper's ImageNet model as we recall it (20 gated layers
        # of 384 units, 5x5 filters; not checked against the paper's text here). Not trained here.
        "base": Preset(model=PixelCNNConfig(num_classes=1000, dim=384, layers=20, kernel=5, out_hidden=1024),
                       train=TrainConfig(steps=250_000, batch_size=128, lr=3e-4, betas=(0.9, 0.999), warmup_steps=0,
                                         min_lr_ratio=1.0, grad_clip=0.0),
                       data=DataConfig(name="photos")),
    },
    "vqvae2": {
        # 4x4 top and 8x8 bottom codes of the tiny digits tokenizer, K = 512, on one CPU thread in about
        # 4 minutes.
        "tiny": Preset(model=VQVAE2PriorConfig(),
                       train=TrainConfig(steps=650, batch_size=32, lr=1e-3, betas=(0.9, 0.999), warmup_steps=50,
                                         grad_clip=1.0),
                       data=_DIGITS),
        # rosinality's train_pixelsnail.py at the paper's ImageNet-256 shapes (32x32 top, 64x64 bottom,
        # K = 512): width 256, 5x5 kernels, 4 blocks of 4 residual blocks, dropout 0.1, 3 conditioning
        # blocks, Adam 3e-4, batch 32; the bottom gated PixelCNN's 16 layers of 256 are our choice. Not
        # trained here.
        "base": Preset(model=VQVAE2PriorConfig(num_classes=1000, top_channels=256, top_res_channels=256, top_kernel=5,
                                               top_blocks=4, top_res_blocks=4, top_out_res_blocks=0, top_attn_dim=128,
                                               top_heads=8, dropout=0.1, bottom_dim=256, bottom_layers=16,
                                               bottom_kernel=5, bottom_out_hidden=1024, cond_channels=256,
                                               cond_res_blocks=3, cond_kernel=3),
                       train=TrainConfig(steps=1_000_000, batch_size=32, lr=3e-4, betas=(0.9, 0.999), warmup_steps=0,
                                         min_lr_ratio=1.0, grad_clip=0.0),
                       data=DataConfig(name="photos")),
    },
}
