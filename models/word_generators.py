"""Generators over word-id tokens: ``lqae`` (LQAE, Liu et al. 2023, arXiv:2302.00902), ``spae`` (SPAE, Yu et
al. 2023, arXiv:2306.17842) and ``unicode`` (UniCode, Zheng et al. 2024, arXiv:2403.09072), whose image codes
ARE MiniLM vocabulary ids (:mod:`models.lqae`, :mod:`models.spae`, :mod:`models.unicode`).

One vocabulary, one network: caption word pieces and image words are both ids of MiniLM's 30522-word
WordPiece vocabulary, so the three systems share :class:`WordTransformer`: one embedding table over the
30522 words (trainable, initialised from MiniLM's word embeddings ``text.word_embeddings()`` [30522, 384]
through a fixed random projection to ``dim``; trainable because the tiny models are narrower than 384 and
must specialise the words the tokenizer actually uses), learned positions, :class:`models.transformer.Transformer`
and an output layer tied to the embedding (``h @ E^T + bias``: a separate 30522 x dim head would double the
parameters). Image positions may hold any id of the tokenizer's codebook (the whole vocabulary: the tokenizers
quantize to every word), so no logits mask is applied beyond the vocabulary itself; the special ids the
systems use as markers ([MASK], the task tokens) are never targets.

- ``lqae``: a masked (bidirectional) prior, MaskGIT-style parallel decoding (``parallel_decoding``) of the
  [h, w] word ids with the caption's word pieces as an unmasked prefix in the same vocabulary (``[CLS]
  caption [SEP] [PAD]...`` then the image's words, [MASK] = MiniLM's own ``[MASK]`` id 103). Training masks
  ``ceil(cosine(r) * N)`` image words, loss on them. Guess: LQAE's paper generates by prompting an LLM; a
  masked prior over its words is this suite's choice (the issue's).
- ``spae``: SPAE's language-model-as-generator with a small causal transformer in place of the LLM:
  ``[caption word pieces, image words of the pyramid coarse to fine, each layer raster-flattened]``, loss
  on the image words, kv-cache sampling.
- ``unicode``: one causal transformer on both directions: generation ``[[unused0], caption, image words]``
  (loss on the image words) and captioning ``[[unused1], image words, caption]`` (loss on the caption's words
  after ``[CLS]``); the task tokens are MiniLM's ``[unused0]`` (id 1) and ``[unused1]`` (id 2), so the
  sequence never leaves the vocabulary. Each training batch holds both directions (the same images).
  :meth:`UniCodeGenerator.caption` decodes greedily (by default) until ``[SEP]``.

Guidance: the empty caption (``[CLS] [SEP]``) is the unconditional input; text dropout trains it.
Deviations: pre-LN blocks, learned absolute positions, the random projection of the word embeddings (the
originals use the LLM's own embedding).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import Preset, text
from .config import DataConfig, TrainConfig
from .generator import Generator, Prompts, TextConditionConfig, encode_prompts
from .sampling import (SamplingConfig, confidence_remask, guidance_scale, guide, mask_ratio, probabilities,
                       sample_logits)
from .tokenizer import StepOutput, Tokenizer
from .transformer import Transformer, check_transformer_fields, init_weights

VOCAB = 30522
PAD, CLS, SEP, MASK = 0, 101, 102, 103
GENERATE, CAPTION = 1, 2   # [unused0], [unused1]: unicode's task tokens


@dataclass
class WordGeneratorConfig(TextConditionConfig):
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    steps: int = 8                  # lqae: decoding iterations when sample() gets steps=None


class WordTransformer(nn.Module):
    """Embedding of the MiniLM vocabulary (tied output), learned positions, a transformer."""

    def __init__(self, cfg: WordGeneratorConfig, max_len: int):
        super().__init__()
        check_transformer_fields(cfg, ("depth",))
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(text.word_embeddings().shape[1], cfg.dim, generator=g)
        words = text.word_embeddings().float() @ proj
        self.tok_emb = nn.Embedding(VOCAB, cfg.dim)
        self.pos_emb = nn.Embedding(max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.bias = nn.Parameter(torch.zeros(VOCAB))
        init_weights(self)
        with torch.no_grad():
            self.tok_emb.weight.copy_(words * (0.02 / words.std()))

    def hidden(self, ids: torch.Tensor, causal: bool, start: int = 0, cache=None) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))
        return self.transformer(x, causal=causal, cache=cache)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.tok_emb.weight.t() + self.bias


def word_shapes(tokenizer: Tokenizer):
    """The tokenizer's ``encode`` format on one blank image (shapes of its id tensors without the batch)."""
    r = tokenizer.cfg.resolution
    with torch.no_grad():
        ids = tokenizer.encode(torch.zeros(1, 3, r, r, device=next(tokenizer.parameters()).device))
    return [tuple(t.shape[1:]) for t in ids] if isinstance(ids, (tuple, list)) else tuple(ids.shape[1:])


class WordGenerator(Generator):
    """Shared plumbing: the image words flattened to [B, N] and back, the shared network."""

    config_cls = WordGeneratorConfig
    conditioning = "text"
    causal: bool = True

    def __init__(self, cfg: WordGeneratorConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        if not isinstance(cfg.steps, int) or cfg.steps < 1:
            raise ValueError(f"{type(cfg).__name__}: steps must be an integer >= 1, got {cfg.steps!r}")
        sizes = set(tokenizer.codebook_sizes().values())
        if sizes != {VOCAB}:
            raise ValueError(f"{type(tokenizer).__name__}'s codes are not MiniLM's {VOCAB} words (codebooks {sizes})")
        self.shapes = word_shapes(tokenizer)
        self.length = (sum(math.prod(s) for s in self.shapes) if isinstance(self.shapes, list)
                       else math.prod(self.shapes))
        self.net = WordTransformer(cfg, cfg.text_length + self.length + 1)

    def flatten(self, ids) -> torch.Tensor:
        if isinstance(ids, (tuple, list)):
            return torch.cat([t.flatten(1) for t in ids], dim=1)
        return ids.flatten(1)

    def unflatten(self, flat: torch.Tensor):
        if isinstance(self.shapes, list):
            out, i = [], 0
            for s in self.shapes:
                out.append(flat[:, i:i + math.prod(s)].reshape(-1, *s))
                i += math.prod(s)
            return tuple(out)
        return flat.reshape(-1, *self.shapes)

    def words(self, ids) -> List:
        """An image's word ids (``encode`` format) as WordPiece tokens."""
        return text.words(self.flatten(ids))

    def cond_prefix(self, prompts: Prompts, guided: bool) -> torch.Tensor:
        if guided:
            prompts = prompts.cat(self.null_prompts(len(prompts), prompts.ids.device))
        return prompts.ids

    @torch.no_grad()
    def autoregress(self, prefix: torch.Tensor, n_new: int, params: SamplingConfig, generator, guided: bool,
                    stop: Optional[int] = None) -> torch.Tensor:
        """``n_new`` tokens [B, n_new] drawn one at a time after ``prefix`` ([2B, P] with the unconditional
        stream second when ``guided``); with ``stop``, rows that drew it keep drawing it (padding)."""
        cache = self.net.transformer.new_cache() if params.use_cache else None
        seq, new, out = prefix, prefix, []
        done = None
        for i in range(n_new):
            start = seq.shape[1] - new.shape[1]
            h = self.net.hidden(new, True, start, cache) if cache is not None else self.net.hidden(seq, True)
            logits = self.net.logits(h[:, -1])
            if guided:
                c, u = logits.chunk(2)
                logits = guide(c, u, guidance_scale(params.cfg, params.cfg_schedule, i / max(n_new - 1, 1)))
            token = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
            if stop is not None:
                done = token == stop if done is None else done | (token == stop)
                token = torch.where(done, torch.full_like(token, stop), token)
            out.append(token)
            new = torch.cat([token, token])[:, None] if guided else token[:, None]
            seq = torch.cat([seq, new], dim=1)
        return torch.stack(out, dim=1)


class LQAEGenerator(WordGenerator):
    """Masked prior over ``[caption word pieces, image words]`` with MaskGIT's parallel decoder."""

    parallel_decoding = True

    def image_hidden(self, prompt_ids: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, N, dim] of the image positions given the caption ids and ``words`` [B, N]."""
        return self.net.hidden(torch.cat([prompt_ids, words], dim=1), causal=False)[:, prompt_ids.shape[1]:]

    def logits(self, prompt_ids: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V] of the image positions given the caption ids and ``words`` [B, N] ([MASK] = 103)."""
        return self.net.logits(self.image_hidden(prompt_ids, words))

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        ids = self.flatten(self.tokens(batch))
        b = ids.shape[0]
        r = torch.rand(b, device=ids.device)
        count = torch.ceil(mask_ratio("cosine", r) * self.length).long().clamp(1, self.length)
        ranks = torch.rand(b, self.length, device=ids.device).argsort(1).argsort(1)
        masked = ranks < count[:, None]
        # the 30522-word output layer only at the masked positions (it is most of a tiny model's step)
        h = self.image_hidden(self.prompts(batch).ids, torch.where(masked, torch.full_like(ids, MASK), ids))
        nll = F.cross_entropy(self.net.logits(h[masked]), ids[masked])
        return StepOutput(loss=nll, recon=None, logs={"nll": nll.detach()})

    @torch.no_grad()
    def generate(self, n: int, prompts: Prompts, params: SamplingConfig, generator: torch.Generator,
                 trace: Optional[List[torch.Tensor]] = None):
        steps = params.steps or self.cfg.steps
        guided = params.cfg is not None
        cond = self.cond_prefix(prompts, guided)
        ids = torch.full((n, self.length), MASK, dtype=torch.long, device=cond.device)
        n0 = self.length
        for t in range(steps):
            unknown = ids == MASK
            logits = self.logits(cond, torch.cat([ids, ids]) if guided else ids)
            if guided:
                c, u = logits.chunk(2)
                logits = guide(c, u, guidance_scale(params.cfg, params.cfg_schedule, t / max(steps - 1, 1)))
            sampled = torch.where(unknown, sample_logits(logits, generator, params.temperature, params.top_k,
                                                         params.top_p), ids)
            if t == steps - 1:
                ids = sampled
            else:
                ratio = (t + 1) / steps
                probs = (probabilities(logits, params.temperature, params.top_k, params.top_p)
                         if params.temperature > 0 else logits.float().softmax(-1))
                logp = probs.gather(-1, sampled[..., None])[..., 0].clamp_min(1e-30).log()
                k = max(1, math.floor(n0 * float(mask_ratio(params.mask_schedule, ratio))))
                n_mask = torch.full((n,), k, dtype=torch.long, device=ids.device)
                remask = confidence_remask(logp, unknown, n_mask, params.gumbel_temperature * (1.0 - ratio), generator)
                ids = torch.where(remask, torch.full_like(sampled, MASK), sampled)
            if trace is not None:
                trace.append(ids.clone())
        return self.unflatten(ids)


class SPAEGenerator(WordGenerator):
    """Causal LM over ``[caption word pieces, pyramid words coarse to fine]``, kv-cache sampling."""

    def logits(self, seq: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Teacher-forced logits [B, T - 1 - start, V]: output ``p`` predicts ``seq[:, start + p + 1]`` (the
        30522-word output layer only where ``start`` says: it is most of a tiny model's step)."""
        return self.net.logits(self.net.hidden(seq[:, :-1], causal=True)[:, start:])

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        ids = self.flatten(self.tokens(batch))
        prompt = self.prompts(batch).ids
        logits = self.logits(torch.cat([prompt, ids], dim=1), prompt.shape[1] - 1)
        nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return StepOutput(loss=nll, recon=None, logs={"nll": nll.detach()})

    @torch.no_grad()
    def generate(self, n: int, prompts: Prompts, params: SamplingConfig, generator: torch.Generator):
        guided = params.cfg is not None
        return self.unflatten(self.autoregress(self.cond_prefix(prompts, guided), self.length, params, generator,
                                               guided))


class UniCodeGenerator(SPAEGenerator):
    """One causal LM on ``[[unused0], caption, image words]`` and ``[[unused1], image words, caption]``."""

    def cond_prefix(self, prompts: Prompts, guided: bool) -> torch.Tensor:
        ids = super().cond_prefix(prompts, guided)
        return torch.cat([torch.full_like(ids[:, :1], GENERATE), ids], dim=1)

    def training_step(self, batch: Dict, step: int) -> StepOutput:
        ids = self.flatten(self.tokens(batch))
        prompt = self.prompts(batch).ids
        L, N = prompt.shape[1], ids.shape[1]
        task = torch.full_like(prompt[:, :1], GENERATE)
        gen = self.logits(torch.cat([task, prompt, ids], dim=1), L)
        gen_nll = F.cross_entropy(gen.flatten(0, 1), ids.flatten())
        caption_ids = encode_prompts(list(batch["caption"]), self.cfg.text_length, ids.device, warn=False).ids
        cap = self.logits(torch.cat([task + 1, ids, caption_ids], dim=1), N + 1)   # predicts caption[1:]
        cap_nll = F.cross_entropy(cap.flatten(0, 1), caption_ids[:, 1:].flatten())
        return StepOutput(loss=(gen_nll + cap_nll) / 2, recon=None,
                          logs={"nll": gen_nll.detach(), "caption_nll": cap_nll.detach()})

    @torch.no_grad()
    def caption(self, images: torch.Tensor, seed: int = 0, temperature: float = 0.0,
                max_length: Optional[int] = None) -> List[str]:
        """Captions of ``images`` [B, 3, H, W] in [-1, 1] (greedy at temperature 0), at most ``max_length``
        WordPiece tokens with [CLS] and [SEP] (default ``text_length``)."""
        r = self.tokenizer.cfg.resolution
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, r, r):
            raise ValueError(f"images must be a tensor [B, 3, {r}, {r}], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        max_length = self.cfg.text_length if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= self.cfg.text_length:
            raise ValueError(f"max_length must be an integer in [2, {self.cfg.text_length}], got {max_length!r}")
        params = SamplingConfig(temperature=temperature).check()
        was_training = self.training
        self.eval()
        try:
            device = self.net.bias.device
            ids = self.flatten(self.tokenizer.encode(images.to(device)))
            prefix = torch.cat([torch.full_like(ids[:, :1], CAPTION), ids, torch.full_like(ids[:, :1], CLS)], 1)
            generator = torch.Generator(device).manual_seed(int(seed))
            out = self.autoregress(prefix, max_length - 1, params, generator, False, stop=SEP)
        finally:
            self.train(was_training)
        tok = text.vocabulary()
        captions = []
        for row in out.tolist():
            row = row[:row.index(SEP)] if SEP in row else row
            captions.append(" ".join(tok[i] for i in row).replace(" ##", ""))
        return captions


MODELS = {"lqae": LQAEGenerator, "spae": SPAEGenerator, "unicode": UniCodeGenerator}

_TINY_TRAIN = TrainConfig(batch_size=32, lr=2e-3, betas=(0.9, 0.96), weight_decay=0.01,
                          warmup_steps=50, min_lr_ratio=0.1, grad_clip=1.0)
# Steps for 5 minutes on both threads of the 2-core machine (40-step trials on shapes): the frozen tokenizer's
# nearest-word search over 30522 words of width 384 (about 1 GFLOP per image) is most of each step: lqae 1.1
# steps/s, spae 0.54 (its pyramid has more words). unicode's search is cheap (codes of width 32), but each step
# runs the 30522-word output layer at its 128 image words and the caption's: 0.43 steps/s in the zoo (160
# steps took 5.9 minutes), so 125.
_TINY_STEPS = {"lqae": 320, "spae": 160, "unicode": 125}
# guesses at a GPT-2-small-like prior: the originals use a frozen LLM (PaLM 2 / LLaMA), not a trained model
_BASE_TRAIN = TrainConfig(steps=500_000, batch_size=256, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          warmup_steps=5000, min_lr_ratio=0.1, grad_clip=1.0)


def _presets() -> Dict[str, Dict[str, Preset]]:
    # tiny: 20 text tokens cover the longest shapes caption (19)
    tiny = WordGeneratorConfig(text_length=20, text_dropout=0.1, dim=128, depth=4, heads=4, dropout=0.0, steps=8)
    base = WordGeneratorConfig(text_length=64)
    return {name: {"tiny": Preset(model=tiny, train=dataclasses.replace(_TINY_TRAIN, steps=_TINY_STEPS[name]),
                                  data=DataConfig(name="shapes", hflip=False)),
                   "base": Preset(model=base, train=_BASE_TRAIN, data=DataConfig(name="captioned/train"))}
            for name in MODELS}


PRESETS = _presets()
