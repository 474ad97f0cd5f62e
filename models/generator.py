"""The contract every stage-2 model (a generator of a tokenizer's codes) keeps, and their registry.

A generator is trained on the codes a frozen, trained tokenizer gives the data set's images
(``python -m models.train SYSTEM --stage generator --tokenizer DIR``) and samples codes that the same
tokenizer decodes into images (``python -m models.sample SYSTEM --ckpt DIR``, or
``models.load(SYSTEM, DIR).sample(...)``). :data:`GENERATORS` names the generator systems: each maps to
the module defining it and the tokenizer system it models.

The tokenizer is held outside the module tree: it is not in the generator's ``state_dict`` or
``parameters()`` (a checkpoint holds the generator alone, keyed as the original's), stays in eval
mode and frozen, and moves with the generator (``.to``, ``.cuda``, ``.half``). Class-conditional
generators (``num_classes > 0``) reserve id ``num_classes`` for the null class of classifier-free
guidance, which label dropout (``class_dropout``) trains.

Text-conditioned generators (``conditioning = "text"``, a config starting with
:class:`TextConditionConfig`) read captions: the WordPiece ids of the frozen MiniLM's tokenizer
(:mod:`models.text`), ``[CLS] words [SEP]`` padded with ``[PAD]`` to ``text_length``
(:class:`Prompts`). The empty caption is the null condition: training replaces a caption by it with
probability ``text_dropout``, and the unconditional pass of classifier-free guidance reads it. A
prompt longer than ``text_length`` is truncated with a warning that says so.

A system may model the codes of several tokenizers (Make-A-Scene: the image's and the scene map's):
its :data:`GENERATORS` entry names them in order and the generator is built as
``cls(cfg, tokenizer, *more_tokenizers)``; ``--tokenizer`` takes one run folder per tokenizer.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .sampling import SamplingConfig, check_labels, drop_labels
from .tokenizer import StepOutput, Tokenizer

# generator system: (the module defining it, the tokenizer system(s) whose codes it models, in the
# order its constructor takes them). Class-conditional (or unconditional) ones:
CLASS_GENERATORS: Dict[str, Tuple[str, ...]] = {
    "vqvae": ("models.pixelcnn", "vqvae"),
    "vqvae2": ("models.pixelcnn", "vqvae2"),
    "vqgan": ("models.gpt", "vqgan"),
    "vit_vqgan": ("models.gpt", "vit_vqgan"),
    "maskgit": ("models.maskgit", "vqgan"),
    "rqvae": ("models.rq_transformer", "rqvae"),
    "hqvae": ("models.hq_transformer", "hqvae"),
    "var": ("models.var", "var_vqvae"),
}
# text-conditioned ones (captions read by MiniLM's WordPiece tokenizer):
TEXT_GENERATORS: Dict[str, Tuple[str, ...]] = {
    "dalle": ("models.dalle", "dvae"),
    "parti": ("models.parti", "vit_vqgan"),
    "make_a_scene": ("models.make_a_scene", "vqgan", "scene"),
    "muse": ("models.muse", "vqgan"),
    "lqae": ("models.word_generators", "lqae"),
    "spae": ("models.word_generators", "spae"),
    "unicode": ("models.word_generators", "unicode"),
}
GENERATORS: Dict[str, Tuple[str, ...]] = {**CLASS_GENERATORS, **TEXT_GENERATORS}


def generator_system(name: str):
    """(generator class, its presets {name: Preset}, tokenizer system) of generator system ``name``;
    the module defines ``MODELS`` and ``PRESETS``, both keyed by system."""
    if name not in GENERATORS:
        raise ValueError(f"system {name!r} has no generator; generators: {', '.join(GENERATORS)}")
    module_name, tokenizer_system = GENERATORS[name][:2]
    module = importlib.import_module(module_name)
    return module.MODELS[name], module.PRESETS[name], tokenizer_system


def tokenizer_systems(name: str) -> Tuple[str, ...]:
    """The tokenizer systems generator system ``name`` is built on, in its constructor's order."""
    if name not in GENERATORS:
        raise ValueError(f"system {name!r} has no generator; generators: {', '.join(GENERATORS)}")
    return tuple(GENERATORS[name][1:])


@dataclass
class ConditionConfig:
    """The class conditioning every generator config starts with (its fields come first)."""
    num_classes: int = 10         # class-conditional on labels 0..num_classes-1 (0: unconditional)
    class_dropout: float = 0.1    # training: share of labels replaced by the null class (classifier-free guidance)


@dataclass
class TextConditionConfig:
    """The text conditioning every text-to-image generator config starts with (its fields come first)."""
    text_length: int = 24         # WordPiece tokens read per caption, [CLS] and [SEP] included
    text_dropout: float = 0.1     # training: share of captions replaced by the empty one (classifier-free guidance)


@dataclass
class Prompts:
    """Captions as a text-conditioned generator reads them: ``ids`` int64 [B, L] (``[CLS] words [SEP]``,
    then ``[PAD]`` = 0), ``mask`` bool [B, L] (True at real tokens), ``texts`` the captions given."""
    texts: List[str]
    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def cat(self, other: "Prompts") -> "Prompts":
        return Prompts(self.texts + other.texts, torch.cat([self.ids, other.ids]), torch.cat([self.mask, other.mask]))


def encode_prompts(texts: Sequence[str], length: int, device="cpu", warn: bool = True) -> Prompts:
    """``texts`` tokenized by the MiniLM package's WordPiece tokenizer into ``length`` ids each; a text
    longer than that is truncated, with a warning naming it when ``warn``."""
    from . import text
    texts = [str(t) for t in texts]
    tok = text.tokenizer()
    ids, mask = tok(texts, max_length=length, pad_to_max_length=True)
    if warn:
        _, full = tok(texts, max_length=1 << 20)
        for t, n, row in zip(texts, full.sum(1).tolist(), ids):
            if n > length:
                kept = " ".join(text.words(row[1:-1])).replace(" ##", "")
                warnings.warn(f"prompt {t!r} is {n} WordPiece tokens with [CLS] and [SEP]; this model reads "
                              f"{length}: truncated to {kept!r}", stacklevel=3)
    return Prompts(texts, ids.to(device), mask.to(device).bool())


@dataclass
class Samples:
    """What :meth:`Generator.sample` returns: ``images`` [n, 3, H, W] in [-1, 1], ``ids`` the codes in
    the tokenizer's ``encode`` format, ``labels`` the classes asked for (None: unconditional or
    text-conditioned), ``prompts`` the captions of a text-conditioned generator."""
    images: torch.Tensor
    ids: Any
    labels: Optional[torch.Tensor]
    prompts: Optional[List[str]] = None


class Generator(nn.Module):
    """Base class of the generators in :mod:`models`.

    Subclasses set ``config_cls`` (a dataclass starting with :class:`ConditionConfig`'s fields, or with
    :class:`TextConditionConfig`'s for ``conditioning = "text"``), build themselves from ``(cfg,
    tokenizer, *more_tokenizers)`` reading the token geometry from the tokenizers, and implement
    :meth:`training_step` (the loss: mean cross-entropy in nats per token; the condition from
    :meth:`labels` or :meth:`prompts`) and :meth:`generate`. ``parallel_decoding`` generators (MaskGIT)
    take ``steps``; the others refuse it.
    """

    config_cls: ClassVar[type]
    parallel_decoding: ClassVar[bool] = False
    conditioning: ClassVar[str] = "class"   # class (labels) | text (prompts)

    def __init__(self, cfg, tokenizer: Tokenizer, *more_tokenizers: Tokenizer):
        super().__init__()
        self.cfg = cfg
        name = type(cfg).__name__
        if self.conditioning == "text":
            if not isinstance(cfg.text_length, int) or cfg.text_length < 2:
                raise ValueError(f"{name}: text_length must be an integer >= 2 ([CLS] and [SEP]), got {cfg.text_length!r}")
            if not 0.0 <= cfg.text_dropout < 1.0:
                raise ValueError(f"{name}: text_dropout must be in [0, 1), got {cfg.text_dropout}")
        else:
            if cfg.num_classes < 0:
                raise ValueError(f"{name}: num_classes must be >= 0 (0: unconditional), got {cfg.num_classes}")
            if not 0.0 <= cfg.class_dropout < 1.0:
                raise ValueError(f"{name}: class_dropout must be in [0, 1), got {cfg.class_dropout}")
        tokenizers = (tokenizer,) + more_tokenizers
        for t in tokenizers:
            t.eval().requires_grad_(False)
        # not submodules: not in state_dict / parameters
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "tokenizers", tokenizers)

    @property
    def num_classes(self) -> int:
        return 0 if self.conditioning == "text" else self.cfg.num_classes

    def _apply(self, fn, recurse=True):
        for t in self.tokenizers:
            t._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.tokenizers:
            t.eval()
        return self

    # ---- training
    @torch.no_grad()
    def tokens(self, batch: Dict[str, Any]):
        """The frozen tokenizer's codes of the batch (its ``encode`` format)."""
        return self.tokenizer.encode(self.tokenizer.inputs(batch))

    def labels(self, batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """The batch's class ids for conditioning (None when unconditional): in training each is replaced
        by the null class with probability ``class_dropout`` (unknown labels always are)."""
        if self.num_classes == 0:
            return None
        labels = batch["label"].long()
        if bool((labels >= self.num_classes).any()):
            raise ValueError(f"a batch label {int(labels.max())} is out of range for {self.num_classes} classes")
        return drop_labels(labels, self.num_classes, self.cfg.class_dropout if self.training else 0.0)

    def prompts(self, batch: Dict[str, Any]) -> Prompts:
        """The batch's captions for a text-conditioned generator: in training each is replaced by the empty
        caption with probability ``text_dropout``. Longer captions are cut to ``text_length`` silently."""
        texts = list(batch["caption"])
        if self.training and self.cfg.text_dropout > 0:
            drop = (torch.rand(len(texts)) < self.cfg.text_dropout).tolist()
            texts = ["" if d else t for t, d in zip(texts, drop)]
        return encode_prompts(texts, self.cfg.text_length, batch["image"].device, warn=False)

    def null_prompts(self, n: int, device) -> Prompts:
        """``n`` empty captions: the unconditional input of classifier-free guidance."""
        return encode_prompts([""] * n, self.cfg.text_length, device, warn=False)

    def forward(self, batch: Dict[str, Any], step: int = 0, discriminate=None) -> StepOutput:
        if discriminate is not None:
            raise NotImplementedError(f"{type(self).__name__} has no discriminator")
        return self.training_step(batch, step)

    def training_step(self, batch: Dict[str, Any], step: int) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def discriminator_parameters(self):
        return []

    def codebook_sizes(self) -> Dict[str, int]:
        return {}

    # ---- sampling
    def sampling_condition(self, n: int, labels, prompt, scene, device):
        """What :meth:`generate` is conditioned on: checked class ids (class-conditional generators) or
        :class:`Prompts` (text; ``prompt`` one string or n, default the empty, unconditional one). Only
        generators that read a scene map (Make-A-Scene) take ``scene`` and override this."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if scene is not None:
            raise ValueError(f"scene: {type(self).__name__} does not read scene maps (make_a_scene does)")
        if self.conditioning == "class":
            if prompt is not None:
                raise ValueError(f"prompt: {type(self).__name__} is conditioned on class labels, not text")
            return check_labels(labels, n, self.num_classes, device)
        if labels is not None:
            raise ValueError(f"labels: {type(self).__name__} is conditioned on text: pass prompt=, not class labels")
        texts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
        texts = list(texts) * n if len(texts) == 1 else list(texts)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} prompts for {n} samples: give one prompt or n")
        return encode_prompts(texts, self.cfg.text_length, device)

    @torch.no_grad()
    def sample(self, n: int = 16, labels=None, *, prompt=None, scene=None, seed: int = 0, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, cfg: Optional[float] = None, cfg_schedule: str = "constant",
               steps: Optional[int] = None, mask_schedule: str = "cosine", gumbel_temperature: float = 4.5,
               use_cache: bool = True) -> Samples:
        """``n`` samples decoded by the tokenizer: of class ``labels`` (one class id or n; default
        ``i % num_classes``), or of ``prompt`` (one caption or n; "" or None: unconditional) for a
        text-conditioned generator, with a ``scene`` map for Make-A-Scene. The draw depends only on
        ``seed`` and the arguments (see :mod:`models.sampling`)."""
        params = SamplingConfig(temperature, top_k, top_p, cfg, cfg_schedule, steps, mask_schedule,
                                gumbel_temperature, use_cache).check()
        if steps is not None and not self.parallel_decoding:
            raise ValueError(f"steps: {type(self).__name__} decodes one token (or scale) at a time; "
                             "only parallel decoders (maskgit, muse, lqae) take steps")
        if cfg is not None and self.conditioning == "class" and self.num_classes == 0:
            raise ValueError("cfg: classifier-free guidance needs a class-conditional generator (num_classes > 0)")
        device = next(self.parameters()).device
        cond = self.sampling_condition(n, labels, prompt, scene, device)
        generator = torch.Generator(device).manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            ids = self.generate(n, cond, params, generator)
            images = self.tokenizer.decode(ids).clamp(-1, 1)
        finally:
            self.train(was_training)
        if isinstance(cond, Prompts):
            return Samples(images=images, ids=ids, labels=None, prompts=cond.texts)
        if self.conditioning == "text":  # a generator whose condition holds prompts and more (a scene)
            return Samples(images=images, ids=ids, labels=None, prompts=cond.prompts.texts)
        return Samples(images=images, ids=ids, labels=cond)

    def generate(self, n: int, cond, params: SamplingConfig,
                 generator: torch.Generator):  # pragma: no cover - abstract
        """Codes of ``n`` samples in the tokenizer's ``encode`` format (eval mode, no autograd), given the
        condition of :meth:`sampling_condition` (class ids, or :class:`Prompts`)."""
        raise NotImplementedError
