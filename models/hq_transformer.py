"""HQ-Transformer (You et al. 2022, "Locally Hierarchical Auto-Regressive Modeling for Image Generation",
NeurIPS 2022), the stage-2 model of HQ-VAE (generator system ``hqvae``), as kakaobrain/hqtransformer
``hqvae/models/stage2/hierarchical_ar.py`` ``iHQGPT`` builds it for two code levels.

The HQ-VAE gives a top code map (H x W) and a bottom one (2H x 2W); top position t (raster order over the
top map) covers the 2 x 2 bottom block under it, taken in raster order within the block
(``'B (H H2 W W2) K -> (B H W) (H2 W2) K'``). An image is T = H * W groups ``(top_t, bot_{t,0..3})``:

* the spatial (body) transformer reads ``[sos, x_0, ..., x_{T-2}]`` causally (``sos``: the class
  embedding, or a learned start vector of an unconditional model), ``x_t`` the group's embedding
  (``embedding_type: transformer1``): the five vectors ``[tok_emb_top(top_t) + pos_emb_top(t),
  tok_emb_bot(bot_{t,0}), ..., tok_emb_bot(bot_{t,3})] + pos_emb_emb(0..4)``, through ``emb_layers - 1``
  bidirectional blocks (none for ``transformer1``), averaged. Blocks, final LayerNorm ``ln_f``: the
  output ``h_t`` summarises the groups before t;
* the head (depth) transformer predicts the group from ``h_t``, for every t independently. ``parallel``
  (``type: hq-transformer/parallel``, every released ImageNet / FFHQ / CC configuration): inputs
  ``[h_t + sos_depth, tok_emb_top_depth(top_t) + pos_emb_depth(j) for j = 0..3]``; output 0 gives the top
  code's logits (it sees only itself), outputs 1..4 the four bottom codes' (each sees all five inputs:
  ``ParallelBlock``'s mask), so the bottom codes are drawn together given the top code. ``top2bot`` (the
  original's baseline, the type when none is named): inputs ``[h_t + sos_depth, tok_emb_top_depth(top_t) +
  pos_emb_depth(0), tok_emb_bot_depth(bot_{t,j-1}) + pos_emb_depth(j) for j = 1..3]``, causal: top, then
  the bottom codes one by one. Logits: ``head_top(ln_top(.))``, ``head_bot(ln_bot(.))`` (no bias).

The loss is the mean cross-entropy over the 5T codes, ``(CE_top + 4 CE_bottom) / 5``: the original's
``loss_top + weight_bottom * loss_bot`` with ``weight_bottom = 4`` divided by 5. Initialisation as the
original's ``_init_weights``: linear and embedding weights normal(0, 0.02), zero biases, unit LayerNorms;
``sos_depth`` (and the unconditional ``sos``) standard normal. The blocks are minGPT's pre-LayerNorm ones
(:class:`models.transformer.Block`; the depth and embedding stacks have no final LayerNorm).

Sampling (``sampling_ihqgpt`` / ``sampling_step``): for each top position, one step of the spatial
transformer with its :class:`models.sampling.KVCache`, then the head with a cache of its own (emptied at
each position): the top code, then the four bottom codes in one step (``parallel``) or four
(``top2bot``), with temperature, top-k and top-p (:func:`models.sampling.sample_logits`; the original
takes separate top-k / top-p / temperatures for the two levels, here one value for both).
``use_cache=False`` recomputes both transformers over the whole prefix at every step and draws the same
codes. Classifier-free guidance (not in the original) runs the class and the null class in one doubled
batch; the linear schedule's progress at group t's code j (0: top, 1..4: bottom) is
``(5 t + j) / (5 T - 1)``.

Deviations: the class embedding ``sos`` has a null-class row (id ``num_classes``) for guidance and label
dropout; only the 1-d top position embedding (``position_embedding: 1d``, the default; no ``2d``) and
no random-order training (``use_random_order``, off in the released configurations); the hard-code loss
(the ``soft1`` configurations train on soft targets); ``pos_emb_depth`` has the 4 rows either type reads
(the original allocates 5) and ``tok_emb_bot_depth`` exists for ``top2bot`` only (the original also
allocates it, unused, for ``parallel``); the blocks' ``dropout`` also drops attention weights (the
original: ``resid_pdrop`` 0.1, ``attn_pdrop`` 0); the attention's query / key / value projections are one
fused linear layer; the head has the body's width and heads (the released configurations give no
``hparams_dec``, which makes the original copy them, with 4 layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .blocks import token_grid
from .config import DataConfig, TrainConfig, check_fields
from .generator import ConditionConfig, Generator
from .sampling import SamplingConfig, guidance_scale, guide, sample_logits, with_null_labels
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights

HEAD_TYPES = ("parallel", "top2bot")
GROUP = 5          # one top code and the 2 x 2 bottom codes under it


@dataclass
class HQTransformerConfig(ConditionConfig):
    """iHQGPT's arguments (defaults: the tiny digits model)."""
    dim: int = 128                 # embed_dim of both transformers
    body_depth: int = 4            # n_layers: spatial transformer blocks
    head_depth: int = 1            # hparams_dec.n_layers: head transformer blocks (the original's default: 4)
    heads: int = 4                 # n_heads of every stack
    mlp_ratio: float = 4.0         # MLP width / dim (the original: 4)
    dropout: float = 0.0           # blocks' dropout (the original's resid_pdrop: 0.1)
    embd_pdrop: float = 0.0        # dropout of the spatial transformer's inputs
    emb_layers: int = 1            # embedding_type transformer<N>: N - 1 bidirectional blocks before the mean
    head_type: str = "parallel"    # parallel (the released configurations) | top2bot (causal baseline)


def bottom_blocks(bottom: torch.Tensor) -> torch.Tensor:
    """[B, 2H, 2W] -> [B, H * W, 4]: the 2 x 2 block under each top position (raster order over the top
    map), its four codes in raster order."""
    b, h2, w2 = bottom.shape
    return bottom.view(b, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, (h2 // 2) * (w2 // 2), 4)


def bottom_map(blocks: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`bottom_blocks`: [B, H * W, 4] -> [B, 2H, 2W] for the top map's ``shape``."""
    h, w = shape
    return blocks.view(-1, h, w, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 2 * h, 2 * w)


class HQTransformer(Generator):
    """The HQ-Transformer over an ``hqvae`` tokenizer's (top [B, H, W], bottom [B, 2H, 2W]) code maps (see
    the module docstring)."""

    config_cls = HQTransformerConfig

    def __init__(self, cfg: HQTransformerConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        check_transformer_fields(cfg, ("body_depth", "head_depth"), rates=("dropout", "embd_pdrop"))
        check_fields(cfg, at_least={"emb_layers": 1})
        if cfg.head_type not in HEAD_TYPES:
            raise ValueError(f"{type(cfg).__name__}: head_type must be one of {', '.join(HEAD_TYPES)}, "
                             f"got {cfg.head_type!r}")
        sizes = tokenizer.codebook_sizes()
        if set(sizes) != {"top", "bottom"} or not hasattr(tokenizer.cfg, "ch_mult"):
            raise ValueError(f"the HQ-Transformer models the (top, bottom) code maps of an hqvae tokenizer, got "
                             f"{type(tokenizer).__name__}")
        side = token_grid(tokenizer.cfg) // 2
        self.shape, self.length = (side, side), side * side
        self.top_size, self.bottom_size = sizes["top"], sizes["bottom"]
        dim = cfg.dim
        if cfg.num_classes:
            self.sos = nn.Embedding(cfg.num_classes + 1, dim)
        else:
            self.sos = nn.Parameter(torch.randn(1, 1, dim))
        self.tok_emb_top = nn.Embedding(self.top_size, dim)
        self.tok_emb_bot = nn.Embedding(self.bottom_size, dim)
        self.pos_emb_emb = nn.Embedding(GROUP, dim)
        self.emb_blocks = Transformer(dim, cfg.emb_layers - 1, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                      final_norm=False)
        self.pos_emb_top = nn.Embedding(self.length, dim)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.body = Transformer(dim, cfg.body_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.sos_depth = nn.Parameter(torch.randn(1, 1, dim))
        self.tok_emb_top_depth = nn.Embedding(self.top_size, dim)
        self.tok_emb_bot_depth = nn.Embedding(self.bottom_size, dim) if cfg.head_type == "top2bot" else None
        self.pos_emb_depth = nn.Embedding(4, dim)
        self.depths = Transformer(dim, cfg.head_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, final_norm=False)
        self.ln_top, self.head_top = nn.LayerNorm(dim), nn.Linear(dim, self.top_size, bias=False)
        self.ln_bot, self.head_bot = nn.LayerNorm(dim), nn.Linear(dim, self.bottom_size, bias=False)
        mask = torch.ones(GROUP, GROUP, dtype=torch.bool)
        if cfg.head_type == "parallel":
            mask[0, 1:] = False            # the top output sees h alone; the bottom outputs see all five
        else:
            mask = mask.tril()
        self.register_buffer("depth_mask", mask, persistent=False)
        init_weights(self)

    # ---- embeddings
    def start_tokens(self, labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """The spatial transformer's first input [n, 1, dim]: the class embedding (the null class when a
        conditional model gets no labels) or the learned start vector."""
        if self.num_classes == 0:
            return self.sos.expand(n, 1, -1)
        if labels is None:
            labels = torch.full((n,), self.num_classes, dtype=torch.long, device=self.sos.weight.device)
        return self.sos(labels.long())[:, None]

    def group_embedding(self, top: torch.Tensor, bottom: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``x_t`` of the groups (``top`` [B, t], ``bottom`` [B, t, 4]) at positions ``start ..``: [B, t, dim]."""
        b, t = top.shape
        pos = self.pos_emb_top(torch.arange(start, start + t, device=top.device))
        seq = torch.cat([(self.tok_emb_top(top) + pos)[:, :, None], self.tok_emb_bot(bottom)], 2)
        seq = self.emb_blocks((seq + self.pos_emb_emb.weight).flatten(0, 1))
        return seq.mean(1).view(b, t, self.cfg.dim)

    def depth_inputs(self, h: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """The head's five inputs per group from ``h`` [B, t, dim] and the group's codes (``top`` [B, t],
        ``bottom`` [B, t, 4]; ``parallel`` reads no bottom code, ``top2bot`` the first three): [B, t, 5, dim]."""
        pos = self.pos_emb_depth.weight
        first = (h + self.sos_depth)[:, :, None]
        top_emb = self.tok_emb_top_depth(top)[:, :, None]
        if self.cfg.head_type == "parallel":
            return torch.cat([first, top_emb + pos], 2)
        return torch.cat([first, top_emb + pos[0], self.tok_emb_bot_depth(bottom[:, :, :3]) + pos[1:]], 2)

    def head_logits(self, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(top logits [..., Kt], bottom logits [..., n, Kb]) of head outputs [..., 1 + n, dim]."""
        return self.head_top(self.ln_top(out[..., 0, :])), self.head_bot(self.ln_bot(out[..., 1:, :]))

    # ---- teacher forcing
    def logits(self, top: torch.Tensor, bottom: torch.Tensor, labels: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(top logits [B, T, Kt], bottom logits [B, T, 4, Kb]) of the groups ``top`` [B, T], ``bottom``
        [B, T, 4] (:func:`bottom_blocks`): group t's from the groups before it, its bottom codes' also from
        its top code (and, ``top2bot``, from the bottom codes before them in the block)."""
        b, t = top.shape
        x = torch.cat([self.start_tokens(labels, b), self.group_embedding(top[:, :-1], bottom[:, :-1])], 1)
        h = self.body(self.drop(x), causal=True)
        out = self.depths(self.depth_inputs(h, top, bottom).flatten(0, 1), mask=self.depth_mask)
        top_logits, bottom_logits = self.head_logits(out.view(b, t, GROUP, -1))
        return top_logits, bottom_logits

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        top, bottom = self.tokens(batch)
        top, bottom = top.flatten(1), bottom_blocks(bottom)
        top_logits, bottom_logits = self.logits(top, bottom, self.labels(batch))
        top_nll = F.cross_entropy(top_logits.flatten(0, 1), top.flatten())
        bottom_nll = F.cross_entropy(bottom_logits.flatten(0, 2), bottom.flatten())
        loss = (top_nll + 4 * bottom_nll) / GROUP
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach(), "top_nll": top_nll.detach(),
                                                       "bottom_nll": bottom_nll.detach()})

    # ---- sampling
    @torch.no_grad()
    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(top [n, H, W], bottom [n, 2H, 2W]), group by group: the top code, then its bottom codes."""
        guided = params.cfg is not None
        if self.num_classes and labels is None:
            labels = torch.full((n,), self.num_classes, dtype=torch.long, device=self.sos.weight.device)
        if guided and labels is not None:
            labels = with_null_labels(labels, self.num_classes)
        start = self.start_tokens(labels, 2 * n if guided else n)
        rows, device = start.shape[0], start.device
        top = torch.zeros(rows, self.length, dtype=torch.long, device=device)
        bottom = torch.zeros(rows, self.length, 4, dtype=torch.long, device=device)
        total = GROUP * self.length

        def mix(logits: torch.Tensor, index: int) -> torch.Tensor:
            """Logits [rows, K] -> [n, K]: guided by the schedule at code ``index`` of the image's 5T."""
            if not guided:
                return logits
            c, u = logits.chunk(2)
            return guide(c, u, guidance_scale(params.cfg, params.cfg_schedule, index / (total - 1)))

        def draw(logits: torch.Tensor) -> torch.Tensor:
            codes = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
            return torch.cat([codes, codes]) if guided else codes

        cached = params.use_cache
        body_cache = self.body.new_cache() if cached else None
        new = start                                   # the cached path's next spatial input
        for t in range(self.length):
            if cached:
                h = self.body(new, causal=True, cache=body_cache)[:, -1:]
            else:
                x = torch.cat([start, self.group_embedding(top[:, :t], bottom[:, :t])], 1)
                h = self.body(x, causal=True)[:, -1:]
            head_cache = self.depths.new_cache() if cached else None
            seq = self.depth_inputs(h, top[:, t:t + 1], bottom[:, t:t + 1])[:, 0]      # [rows, 5, dim]
            out = self.depths(seq[:, :1], causal=True, cache=head_cache)[:, 0]
            top[:, t] = draw(mix(self.head_top(self.ln_top(out)), GROUP * t))
            seq = self.depth_inputs(h, top[:, t:t + 1], bottom[:, t:t + 1])[:, 0]
            if self.cfg.head_type == "parallel":
                if cached:
                    out = self.depths(seq[:, 1:], cache=head_cache)   # every new input sees all five
                else:
                    out = self.depths(seq, mask=self.depth_mask)[:, 1:]
                logits = self.head_bot(self.ln_bot(out))                          # [rows, 4, Kb]
                bottom[:, t] = draw(torch.stack([mix(logits[:, j], GROUP * t + 1 + j) for j in range(4)], 1))
            else:
                for j in range(4):
                    if cached:
                        out = self.depths(seq[:, 1 + j:2 + j], causal=True, cache=head_cache)[:, -1]
                    else:
                        out = self.depths(seq[:, :2 + j], causal=True)[:, -1]
                    bottom[:, t, j] = draw(mix(self.head_bot(self.ln_bot(out)), GROUP * t + 1 + j))
                    seq = self.depth_inputs(h, top[:, t:t + 1], bottom[:, t:t + 1])[:, 0]
            if cached:
                new = self.group_embedding(top[:, t:t + 1], bottom[:, t:t + 1], t)
        return top[:n].view(n, *self.shape), bottom_map(bottom[:n], self.shape)


MODELS = {"hqvae": HQTransformer}

PRESETS: Dict[str, Dict[str, Preset]] = {
    "hqvae": {
        # digits on the hqvae tiny tokenizer: 4 x 4 top and 8 x 8 bottom codes (16 groups of 5), K = 512 each.
        # Without dropout it overfits the 1.6k images (1000 steps: held-out 4.15 nats/code, train 2.7; judge 69.4%,
        # lowest class 50%; 2000 steps: 5.8 nats, 66.8%). With the original's dropout 0.1 in the blocks and on the
        # spatial inputs, 2000 steps (5.2 min on one CPU thread): 3.93 nats, 80.2% (64%) plain, 97.6% (94%)
        # at cfg 2, 50 samples a class; dropout 0.1 in the blocks only: 4.04 nats, 76.8% / 93.6% (76%); 0.2: 73.4%.
        # 1800 steps fit the 5 minutes (6.4 steps/s).
        "tiny": Preset(model=HQTransformerConfig(dropout=0.1, embd_pdrop=0.1),
                       train=TrainConfig(steps=1800, batch_size=32, lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="digits", hflip=False)),
        # hqtransformer-embtrans1-layer12-top8x8.yaml on the hqvae base tokenizer (8 x 8 top, 16 x 16 bottom
        # codes, K = 8192 each): width 1536, 12 spatial layers, 24 heads, the head 4 layers (no hparams_dec),
        # resid_pdrop 0.1, 1000 classes; AdamW 5e-4 (0.9, 0.95), weight decay 1e-4, warm-up 1 epoch, cosine to
        # 0 over 100 epochs at 512 images a step (2502 steps an epoch on ImageNet; here 64 x 8 accumulated on
        # one process). The repository holds no stage-2 trainer: no gradient clipping is given.
        # data.name: an ImageNet-style folder of class folders.
        "base": Preset(model=HQTransformerConfig(num_classes=1000, dim=1536, body_depth=12, head_depth=4, heads=24,
                                                 dropout=0.1),
                       train=TrainConfig(steps=250_200, batch_size=64, grad_accum=8, lr=5e-4, betas=(0.9, 0.95),
                                         weight_decay=1e-4, warmup_steps=2502, min_lr_ratio=0.0, grad_clip=0.0),
                       data=DataConfig(name="imagenet/train")),
    },
}
