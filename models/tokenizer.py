"""The contract every stage-1 model (image tokenizer) keeps, so one trainer, one evaluator and the
generators of the later stages can drive all of them.

Images are float tensors ``[B, C, H, W]`` in ``[-1, 1]`` (C = 3 for pictures; the ``scene``
tokenizer takes one-hot maps). A batch is a dict from :mod:`models.data`: ``image`` always,
``label`` (int64 [B], -1 when unknown), ``caption`` (list of str, "" when none) and ``scene``
(int64 [B, H, W]) where the data set has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn


@dataclass
class StepOutput:
    """What a training forward returns."""
    loss: torch.Tensor                       # the autoencoder's (generator's) loss, a scalar to minimise
    recon: torch.Tensor                      # the reconstruction, in the input's space
    indices: Dict[str, torch.Tensor] = field(default_factory=dict)  # code ids per codebook level (-1: none)
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)     # scalars to log (detached)


class Tokenizer(nn.Module):
    """Base class of the image tokenizers in ``models``.

    All of a model's state lives in its parameters and buffers and its schedules are functions of
``step`` (so a resumed run continues bit for bit); every rank logs the same keys at a step; GAN
models log the discriminator's logits and the adaptive weight.

Subclasses set ``config_cls`` (their dataclass), build themselves from one config instance,
    and implement :meth:`training_step`, :meth:`encode` and :meth:`decode`; models with a GAN loss also
    implement :meth:`discriminator_parameters` and :meth:`discriminator_loss`.
    """

    config_cls: ClassVar[type]

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    # ---- data ----
    def inputs(self, batch: Dict[str, Any]) -> torch.Tensor:
        """The tensor this model encodes, from a data batch (default: the images)."""
        return batch["image"]

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """A [B, 3, H, W] picture in [-1, 1] of an input or a reconstruction, for grids."""
        return x.clamp(-1, 1)

    # ---- training ----
    def forward(self, batch: Dict[str, Any], step: int = 0, discriminate: Optional[StepOutput] = None):
        """The training forward: :meth:`training_step`, or with ``discriminate`` (the generator's
        output for this batch) :meth:`discriminator_loss`. One entry point, so that a
        DistributedDataParallel wrapper sees both passes."""
        if discriminate is not None:
            return self.discriminator_loss(batch, discriminate, step)
        return self.training_step(batch, step)

    def training_step(self, batch: Dict[str, Any], step: int) -> StepOutput:  # pragma: no cover - abstract
        """Reconstruct the batch's :meth:`inputs`; ``step`` drives schedules (temperatures, GAN start)."""
        raise NotImplementedError

    def discriminator_parameters(self) -> List[nn.Parameter]:
        """Parameters the trainer's second optimizer updates (none without a GAN loss)."""
        return []

    def discriminator_loss(self, batch: Dict[str, Any], out: StepOutput, step: int
                           ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The discriminator's loss for this batch and the generator's output (GAN models only)."""
        raise NotImplementedError(f"{type(self).__name__} has no discriminator")

    # ---- tokens ----
    def encode(self, x: torch.Tensor):  # pragma: no cover - abstract
        """Code ids of ``x``, batch first: one int64 tensor per :meth:`codebook_sizes` level, as a tuple
        in that order, or one tensor with the levels stacked on its last dimension (one tensor also for
        a single level)."""
        raise NotImplementedError

    def decode(self, indices) -> torch.Tensor:  # pragma: no cover - abstract
        """The reconstruction from what :meth:`encode` returned."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode reconstruction (default: ``decode(encode(x))``)."""
        return self.decode(self.encode(x))

    def codebook_sizes(self) -> Dict[str, int]:
        """Codes per level, keyed as :attr:`StepOutput.indices` (empty for a model without codes)."""
        return {}
