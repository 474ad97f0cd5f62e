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
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from .sampling import SamplingConfig, check_labels, drop_labels
from .tokenizer import StepOutput, Tokenizer

# generator system: (the module defining it, the tokenizer system whose codes it models)
GENERATORS: Dict[str, Tuple[str, str]] = {
    "vqvae": ("models.pixelcnn", "vqvae"),
    "vqvae2": ("models.pixelcnn", "vqvae2"),
    "vqgan": ("models.gpt", "vqgan"),
    "vit_vqgan": ("models.gpt", "vit_vqgan"),
    "maskgit": ("models.maskgit", "vqgan"),
    "rqvae": ("models.rq_transformer", "rqvae"),
    "hqvae": ("models.hq_transformer", "hqvae"),
    "var": ("models.var", "var_vqvae"),
}


def generator_system(name: str):
    """(generator class, its presets {name: Preset}, tokenizer system) of generator system ``name``;
    the module defines ``MODELS`` and ``PRESETS``, both keyed by system."""
    if name not in GENERATORS:
        raise ValueError(f"system {name!r} has no generator; generators: {', '.join(GENERATORS)}")
    module_name, tokenizer_system = GENERATORS[name]
    module = importlib.import_module(module_name)
    return module.MODELS[name], module.PRESETS[name], tokenizer_system


@dataclass
class ConditionConfig:
    """The class conditioning every generator config starts with (its fields come first)."""
    num_classes: int = 10         # class-conditional on labels 0..num_classes-1 (0: unconditional)
    class_dropout: float = 0.1    # training: share of labels replaced by the null class (classifier-free guidance)


@dataclass
class Samples:
    """What :meth:`Generator.sample` returns: ``images`` [n, 3, H, W] in [-1, 1], ``ids`` the codes in
    the tokenizer's ``encode`` format, ``labels`` the classes asked for (None: unconditional)."""
    images: torch.Tensor
    ids: Any
    labels: Optional[torch.Tensor]


class Generator(nn.Module):
    """Base class of the generators in :mod:`models`.

    Subclasses set ``config_cls`` (a dataclass with at least ``num_classes`` and ``class_dropout``),
    build themselves from ``(cfg, tokenizer)`` reading the token geometry from the tokenizer, and
    implement :meth:`training_step` (the loss: mean cross-entropy in nats per token; labels from
    :meth:`labels`) and :meth:`generate`. ``parallel_decoding`` generators (MaskGIT) take ``steps``;
    the others refuse it.
    """

    config_cls: ClassVar[type]
    parallel_decoding: ClassVar[bool] = False

    def __init__(self, cfg, tokenizer: Tokenizer):
        super().__init__()
        self.cfg = cfg
        if cfg.num_classes < 0:
            raise ValueError(f"{type(cfg).__name__}: num_classes must be >= 0 (0: unconditional), got {cfg.num_classes}")
        if not 0.0 <= cfg.class_dropout < 1.0:
            raise ValueError(f"{type(cfg).__name__}: class_dropout must be in [0, 1), got {cfg.class_dropout}")
        tokenizer.eval().requires_grad_(False)
        object.__setattr__(self, "tokenizer", tokenizer)  # not a submodule: not in state_dict / parameters

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def _apply(self, fn, recurse=True):
        self.tokenizer._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()
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
    @torch.no_grad()
    def sample(self, n: int = 16, labels=None, *, seed: int = 0, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, cfg: Optional[float] = None, cfg_schedule: str = "constant",
               steps: Optional[int] = None, mask_schedule: str = "cosine", gumbel_temperature: float = 4.5,
               use_cache: bool = True) -> Samples:
        """``n`` samples (of ``labels``: one class id or n; default ``i % num_classes``), decoded by the
        tokenizer. The draw depends only on ``seed`` and the arguments (see :mod:`models.sampling`)."""
        params = SamplingConfig(temperature, top_k, top_p, cfg, cfg_schedule, steps, mask_schedule,
                                gumbel_temperature, use_cache).check()
        if steps is not None and not self.parallel_decoding:
            raise ValueError(f"steps: {type(self).__name__} decodes one token (or scale) at a time; "
                             "only parallel decoders (maskgit) take steps")
        if cfg is not None and self.num_classes == 0:
            raise ValueError("cfg: classifier-free guidance needs a class-conditional generator (num_classes > 0)")
        device = next(self.parameters()).device
        labels = check_labels(labels, n, self.num_classes, device)
        generator = torch.Generator(device).manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            ids = self.generate(n, labels, params, generator)
            images = self.tokenizer.decode(ids).clamp(-1, 1)
        finally:
            self.train(was_training)
        return Samples(images=images, ids=ids, labels=labels)

    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator):  # pragma: no cover - abstract
        """Codes of ``n`` samples in the tokenizer's ``encode`` format (eval mode, no autograd)."""
        raise NotImplementedError
