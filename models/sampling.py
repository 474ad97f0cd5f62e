"""The sampling code every generator of :mod:`models` shares (one place).

* :class:`SamplingConfig`: what a caller asks of a sampler (temperature, top-k, top-p, classifier-free
  guidance and its schedule, decoding steps, mask schedule, kv-cache), checked by :meth:`SamplingConfig.check`.
* :func:`filter_logits` / :func:`sample_logits`: temperature, top-k and top-p (nucleus) sampling of
  categorical logits, with randomness only from a given ``torch.Generator`` (so a seed fixes the draw).
* :func:`guide` and :func:`guidance_scale`: classifier-free guidance ``uncond + w * (cond - uncond)``
  (``w = 0``: the unconditional model, ``w = 1``: the conditional one, ``w > 1``: guided) with a
  ``constant`` weight or VAR's ``linear`` ramp ``1 + (w - 1) * t`` over the progress ``t`` in [0, 1]
  (VAR's ``t = cfg * ratio`` with our ``w = 1 + cfg``).
* :func:`drop_labels`: label dropout in training (a dropped label becomes the null class ``num_classes``).
* :func:`mask_ratio` (cosine, arccos, linear mask schedules), :func:`gumbel_noise` and
  :func:`confidence_remask` (MaskGIT's re-masking by confidence with annealed Gumbel noise).
* :class:`KVCache`: the key / value cache of every autoregressive transformer in :mod:`models`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

CFG_SCHEDULES = ("constant", "linear")
MASK_SCHEDULES = ("cosine", "arccos", "linear")


@dataclass
class SamplingConfig:
    """A sampling request. ``top_k = 0`` and ``top_p = 1`` switch those filters off; ``temperature = 0``
    is greedy (argmax). ``cfg = None`` samples the conditional model alone (no unconditional pass);
    ``steps`` is the number of parallel decoding steps of MaskGIT (None: its default)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg: Optional[float] = None
    cfg_schedule: str = "constant"
    steps: Optional[int] = None
    mask_schedule: str = "cosine"
    gumbel_temperature: float = 4.5   # MaskGIT's choice temperature, annealed to 0 over the steps
    use_cache: bool = True

    def check(self) -> "SamplingConfig":
        """Raises ValueError naming the first argument out of range; returns self."""
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if self.cfg is not None and not (isinstance(self.cfg, (int, float)) and math.isfinite(self.cfg)):
            raise ValueError(f"cfg must be a finite number (0: unconditional, 1: conditional), got {self.cfg!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {self.mask_schedule!r}")
        if not self.gumbel_temperature >= 0:
            raise ValueError(f"gumbel_temperature must be >= 0, got {self.gumbel_temperature!r}")
        return self


# ---------------------------------------------------------------- categorical sampling

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` [..., V] with every entry outside the ``top_k`` largest and outside the smallest set
    whose probability reaches ``top_p`` set to -inf (the most likely token always stays)."""
    v = logits.shape[-1]
    if top_k and top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        before = probs.cumsum(-1) - probs          # probability of the tokens ranked above each one
        drop_sorted = before >= top_p              # the first token has 0 before it: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, generator: Optional[torch.Generator], temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token id per row of ``logits`` [..., V] (int64 [...]): greedy at temperature 0, else drawn
    from ``softmax(filter_logits(logits / temperature))``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution :func:`sample_logits` draws from (one-hot at the argmax at temperature 0)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


# ---------------------------------------------------------------- classifier-free guidance

def guidance_scale(w: float, schedule: str, progress: float) -> float:
    """The guidance weight at ``progress`` in [0, 1] (first to last step): ``w`` (constant) or
    ``1 + (w - 1) * progress`` (linear: VAR's ramp, conditional at the first step)."""
    if schedule == "constant":
        return float(w)
    if schedule == "linear":
        return 1.0 + (float(w) - 1.0) * float(progress)
    raise ValueError(f"unknown cfg schedule {schedule!r}; schedules: {', '.join(CFG_SCHEDULES)}")


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guided logits ``uncond + w * (cond - uncond)``; exactly ``uncond`` at w = 0 and
    ``cond`` at w = 1."""
    if w == 0:
        return uncond
    if w == 1:
        return cond
    return uncond + w * (cond - uncond)


def with_null_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[labels, null...]``: the batch doubled for one guided pass, the second half the null class."""
    return torch.cat([labels, torch.full_like(labels, num_classes)])


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """Training-time label dropout: each label is replaced by the null class ``num_classes`` with
    probability ``p`` (unknown labels, -1, always are)."""
    labels = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def check_labels(labels, n: int, num_classes: int, device) -> Optional[torch.Tensor]:
    """The class ids to sample, int64 [n] on ``device``: ``labels`` (an int, a sequence or a tensor; one
    label or n), or for a class-conditional model without labels ``i % num_classes``. None for an
    unconditional model (``num_classes = 0``), which takes no labels."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if num_classes == 0:
        if labels is not None:
            raise ValueError("this generator is unconditional (num_classes = 0): it takes no class labels")
        return None
    if labels is None:
        return torch.arange(n, device=device) % num_classes
    t = torch.as_tensor(labels, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"class labels must be integers, got {t.dtype}")
    t = t.reshape(-1).long()
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"{t.numel()} class labels for {n} samples: give one label or n")
    bad = (t < 0) | (t >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"class id {int(t[bad][0])} out of range: this generator has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return t


# ---------------------------------------------------------------- masked (MaskGIT) decoding

def mask_ratio(schedule: str, progress) -> torch.Tensor:
    """The share of tokens still masked at ``progress`` r in [0, 1] (1 at r = 0, 0 at r = 1):
    cosine ``cos(pi r / 2)``, arccos ``arccos(r) / (pi / 2)``, linear ``1 - r``."""
    r = torch.as_tensor(progress, dtype=torch.float64).clamp(0, 1)
    if schedule == "cosine":
        return torch.cos(r * math.pi / 2)
    if schedule == "arccos":
        return torch.arccos(r) / (math.pi / 2)
    if schedule == "linear":
        return 1 - r
    raise ValueError(f"unknown mask schedule {schedule!r}; schedules: {', '.join(MASK_SCHEDULES)}")


def gumbel_noise(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log((-torch.log(u.clamp(1e-20, 1.0))).clamp_min(1e-20))


def confidence_remask(sampled_logp: torch.Tensor, unknown: torch.Tensor, n_mask: torch.Tensor,
                      gumbel_temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """MaskGIT's re-masking: among the tokens that were ``unknown`` (bool [B, N]) before this step, the
    ``n_mask`` (int64 [B]) with the lowest confidence ``log p(sampled) + gumbel_temperature * g`` are
    masked again. Tokens that were known before have infinite confidence and are never re-masked.
    Returns the new mask (bool [B, N])."""
    confidence = sampled_logp.float()
    if gumbel_temperature > 0:
        confidence = confidence + gumbel_temperature * gumbel_noise(confidence.shape, generator, confidence.device)
    confidence = confidence.masked_fill(~unknown, float("inf"))
    n_mask = torch.minimum(n_mask, unknown.sum(-1) - 1).clamp_min(0)  # at least one new token each step
    order = confidence.argsort(dim=-1)                                 # least confident first
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order).contiguous())
    return (ranks < n_mask[:, None]) & unknown


# ---------------------------------------------------------------- key / value cache

class KVCache:
    """Keys and values of the positions seen so far, per layer: an autoregressive transformer's
    attention calls :meth:`update` with the new positions' keys and values ([B, H, T_new, D]) and
    attends to what it returns (all positions so far). ``length`` is the number of cached positions
    (the start position of the next call). :meth:`expand` repeats the batch (e.g. for guidance)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layers
        self.values: List[Optional[torch.Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        k = self.keys[-1] if self.n_layers else None
        return 0 if k is None else k.shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reset(self) -> None:
        self.keys = [None] * self.n_layers
        self.values = [None] * self.n_layers

    def select(self, index: torch.Tensor) -> None:
        """Keeps the batch rows ``index`` (e.g. ``repeat_interleave`` for several draws per prefix)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


def causal_mask(length: int, device, offset: int = 0) -> torch.Tensor:
    """bool [length, offset + length]: query i (at position offset + i) may attend to key j <= offset + i."""
    q = torch.arange(length, device=device)[:, None] + offset
    k = torch.arange(offset + length, device=device)[None, :]
    return k <= q


def block_causal_mask(sizes: Sequence[int], device) -> torch.Tensor:
    """bool [L, L] with L = sum(sizes): a position of block b attends to every position of blocks <= b
    (VAR's attention by scale)."""
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(list(sizes), device=device))
    return block[None, :] <= block[:, None]
