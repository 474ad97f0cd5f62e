"""DALL-E's transformer (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", arXiv:2102.12092) on
the ``dvae`` tokenizer, and :class:`TextTokenTransformer`, the decoder-only transformer over
``[text tokens, grid segments...]`` that it shares with Make-A-Scene (:mod:`models.make_a_scene`).

The sequence is the caption's ``text_length`` WordPiece ids (MiniLM's tokenizer, ``[CLS] words [SEP]``
then padding; :class:`models.generator.Prompts`) followed by the image's ``h * w`` dVAE codes in raster
order, modelled autoregressively by one decoder-only transformer, as the paper's Sec. 2.2 and appendix B.1
and the reference reimplementation lucidrains/DALLE-pytorch (``dalle_pytorch/dalle_pytorch.py``, ``DALLE``).

Faithful:
- Unique padding per position: a padded text position ``i`` holds its own id ``30522 + i`` (the paper:
  "we learn a special padding token separately for each of the 256 text positions"; DALLE-pytorch:
  ``num_text_tokens += text_seq_len`` and ``torch.where(text == 0, text_range, text)``), so the text
  vocabulary is MiniLM's 30522 words + ``text_length`` pad ids. The padded positions are predicted like
  any other text token.
- One vocabulary of ``30522 + text_length + K`` ids, text ids first (DALLE-pytorch's ``total_tokens``),
  separate text and image embeddings (``text_emb``, ``image_emb``), a learned position embedding per
  text position (``text_pos_emb``) and a row plus a column embedding per image position
  (``image_row_emb``, ``image_col_emb``: the paper's Fig. 10), one output layer ``to_logits`` over the
  whole vocabulary.
- Logits masks (DALLE-pytorch's ``logits_mask``): an output whose target is a text position allows
  only the text ids, one whose target is an image position only the K image ids; :meth:`logits`
  returns the full-vocabulary logits with the other ids at -inf. The loss and the sampler compute the
  allowed slice of ``to_logits`` only, which is the same softmax (the masked ids have probability 0) at
  a fraction of the cost; no text id can be drawn at an image position, nor the reverse.
- The loss: cross-entropy of the text tokens (targets 1 .. L-1; ``[CLS]`` starts the stream and is not
  predicted) and of the image tokens, weighted text : image = 1 : 7 and normalised,
  ``(loss_text + 7 loss_img) / 8`` (the paper's Sec. 2.2 and DALLE-pytorch's ``loss_img_weight = 7``).
- Attention masks (the paper's appendix B.1, Fig. 11; OpenAI's blog post): text tokens attend causally
  to text, every image token attends to every text token, and image-to-image attention is sparse:
  row attention (an image token sees itself and the ``w`` image tokens before it in raster order),
  column attention (the image tokens of its own column at or above it), and a causal convolutional
  attention in the last layer; column attention at layers ``i`` (1-based) with ``(i - 2) mod 4 = 0``,
  row attention at the others (``attention="sparse"``). The masks are dense boolean matrices here (the
  paper's column attention on transposed states and its kernels are an efficiency measure with the same
  mask). ``attention="dense"`` is the plain causal mask of DALLE-pytorch's default ``attn_types=('full',)``.
- Sampling draws the image tokens one at a time given the prompt's text tokens (the text is not sampled),
  with temperature / top-k / top-p (:func:`models.sampling.sample_logits`; the paper reranks 512 samples
  with CLIP instead, DALLE-pytorch samples with top-k ``filter_thres = 0.5``) and the shared
  :class:`models.sampling.KVCache`; ``use_cache=False`` recomputes the whole prefix at every step and gives
  the same tokens.

Deviations and guesses:
- Text: MiniLM's WordPiece ids (30522 words, ``[CLS] ... [SEP]``) in place of the paper's 16384-id BPE
  (lower-cased, BPE dropout 0.1); ``[CLS]`` plays the start token (DALLE-pytorch prepends id 0).
- Classifier-free guidance is not in the paper (DALLE-pytorch adds it as ``cond_scale``, nulling the text
  to padding): here caption dropout (``text_dropout``) trains the empty caption ``[CLS] [SEP]`` + the
  per-position pads, the unconditional stream reads it, and the guided logits are
  ``uncond + w (cond - uncond)`` on the allowed slice.
- The convolutional attention kernel's geometry is a guess: the paper names an 11x11 kernel (at 32x32
  codes); here a token sees the raster-earlier tokens within ``conv_kernel // 2`` rows above and
  ``conv_kernel // 2`` columns either side (``conv_kernel`` 11 in ``base``, 5 in ``tiny``).
- ``text_loss_share`` (1 in ``base``, the paper): the tiny presets score the text tokens of a quarter of each
  batch's captions (the first rows of the shuffled batch: the same loss in expectation, more variance),
  since the 30542-way text softmax is most of a tiny model's step on a CPU.
- The paper's layers are ``resblock``s of the Sparse Transformer with fp16 tricks (per-resblock gradient
  scaling); here the suite's pre-LayerNorm :class:`models.transformer.Block`, minGPT's initialisation, and
  the trainer's AdamW / cosine schedule (the paper halves the step size on plateaus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset
from .config import DataConfig, TrainConfig
from .generator import Generator, Prompts, TextConditionConfig
from .gpt import code_map_shape
from .sampling import SamplingConfig, guidance_scale, guide, sample_logits
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights

WORDS = 30522   # MiniLM's WordPiece vocabulary
ATTENTION = ("dense", "sparse")


def token_map_shape(tokenizer: Tokenizer) -> Tuple[int, int]:
    """``(h, w)`` of a single-level tokenizer's code map; the dVAE's is ``resolution / 2 ** (group_count - 1)``."""
    cfg = tokenizer.cfg
    if hasattr(cfg, "group_count") and hasattr(cfg, "resolution"):
        side = cfg.resolution // 2 ** (cfg.group_count - 1)
        return side, side
    return code_map_shape(tokenizer)


@dataclass
class Segment:
    """A grid of codes in the sequence: its name (``image``, ``scene``), shape, codebook size K, the
    weight of its cross-entropy and its place (``start`` position, ``offset`` of its ids in the vocabulary)."""
    name: str
    tokenizer: int                 # index in the generator's tokenizers
    shape: Tuple[int, int]
    size: int
    weight: float
    start: int = 0
    offset: int = 0

    @property
    def length(self) -> int:
        return self.shape[0] * self.shape[1]


class TextTokenTransformer(Generator):
    """A decoder-only transformer over ``[text (L), segment 1, segment 2, ...]`` (each segment a code grid
    in raster order) with DALL-E's per-position text padding, vocabulary layout, logits masks and
    weighted loss. Subclasses pass their segments (``(name, tokenizer index, loss weight)``; the one named
    ``image`` is what the generator samples), may override :meth:`attention_masks`, and implement
    :meth:`generate` with :meth:`text_prefix` and :meth:`decode_tokens`. The config has the fields of
    :func:`models.transformer.check_transformer_fields` and ``text_loss_share``."""

    conditioning = "text"

    def __init__(self, cfg, tokenizers: Sequence[Tokenizer], segments: Sequence[Tuple[str, int, float]],
                 text_weight: float):
        super().__init__(cfg, *tokenizers)
        check_transformer_fields(cfg, ("depth",))
        if not 0.0 < cfg.text_loss_share <= 1.0:
            raise ValueError(f"{type(cfg).__name__}: text_loss_share must be in (0, 1], got {cfg.text_loss_share}")
        weights = [text_weight] + [w for _, _, w in segments]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"{type(cfg).__name__}: the loss weights must be >= 0 and not all 0, got {weights}")
        L = cfg.text_length
        self.text_weight = float(text_weight)
        self.text_vocab = WORDS + L                                  # words + one pad id per position
        self.segments: List[Segment] = []
        start, offset = L, self.text_vocab
        for name, index, weight in segments:
            tok = self.tokenizers[index]
            seg = Segment(name, index, token_map_shape(tok), next(iter(tok.codebook_sizes().values())),
                          float(weight), start, offset)
            self.segments.append(seg)
            start, offset = start + seg.length, offset + seg.size
        self.seq_len, self.total_tokens = start, offset
        d = cfg.dim
        self.text_emb = nn.Embedding(self.text_vocab, d)
        self.text_pos_emb = nn.Embedding(L, d)
        for seg in self.segments:
            setattr(self, f"{seg.name}_emb", nn.Embedding(seg.size, d))
            setattr(self, f"{seg.name}_row_emb", nn.Embedding(seg.shape[0], d))
            setattr(self, f"{seg.name}_col_emb", nn.Embedding(seg.shape[1], d))
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(d, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.to_logits = nn.Linear(d, self.total_tokens)
        init_weights(self)
        self._masks = None

    # ---- the sequence
    def text_tokens(self, prompts: Prompts) -> torch.Tensor:
        """int64 [B, L]: the WordPiece ids, each padded position ``i`` replaced by its own pad id ``30522 + i``."""
        pads = WORDS + torch.arange(prompts.ids.shape[1], device=prompts.ids.device)
        return torch.where(prompts.mask, prompts.ids, pads.expand_as(prompts.ids))

    def segment_of(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def target_ranges(self) -> torch.Tensor:
        """int64 [seq_len, 2]: the [first, last + 1) vocabulary ids allowed at each position of the sequence."""
        ranges = [[0, self.text_vocab]] * self.cfg.text_length
        for seg in self.segments:
            ranges += [[seg.offset, seg.offset + seg.size]] * seg.length
        return torch.tensor(ranges, device=self.to_logits.weight.device)

    def logits_mask(self) -> torch.Tensor:
        """bool [seq_len - 1, total_tokens]: True where output ``p`` (the target at position ``p + 1``) may
        take that id: text ids at text positions, a segment's ids at its positions."""
        r = self.target_ranges()[1:]
        ids = torch.arange(self.total_tokens, device=r.device)
        return (ids >= r[:, :1]) & (ids < r[:, 1:])

    def attention_masks(self) -> List[Optional[torch.Tensor]]:
        """Per layer, bool [seq_len, seq_len] (True: may attend) or None (plain causal attention)."""
        return [None] * self.cfg.depth

    def _layer_masks(self) -> List[Optional[torch.Tensor]]:
        device = self.to_logits.weight.device
        if self._masks is None or any(m is not None and m.device != device for m in self._masks):
            self._masks = [None if m is None else m.to(device) for m in self.attention_masks()]
        return self._masks

    def embed(self, seq: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token + position embeddings [B, T, dim] of the global ids ``seq`` [B, T] at positions
        ``start .. start + T - 1``."""
        b, t = seq.shape
        end, L = start + t, self.cfg.text_length
        parts = []
        if start < L:
            pos = torch.arange(start, min(end, L), device=seq.device)
            parts.append(self.text_emb(seq[:, :pos.numel()]) + self.text_pos_emb(pos))
        for seg in self.segments:
            a, z = max(start, seg.start), min(end, seg.start + seg.length)
            if a >= z:
                continue
            i = torch.arange(a - seg.start, z - seg.start, device=seq.device)
            local = seq[:, a - start:z - start] - seg.offset
            parts.append(getattr(self, f"{seg.name}_emb")(local) + getattr(self, f"{seg.name}_row_emb")(i // seg.shape[1])
                         + getattr(self, f"{seg.name}_col_emb")(i % seg.shape[1]))
        return self.drop(torch.cat(parts, dim=1))

    def hidden(self, seq: torch.Tensor, start: int = 0, cache=None) -> torch.Tensor:
        """The final hidden states [B, T, dim] of ``seq`` [B, T] at positions ``start ..`` (causal and the
        layers' masks; with ``cache`` the earlier positions come from it)."""
        x = self.embed(seq, start)
        end = start + seq.shape[1]
        for i, (block, mask) in enumerate(zip(self.transformer.blocks, self._layer_masks())):
            x = block(x, None if mask is None else mask[start:end, :end], True, cache, i)
        return self.transformer.ln_f(x)

    def head(self, h: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The logits of vocabulary ids ``first .. last - 1`` only (a slice of ``to_logits``)."""
        return F.linear(h, self.to_logits.weight[first:last], self.to_logits.bias[first:last])

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """Teacher-forced full-vocabulary logits [B, seq_len - 1, total_tokens] of the sequence ``seq``
        [B, seq_len] (global ids): output ``p`` predicts ``seq[:, p + 1]``; ids not allowed there are -inf."""
        out = self.to_logits(self.hidden(seq[:, :-1]))
        return out.masked_fill(~self.logits_mask(), float("-inf"))

    # ---- training
    @torch.no_grad()
    def segment_tokens(self, batch: Dict, index: int) -> torch.Tensor:
        """Codes [B, h * w] of the batch by the frozen tokenizer ``index``."""
        tok = self.tokenizers[index]
        return tok.encode(tok.inputs(batch)).flatten(1)

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        """The weighted loss; logs the image cross-entropy as ``nll`` and the others as ``text_nll``, ...."""
        codes = [self.segment_tokens(batch, seg.tokenizer) for seg in self.segments]
        loss, parts = self.losses(self.sequence(self.prompts(batch), codes))
        logs = {("nll" if k == "image" else f"{k}_nll"): v.detach() for k, v in parts.items()}
        return StepOutput(loss=loss, recon=None, logs=logs)

    def sequence(self, prompts: Prompts, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global ids [B, seq_len]: text tokens, then each segment's codes [B, h * w] offset into the vocabulary."""
        return torch.cat([self.text_tokens(prompts)] + [c + s.offset for c, s in zip(codes, self.segments)], dim=1)

    def losses(self, seq: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(the weighted loss, the per-segment cross-entropies ``text``, ``image``, ...) of ``seq``. In training
        the text cross-entropy is taken on the first ``text_loss_share`` of the (shuffled) batch's rows only."""
        h = self.hidden(seq[:, :-1])
        L = self.cfg.text_length
        rows = max(1, math.ceil(seq.shape[0] * self.cfg.text_loss_share)) if self.training else seq.shape[0]
        parts = {"text": F.cross_entropy(self.head(h[:rows, :L - 1], 0, self.text_vocab).flatten(0, 1),
                                         seq[:rows, 1:L].flatten())}
        for seg in self.segments:
            s = seg.start
            logits = self.head(h[:, s - 1:s - 1 + seg.length], seg.offset, seg.offset + seg.size)
            parts[seg.name] = F.cross_entropy(logits.flatten(0, 1), (seq[:, s:s + seg.length] - seg.offset).flatten())
        weights = [self.text_weight] + [seg.weight for seg in self.segments]
        loss = sum(w * parts[k] for w, k in zip(weights, parts)) / sum(weights)
        return loss, parts

    # ---- sampling
    def text_prefix(self, prompts: Prompts, guided: bool) -> torch.Tensor:
        """The prompts' text tokens [n, L], followed by n null (empty) prompts' when ``guided`` ([2n, L])."""
        if guided:
            prompts = prompts.cat(self.null_prompts(len(prompts), prompts.ids.device))
        return self.text_tokens(prompts)

    @torch.no_grad()
    def decode_tokens(self, prefix: torch.Tensor, params: SamplingConfig, generator: torch.Generator,
                      guided: bool) -> torch.Tensor:
        """Samples the positions after ``prefix`` (global ids [B, P], or [2B, P] with the unconditional
        stream second when ``guided``) up to ``seq_len``, one token at a time, each from its position's
        allowed ids; returns the whole sequence [B, seq_len] (the conditional stream)."""
        ranges = self.target_ranges().tolist()
        p0, n_new = prefix.shape[1], self.seq_len - prefix.shape[1]
        cache = self.transformer.new_cache() if params.use_cache else None
        seq, new = prefix, prefix
        for i in range(n_new):
            first, last = ranges[p0 + i]
            start = seq.shape[1] - new.shape[1]
            h = self.hidden(new, start, cache) if cache is not None else self.hidden(seq)
            logits = self.head(h[:, -1], first, last)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = guide(cond, uncond, guidance_scale(params.cfg, params.cfg_schedule, i / max(n_new - 1, 1)))
            token = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p) + first
            new = torch.cat([token, token])[:, None] if guided else token[:, None]
            seq = torch.cat([seq, new], dim=1)
        return seq[:prefix.shape[0] // 2] if guided else seq

    def split(self, seq: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The codes [B, h, w] of each segment of the global ids ``seq`` [B, seq_len]."""
        return {s.name: (seq[:, s.start:s.start + s.length] - s.offset).view(-1, *s.shape) for s in self.segments}


# ---------------------------------------------------------------- DALL-E

@dataclass
class DALLEConfig(TextConditionConfig):
    """DALL-E's transformer (defaults: the paper's 12B model, 256 text tokens; its 64 layers of 62 heads
    of width 64)."""
    dim: int = 3968
    depth: int = 64
    heads: int = 62
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_loss_weight: float = 1.0     # the paper's text : image = 1 : 7
    image_loss_weight: float = 7.0
    text_loss_share: float = 1.0      # training: share of the batch's captions whose text tokens are scored (1: all)
    attention: str = "sparse"         # sparse (the paper's row / column / conv masks) | dense (causal)
    conv_kernel: int = 11             # the last layer's convolutional attention kernel (odd)


def image_attention_mask(kind: str, text_length: int, shape: Tuple[int, int], kernel: int = 11) -> torch.Tensor:
    """bool [L + h w, L + h w]: DALL-E's causal mask of one layer (``row``, ``column`` or ``conv``): text
    attends causally to text, image tokens to all text and, among the image tokens at or before them in
    raster order, to those the pattern allows (see the module docstring)."""
    h, w = shape
    n = text_length + h * w
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = k <= q
    i, j = q - text_length, k - text_length                   # raster indices (negative: text)
    if kind == "row":
        allowed = i - j <= w
    elif kind == "column":
        allowed = (i - j) % w == 0
    elif kind == "conv":
        allowed = ((i // w - j // w) <= kernel // 2) & ((i % w - j % w).abs() <= kernel // 2)
    else:
        raise ValueError(f"unknown attention pattern {kind!r}; patterns: row, column, conv")
    image_pair = (i >= 0) & (j >= 0)
    return mask & (~image_pair | allowed)


def sparse_layer_kinds(depth: int) -> List[str]:
    """The paper's schedule: column attention at layers i (1-based) with (i - 2) mod 4 = 0, row attention at
    the others, convolutional attention at the last."""
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
    kinds[-1] = "conv"
    return kinds


class DALLE(TextTokenTransformer):
    """DALL-E's decoder-only transformer over ``[text, image codes]`` on the dVAE."""

    config_cls = DALLEConfig

    def __init__(self, cfg: DALLEConfig, tokenizer: Tokenizer):
        if cfg.attention not in ATTENTION:
            raise ValueError(f"DALLEConfig: attention must be one of {', '.join(ATTENTION)}, got {cfg.attention!r}")
        if cfg.conv_kernel < 1 or cfg.conv_kernel % 2 == 0:
            raise ValueError(f"DALLEConfig: conv_kernel must be an odd integer >= 1, got {cfg.conv_kernel}")
        super().__init__(cfg, (tokenizer,), [("image", 0, cfg.image_loss_weight)], cfg.text_loss_weight)

    def attention_masks(self) -> List[Optional[torch.Tensor]]:
        if self.cfg.attention == "dense":
            return super().attention_masks()
        shape = self.segments[0].shape
        return [image_attention_mask(kind, self.cfg.text_length, shape, self.cfg.conv_kernel)
                for kind in sparse_layer_kinds(self.cfg.depth)]

    @torch.no_grad()
    def generate(self, n: int, prompts: Prompts, params: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
        """Image codes [n, h, w] drawn one at a time after the prompts' text tokens."""
        guided = params.cfg is not None
        seq = self.decode_tokens(self.text_prefix(prompts, guided), params, generator, guided)
        return self.split(seq)["image"]


MODELS = {"dalle": DALLE}

PRESETS = {
    "dalle": {
        # shapes (32x32, captions) on the dvae tiny tokenizer: 8x8 codes, K = 256; 20 text tokens (the longest
        # shapes caption is 19 WordPiece ids with [CLS] and [SEP]). 8.7M parameters (7.8M of them the 30542-id text
        # embedding and output rows); 0.36 s/step on one thread with the text loss on a quarter of each batch's
        # captions (0.58 s/step on all: the 30542-way text softmax dominates); 700 steps: 28% plain (its dvae's
        # ceiling 41%). Both threads of the 2-core machine: 3.8 steps/s (60-step trial), so 1000 steps for 5 minutes.
        "tiny": Preset(model=DALLEConfig(text_length=20, text_dropout=0.1, dim=128, depth=4, heads=4, dropout=0.0,
                                         text_loss_share=0.25, conv_kernel=5),
                       train=TrainConfig(steps=1000, batch_size=32, lr=2e-3, betas=(0.9, 0.96), weight_decay=0.01,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="shapes", hflip=False)),
        # the paper's 12B transformer: 64 layers, 62 heads of width 64 (3968), 256 text + 32x32 image tokens
        # (the dvae base tokenizer: 256x256 -> 32x32, K = 8192); Adam (0.9, 0.96), weight decay 4.5e-2, step
        # size 4.5e-4 after a 5000-update warmup, batch 1024, 430k updates, gradient norm clipped at 4 (the
        # paper's appendix B.2 as recalled, not re-checked here; its halving on plateaus replaced by the
        # trainer's cosine). data.name: a folder of images with .txt captions.
        "base": Preset(model=DALLEConfig(text_length=256),
                       train=TrainConfig(steps=430_000, batch_size=1024, lr=4.5e-4, betas=(0.9, 0.96),
                                         weight_decay=4.5e-2, warmup_steps=5000, min_lr_ratio=0.0, grad_clip=4.0),
                       data=DataConfig(name="captioned/train")),
    },
}
