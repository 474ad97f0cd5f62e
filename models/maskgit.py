"""MaskGIT (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", arXiv:2202.04200) on the
``vqgan`` tokenizer's codes: a bidirectional transformer that predicts masked codes, and its parallel
decoder (google-research/maskgit ``maskgit/libml/parallel_decode.py``, ``mask_schedule.py``,
``nets/maskgit_transformer.py``, ``configs/maskgit_class_cond_config.py``, ``inference.py``).

Sequence: ``[class token, z_0, ..., z_{N-1}]`` (raster order). As in MaskGIT's ``inference.py`` the class
``y`` is token ``K + y`` (shifted by the codebook size K); the null class of classifier-free guidance
(``num_classes``) is ``K + num_classes`` (an unconditional model, ``num_classes = 0``, always starts with
it) and [MASK] is the last id ``K + num_classes + 1`` (MaskGIT: ``mask_token_id = -1``, the last row of its
``K + num_classes + 1`` embeddings). The network follows ``maskgit_transformer.Transformer``: word plus
learned position embeddings, LayerNorm, dropout, the transformer, then the ``MlmLayer`` head (dense, GELU,
LayerNorm, logits against the transposed word embeddings plus a bias); logits are taken over the K codes
(``inference.py``'s ``logits[..., :K]``).

Training (MaskGIT's training code is not released; the paper's recipe): per image ``r ~ U[0, 1)``,
``ceil(gamma(r) * N)`` codes (at least one) chosen uniformly at random are replaced by [MASK], with
``gamma`` the ``mask_schedule`` (cosine by default); the loss is the cross-entropy on the masked
positions only (``compute_loss_for_all = False``) with ``label_smoothing`` (0.1 in MaskGIT's config;
applied in training only, so held-out losses are plain cross-entropies). Labels drop to the null class
with ``class_dropout`` (for guidance; MaskGIT has none).

Decoding (``parallel_decode.decode``): starting from the given tokens (all [MASK] when sampling) with
``N0`` unknown, each of ``steps`` iterations ``t`` runs the transformer, draws every code (temperature,
top-k, top-p: :func:`models.sampling.sample_logits`), keeps the codes known before, and, with
``ratio = (t + 1) / steps``, re-masks the ``max(1, floor(N0 * mask_ratio(mask_schedule, ratio)))`` newly
drawn codes of lowest confidence ``log p(code) + gumbel_temperature * (1 - ratio) * Gumbel``
(:func:`models.sampling.confidence_remask`; MaskGIT's choice temperature 4.5 annealed to 0). A code once
known is never re-masked; the last iteration keeps every draw (MaskGIT returns its last ``sampled_ids``).
``p`` is the drawn code's probability under the distribution it was drawn from (temperature, top-k and top-p
applied; MaskGIT draws from the plain softmax, where both agree), at temperature 0 (greedy) the plain
softmax. Guidance runs the class and the null class in one doubled batch, with the linear schedule's
progress ``t / (steps - 1)``.

Editing (:meth:`MaskGIT.edit`, MaskGIT's inpainting / outpainting): the images are encoded, a code is kept
when its whole patch (the ``f x f`` pixels it covers, ``f = H / h``) is inside the keep mask, and the rest
are decoded as above from the kept ones; ``N0`` counts the codes to regenerate. MaskGIT's demo widens the
box by one code and starts at iteration 2 of 12, then blends the output into the input with a blurred
mask; here every iteration runs and the output is the tokenizer's decoding of the codes.

Deviations: pre-LayerNorm blocks (:class:`models.transformer.Transformer`; MaskGIT's are BERT's post-LN),
normal(0.02) initialisation (MaskGIT: truncated normal 0.02), LayerNorm epsilon 1e-5 (BERT: 1e-12), the
head's bias over the K codes only (the other ids are never predicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .generator import ConditionConfig, Generator, Samples
from .gpt import code_map_shape
from .sampling import (MASK_SCHEDULES, SamplingConfig, check_labels, confidence_remask, guidance_scale, guide,
                       mask_ratio, probabilities, sample_logits, with_null_labels)
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights


@dataclass
class MaskGITConfig(ConditionConfig):
    """MaskGIT's transformer (defaults: ``maskgit_class_cond_config``) and training / decoding defaults."""
    dim: int = 768                # num_embeds
    depth: int = 24               # num_layers
    heads: int = 16               # num_heads
    mlp_ratio: float = 4.0        # intermediate_size / num_embeds (3072 / 768)
    dropout: float = 0.1          # dropout_rate (embeddings, attention, residuals)
    label_smoothing: float = 0.1  # training cross-entropy's label smoothing
    mask_schedule: str = "cosine"  # training: share of codes masked, gamma(r) with r ~ U[0, 1)
    steps: int = 8                # decoding iterations when sample() gets steps=None (the paper's T = 8)


def _check_config(cfg: MaskGITConfig) -> None:
    name = type(cfg).__name__
    check_transformer_fields(cfg, ("depth",))
    check_fields(cfg, at_least={"steps": 1}, non_negative=("label_smoothing",))
    if not cfg.label_smoothing < 1:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.mask_schedule not in MASK_SCHEDULES:
        raise ValueError(f"{name}: mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {cfg.mask_schedule!r}")


class MaskGIT(Generator):
    """MaskGIT's bidirectional transformer over ``[class token, codes]`` and its parallel decoder."""

    config_cls = MaskGITConfig
    parallel_decoding = True

    def __init__(self, cfg: MaskGITConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        _check_config(cfg)
        self.shape = code_map_shape(tokenizer)
        self.length = self.shape[0] * self.shape[1]
        self.codebook_size = next(iter(tokenizer.codebook_sizes().values()))  # K
        self.mask_id = self.codebook_size + cfg.num_classes + 1
        self.tok_emb = nn.Embedding(self.mask_id + 1, cfg.dim)      # codes, classes, null class, [MASK]
        self.pos_emb = nn.Embedding(self.length + 1, cfg.dim)
        self.emb_ln = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.mlm_dense = nn.Linear(cfg.dim, cfg.dim)
        self.mlm_ln = nn.LayerNorm(cfg.dim)
        self.mlm_bias = nn.Parameter(torch.zeros(self.codebook_size))
        init_weights(self)

    # ---- the network
    def class_tokens(self, labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """int64 [n]: ``K + label`` (the null class included); ``K`` for an unconditional model."""
        if labels is None:
            return torch.full((n,), self.codebook_size, dtype=torch.long, device=self.mlm_bias.device)
        return labels.long() + self.codebook_size

    def logits(self, ids: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [B, N, K] of every code position given ``ids`` [B, N] (codes or [MASK]) and the class."""
        x = torch.cat([self.class_tokens(labels, ids.shape[0])[:, None], ids], dim=1)
        h = self.tok_emb(x) + self.pos_emb.weight[None, :x.shape[1]]
        h = self.transformer(self.drop(self.emb_ln(h)))
        h = self.mlm_ln(F.gelu(self.mlm_dense(h[:, 1:])))
        return h @ self.tok_emb.weight[:self.codebook_size].t() + self.mlm_bias

    def random_mask(self, b: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """bool [b, N]: per row ``ceil(gamma(r) * N)`` positions (at least one), ``r ~ U[0, 1)``."""
        r = torch.rand(b, generator=generator, device=device)
        count = torch.ceil(mask_ratio(self.cfg.mask_schedule, r) * self.length).long().clamp(1, self.length)
        order = torch.rand(b, self.length, generator=generator, device=device).argsort(dim=1)
        ranks = order.argsort(dim=1)                     # a uniformly random rank per position
        return ranks < count.to(device)[:, None]

    # ---- training
    def training_step(self, batch: Dict, step: int) -> StepOutput:
        ids = self.tokens(batch).flatten(1)
        labels = self.labels(batch)
        masked = self.random_mask(ids.shape[0], ids.device)
        logits = self.logits(torch.where(masked, torch.full_like(ids, self.mask_id), ids), labels)[masked]
        target = ids[masked]
        nll = F.cross_entropy(logits, target)
        smoothing = self.cfg.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, target, label_smoothing=smoothing) if smoothing > 0 else nll
        accuracy = (logits.argmax(-1) == target).float().mean()
        return StepOutput(loss=loss, recon=None, logs={"nll": nll.detach(), "accuracy": accuracy.detach(),
                                                       "mask_ratio": masked.float().mean().detach()})

    # ---- decoding
    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor, labels: Optional[torch.Tensor], params: SamplingConfig,
                      generator: Optional[torch.Generator], trace: Optional[List[torch.Tensor]] = None
                      ) -> torch.Tensor:
        """MaskGIT's parallel decoding of ``ids`` [n, N] (codes, [MASK] where unknown): the completed
        codes [n, N]. ``trace`` (a list) receives the codes after each iteration, [MASK] where re-masked."""
        steps = params.steps or self.cfg.steps
        guided = params.cfg is not None
        cond = with_null_labels(labels, self.num_classes) if guided else labels
        unknown_start = (ids == self.mask_id).sum(-1)                          # N0 per row
        for t in range(steps):
            unknown = ids == self.mask_id
            logits = self.logits(torch.cat([ids, ids]) if guided else ids, cond)
            if guided:
                c, u = logits.chunk(2)
                logits = guide(c, u, guidance_scale(params.cfg, params.cfg_schedule, t / max(steps - 1, 1)))
            sampled = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
            sampled = torch.where(unknown, sampled, ids)
            if t == steps - 1:
                ids = sampled
            else:
                ratio = (t + 1) / steps
                probs = (probabilities(logits, params.temperature, params.top_k, params.top_p)
                         if params.temperature > 0 else logits.float().softmax(-1))
                logp = probs.gather(-1, sampled[..., None])[..., 0].clamp_min(1e-30).log()
                n_mask = torch.floor(unknown_start * mask_ratio(params.mask_schedule, ratio)).long().clamp_min(1)
                remask = confidence_remask(logp, unknown, n_mask.to(ids.device),
                                           params.gumbel_temperature * (1.0 - ratio), generator)
                ids = torch.where(remask, torch.full_like(sampled, self.mask_id), sampled)
            if trace is not None:
                trace.append(ids.clone())
        return ids

    @torch.no_grad()
    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator, trace: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Codes [n, h, w] decoded from all-[MASK] in ``params.steps`` (default ``cfg.steps``) iterations."""
        start = torch.full((n, self.length), self.mask_id, dtype=torch.long, device=self.mlm_bias.device)
        return self.decode_tokens(start, labels, params, generator, trace).view(n, *self.shape)

    def keep_tokens(self, keep_mask: torch.Tensor) -> torch.Tensor:
        """bool [B, h, w] of a pixel keep mask [B, H, W]: a code is kept when every pixel of its patch is."""
        if keep_mask.dim() != 3 or keep_mask.dtype != torch.bool:
            raise ValueError(f"keep_mask must be a bool tensor [B, H, W], got {keep_mask.dtype} "
                             f"{tuple(keep_mask.shape)}")
        b, hh, ww = keep_mask.shape
        h, w = self.shape
        if hh % h or ww % w or hh // h != ww // w:
            raise ValueError(f"keep_mask of {hh}x{ww} pixels does not tile the {h}x{w} code map in square patches")
        f = hh // h
        return keep_mask.view(b, h, f, w, f).all(dim=4).all(dim=2)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, keep_mask: torch.Tensor, labels=None, seed: int = 0, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg: Optional[float] = None,
             cfg_schedule: str = "constant", steps: Optional[int] = None, mask_schedule: str = "cosine",
             gumbel_temperature: float = 4.5, trace: Optional[List[torch.Tensor]] = None) -> Samples:
        """Inpainting / outpainting: ``images`` [B, 3, H, W] in [-1, 1] are encoded, the codes whose patch
        lies wholly inside ``keep_mask`` (bool [B, H, W], True: keep) are kept, the others regenerated by
        the parallel decoder (class ``labels``: one or B; None: the null class of a class-conditional
        model, i.e. unconditional). Returns the decoded images, the codes [B, h, w] and the labels."""
        params = SamplingConfig(temperature, top_k, top_p, cfg, cfg_schedule, steps, mask_schedule,
                                gumbel_temperature).check()
        if cfg is not None and self.num_classes == 0:
            raise ValueError("cfg: classifier-free guidance needs a class-conditional generator (num_classes > 0)")
        if images.dim() != 4 or images.shape[0] != keep_mask.shape[0] or images.shape[-2:] != keep_mask.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and keep_mask {tuple(keep_mask.shape)} do not match "
                             "([B, C, H, W] and [B, H, W])")
        device = self.mlm_bias.device
        n = images.shape[0]
        if labels is None and self.num_classes:
            labels = torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        else:
            labels = check_labels(labels, n, self.num_classes, device)
        generator = torch.Generator(device).manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            codes = self.tokenizer.encode(images.to(device))
            keep = self.keep_tokens(keep_mask.to(device))
            start = torch.where(keep, codes, torch.full_like(codes, self.mask_id)).flatten(1)
            ids = self.decode_tokens(start, labels, params, generator, trace).view(n, *self.shape)
            out = self.tokenizer.decode(ids).clamp(-1, 1)
        finally:
            self.train(was_training)
        return Samples(images=out, ids=ids, labels=labels)


MODELS = {"maskgit": MaskGIT}

PRESETS = {
    "maskgit": {
        # digits on the vqgan tiny tokenizer: 8x8 codes, K = 128; 0.84M parameters, 1000 steps at 0.2-0.29 s/step
        # on one thread (by the machine's load), class accuracy 94% under the default decoding (8 steps, choice
        # temperature 4.5; lowest class 78-84%). No label smoothing: its 0.1 uniform share is drawn as random codes
        # at temperature 1 (with 0.1 and 1200 steps: 93%, lowest class 75-80%); no dropout in the short run.
        "tiny": Preset(model=MaskGITConfig(num_classes=10, class_dropout=0.1, dim=128, depth=4, heads=4,
                                           dropout=0.0, label_smoothing=0.0, steps=8),
                       train=TrainConfig(steps=1000, batch_size=32, lr=2e-3, betas=(0.9, 0.96), weight_decay=0.045,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="digits", hflip=False)),
        # MaskGIT's class-conditional ImageNet 256 model (maskgit_class_cond_config: 24 layers, 16 heads, width
        # 768, MLP 3072, dropout 0.1, label smoothing 0.1; Adam (0.9, 0.96), lr 1e-4 after 5000 warmup steps,
        # constant (base_config), weight decay 0.045, batch 256, 2M steps; its Polyak average is not kept) on the
        # vqgan base tokenizer (16x16 codes; MaskGIT's own VQGAN has K = 1024 too). Batch 32 x 8 accumulated
        # micro-batches. data.name: an ImageNet-style folder of class folders (1000 classes).
        "base": Preset(model=MaskGITConfig(num_classes=1000),
                       train=TrainConfig(steps=2_000_000, batch_size=32, grad_accum=8, lr=1e-4, betas=(0.9, 0.96),
                                         weight_decay=0.045, warmup_steps=5000, min_lr_ratio=1.0, grad_clip=0.0),
                       data=DataConfig(name="imagenet/train")),
    },
}
