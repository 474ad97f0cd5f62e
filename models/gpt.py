"""Autoregressive stage-2 transformers over a single-level token map in raster order: taming-transformers'
class-conditional GPT on VQGAN codes (system ``vqgan``; Esser et al. 2021, CompVis/taming-transformers
``taming/models/cond_transformer.py`` ``Net2NetTransformer`` and ``taming/modules/transformer/mingpt.py``
``GPT``) and ViT-VQGAN's stage 2, the VIM transformer (system ``vit_vqgan``; Yu et al. 2021,
"Vector-quantized Image Modeling with Improved VQGAN", arXiv:2110.04627).

The sequence is ``[c, z_0, ..., z_{N-1}]``: one condition token ``c`` (the class, or the one start token of
an unconditional model) and the tokenizer's ``N = h * w`` codes in raster order. As in taming's
``Net2NetTransformer.forward`` the transformer reads ``[c, z_0, ..., z_{N-2}]`` (``block_size = N``
positions), output ``i`` gives the logits of ``z_i``, and the loss is the cross-entropy on the N image
tokens only. Training corrupts the input (not the targets) with taming's ``pkeep``: each input image token
is kept with probability ``pkeep`` and otherwise replaced by a uniformly drawn code
(``torch.randint_like``). The network is minGPT's: token embedding ``tok_emb``, learned position
embedding ``pos_emb`` (zeros at start), embedding dropout, pre-LayerNorm blocks with causal attention
(:class:`models.transformer.Transformer`), final LayerNorm and a bias-free ``head``; minGPT's
initialisation (normal 0.02, zero biases).

Sampling draws ``z_0 .. z_{N-1}`` one at a time with temperature, top-k and top-p
(:func:`models.sampling.sample_logits`; taming's ``sample_with_past`` and the ViT-VQGAN paper both
sample with top-k / top-p: taming's ImageNet numbers use k = 600, p = 0.92 (``scripts/sample_fast.py``
defaults k = 250; ``log_images`` k = 100); pass them to :meth:`sample`, whose defaults are plain
sampling) and a :class:`models.sampling.KVCache` (taming's ``forward_with_past``); ``use_cache=False``
recomputes the whole prefix at each step and gives the same tokens. Classifier-free guidance (not in
taming or the paper) runs the class and the null class in one doubled batch; the linear schedule's
progress is ``i / (N - 1)`` at token ``i``.

Conditioning (a deviation, stated): taming's class-conditional model (``cond_stage_config:
taming.modules.util.Labelator``) puts the raw class id in the same sequence and the same embedding
table as the image codes (class 7 shares the embedding of code 7; its unconditional models prepend
``sos_token = 0``, code 0's embedding). Here the condition tokens have their own ids after the K codes:
class ``y`` is token ``K + y``, the null class of classifier-free guidance (``num_classes``) is
``K + num_classes``, and an unconditional model (``num_classes = 0``) starts with token ``K``; the embedding
table has ``K + num_classes + 1`` rows and the head predicts the K codes only. The ViT-VQGAN paper
prepends a class-id token the same way.

Other deviations: the attention's query / key / value projections are one fused ``qkv`` linear (minGPT:
three), so taming checkpoints do not load by key; AdamW's weight decay (the trainer's) applies to every
parameter (taming: 0.01 on linear weights only); no ``permuter`` (raster order, taming's ``Identity``).

The ``vit_vqgan`` system is the same network with VIM's sizes (the paper's Table 2: VIM-Base 24 layers,
16 heads, width 1536, MLP 6144, 650M parameters; VIM-Large 36 / 32 / 2048 / 8192); the paper gives no
architecture differences from a GPT decoder that matter here (its stage 2 is a decoder-only transformer
over the 32x32 codes of ViT-VQGAN with a class-id token first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .blocks import token_grid
from .config import DataConfig, TrainConfig
from .generator import ConditionConfig, Generator
from .sampling import SamplingConfig, guidance_scale, guide, sample_logits, with_null_labels
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights


@dataclass
class GPTConfig(ConditionConfig):
    """taming's ``GPT`` arguments (defaults: the 1.4B class-conditional ImageNet transformer) and
    ``Net2NetTransformer``'s ``pkeep``."""
    dim: int = 1536               # n_embd
    depth: int = 48               # n_layer
    heads: int = 24               # n_head
    mlp_ratio: float = 4.0        # MLP width / dim (minGPT: 4)
    dropout: float = 0.0          # embd_pdrop = resid_pdrop = attn_pdrop (taming's GPT: 0)
    pkeep: float = 1.0            # training: share of input image tokens kept (the rest: random codes)


def code_map_shape(tokenizer: Tokenizer) -> Tuple[int, int]:
    """The ``(h, w)`` of the code map a single-level tokenizer's ``encode`` gives [B, h, w] (ViT
    tokenizers: one code per patch, ``grid``; conv tokenizers: :func:`models.blocks.token_grid`)."""
    sizes = tokenizer.codebook_sizes()
    if len(sizes) != 1:
        raise ValueError(f"{type(tokenizer).__name__} has {len(sizes)} codebook levels; this generator models "
                         "a single-level code map")
    grid = getattr(tokenizer, "grid", None)
    if grid is not None:
        return int(grid), int(grid)
    cfg = tokenizer.cfg
    if hasattr(cfg, "ch_mult") and hasattr(cfg, "resolution"):
        side = token_grid(cfg)
        return side, side
    raise ValueError(f"cannot tell the code map shape of {type(tokenizer).__name__}")


def _check_config(cfg: GPTConfig) -> None:
    check_transformer_fields(cfg, ("depth",))
    if not 0.0 < cfg.pkeep <= 1.0:
        raise ValueError(f"{type(cfg).__name__}: pkeep must be in (0, 1], got {cfg.pkeep}")


class GPT(Generator):
    """taming's ``Net2NetTransformer`` + ``GPT`` over ``[condition token, codes in raster order]``."""

    config_cls = GPTConfig

    def __init__(self, cfg: GPTConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        _check_config(cfg)
        self.shape = code_map_shape(tokenizer)
        self.length = self.shape[0] * self.shape[1]                # N, taming's block_size
        self.codebook_size = next(iter(tokenizer.codebook_sizes().values()))  # K
        self.tok_emb = nn.Embedding(self.codebook_size + cfg.num_classes + 1, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.length, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.head = nn.Linear(cfg.dim, self.codebook_size, bias=False)
        init_weights(self)

    # ---- the network
    def condition_tokens(self, labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """int64 [n]: ``K + label`` (the null class ``num_classes`` included), or the start token ``K`` of
        an unconditional model (``labels`` None)."""
        if labels is None:
            return torch.full((n,), self.codebook_size, dtype=torch.long, device=self.pos_emb.device)
        return labels.long() + self.codebook_size

    def forward_tokens(self, x: torch.Tensor, start: int = 0, cache=None) -> torch.Tensor:
        """Logits [B, T, K] of the next code after each of the tokens ``x`` [B, T] at positions
        ``start .. start + T - 1`` (causal; with ``cache`` the earlier positions come from it)."""
        h = self.drop(self.tok_emb(x) + self.pos_emb[:, start:start + x.shape[1]])
        return self.head(self.transformer(h, causal=True, cache=cache))

    def logits(self, ids: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits [B, N, K]: output ``i`` predicts ``ids[:, i]`` from the condition and
        ``ids[:, :i]`` (``ids``: [B, N] codes in raster order)."""
        c = self.condition_tokens(labels, ids.shape[0])
        return self.forward_tokens(torch.cat([c[:, None], ids[:, :-1]], dim=1))

    def corrupt(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """taming's ``pkeep`` corruption: each code kept with probability ``pkeep``, else a uniform draw
        from the K codes."""
        if self.cfg.pkeep >= 1.0:
            return ids
        keep = torch.rand(ids.shape, generator=generator, device=ids.device) < self.cfg.pkeep
        random = torch.randint(0, self.codebook_size, ids.shape, generator=generator, device=ids.device)
        return torch.where(keep, ids, random)

    # ---- training
    def training_step(self, batch: Dict, step: int) -> StepOutput:
        ids = self.tokens(batch).flatten(1)
        labels = self.labels(batch)
        inputs = self.corrupt(ids) if self.training else ids
        logits = self.logits(inputs, labels)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        accuracy = (logits.argmax(-1) == ids).float().mean()
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach(), "accuracy": accuracy.detach()})

    # ---- sampling
    @torch.no_grad()
    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> torch.Tensor:
        """Codes [n, h, w] drawn token by token (see the module docstring)."""
        guided = params.cfg is not None
        c = self.condition_tokens(with_null_labels(labels, self.num_classes) if guided else labels, n)
        seq = c[:, None]                                      # what the uncached path re-reads
        cache = self.transformer.new_cache() if params.use_cache else None
        new = seq                                             # what the cached path feeds next
        out: List[torch.Tensor] = []
        for i in range(self.length):
            logits = (self.forward_tokens(new, i, cache) if cache is not None else self.forward_tokens(seq))[:, -1]
            if guided:
                cond, uncond = logits.chunk(2)
                logits = guide(cond, uncond, guidance_scale(params.cfg, params.cfg_schedule,
                                                            i / max(self.length - 1, 1)))
            token = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
            out.append(token)
            new = torch.cat([token, token])[:, None] if guided else token[:, None]
            seq = torch.cat([seq, new], dim=1)
        return torch.stack(out, dim=1).view(n, *self.shape)


MODELS = {"vqgan": GPT, "vit_vqgan": GPT}

PRESETS = {
    "vqgan": {
        # digits (32x32, labels) on the vqgan tiny tokenizer: 8x8 codes, K = 128; 0.84M parameters, 1200 steps
        # in about 3.6 minutes on one thread (0.18 s/step), class accuracy 93-94% under plain sampling (lowest
        # class, 8, 82%; the judge itself reaches 88% on the tokenizer's reconstructions of held-out 8s).
        # pkeep 0.9 (taming's configs keep 1.0), no dropout (taming's default), lr 2e-3 (1e-3: 91%, an 8 at 70%).
        "tiny": Preset(model=GPTConfig(num_classes=10, class_dropout=0.1, dim=128, depth=4, heads=4, dropout=0.0,
                                       pkeep=0.9),
                       train=TrainConfig(steps=1200, batch_size=32, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="digits", hflip=False)),
        # taming's class-conditional ImageNet transformer (the released cin_transformer: 48 layers, 24 heads,
        # width 1536, 1.4B parameters; its first stage is the f16 K = 16384 VQGAN, here the vqgan base
        # tokenizer, f16 K = 1024). AdamW (0.9, 0.95), weight decay 0.01, a constant lr: taming's
        # base_learning_rate 4.5e-6 times the batch (taming: times GPUs x batch); taming gives no step count.
        # data.name: an ImageNet-style folder of class folders (1000 classes).
        "base": Preset(model=GPTConfig(num_classes=1000),
                       train=TrainConfig(steps=1_000_000, batch_size=16, lr=7.2e-5, betas=(0.9, 0.95),
                                         weight_decay=0.01, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0),
                       data=DataConfig(name="imagenet/train")),
    },
    "vit_vqgan": {
        # digits on the vit_vqgan tiny tokenizer: 8x8 codes, K = 512 (all in use, perplexity ~450); 0.93M
        # parameters, 1200 steps at 0.22 s/step on one thread, class accuracy 89-92% under plain sampling
        # (lowest class, 8, 78-82%). Its codes are memorised faster than the vqgan's (pkeep 0.9, weight decay
        # 0.01: train 1.27 / held-out 1.79 nats, 83%), so more corruption and weight decay (dropout 0.1 instead:
        # 80%).
        "tiny": Preset(model=GPTConfig(num_classes=10, class_dropout=0.1, dim=128, depth=4, heads=4, dropout=0.0,
                                       pkeep=0.8),
                       train=TrainConfig(steps=1200, batch_size=32, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="digits", hflip=False)),
        # VIM-Base (the paper's Table 2) on the vit_vqgan base tokenizer (32x32 codes, K = 8192), class-id
        # token first. The optimisation is taming's (above): the paper's stage-2 schedule is not reproduced.
        "base": Preset(model=GPTConfig(num_classes=1000, dim=1536, depth=24, heads=16),
                       train=TrainConfig(steps=1_000_000, batch_size=16, lr=7.2e-5, betas=(0.9, 0.95),
                                         weight_decay=0.01, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0),
                       data=DataConfig(name="imagenet/train")),
    },
}
