"""``python -m models.bench``: each tokenizer's training step with our quantizer layers against the
same model with the baseline quantizer swapped in.

    python -m models.bench                       # every entry, codebooks of 1024 and 16384
    python -m models.bench --quick               # 3 timed steps, codebook 1024 only: a smoke run
    python -m models.bench --systems vqvae,rqvae --sizes 1024
    python -m models.bench --cpu-time --threads 1  # on a busy machine: process CPU time, one thread

What is compared. For every entry of :data:`models.zoo.ENTRIES` with a quantizer (the systems and
the zoo's variants, e.g. ``vqvae_codebook_loss``), the ``tiny`` preset's model is built twice from the same
seed at each codebook size (every ``codebook_size*`` / ``vocab_size`` / ``n_embed`` field of its
config set to it; LQAE, SPAE and UniCode keep their frozen 30522-word MiniLM vocabulary): once as
written (our layers), once with the baseline quantizer swapped in, which then loads the first
model's state. The baselines (:data:`KINDS`):

* ``vqkernels.nn.VectorQuantize`` / ``ResidualVQ`` -> vector-quantize-pytorch's class of the same
  name built with the same keywords (ours are drop-ins with its state_dict); our ``frozen_codebook``
  (LQAE's and SPAE's word tables) becomes its ``freeze_codebook=True``, and its ResidualVQ gets image
  feature maps as token sequences (its own ``accept_image_fmap`` fails in version 1.32);
* ``vqkernels.nn.VectorQuantizer``, ``GumbelQuantize``, ``MultiScaleVQ`` and the op
  ``vqkernels.gumbel_quantize`` -> the originals' code in plain PyTorch (:mod:`vqkernels.bench.plain`:
  taming's ``VectorQuantizer2`` and ``GumbelQuantize``, VAR's per-scale loop, DALL-E's Gumbel
  arithmetic on the caller's noise).

The swap replaces the names the ``models`` modules imported (``models.<system>.VectorQuantize =
vector_quantize_pytorch.VectorQuantize``) while the baseline model is built and while it steps.
Before timing, the pair is checked to be the same model: a training forward in eval mode (no
codebook update) from the same RNG state must give losses within :data:`LOSS_TOLERANCE` (relative)
and at least :data:`MIN_AGREEMENT` equal code ids (near-ties may go either way: at K = 16384 a few
codes in a thousand do), and the baseline must call no ``torch.ops.vqkernels`` op (else our
kernels would still be in it); a pair that fails is reported, not timed. Then each takes one
training step from the same RNG state; its loss difference is reported too. It can exceed the
tolerance where the codebook updates inside the step differ: vector-quantize-pytorch's ResidualVQ
with a shared codebook restarts dead codes after each depth (ours after all depths), so its later
depths search another codebook.

The step: the trainer's (:mod:`models.train`) optimizer step without data loading, statistics and
logging: ``model(batch, step)``, backward, gradient-norm clipping (``train.grad_clip``; the norm is
computed also when it is 0), AdamW step; for GAN models the same for the discriminator. The
quantizers' codebook updates happen inside their forward. ``step`` is the middle of the preset's
training (schedules mid-way; GAN terms on where they have started by then). The batch: the first
``--batch-size`` training items of the preset's data set. With ``--threads`` (default 2) torch
threads, both models get ``--warmup`` untimed steps, then ``--repeats`` timed steps each, the two
alternating (drift on a shared machine hits both alike); the table gives medians and the speedup
baseline / ours. Only ratios from the same run mean anything. The steps are timed by the wall clock,
or with ``--cpu-time`` by the process's CPU time, which time spent descheduled does not count (on a
machine shared with busy processes; with ``--threads 1``, since idle OpenMP threads spin on a CPU).

The quantizer's share of the step: the wall time inside the quantizer calls (their forward, plus
their backward: from the moment the gradient reaches a call's outputs to the moment it leaves
through its inputs, noted by identity autograd nodes, which cost microseconds) divided by the step's
time, median over the timed steps. Of the nodes ready to run, the autograd engine runs the one
created last, so that window holds the quantizer's backward and nothing of the encoder or decoder.
On CUDA each note synchronizes the device, which the timed step then pays too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vqkernels
from vqkernels import info as vq_info
from vqkernels.bench.harness import THREADS, version
from vqkernels.bench.plain import (PlainGumbelQuantize, PlainMultiScaleVQ, PlainVectorQuantizer,
                                   plain_gumbel_quantize)
from vqkernels.nn import GumbelQuantize, MultiScaleVQ, ResidualVQ, VectorQuantize, VectorQuantizer

from . import system as load_system
from .config import RunConfig, apply_overrides, parse_set_items
from .data import build_dataset, collate
from .eval import to_device
from .tokenizer import StepOutput, Tokenizer
from .zoo import ENTRIES, RESULTS, Entry, write_section

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SIZES = (1024, 16384)
FIXED_VOCABULARY = ("lqae", "spae", "unicode")  # frozen MiniLM word tables: benchmarked at their own size
SIZE_FIELD = re.compile(r"^(codebook_size\w*|vocab_size|n_embed)$")
BATCH_SIZE, WARMUP, REPEATS, QUICK_REPEATS = 16, 3, 10, 3
LOSS_TOLERANCE = 1e-4  # |ours - baseline| / max(1, |ours|) of the eval-mode loss for "the same model"
MIN_AGREEMENT = 0.99   # share of equal code ids in the eval-mode forward (near-ties may go either way)


def _vqp(name: str) -> type:
    """vector-quantize-pytorch's class ``name`` (imported when a baseline is built)."""
    return getattr(importlib.import_module("vector_quantize_pytorch"), name)


@functools.lru_cache(maxsize=None)
def _vqp_vector_quantize():
    """vector-quantize-pytorch's VectorQuantize also taking our ``frozen_codebook`` (LQAE / SPAE word
    tables): as its ``freeze_codebook=True`` with ``codebook_dim`` the table's width, the table copied into
    its codebook (unit rows for a cosine codebook, as its own) and, as in ours, not part of the
    state_dict (so our model's state loads into it)."""
    class VQPVectorQuantize(_vqp("VectorQuantize")):
        def __init__(self, dim, codebook_size, frozen_codebook=None, **kwargs):
            if frozen_codebook is not None:
                kwargs.update(codebook_dim=frozen_codebook.shape[1], freeze_codebook=True)
            super().__init__(dim, codebook_size, **kwargs)
            if frozen_codebook is not None:
                cb = self._codebook
                table = F.normalize(frozen_codebook, dim=-1) if kwargs.get("use_cosine_sim") else frozen_codebook
                with torch.no_grad():  # its cosine codebook keeps unit rows (ours normalises in the search)
                    cb.embed.copy_(table.reshape(cb.embed.shape))
                cb._non_persistent_buffers_set.update(("embed", "embed_avg"))
    return VQPVectorQuantize


@functools.lru_cache(maxsize=None)
def _vqp_residual_vq():
    """vector-quantize-pytorch's ResidualVQ taking image feature maps [B, C, H, W] as tokens [B, H * W, C]
    around its forward (its own ``accept_image_fmap=True`` fails in its forward, version 1.32)."""
    class VQPResidualVQ(_vqp("ResidualVQ")):
        def __init__(self, *, accept_image_fmap=False, **kwargs):
            super().__init__(**kwargs)
            self.image_fmap = accept_image_fmap

        def forward(self, x, **kwargs):
            if not self.image_fmap:
                return super().forward(x, **kwargs)
            b, c, h, w = x.shape
            q, ids, losses = super().forward(x.flatten(2).transpose(1, 2), **kwargs)
            return q.transpose(1, 2).reshape(b, c, h, w), ids.view(b, h, w, -1), losses
    return VQPResidualVQ


@dataclass(frozen=True)
class Kind:
    """One of our quantizers (a class or an op the ``models`` modules import) and its baseline."""
    ours: Any
    baseline: Callable[[], Any]            # -> the baseline class / function (imported when needed)
    describe: str                          # the baseline, for the table
    methods: Tuple[str, ...] = ("forward",)  # a class's methods that count as quantizer time

    @property
    def name(self) -> str:
        return self.ours.__name__

    @property
    def is_class(self) -> bool:
        return isinstance(self.ours, type)


KINDS: Tuple[Kind, ...] = (
    Kind(VectorQuantize, _vqp_vector_quantize, "vector-quantize-pytorch VectorQuantize"),
    Kind(ResidualVQ, _vqp_residual_vq, "vector-quantize-pytorch ResidualVQ"),
    Kind(VectorQuantizer, lambda: PlainVectorQuantizer, "taming VectorQuantizer2 (plain PyTorch)"),
    Kind(GumbelQuantize, lambda: PlainGumbelQuantize, "taming GumbelQuantize (plain PyTorch)"),
    Kind(vqkernels.gumbel_quantize, lambda: plain_gumbel_quantize, "F.gumbel_softmax arithmetic (plain PyTorch)"),
    Kind(MultiScaleVQ, lambda: PlainMultiScaleVQ, "VAR VectorQuantizer2 loop (plain PyTorch)",
         methods=("forward", "f_to_idxBl_or_fhat")),
)


# ---------------------------------------------------------------------------- timing the quantizer

class _Marker(torch.autograd.Function):
    """Identity whose backward notes when the gradient passes (``QuantizerClock`` windows)."""

    @staticmethod
    def forward(ctx, x, note):
        ctx.note = note
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.note()
        return grad, None


class QuantizerClock:
    """Time (by ``timer``) spent in quantizer calls during one step: the time inside each call, and
    per call the backward window from the first gradient reaching an output to the last leaving
    through an input (see the module docstring). ``calls`` counts the calls per kind name."""

    def __init__(self, device: torch.device = torch.device("cpu"), timer: Callable[[], float] = time.perf_counter):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.timer = timer
        self.reset()

    def reset(self):
        self.forward_s = 0.0
        self.windows: List[List[float]] = []
        self.calls: Dict[str, int] = {}

    def _now(self) -> float:
        self._sync()
        return self.timer()

    def _mark(self, value, note):
        if isinstance(value, torch.Tensor):
            return _Marker.apply(value, note) if value.requires_grad and torch.is_grad_enabled() else value
        if isinstance(value, (tuple, list)):
            marked = [self._mark(v, note) for v in value]
            return type(value)(*marked) if hasattr(value, "_fields") else type(value)(marked)
        if isinstance(value, dict):
            return {k: self._mark(v, note) for k, v in value.items()}
        return value

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` timed as a call of quantizer kind ``name``."""
        def timed(*args, **kwargs):
            window = [math.inf, -math.inf]

            def output_reached():
                window[0] = min(window[0], self._now())

            def input_left():
                window[1] = max(window[1], self._now())
            args, kwargs = self._mark(args, input_left), self._mark(kwargs, input_left)
            start = self._now()
            out = fn(*args, **kwargs)
            self.forward_s += self._now() - start
            self.windows.append(window)
            self.calls[name] = self.calls.get(name, 0) + 1
            return self._mark(out, output_reached)
        return timed

    def seconds(self) -> float:
        """Quantizer time of the step: forwards plus the backward windows that were reached."""
        return self.forward_s + sum(max(0.0, end - start) for start, end in self.windows if start < math.inf)


def _outermost(model: nn.Module, classes: Tuple[type, ...]) -> List[nn.Module]:
    """The modules of ``model`` that are instances of ``classes`` and not inside another one."""
    found: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and not any(name.startswith(f"{p}.") for p, _ in found):
            found.append((name, module))
    return [m for _, m in found]


def time_quantizers(model: nn.Module, clock: QuantizerClock, kinds: Dict[type, Kind]):
    """Wraps the quantizer methods of every outermost instance of the classes in ``kinds``
    (class -> its kind) in ``clock`` (instance attributes: the class is untouched)."""
    for module in _outermost(model, tuple(kinds)):
        kind = next(k for cls, k in kinds.items() if isinstance(module, cls))
        for method in kind.methods:
            setattr(module, method, clock.wrap(kind.name, getattr(module, method)))


# ---------------------------------------------------------------------------- swapping the quantizer

def model_namespaces() -> List[Any]:
    """The loaded ``models`` modules but this one: where a system's module (and the helpers it imports)
    find our layers."""
    return [m for name, m in sorted(sys.modules.items())
            if m is not None and (name == "models" or name.startswith("models.")) and name != __name__]


@contextlib.contextmanager
def patched(replacements: Dict[int, Any], namespaces: Iterable[Any]):
    """Within the block, every global of ``namespaces`` whose value is an object ``o`` with ``id(o)``
    in ``replacements`` holds ``replacements[id(o)]``."""
    undo = []
    for ns in namespaces:
        for name, value in list(vars(ns).items()):
            if id(value) in replacements:
                undo.append((ns, name, value))
                setattr(ns, name, replacements[id(value)])
    try:
        yield
    finally:
        for ns, name, value in reversed(undo):
            setattr(ns, name, value)


class _OpRecorder(TorchDispatchMode):
    """Records the ``torch.ops.vqkernels`` ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vqkernels":
            self.ops.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------- one side of a comparison

@dataclass
class Side:
    """A model, its optimizers and clock, and the name replacements in force while it is built and steps."""
    model: Tokenizer
    replacements: Dict[int, Any]
    clock: QuantizerClock
    namespaces: List[Any]
    optimizers: List[torch.optim.Optimizer] = field(default_factory=list)
    params: List[List[nn.Parameter]] = field(default_factory=list)

    def context(self):
        return patched(self.replacements, self.namespaces)


def build_side(factory: Callable[[], Tokenizer], kinds: Sequence[Kind], baseline: bool, namespaces: List[Any],
               device: torch.device, seed: int) -> Side:
    """The model of ``factory`` built from ``seed`` (with the baselines of ``kinds`` swapped in when
    ``baseline``), its quantizers timed by a fresh clock."""
    clock = QuantizerClock(device)
    replacements = {}
    for kind in kinds:
        target = kind.baseline() if baseline else kind.ours
        replacements[id(kind.ours)] = target if kind.is_class else clock.wrap(kind.name, target)
    side = Side(None, replacements, clock, namespaces)
    with side.context():
        torch.manual_seed(seed)
        side.model = factory().to(device).train()
    time_quantizers(side.model, clock, {replacements[id(k.ours)]: k for k in kinds if k.is_class})
    return side


def add_optimizers(side: Side, train):
    """AdamW over the generator's and (GAN models) the discriminator's parameters, as the trainer."""
    disc = [p for p in side.model.discriminator_parameters() if p.requires_grad]
    disc_ids = {id(p) for p in disc}
    gen = [p for p in side.model.parameters() if p.requires_grad and id(p) not in disc_ids]
    adamw = dict(betas=train.betas, weight_decay=train.weight_decay)
    side.params = [gen] + ([disc] if disc else [])
    side.optimizers = [torch.optim.AdamW(gen, lr=train.lr, **adamw)]
    if disc:
        side.optimizers.append(torch.optim.AdamW(disc, lr=train.disc_lr or train.lr, **adamw))


def train_step(side: Side, batch: Dict[str, Any], step: int, grad_clip: float) -> List[float]:
    """One optimizer step (see the module docstring), inside ``side.context()``; the losses
    [generator, discriminator]."""
    clip = grad_clip if grad_clip > 0 else math.inf
    side.optimizers[0].zero_grad(set_to_none=True)
    out = side.model(batch, step)
    out.loss.backward()
    nn.utils.clip_grad_norm_(side.params[0], clip)
    side.optimizers[0].step()
    losses = [out.loss.detach()]
    if len(side.optimizers) > 1:
        side.optimizers[1].zero_grad(set_to_none=True)
        d_loss, _ = side.model(batch, step, discriminate=out)
        d_loss.backward()
        nn.utils.clip_grad_norm_(side.params[1], clip)
        side.optimizers[1].step()
        losses.append(d_loss.detach())
    return [float(v) for v in losses]


def first_train_step(side: Side, batch, train, step: int, seed: int) -> List[float]:
    """The side's optimizers and its first training step from the RNG state ``seed``."""
    add_optimizers(side, train)
    torch.manual_seed(seed)
    with side.context():
        return train_step(side, batch, step, train.grad_clip)


# ---------------------------------------------------------------------------- one model, ours vs baseline

@dataclass
class Comparison:
    """What :func:`first_step` and :func:`time_sides` found for one model."""
    quantizers: str = ""               # our quantizer calls in a training forward, e.g. "VectorQuantize x2"
    baseline: str = ""                 # the baselines' description
    eval_difference: Optional[float] = None   # eval-mode forward: relative difference of the losses
    agreement: Optional[float] = None         # eval-mode forward: share of equal code ids
    train_difference: Optional[float] = None  # first training step: relative difference of the losses
    codebook_sizes: List[int] = field(default_factory=list)  # the distinct K of our model's levels
    note: str = ""                     # why there is no timing, or what to know about the row
    ours_ms: Optional[float] = None
    baseline_ms: Optional[float] = None
    share_ours: Optional[float] = None
    share_baseline: Optional[float] = None

    @property
    def speedup(self) -> Optional[float]:
        return self.baseline_ms / self.ours_ms if self.ours_ms and self.baseline_ms else None


def relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max over the pairs of |a - b| / max(1, |a|)."""
    return max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b))


def agreement(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """The share of equal code ids over all levels of two StepOutput.indices (0 when their levels or
    shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return 0.0
    total = sum(a[k].numel() for k in a)
    return sum(int((a[k] == b[k]).sum()) for k in a) / max(total, 1)


def _calls(clock: QuantizerClock) -> str:
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(clock.calls.items()))


def eval_forward(side: Side, batch, step: int, seed: int) -> StepOutput:
    """The model's training forward in eval mode without gradients: no codebook update, no state change."""
    side.model.eval()
    try:
        with side.context(), torch.no_grad():
            torch.manual_seed(seed)
            out = side.model(batch, step)
    finally:
        side.model.train()
    return out


def first_step(factory: Callable[[], Tokenizer], batch, train, step: int, kinds: Sequence[Kind] = KINDS,
               namespaces: Optional[List[Any]] = None, device="cpu", seed: int = 0
               ) -> Tuple[Comparison, Optional[Tuple[Side, Side]]]:
    """Builds ours and the baseline-swapped model of ``factory`` (the same state) and compares them:
    the eval-mode forward (the quantization arithmetic: the losses within :data:`LOSS_TOLERANCE`, at
    least :data:`MIN_AGREEMENT` of the code ids equal, and no vqkernels op in the baseline), then one
    training step from the same RNG state (its loss difference is reported; the codebook updates
    inside it may legitimately differ). Returns the comparison and the two sides, ready to time
    (None when there is nothing to time)."""
    device = torch.device(device)
    namespaces = model_namespaces() if namespaces is None else namespaces
    ours = build_side(factory, kinds, False, namespaces, device, seed)
    initial = {k: v.clone() for k, v in ours.model.state_dict().items()}
    eval_ours = eval_forward(ours, batch, step, seed)
    result = Comparison(quantizers=_calls(ours.clock),
                        codebook_sizes=sorted(set(ours.model.codebook_sizes().values())))
    used = [k for k in kinds if k.name in ours.clock.calls]
    if not used:
        result.note = "no quantizer"
        return result, None
    result.baseline = "; ".join(k.describe for k in used)
    loss_ours = first_train_step(ours, batch, train, step, seed + 1)
    try:
        base = build_side(factory, used, True, namespaces, device, seed)
        base.model.load_state_dict(initial)
        with _OpRecorder() as recorder:
            eval_base = eval_forward(base, batch, step, seed)
            loss_base = first_train_step(base, batch, train, step, seed + 1)
        result.eval_difference = relative_difference([float(eval_ours.loss)], [float(eval_base.loss)])
        result.agreement = agreement(eval_ours.indices, eval_base.indices)
        result.train_difference = relative_difference(loss_ours, loss_base)
    except Exception as exc:  # the baseline cannot take this configuration (e.g. a frozen word table)
        result.note = f"no baseline: {type(exc).__name__}: {_first_line(exc)}"
        return result, None
    if recorder.ops:
        result.note = f"no baseline: the swapped model still calls {', '.join(sorted(recorder.ops))}"
    elif not (result.eval_difference <= LOSS_TOLERANCE and result.agreement >= MIN_AGREEMENT):
        result.note = (f"not the same model: eval-mode loss difference {result.eval_difference:.2g} (at most "
                       f"{LOSS_TOLERANCE:g}), {100 * result.agreement:.1f}% equal codes (at least "
                       f"{100 * MIN_AGREEMENT:g}%)")
    else:
        if result.train_difference > LOSS_TOLERANCE:
            result.note = (f"first training step's loss differs by {result.train_difference:.2g}: the codebook "
                           "updates inside the step differ")
        return result, (ours, base)
    return result, None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:120]


def time_sides(sides: Tuple[Side, Side], batch, train, step: int, repeats: int, warmup: int,
               timer: Callable[[], float] = time.perf_counter) -> List[Tuple[float, float]]:
    """(median seconds, median quantizer share) of each side's step by ``timer`` (wall or process CPU
    time): ``warmup`` untimed steps each, then ``repeats`` timed steps each, the sides alternating."""
    for _ in range(warmup):
        for side in sides:
            with side.context():
                train_step(side, batch, step, train.grad_clip)
    seconds: List[List[float]] = [[] for _ in sides]
    shares: List[List[float]] = [[] for _ in sides]
    for _ in range(repeats):
        for i, side in enumerate(sides):
            side.clock.reset()
            side.clock.timer = timer
            with side.context():
                start = timer()
                train_step(side, batch, step, train.grad_clip)
                elapsed = timer() - start
            seconds[i].append(elapsed)
            shares[i].append(side.clock.seconds() / elapsed)
    return [(statistics.median(s), statistics.median(q)) for s, q in zip(seconds, shares)]


# ---------------------------------------------------------------------------- the entries

@dataclass
class Row:
    """One table row: an entry at one codebook size."""
    entry: str
    size: str                                  # the codebook size(s) benchmarked
    result: Comparison = field(default_factory=Comparison)


def size_fields(cfg) -> List[str]:
    """The config's codebook-size fields (:data:`SIZE_FIELD` names of type int)."""
    return [f.name for f in dataclasses.fields(cfg)
            if SIZE_FIELD.match(f.name) and isinstance(getattr(cfg, f.name), int)]


def entry_run(entry: Entry) -> RunConfig:
    """The entry's tiny preset with its overrides."""
    preset = load_system(entry.system).PRESETS["tiny"]
    run = RunConfig(entry.system, "tiny", preset.model, preset.train, preset.data)
    return apply_overrides(run, parse_set_items(entry.sets))


_BATCHES: Dict[Tuple[str, int, int], Dict[str, Any]] = {}


def preset_batch(data, resolution: int, batch_size: int) -> Dict[str, Any]:
    """The first ``batch_size`` training items of a data set (no augmentation), collated (cached)."""
    key = (repr(data), resolution, batch_size)
    if key not in _BATCHES:
        dataset = build_dataset(data, resolution, "train")
        _BATCHES[key] = collate([dataset[i] for i in range(batch_size)])
    return _BATCHES[key]


def bench_entry(entry: Entry, size: Optional[int], batch_size: int, repeats: int, warmup: int, device="cpu",
                timer: Callable[[], float] = time.perf_counter) -> Row:
    """One row: the entry's tiny model at codebook ``size`` (None: the preset's own sizes), ours vs
    the baseline, timed by ``timer``."""
    run = entry_run(entry)
    cfg = run.model
    fields = size_fields(cfg)
    if size is not None:
        cfg = dataclasses.replace(cfg, **{f: size for f in fields})
    model_cls = load_system(entry.system).Model
    batch = to_device(preset_batch(run.data, cfg.resolution, batch_size), device)
    step = run.train.steps // 2
    result, sides = first_step(lambda: model_cls(cfg), batch, run.train, step, device=device, seed=run.train.seed)
    row = Row(entry.name, "/".join(str(k) for k in result.codebook_sizes) or "-", result)
    if size is not None and result.codebook_sizes != [size]:
        result.note = f"codebook sizes {result.codebook_sizes} do not follow the fields {fields} set to {size}"
    elif sides is not None:
        (result.ours_ms, result.share_ours), (result.baseline_ms, result.share_baseline) = [
            (seconds * 1e3, share) for seconds, share in time_sides(sides, batch, run.train, step, repeats, warmup,
                                                                    timer)]
    return row


def plan(names: Sequence[str], sizes: Sequence[int]) -> List[Tuple[Entry, Optional[int]]]:
    """(entry, codebook size) pairs to run: every size for a system whose codebook size is set by its
    config, its own size (None) for the frozen-vocabulary systems."""
    entries = {e.name: e for e in ENTRIES}
    out = []
    for name in names:
        entry = entries[name]
        out += [(entry, None)] if entry.system in FIXED_VOCABULARY else [(entry, k) for k in sizes]
    return out


# ---------------------------------------------------------------------------- the report

def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def _share(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2g}%"


def _diff(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1g}"


def table(rows: Sequence[Row]) -> str:
    lines = ["| entry | quantizer (calls per step) | K | ours ms | baseline | baseline ms | speedup | "
             "quantizer share ours / baseline | eval loss diff / equal codes / train loss diff | note |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        r = row.result
        speedup = f"{r.speedup:.2f}x" if r.speedup else "-"
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        lines.append(f"| `{row.entry}` | {r.quantizers or '-'} | {row.size} | {_ms(r.ours_ms)} | {r.baseline or '-'} | "
                     f"{_ms(r.baseline_ms)} | {speedup} | {_share(r.share_ours)} / {_share(r.share_baseline)} | "
                     f"{_diff(r.eval_difference)} / {agree} / {_diff(r.train_difference)} | {r.note} |")
    return "\n".join(lines)


def machine_facts(batch_size: int, repeats: int, warmup: int, device: str, cpu_time: bool) -> List[str]:
    facts = dict(vq_info.report()[0])
    keep = ("torch", "CPU", "CPU AVX2+FMA / AVX-512F", "CPU kernels ISA", "CUDA device")
    lines = [f"- {k}: {facts[k]}" for k in keep if k in facts]
    return lines + [f"- vector-quantize-pytorch: {version('vector-quantize-pytorch')}",
                    f"- device {device}, batch {batch_size}, {warmup} warm-up + {repeats} timed steps per model, "
                    f"{'process CPU' if cpu_time else 'wall-clock'} time, "
                    f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]


def render(rows: Sequence[Row], command: str, facts: Sequence[str]) -> str:
    lines = [START, "", "## Training step: our quantizer layers vs the baseline quantizers", "",
             f"`{command}`: each tiny model's full training step (forward, backward, optimizer step, codebook "
             "updates) with our layers and with the baseline quantizer swapped in, same state and batch, the two "
             "alternating; medians. Speedup = baseline / ours. Quantizer share = time inside the quantizer's "
             "forward and backward / step time. The pair is the same model: an eval-mode forward gives losses "
             f"within {LOSS_TOLERANCE:g} (relative) and at least {100 * MIN_AGREEMENT:g}% equal codes (near-ties); "
             "the first training step's loss difference is shown too (codebook updates inside it may differ). "
             "Method: `models/bench.py`'s docstring. Only ratios within one run mean something.", ""]
    lines += list(facts) + ["", table(rows), "", END]
    return "\n".join(lines)


def _positive_ints(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(k) for k in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    names = [e.name for e in ENTRIES if e.vq]
    p = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="", help=f"comma-separated entries (default all: {','.join(names)})")
    p.add_argument("--sizes", type=_positive_ints, default=SIZES, help="codebook sizes (default 1024,16384)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} timed steps, 1 warm-up, the first size only")
    p.add_argument("--repeats", type=int, default=None, help=f"timed steps per model (default {REPEATS})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps per model first (default {WARMUP})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time (time.process_time), which time spent descheduled does not "
                        "count: steadier on a busy machine; use with --threads 1")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file whose bench section is rewritten")
    args = p.parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--repeats must be >= 1 and --warmup >= 0")
    selected = [n for n in args.systems.split(",") if n] or names
    unknown = sorted(set(selected) - set(names))
    if unknown:
        p.error(f"unknown entries {unknown}; entries with a quantizer: {', '.join(names)}")
    sizes = args.sizes
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else WARMUP)
    if args.quick:
        sizes = sizes[:1]
    torch.set_num_threads(args.threads)
    timer = time.process_time if args.cpu_time else time.perf_counter
    rows, failed = [], False
    for entry, size in plan(selected, sizes):
        try:
            row = bench_entry(entry, size, args.batch_size, repeats, warmup, args.device, timer)
        except Exception as exc:  # one broken system does not stop the others; the row says why
            row, failed = Row(entry.name, str(size or "-"), Comparison(note=f"error: {type(exc).__name__}: "
                                                                            f"{_first_line(exc)}")), True
        rows.append(row)
        r = row.result
        print(f"{entry.name} K={row.size}: ours {_ms(r.ours_ms)} ms, baseline {_ms(r.baseline_ms)} ms {r.note}",
              flush=True)
    command = "python -m models.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(rows, command.strip(), machine_facts(args.batch_size, repeats, warmup, args.device, args.cpu_time))
    write_section(text, Path(args.results), START, END)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
