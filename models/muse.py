"""Muse (Chang et al. 2023, "Muse: Text-To-Image Generation via Masked Generative Transformers",
arXiv:2301.00704) on the ``vqgan`` tokenizer's codes: a text-conditioned masked transformer (the base model)
and a super-resolution masked transformer that turns the base model's low-resolution codes into the codes of
the full-resolution image, both decoded in parallel as MaskGIT.

Faithful to the paper (Sections 2.1-2.4, Figure 3-4):
- The caption is encoded by a frozen language model (Muse: T5-XXL; here the frozen MiniLM,
  :func:`models.parti.text_states`, never a sub-module, run without gradient); its last hidden states are
  projected to the transformer's width (``text_proj``) and every layer cross-attends to them (self-attention,
  cross-attention, MLP: :class:`models.transformer.Transformer` with ``cross=True``) under the text padding
  mask, so a padded position never changes an output.
- Training masks ``ceil(gamma(r) N)`` codes (at least one) with ``r ~ U[0, 1)`` and gamma the cosine
  schedule (Muse: a cosine masking rate, density ``2/pi (1 - r^2)^(-1/2)`` of the rate: the same draw), the
  masked codes replaced by [MASK] (id K); the loss is the cross-entropy on the masked codes only. Condition
  dropout: captions are replaced by the empty one with ``text_dropout`` (Muse: 10%), which is also the null
  condition of classifier-free guidance.
- The super-resolution model: the low-resolution codes go through their own self-attention layers
  (``lowres_encoder``, ``sr_lowres_depth`` layers); their output is concatenated with the projected text
  states along the sequence and the high-resolution transformer cross-attends to the concatenation (Muse
  Section 2.3; lucidrains/muse-maskgit-pytorch ``conditioning_token_ids`` concatenates the low-resolution
  token embeddings to the cross-attention context the same way, without the extra layers). It is trained
  on the ground-truth low-resolution codes with the high-resolution codes masked.
  Here the low-resolution image is the full one box-downsampled by 2 (``F.avg_pool2d``), encoded by the
  same ``vqgan`` tokenizer (a conv tokenizer encodes any multiple of its downsampling): 16 -> 32 pixels for
  the tiny preset (4x4 -> 8x8 codes), as Muse's 256 -> 512 (16x16 -> 64x64 codes with a second VQGAN). A
  tokenizer trained at full resolution only encodes the half-resolution images poorly: train it with
  ``data.half_resolution`` (the text zoo: 0.5) so that it has seen them.
- Decoding: MaskGIT's parallel decoder (:meth:`models.maskgit.MaskGIT.decode_tokens`, reused as is: cosine
  re-masking, choice temperature annealed, a kept code never re-masked), base then super-resolution
  (Muse: 24 and 8 steps; ``steps`` and ``sr_steps``; ``sample(steps=...)`` overrides both). Guidance
  ``uncond + w (cond - uncond)`` with the empty caption (the super-resolution model's null pass keeps the
  low-resolution codes); Muse ramps the scale linearly over the iterations: ``cfg_schedule="linear"``.

How a user gets the pipeline: one model holds both stages (``superres=True``, the default; state_dict
prefixes ``base.`` and ``superres.``), trained together in one run (the loss is the mean of the two stages'
masked-token cross-entropies, logged as ``nll_base`` and ``nll_superres``); ``sample(prompt=...)`` runs the
base model at half resolution, then the super-resolution model, and returns full-resolution images and
codes [n, h, w]. ``superres=False`` is the base model alone at the tokenizer's resolution.

Deviations and guesses (stated): MiniLM (384 wide, 6 layers) for T5-XXL; Muse's negative prompting (the
null caption replaced by a negative one) is not exposed (``sample`` has no negative prompt; the null is
always ""); Muse's super-resolution uses a second VQGAN with a larger code map, here the same tokenizer at
two resolutions; both stages share ``dim`` / ``heads`` / ``mlp_ratio``; pre-LayerNorm blocks with learned
absolute positions, normal(0.02) initialisation, a linear head over the K codes (Muse's layer details are
not given); no label smoothing; the joint training of both stages in one run (Muse trains them separately:
the two are independent networks, so only the shared gradient clipping couples them); the masking
schedule's gamma = cos also for super-resolution (Muse does not say otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .generator import Generator, Prompts, TextConditionConfig
from .gpt import code_map_shape
from .maskgit import MaskGIT
from .parti import TEXT_WIDTH, text_states
from .sampling import MASK_SCHEDULES, SamplingConfig
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights


@dataclass
class MuseConfig(TextConditionConfig):
    """Muse's base and super-resolution transformers (defaults: the ``base`` preset's guessed sizes)."""
    dim: int = 1024
    depth: int = 24               # base transformer layers
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    mask_schedule: str = "cosine"  # training: share of codes masked, gamma(r) with r ~ U[0, 1)
    steps: int = 24               # base decoding iterations (Muse: 24)
    superres: bool = True         # also a super-resolution model: base at half resolution, then x2
    sr_depth: int = 8             # super-resolution transformer layers
    sr_lowres_depth: int = 4      # self-attention layers over the low-resolution codes
    sr_steps: int = 8             # super-resolution decoding iterations (Muse: 8)


def _check_config(cfg: MuseConfig) -> None:
    name = type(cfg).__name__
    check_transformer_fields(cfg, ("depth", "sr_depth", "sr_lowres_depth"))
    check_fields(cfg, at_least={"steps": 1, "sr_steps": 1})
    if cfg.mask_schedule not in MASK_SCHEDULES:
        raise ValueError(f"{name}: mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {cfg.mask_schedule!r}")
    if not isinstance(cfg.superres, bool):
        raise ValueError(f"{name}: superres must be True or False, got {cfg.superres!r}")


class MaskedTransformer(nn.Module):
    """One Muse stage: a bidirectional transformer over ``length`` codes ([MASK] = id K) that cross-attends to
    the projected text states, and, with ``lowres_length``, to its encoding of the low-resolution codes."""

    def __init__(self, cfg: MuseConfig, depth: int, codebook_size: int, length: int, lowres_length: int = 0):
        super().__init__()
        self.length, self.mask_id = length, codebook_size
        self.tok_emb = nn.Embedding(codebook_size + 1, cfg.dim)
        self.pos_emb = nn.Embedding(length, cfg.dim)
        self.text_proj = nn.Linear(TEXT_WIDTH, cfg.dim)
        if lowres_length:
            self.lowres_emb = nn.Embedding(codebook_size, cfg.dim)
            self.lowres_pos_emb = nn.Embedding(lowres_length, cfg.dim)
            self.lowres_encoder = Transformer(cfg.dim, cfg.sr_lowres_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.dim, depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross=True)
        self.head = nn.Linear(cfg.dim, codebook_size)

    def context(self, states: torch.Tensor, mask: torch.Tensor, lowres: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention context [B, S, dim] and its mask [B, S]: the projected text states, then (the
        super-resolution model) the encoded low-resolution codes ``lowres`` [B, n_low]."""
        context = self.text_proj(states)
        if lowres is None:
            return context, mask
        low = self.lowres_emb(lowres) + self.lowres_pos_emb.weight[None, :lowres.shape[1]]
        low = self.lowres_encoder(self.drop(low))
        return torch.cat([context, low], 1), torch.cat([mask, torch.ones_like(lowres, dtype=torch.bool)], 1)

    def forward(self, ids: torch.Tensor, context, context_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, K] of every position given ``ids`` [B, N] (codes or [MASK]) and the context (or
        its per-layer keys / values)."""
        h = self.tok_emb(ids) + self.pos_emb.weight[None, :ids.shape[1]]
        return self.head(self.transformer(self.drop(h), context=context, context_mask=context_mask))


class _Stage:
    """One stage under fixed contexts, in the shape :meth:`MaskGIT.decode_tokens` and
    :meth:`MaskGIT.random_mask` read (``cfg.steps``, ``cfg.mask_schedule``, ``length``, ``mask_id``,
    ``num_classes``, ``logits(ids, labels)``). Its "classes": 0 the caption, 1 (the null class) the empty
    caption; row ``i`` of a batch reads context row ``i mod n`` of the caption's (class 0) or of the empty
    caption's (class 1) contexts, which are stacked [caption rows; empty rows] and projected to every
    layer's keys / values once."""

    num_classes = 1

    def __init__(self, net: MaskedTransformer, steps: int, mask_schedule: str, n: int = 0, context=None,
                 context_mask=None):
        self.net, self.length, self.mask_id, self.n = net, net.length, net.mask_id, n
        self.cfg = SimpleNamespace(steps=steps, mask_schedule=mask_schedule)
        if context is not None:
            self.kv = net.transformer.context_kv(context)
            self.context_mask = context_mask

    def logits(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(ids.shape[0], device=ids.device) % self.n + self.n * labels
        kv = [(k[rows], v[rows]) for k, v in self.kv]
        return self.net(ids, kv, self.context_mask[rows])


class Muse(Generator):
    """Muse's text-conditioned base masked transformer and (``superres``) its super-resolution model."""

    config_cls = MuseConfig
    conditioning = "text"
    parallel_decoding = True

    def __init__(self, cfg: MuseConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        _check_config(cfg)
        self.shape = code_map_shape(tokenizer)
        self.codebook_size = next(iter(tokenizer.codebook_sizes().values()))   # K
        h, w = self.shape
        if cfg.superres:
            if h % 2 or w % 2:
                raise ValueError(f"MuseConfig: superres needs an even code map, the tokenizer gives {h}x{w}")
            self.lowres_shape = (h // 2, w // 2)
            n_low = h * w // 4
            self.base = MaskedTransformer(cfg, cfg.depth, self.codebook_size, n_low)
            self.superres = MaskedTransformer(cfg, cfg.sr_depth, self.codebook_size, h * w, lowres_length=n_low)
        else:
            self.lowres_shape = self.shape
            self.base = MaskedTransformer(cfg, cfg.depth, self.codebook_size, h * w)
            self.superres = None
        init_weights(self)

    # ---- training
    @torch.no_grad()
    def lowres_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The codes [B, h/2, w/2] of the images box-downsampled by 2 (the super-resolution model's input)."""
        return self.tokenizer.encode(F.avg_pool2d(images, 2))

    def stage_loss(self, net: MaskedTransformer, codes: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                   lowres: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy on the masked codes, accuracy) of one stage on ``codes`` [B, N]."""
        masked = MaskGIT.random_mask(_Stage(net, 1, self.cfg.mask_schedule), codes.shape[0], codes.device)
        context, context_mask = net.context(states, mask, lowres)
        logits = net(torch.where(masked, torch.full_like(codes, net.mask_id), codes), context, context_mask)[masked]
        target = codes[masked]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        prompts = self.prompts(batch)
        states = text_states(prompts, cache=self.training, dtype=self.base.pos_emb.weight.dtype)
        images = self.tokenizer.inputs(batch)
        with torch.no_grad():
            codes = self.tokenizer.encode(images).flatten(1)
        if self.superres is None:
            loss, accuracy = self.stage_loss(self.base, codes, states, prompts.mask)
            return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach(), "accuracy": accuracy.detach()})
        low = self.lowres_tokens(images).flatten(1)
        base, base_acc = self.stage_loss(self.base, low, states, prompts.mask)
        sr, sr_acc = self.stage_loss(self.superres, codes, states, prompts.mask, low)
        loss = (base + sr) / 2
        return StepOutput(loss=loss, recon=None, logs={
            "nll": loss.detach(), "nll_base": base.detach(), "nll_superres": sr.detach(),
            "accuracy": base_acc.detach(), "accuracy_superres": sr_acc.detach()})

    # ---- decoding
    @torch.no_grad()
    def decode_stage(self, net: MaskedTransformer, steps: int, prompts: Prompts, params: SamplingConfig,
                     generator: Optional[torch.Generator], lowres: Optional[torch.Tensor] = None,
                     trace: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """One stage's codes [n, N] decoded from all-[MASK] by MaskGIT's decoder (guided by the empty caption
        when ``params.cfg`` is set; the low-resolution codes stay in the null pass)."""
        n, device = len(prompts), prompts.ids.device
        if params.cfg is not None:
            prompts = prompts.cat(self.null_prompts(n, device))
            lowres = None if lowres is None else torch.cat([lowres, lowres])
        context, context_mask = net.context(text_states(prompts, dtype=self.base.pos_emb.weight.dtype), prompts.mask, lowres)
        stage = _Stage(net, steps, self.cfg.mask_schedule, n, context, context_mask)
        start = torch.full((n, net.length), net.mask_id, dtype=torch.long, device=device)
        return MaskGIT.decode_tokens(stage, start, torch.zeros(n, dtype=torch.long, device=device), params,
                                     generator, trace)

    @torch.no_grad()
    def generate(self, n: int, prompts: Prompts, params: SamplingConfig, generator: torch.Generator,
                 trace: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Codes [n, h, w] at the tokenizer's resolution: the base model's, then (``superres``) the
        super-resolution model's given them. ``trace`` receives each stage's codes after every iteration."""
        low = self.decode_stage(self.base, self.cfg.steps, prompts, params, generator, trace=trace)
        if self.superres is None:
            return low.view(n, *self.shape)
        high = self.decode_stage(self.superres, self.cfg.sr_steps, prompts, params, generator, low, trace)
        return high.view(n, *self.shape)


MODELS = {"muse": Muse}

PRESETS = {
    "muse": {
        # shapes captions on the vqgan tiny tokenizer: base on 16x16 images (4x4 codes), super-resolution to
        # 32x32 (8x8 codes), K = 128; 1.7M parameters. Trial runs on a shared core (about half of one thread):
        # 1.5-3 steps/s; 276 steps (of 280) gave caption match 7.5% plain, 28% at cfg 3, 34% at cfg 5 (200
        # held-out captions, the shapes judge), a second 300-step run 1.5% / 6%: the text conditioning is barely
        # learnt at 300 steps; 800 steps (3.6 min): 28.7% plain, 32.5% at cfg 3. On both threads of the 2-core
        # machine 4.8 steps/s (60-step trial), but 1250 steps took 3.5 minutes (22.3% plain, 34.7% at cfg 3, on a
        # vqgan trained at 32 pixels only, whose 16-pixel codes lose most objects), so 1650.
        "tiny": Preset(model=MuseConfig(text_length=24, text_dropout=0.1, dim=128, depth=3, heads=4, dropout=0.0,
                                        steps=8, superres=True, sr_depth=2, sr_lowres_depth=1, sr_steps=8),
                       train=TrainConfig(steps=1650, batch_size=32, lr=1e-3, betas=(0.9, 0.96), weight_decay=0.045,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="shapes", hflip=False)),
        # On the vqgan base tokenizer (256 -> 16x16 codes; the base model at 128 pixels, 8x8 codes). Muse trains
        # 1M steps at batch 512 (here 32 x 16 accumulated) and decodes in 24 base / 8 super-resolution steps
        # (paper, Section 3). The layer sizes are a guess (width 1024, 24 base layers, 8 super-resolution layers
        # over 4 low-resolution layers: Muse's Table of sizes was not checked here); AdamW (0.9, 0.96) with
        # MaskGIT's lr and weight decay (Muse: Adafactor); text length 64 (T5's 64 tokens in Muse).
        "base": Preset(model=MuseConfig(text_length=64),
                       train=TrainConfig(steps=1_000_000, batch_size=32, grad_accum=16, lr=1e-4, betas=(0.9, 0.96),
                                         weight_decay=0.045, warmup_steps=5000, min_lr_ratio=1.0, grad_clip=1.0),
                       data=DataConfig(name="photos")),
    },
}
