"""RQ-Transformer (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization",
arXiv:2203.01941), the stage-2 model of RQ-VAE (generator system ``rqvae``), as kakaobrain/rq-vae-transformer
``rqvae/models/rqtransformer/transformers.py`` ``RQTransformer`` builds it.

An image is the RQ-VAE's code stacks ``S`` [T = h * w positions, D depths] in raster order. Two
transformers factorise ``p(S) = prod_t prod_d p(S_{t,d} | S_{<t}, S_{t,<d})``:

* the spatial (body) transformer reads ``[c, u_0, ..., u_{T-2}]``, causally: ``c`` the condition (the
  class embedding ``cond_emb`` plus ``pos_emb_cond``; one start row for an unconditional model, the
  original's ``vocab_size_cond = 1``) and ``u_t = sum_d E(S_{t,d}) + pos_emb_hw[t]``: the sum over the
  depths of position t's code embeddings. Its output ``h_t`` (read at the input of ``u_{t-1}``) summarises
  the positions before t;
* the depth (head) transformer reads, for every position t independently, ``[h_t, v_{t,0}, ...,
  v_{t,D-2}] + pos_emb_d`` causally over the depths and its output ``d`` gives the logits of ``S_{t,d}``
  (``classifier``: LayerNorm and a linear layer, one for all depths, ``shared_cls_emb``, or one per
  depth, the original's ``BatchLinear``).

Embeddings as the released configurations (every ``configs/*/stage2/*.yaml``): ``input_emb_vqvae``
(``E(k) = input_mlp(e_k)``, ``e_k`` the tokenizer's own code vector, read from its frozen codebook at
every call, outside this module's parameters; the linear layer is applied per depth before the sum, so
its bias counts D times, as the original), ``head_emb_vqvae`` with ``cumsum_depth_ctx`` (``v_{t,d} =
head_mlp(e_{S_{t,0}} + ... + e_{S_{t,d}})``: the partial sum of the residual codes, RQ-VAE's partial
reconstruction). Without them a learned ``tok_emb`` serves: one table for every depth
(``shared_tok_emb``) or one per depth (``TupleEmbedding``; ``v_{t,d} = tok_emb_d(S_{t,d})``). The loss is
the cross-entropy over all ``T * D`` codes (``compute_loss``). The blocks are minGPT's pre-LayerNorm
ones (:class:`models.transformer.Block`, GELU, MLP ratio 4) with no final LayerNorm in either stack
(the original's ``AttentionStack``; the classifier's LayerNorm ends the head). Initialisation as the
original: the position embeddings normal(0, 0.02), the learned tables normal(0, 0.02) except a shared
``tok_emb`` (an ``nn.Embedding``: PyTorch's normal(0, 1)), everything else PyTorch's defaults (the
original defines minGPT's ``_init_weights`` in ``Stage2Model`` but never applies it).

Sampling (``RQTransformer.sample`` with ``cached_forward``): for each position, one step of the spatial
transformer with its :class:`models.sampling.KVCache`, then D steps of the depth transformer with a
cache of its own, emptied at each position; every code is drawn with temperature, top-k and top-p
(:func:`models.sampling.sample_logits`; the original takes top-k / top-p per depth, here one value for
all). ``use_cache=False`` recomputes both transformers over the whole prefix at every step and draws the
same codes. Classifier-free guidance (not in the original) runs the class and the null class in one
doubled batch; the linear schedule's progress at code ``(t, d)`` is ``(t * D + d) / (T * D - 1)``.

Deviations: the class condition has a null class (id ``num_classes``, an extra ``cond_emb`` row) for
guidance and label dropout; the loss uses the tokenizer's hard codes (the released configurations train
on soft targets: ``soft_target_cross_entropy`` with RQ-VAE's stochastic codes at temperature 0.5); the
blocks' dropout ``dropout`` applies to the attention weights as well as the residual branches (the
original: ``resid_pdrop`` 0.1, ``attn_pdrop`` 0); the attention's query / key / value projections are one
fused linear layer (checkpoints of the original do not load by key); one codebook size for all depths
(no ``LogitMask``); no conditioning sequence longer than one token (``block_size_cond`` 1: the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .blocks import token_grid
from .config import DataConfig, TrainConfig
from .generator import ConditionConfig, Generator
from .sampling import SamplingConfig, guidance_scale, guide, sample_logits, with_null_labels
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields


@dataclass
class RQTransformerConfig(ConditionConfig):
    """RQ-Transformer's ``RQTransformerConfig`` (defaults: the tiny digits model; the embedding flags as
    every released configuration)."""
    dim: int = 128                   # embed_dim, both transformers
    body_depth: int = 4              # body.n_layer: spatial transformer blocks
    head_depth: int = 1              # head.n_layer: depth transformer blocks
    heads: int = 4                   # n_head of both transformers
    mlp_ratio: float = 4.0           # MLP width / dim (the original: 4)
    dropout: float = 0.0             # blocks' dropout (the original's resid_pdrop: 0.1)
    embd_pdrop: float = 0.0          # dropout of the spatial transformer's inputs
    input_emb_vqvae: bool = True     # spatial inputs from the tokenizer's code vectors (input_mlp), else tok_emb
    head_emb_vqvae: bool = True      # depth inputs from the tokenizer's code vectors (head_mlp), else tok_emb
    cumsum_depth_ctx: bool = True    # head_emb_vqvae: depth input d is the sum of codes 0..d (else code d alone)
    shared_tok_emb: bool = True      # the learned tok_emb (when used): one table for all depths, else one per depth
    shared_cls_emb: bool = True      # one classifier for all depths, else one per depth (BatchLinear)


def _rq_geometry(tokenizer: Tokenizer) -> Tuple[Tuple[int, int], int, int, int]:
    """((h, w), D, K, code width) of an RQ-VAE tokenizer's code stacks."""
    cfg = tokenizer.cfg
    quantizer = getattr(tokenizer, "quantizer", None)
    if not all(hasattr(cfg, k) for k in ("depth", "codebook_size", "embed_dim")) or \
            not hasattr(quantizer, "get_codes_from_indices"):
        raise ValueError("the RQ-Transformer models the code stacks of an rqvae tokenizer, got "
                         f"{type(tokenizer).__name__}")
    side = token_grid(cfg)
    return (side, side), cfg.depth, cfg.codebook_size, cfg.embed_dim


class RQTransformer(Generator):
    """The RQ-Transformer over an ``rqvae`` tokenizer's code stacks [B, h, w, D] (see the module docstring)."""

    config_cls = RQTransformerConfig

    def __init__(self, cfg: RQTransformerConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        check_transformer_fields(cfg, ("body_depth", "head_depth"), rates=("dropout", "embd_pdrop"))
        self.shape, self.depth, self.codebook_size, code_dim = _rq_geometry(tokenizer)
        self.length = self.shape[0] * self.shape[1]
        dim, d, k = cfg.dim, self.depth, self.codebook_size
        self.cond_emb = nn.Embedding(cfg.num_classes + 1 if cfg.num_classes else 1, dim)
        self.input_mlp = nn.Linear(code_dim, dim) if cfg.input_emb_vqvae else None
        self.head_mlp = nn.Linear(code_dim, dim) if cfg.head_emb_vqvae else None
        self.tok_emb = None
        if not (cfg.input_emb_vqvae and cfg.head_emb_vqvae):
            self.tok_emb = nn.Embedding(k if cfg.shared_tok_emb else d * k, dim)
            if not cfg.shared_tok_emb:
                nn.init.normal_(self.tok_emb.weight, 0.0, 0.02)          # TupleEmbedding.reset_parameters
        self.pos_emb_cond = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_emb_hw = nn.Parameter(torch.randn(1, self.length, dim) * 0.02)
        self.pos_emb_d = nn.Parameter(torch.randn(1, d, dim) * 0.02)
        self.embed_drop = nn.Dropout(cfg.embd_pdrop)
        self.body_transformer = Transformer(dim, cfg.body_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                            final_norm=False)
        self.head_transformer = Transformer(dim, cfg.head_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                            final_norm=False)
        self.classifier_norm = nn.LayerNorm(dim)
        if cfg.shared_cls_emb:
            self.classifier = nn.Linear(dim, k)
        else:   # BatchLinear: one (weight, bias) per depth, normal(0, 0.02) and zeros
            self.classifier_weight = nn.Parameter(torch.randn(d, dim, k) * 0.02)
            self.classifier_bias = nn.Parameter(torch.zeros(d, k))

    # ---- embeddings
    def condition_ids(self, labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """int64 [n]: the class ids (the null class ``num_classes`` when a conditional model gets none),
        or the one start row 0 of an unconditional model."""
        device = self.pos_emb_hw.device
        if self.num_classes == 0:
            return torch.zeros(n, dtype=torch.long, device=device)
        if labels is None:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        return labels.to(device=device, dtype=torch.long)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """The tokenizer's code vectors of ``codes`` [..., d] (depths 0..d-1): [..., d, code width], detached
        (RQ-VAE's ``get_code_emb_with_depth``)."""
        return self.tokenizer.quantizer.get_codes_from_indices(codes).movedim(0, -2).detach()

    def learned_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """``tok_emb`` of ``codes`` [..., d] (depths 0..d-1): [..., d, dim]."""
        if self.cfg.shared_tok_emb:
            return self.tok_emb(codes)
        offsets = torch.arange(codes.shape[-1], device=codes.device) * self.codebook_size
        return self.tok_emb(codes + offsets)

    def spatial_inputs(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``u_t`` of the stacks ``codes`` [B, t, D] at positions ``start ..``: [B, t, dim]."""
        if self.input_mlp is not None:
            emb = self.input_mlp(self.code_vectors(codes))
        else:
            emb = self.learned_embedding(codes)
        return emb.sum(-2) + self.pos_emb_hw[:, start:start + codes.shape[1]]

    def depth_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """``v_{t,0..d-1}`` of the partial stacks ``codes`` [B, t, d]: [B, t, d, dim]."""
        if self.head_mlp is None:
            return self.learned_embedding(codes)
        vectors = self.code_vectors(codes)
        return self.head_mlp(vectors.cumsum(-2) if self.cfg.cumsum_depth_ctx else vectors)

    def condition_input(self, cond: torch.Tensor) -> torch.Tensor:
        """The spatial transformer's first input ``c`` [B, 1, dim] of condition ids ``cond`` [B]."""
        return self.cond_emb(cond)[:, None] + self.pos_emb_cond

    def classify(self, x: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        """Logits [..., K] of head outputs ``x``: [..., D, dim] (every depth), or [..., dim] at ``depth``."""
        x = self.classifier_norm(x)
        if self.cfg.shared_cls_emb:
            return self.classifier(x)
        if depth is None:
            return torch.einsum("...dc,dck->...dk", x, self.classifier_weight) + self.classifier_bias
        return x @ self.classifier_weight[depth] + self.classifier_bias[depth]

    # ---- teacher forcing
    def logits(self, codes: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [B, T, D, K] of the stacks ``codes`` [B, T, D] (raster order): entry (t, d) from the
        condition, ``codes[:, :t]`` and ``codes[:, t, :d]``."""
        b, t, d = codes.shape
        x = torch.cat([self.condition_input(self.condition_ids(labels, b)), self.spatial_inputs(codes[:, :-1])], 1)
        h = self.body_transformer(self.embed_drop(x), causal=True)
        ctx = torch.cat([h[:, :, None], self.depth_inputs(codes)[:, :, :-1]], 2) + self.pos_emb_d
        out = self.head_transformer(ctx.reshape(b * t, d, -1), causal=True)
        return self.classify(out.view(b, t, d, -1))

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        codes = self.tokens(batch).flatten(1, 2)
        logits = self.logits(codes, self.labels(batch))
        per_code = F.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none").view(codes.shape)
        loss = per_code.mean()
        logs = {"nll": loss.detach()}
        logs.update({f"nll_depth{d}": per_code[..., d].mean().detach() for d in range(self.depth)})
        return StepOutput(loss=loss, recon=None, logs=logs)

    # ---- sampling
    @torch.no_grad()
    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> torch.Tensor:
        """Code stacks [n, h, w, D], position by position and depth by depth."""
        guided = params.cfg is not None
        cond = self.condition_ids(labels, n)
        if guided:
            cond = with_null_labels(cond, self.num_classes)
        rows, total = cond.shape[0], self.length * self.depth
        codes = torch.zeros(rows, self.length, self.depth, dtype=torch.long, device=cond.device)
        start = self.condition_input(cond)
        body_cache = self.body_transformer.new_cache() if params.use_cache else None
        new = start                                           # the cached path's next spatial input
        for t in range(self.length):
            if body_cache is not None:
                h = self.body_transformer(new, causal=True, cache=body_cache)[:, -1]
            else:
                x = torch.cat([start, self.spatial_inputs(codes[:, :t])], 1)
                h = self.body_transformer(x, causal=True)[:, -1]
            head_cache = self.head_transformer.new_cache() if params.use_cache else None
            step = h[:, None] + self.pos_emb_d[:, :1]          # the cached path's next depth input
            for d in range(self.depth):
                if head_cache is not None:
                    out = self.head_transformer(step, causal=True, cache=head_cache)[:, -1]
                else:
                    ctx = h[:, None]
                    if d:
                        ctx = torch.cat([ctx, self.depth_inputs(codes[:, t:t + 1, :d])[:, 0]], 1)
                    out = self.head_transformer(ctx + self.pos_emb_d[:, :d + 1], causal=True)[:, -1]
                logits = self.classify(out, d)
                if guided:
                    c, u = logits.chunk(2)
                    logits = guide(c, u, guidance_scale(params.cfg, params.cfg_schedule,
                                                        (t * self.depth + d) / max(total - 1, 1)))
                token = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
                codes[:, t, d] = torch.cat([token, token]) if guided else token
                if head_cache is not None and d + 1 < self.depth:
                    step = self.depth_inputs(codes[:, t:t + 1, :d + 1])[:, 0, -1:] + self.pos_emb_d[:, d + 1:d + 2]
            if body_cache is not None:
                new = self.spatial_inputs(codes[:, t:t + 1], t)
        return codes[:n].view(n, *self.shape, self.depth)


MODELS = {"rqvae": RQTransformer}

PRESETS: Dict[str, Dict[str, Preset]] = {
    "rqvae": {
        # digits on the rqvae tiny tokenizer: 4 x 4 positions x 4 depths (64 codes), one K = 512 codebook.
        # 1000 steps: 3.1 min on one CPU thread; held-out 3.41 nats/code (train 2.8), judge 91.5% (20 a class,
        # lowest 80%). With 1 depth layer: 88.0% (50 a class, lowest 70%); dropout 0.1, 2 depth layers,
        # lr 1e-3, 800 steps: 78%.
        "tiny": Preset(model=RQTransformerConfig(head_depth=2),
                       train=TrainConfig(steps=1000, batch_size=32, lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="digits", hflip=False)),
        # in256-rqtransformer-8x8x4-1400M.yaml on the rqvae base tokenizer (8 x 8 x 4 codes, K = 16384): width
        # 1536, 42 spatial and 6 depth layers, 24 heads, 1000 classes; AdamW 5e-4 (0.9, 0.95), weight decay
        # 1e-4, gradient norm 1.0, no warm-up, cosine to 0 over 100 epochs at 2048 images a step (625 steps
        # an epoch on ImageNet: 62,500 steps; here 64 x 32 accumulated on one process). data.name: an
        # ImageNet-style folder of class folders.
        "base": Preset(model=RQTransformerConfig(num_classes=1000, dim=1536, body_depth=42, head_depth=6, heads=24,
                                                 dropout=0.1),
                       train=TrainConfig(steps=62_500, batch_size=64, grad_accum=32, lr=5e-4, betas=(0.9, 0.95),
                                         weight_decay=1e-4, warmup_steps=0, min_lr_ratio=0.0, grad_clip=1.0),
                       data=DataConfig(name="imagenet/train")),
    },
}
