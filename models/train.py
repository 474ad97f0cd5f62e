"""``python -m models.train``: the one trainer of every tokenizer in :data:`models.SYSTEMS` and every
generator in :data:`models.generator.GENERATORS`.

    python -m models.train SYSTEM [--stage tokenizer|generator] [--tokenizer DIR] [--preset tiny|base] [--config run.yaml]
        [--data NAME|PATH] [--steps N] [--batch-size B] [--out DIR] [--resume] [--device cpu|cuda]
        [--amp bf16|fp16] [--compile] [--set key=value ...] [--no-progress]

The same command under ``torchrun --nproc-per-node N`` trains with DistributedDataParallel, or with
FSDP2's ``fully_shard`` given ``--set train.fsdp=true``; rank 0 logs and writes checkpoints, and the
quantizer layers keep their codebooks identical through ``sync_codebook`` (on by default when the model
is built after the process group exists, as here).

Configuration: the system's preset, then ``--config``'s YAML (sections model / train / data), then
the flags (``--data``, ``--steps``, ``--batch-size``, ``--amp``, ``--compile``), then ``--set`` items.
With ``--resume`` the run folder's config.yaml takes the preset's place. The run folder's layout is
described in :mod:`models.checkpoint`.

One optimizer step: for each of ``grad_accum`` micro-batches ``out = model(batch, step)`` and a
backward of ``out.loss / grad_accum`` (DDP / FSDP sync gradients on the last one only), gradient clipping,
an AdamW step of the generator (every parameter but ``discriminator_parameters()``); then, for GAN
models, the discriminator's gradients from ``model(batch, step, discriminate=out)`` per micro-batch,
clipping and its own AdamW step. Both learning rates warm up linearly and decay with a cosine to
``lr * min_lr_ratio`` at the last step. After the last step: a checkpoint, ``recon.png`` (held-out
originals over reconstructions) and the held-out evaluation of :mod:`models.eval`, printed, logged
and written to ``eval.json``.

Generators (``--stage generator --tokenizer DIR [DIR ...]``): the run trains the system's generator on
the codes the frozen tokenizers of run folders DIR give the data set's images (the tokenizer's
resolution; Make-A-Scene reads two), with the data set's class labels (whose class count must match
``model.num_classes``) or, for a text-conditioned system, its captions. The checkpoints hold the
generator alone; config.yaml names the tokenizers' folders. Grids are sample grids (a row per class or
held-out caption); after the last step ``samples.png`` and the held-out cross-entropy, and the judge's
scores (:func:`models.eval.evaluate_generator`): class accuracy and classifier FID on ``digits``, caption
match (and scene IoU, captioning) on ``shapes``.

Data order: epoch e visits the training items in a permutation drawn from (seed, e); each
micro-batch takes the next ``batch_size * world_size`` of them (the epoch's incomplete tail is
dropped) and rank r takes its r-th ``batch_size`` slice, so every rank runs the same steps and the
global batch does not depend on the number of processes. Augmentation draws from a generator seeded
with (seed, epoch, item). Python, NumPy and torch are seeded with ``seed`` before the model is built
(the same weights on every rank) and with ``seed + rank`` after it; checkpoints keep every rank's
RNG states and the data position, so ``--resume`` continues bit-exactly (models keep their whole state
in parameters and buffers and take schedules from ``step``).

Logging: every ``log_every`` steps, to ``log.jsonl`` (and TensorBoard when installed) and the progress
bar: the window's mean of every ``out.logs`` / discriminator log value (averaged over ranks, which
must log the same keys), ``loss``, ``d_loss``, gradient norms, learning rates, codebook usage,
perplexity and dead codes per level (code counts gathered on the device, summed over ranks at log
time) and images/s. The first Ctrl-C or a SIGTERM stops after the current step with a checkpoint (a
second Ctrl-C stops at once, checkpointing the half-done step unless that step already has one).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from . import system as load_system
from .checkpoint import (latest_checkpoint, load_tokenizers, load_weights, read_run_config, read_state, save_checkpoint,
                         step_name, write_run_config)
from .config import RunConfig, TrainConfig, apply_overrides, from_dict, load_yaml_overrides, parse_set_items
from .generator import generator_system
from .data import build_dataset, collate
from .eval import (evaluate, evaluate_generator, format_generator_summary, format_summary, judgeable,
                   reconstruction_grid, resolve_device, sample_grid, save_png, to_device)
from .metrics import CodebookStats, flatten_codebook_summary, mean_usage

STAGES = ("tokenizer", "generator")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_FLAG_KEYS = {"data": "data.name", "steps": "train.steps", "batch_size": "train.batch_size", "amp": "train.amp",
              "compile": "train.compile"}


# ---------------------------------------------------------------- configuration

def validate(cfg: TrainConfig):
    """Raises ValueError naming the first TrainConfig value the trainer cannot use."""
    checks = [(cfg.steps >= 1, "train.steps must be >= 1"), (cfg.batch_size >= 1, "train.batch_size must be >= 1"),
              (cfg.grad_accum >= 1, "train.grad_accum must be >= 1"), (cfg.lr > 0, "train.lr must be > 0"),
              (cfg.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
              (0 <= cfg.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]"),
              (cfg.grad_clip >= 0, "train.grad_clip must be >= 0 (0: off)"),
              (cfg.log_every >= 1, "train.log_every must be >= 1"),
              (cfg.keep_last >= 1, "train.keep_last must be >= 1"),
              (cfg.amp in AMP_DTYPES, f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}"),
              (cfg.image_every >= 0 and cfg.ckpt_every >= 0, "train.image_every and train.ckpt_every must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def stage_system(system: str, stage: str):
    """(model class, presets) of ``system`` at ``stage`` (tokenizer or generator)."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: stages are {', '.join(STAGES)}")
    if stage == "generator":
        model_cls, presets, _ = generator_system(system)
        return model_cls, presets
    module = load_system(system)
    return module.Model, module.PRESETS


def _tokenizer_paths(tokenizer) -> list:
    """One run folder or several, as a list of absolute paths."""
    return [str(Path(t).resolve()) for t in ([tokenizer] if isinstance(tokenizer, (str, Path)) else tokenizer)]


def build_run_config(system: str, preset: Optional[str] = None, config_file: Optional[str] = None,
                     sets: Sequence[str] = (), saved: Optional[Dict[str, Any]] = None, stage: str = "tokenizer",
                     tokenizer: Optional[str] = None, **flags) -> RunConfig:
    """The run configuration: ``saved`` (a run folder's config.yaml) or the system's ``preset``
    (default tiny) at ``stage``, then the YAML file, then ``flags`` (data, steps, batch_size, amp,
    compile; None leaves a value alone), then the ``--set`` items. A generator run names its trained
    ``tokenizer`` run folder (kept as an absolute path)."""
    model_cls, presets = stage_system(system, stage)
    if saved is not None:
        if saved.get("system") != system:
            raise ValueError(f"the run folder holds a run of system {saved.get('system')!r}, not {system!r}")
        if saved.get("stage", "tokenizer") != stage:
            raise ValueError(f"the run folder holds a {saved.get('stage', 'tokenizer')} run, not a {stage} run")
        if preset not in (None, saved["preset"]):
            raise ValueError(f"the run folder was trained from preset {saved['preset']!r}, not {preset!r}")
        run = from_dict(saved, model_cls.config_cls)
        if tokenizer is not None and _tokenizer_paths(tokenizer) != _tokenizer_paths(run.tokenizer):
            raise ValueError(f"--tokenizer {tokenizer}: the run was trained on the tokenizer(s) of {run.tokenizer}")
    else:
        preset = preset or "tiny"
        if preset not in presets:
            raise ValueError(f"system {system!r} has no preset {preset!r}" + (" for its generator" if stage == "generator"
                             else "") + f"; presets: {', '.join(presets)}")
        p = presets[preset]
        run = RunConfig(system, preset, p.model, p.train, p.data, stage=stage)
        if stage == "generator":
            if not tokenizer:
                raise ValueError("--stage generator needs --tokenizer DIR, the run folder of a trained tokenizer")
            paths = _tokenizer_paths(tokenizer)
            run.tokenizer = paths[0] if len(paths) == 1 else paths
        elif tokenizer is not None:
            raise ValueError("--tokenizer is for --stage generator")
    if config_file:
        run = apply_overrides(run, load_yaml_overrides(config_file))
    unknown = set(flags) - set(_FLAG_KEYS)
    if unknown:
        raise TypeError(f"build_run_config: unknown flags {sorted(unknown)}")
    run = apply_overrides(run, {_FLAG_KEYS[k]: v for k, v in flags.items() if v is not None})
    run = apply_overrides(run, parse_set_items(sets))
    validate(run.train)
    return run


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup reaching 1 at step
    ``warmup_steps - 1``, then a cosine from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``steps - 1``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - 1 - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- randomness and data order

def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def half_size(batch: Dict[str, Any]) -> Dict[str, Any]:
    """A batch at half the resolution (``data.half_resolution``): the images box-averaged by 2, the scene
    maps (if any) every second pixel in both directions."""
    out = dict(batch, image=F.avg_pool2d(batch["image"], 2))
    if "scene" in batch:
        out["scene"] = batch["scene"][..., ::2, ::2]
    return out


def _check_half_size(model: nn.Module, data, device, system: str):
    """``data.half_resolution`` needs a tokenizer that reconstructs half-size inputs at their size (a conv stack
    does; a ViT's fixed patch grid or a fixed token pyramid does not): one training item is tried up front, in
    eval mode (nothing updated)."""
    x = model.inputs(half_size(to_device(collate([data[0]]), device)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shape = tuple(model.reconstruct(x).shape)
        problem = None if shape == tuple(x.shape) else f"it gives {shape[1:]} for {tuple(x.shape[1:])}"
    except (RuntimeError, ValueError) as exc:
        problem = str(exc)
    finally:
        model.train(was_training)
    if problem:
        raise ValueError(f"data.half_resolution: {system} cannot reconstruct {x.shape[-2]}x{x.shape[-1]} inputs "
                         f"({problem})")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states, as types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSampler:
    """The items of each micro-batch for one rank (see the module docstring); ``epoch`` and
    ``offset`` (items of the epoch already taken by all ranks) are the data position."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.size, self.batch_size, self.rank, self.seed = size, batch_size, rank, seed
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"the training set has {size} items, fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.epoch, self.offset = 0, 0
        self._perm: Tuple[int, List[int]] = (-1, [])

    def next(self) -> Tuple[int, List[int]]:
        """(epoch, this rank's item indices) of the next micro-batch."""
        if self.offset + self.global_batch > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
        if self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            self._perm = (self.epoch, torch.randperm(self.size, generator=g).tolist())
        start = self.offset + self.rank * self.batch_size
        self.offset += self.global_batch
        return self.epoch, self._perm[1][start:start + self.batch_size]


# ---------------------------------------------------------------- the trainer

def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _scalar(v) -> torch.Tensor:
    if hasattr(v, "full_tensor"):  # a DTensor (FSDP2 gradient norms)
        v = v.full_tensor()
    return v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))


class Trainer:
    """Trains one tokenizer; :meth:`fit` runs the steps, checkpoints, grids and the final evaluation.

    ``run``: the configuration; ``out_dir``: the run folder; ``resume``: continue from its newest
    checkpoint. ``model_factory`` (default: the system's ``Model``) builds the model from
    ``run.model``; ``datasets`` (default: :func:`models.data.build_dataset`'s train and holdout
    splits) is a (train, holdout) pair of :mod:`models.data` data sets. Under an initialised
    torch.distributed process group the model is wrapped in DDP (or FSDP2 with ``train.fsdp``).
    """

    def __init__(self, run: RunConfig, out_dir, device="cpu", resume: bool = False, progress: bool = True,
                 command: Optional[List[str]] = None, model_factory: Optional[Callable[[Any], nn.Module]] = None,
                 datasets=None):
        validate(run.train)
        self.run, self.cfg, self.out = run, run.train, Path(out_dir)
        self.rank, self.world = _world()
        self.device = torch.device(device)
        self.fsdp = self.cfg.fsdp and self.world > 1
        if self.fsdp and self.cfg.amp == "fp16":
            raise ValueError("train.amp=fp16 with train.fsdp: use bf16 (the loss scaler would see only its shard)")
        resume_from = latest_checkpoint(self.out) if resume else None
        if resume and resume_from is None:
            raise FileNotFoundError(f"--resume: {self.out} has no complete checkpoint")
        if not resume and latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"{self.out} already holds a run's checkpoints: pass --resume or another --out")
        self.generator_stage = run.stage == "generator"
        if self.generator_stage:  # the frozen tokenizer, outside the trained module tree
            model_cls = generator_system(run.system)[0]
            tokenizers = load_tokenizers(run.system, run.tokenizer, self.device)
            resolution = tokenizers[0].cfg.resolution

            def default_factory(cfg):
                return model_cls(cfg, *tokenizers)
        else:
            resolution = run.model.resolution
            default_factory = None if model_factory is not None else load_system(run.system).Model
        if datasets is None:
            datasets = tuple(build_dataset(run.data, resolution, split) for split in ("train", "holdout"))
        self.train_set, self.holdout_set = datasets
        if self.generator_stage:
            _check_classes(run, self.train_set)
        if run.data.half_resolution and self.generator_stage:
            raise ValueError("data.half_resolution downsamples a tokenizer's training images, not a generator's")
        self.sampler = EpochSampler(len(self.train_set), self.cfg.batch_size, self.rank, self.world, self.cfg.seed)

        seed_everything(self.cfg.seed)  # the same initial weights on every rank
        factory = model_factory or default_factory
        self.model = factory(run.model).to(self.device).train()
        seed_everything(self.cfg.seed + self.rank)
        if resume_from is not None:
            load_weights(self.model, resume_from)
        if run.data.half_resolution:
            _check_half_size(self.model, self.train_set, self.device, run.system)
        self.forward_module = self._wrap()
        disc = list(self.model.discriminator_parameters())
        disc_ids = {id(p) for p in disc}
        self.gen_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in disc_ids]
        self.disc_params = [p for p in disc if p.requires_grad]
        adamw = dict(betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        self.optimizers = [torch.optim.AdamW(self.gen_params, lr=self.cfg.lr, **adamw)]
        if self.disc_params:
            self.optimizers.append(torch.optim.AdamW(self.disc_params, lr=self.cfg.disc_lr or self.cfg.lr, **adamw))
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, self.cfg))
                           for o in self.optimizers]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")
        self.stats = CodebookStats(self.model.codebook_sizes(), self.device)
        self.step = 0
        self._stop_signal: Optional[int] = None
        self._reset_window()
        if resume_from is not None:
            self._restore(resume_from)
        self._log_file = self._bar = self._tb = None
        if self.rank == 0:
            write_run_config(self.out, run.to_dict(), command)
            self._log_file = open(self.out / "log.jsonl", "a", encoding="utf-8")
            self._tb = _tensorboard(self.out)
            if progress:
                self._bar = tqdm(total=self.cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)
        self._event("resume" if resume_from is not None else "start", checkpoint=str(resume_from or ""),
                    world_size=self.world, device=str(self.device), parameters=sum(p.numel() for p in self.gen_params),
                    disc_parameters=sum(p.numel() for p in self.disc_params))

    # ---- setup
    def _wrap(self) -> nn.Module:
        module = self.model
        if self.fsdp:
            # one FSDP unit, the whole model: its methods may read any submodule's parameters inside the
            # forward (e.g. VQGAN's adaptive weight takes the decoder's last layer)
            _fully_shard()(module)
        elif self.world > 1:
            # the generator pass leaves the discriminator unused (before the GAN starts) and the
            # discriminator pass the autoencoder; buffers are either synced by the layers themselves
            # (sync_codebook) or rank-local statistics, so none is broadcast at each forward
            ddp = nn.parallel.DistributedDataParallel
            no_buffer_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                              else "broadcast_buffers")
            module = ddp(module, find_unused_parameters=bool(self.model.discriminator_parameters()),
                         **{no_buffer_sync: False})
        elif self.cfg.fsdp:
            self._print("train.fsdp: one process; training without sharding (run under torchrun to shard)")
        self._ddp = module if isinstance(module, nn.parallel.DistributedDataParallel) else None
        if self.cfg.compile:
            try:
                module = torch.compile(module)
            except RuntimeError as exc:
                self._print(f"train.compile: torch.compile is unavailable here ({exc}); training eagerly")
        return module

    def _forward(self, batch, **kwargs):
        """The training forward through the wrappers, under autocast; with train.compile a frame that
        fails to compile runs eagerly (with torch's warning naming the error) instead of ending the run."""
        dtype = AMP_DTYPES[self.cfg.amp]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                                               enabled=dtype is not None))
            if self.cfg.compile:
                stack.enter_context(torch._dynamo.config.patch(suppress_errors=True))
            return self.forward_module(batch, self.step, **kwargs)

    def _restore(self, path: Path):
        state = read_state(path)
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"{path}: {len(state['optimizers'])} optimizer state(s) for {len(self.optimizers)} "
                             "optimizer(s) (a model with a discriminator has two)")
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            if self.fsdp:
                set_optimizer_state_dict(self.model, opt, sd, options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(sd)
        for sched, sd in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.sampler.epoch, self.sampler.offset = state["data_position"]
        if state["world_size"] == self.world:
            set_rng_state(state["rng"][self.rank])
        else:
            self._print(f"resuming with {self.world} processes instead of {state['world_size']}: the data "
                        "order continues, random states are reseeded (not bit-exact)")
            seed_everything(derived_seed(self.cfg.seed, self.rank, self.step))

    # ---- checkpoints
    def _model_state(self) -> Dict[str, torch.Tensor]:
        if self.fsdp:
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optimizer_states(self) -> List[Dict[str, Any]]:
        if self.fsdp:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return [get_optimizer_state_dict(self.model, o, options=opts) for o in self.optimizers]
        return [o.state_dict() for o in self.optimizers]

    def save(self, partial_step: bool = False) -> Optional[Path]:
        """Writes a checkpoint of the current step (every rank calls it; rank 0 writes)."""
        model_state, optimizers = self._model_state(), self._optimizer_states()
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        path = None
        if self.rank == 0:
            state = {"step": self.step, "data_position": (self.sampler.epoch, self.sampler.offset),
                     "optimizers": optimizers, "schedulers": [s.state_dict() for s in self.schedulers],
                     "scaler": self.scaler.state_dict(), "rng": rngs, "world_size": self.world,
                     "partial_step": partial_step}
            path = save_checkpoint(self.out, self.step, model_state, state, self.cfg.keep_last)
        if self.world > 1:
            dist.barrier()
        self._event("checkpoint", path=str(path or ""), partial_step=partial_step)
        return path

    # ---- training
    def request_stop(self, signum: int = signal.SIGINT):
        """Stop after the current step with a checkpoint (what Ctrl-C and SIGTERM do)."""
        self._stop_signal = signum

    def fit(self, until: Optional[int] = None) -> Dict[str, Any]:
        """Trains to ``train.steps`` (or to step ``until``), then checkpoints; after the last step also
        writes ``recon.png`` and evaluates the held-out set. Ctrl-C / SIGTERM stop after the current step
        with a checkpoint. Returns ``{"step", "checkpoint", "interrupted", "eval"}``."""
        end = self.cfg.steps if until is None else min(until, self.cfg.steps)
        in_step, interrupted = False, False
        self._window["start"] = time.perf_counter()
        with self._signals():
            try:
                while self.step < end and not self._should_stop():
                    in_step = True
                    self._train_step()
                    in_step = False
                    self.step += 1
                    self._after_step(end)
            except KeyboardInterrupt:
                interrupted = True
        interrupted = interrupted or self._stop_signal is not None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        existing = latest_checkpoint(self.out)
        if in_step and existing is not None and existing.name == step_name(self.step):
            path = existing  # keep the complete checkpoint of this step rather than a half-done step's state
        else:
            path = self.save(partial_step=in_step)
        result = {"step": self.step, "checkpoint": path, "interrupted": interrupted, "eval": None}
        if interrupted:
            self._event("interrupt", signal=self._stop_signal or signal.SIGINT)
            self._print(f"interrupted at step {self.step}; checkpoint {path}; continue with --resume"
                        + (" (written in the middle of a step)" if in_step else ""))
        elif self.step >= self.cfg.steps:
            result["eval"] = self._final_evaluation()
        self.close()
        return result

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._log_file is not None:
            self._log_file.close()
        if self._tb is not None:
            self._tb.close()
        self._bar = self._log_file = self._tb = None

    @contextlib.contextmanager
    def _signals(self):
        """The first SIGINT / SIGTERM asks for a stop after the current step; a second SIGINT
        interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _should_stop(self) -> bool:
        stop = self._stop_signal is not None
        if self.world > 1:  # every rank stops at the same step
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _grad_sync(self, sync: bool):
        """Gradients all-reduced on this backward (the last micro-batch) or only accumulated."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        elif self._ddp is not None and not sync:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def _next_batch(self) -> Dict[str, Any]:
        epoch, idx = self.sampler.next()
        data = self.train_set
        items = [data.augment(data[i], torch.Generator().manual_seed(derived_seed(self.cfg.seed, epoch, i)))
                 for i in idx]
        batch = to_device(collate(items), self.device)
        return half_size(batch) if self._half_resolution(epoch, idx) else batch

    def _half_resolution(self, epoch: int, idx: List[int]) -> bool:
        """Whether this batch trains at half size: ``data.half_resolution``'s share, one draw per batch fixed by
        the seed, the epoch and the batch's items (so a resumed run draws the same)."""
        share = self.run.data.half_resolution
        if not share:
            return False
        draw = torch.Generator().manual_seed(derived_seed(self.cfg.seed, epoch, -1, *idx))
        return bool(torch.rand((), generator=draw) < share)

    def _optimizer_step(self, opt, params) -> torch.Tensor:
        self.scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.scaler.step(opt)
        return norm

    def _train_step(self):
        accum = self.cfg.grad_accum
        batches = [self._next_batch() for _ in range(accum)]
        gen_opt = self.optimizers[0]
        gen_opt.zero_grad(set_to_none=True)
        gan = len(self.optimizers) > 1
        outs = []
        for i, batch in enumerate(batches):
            with self._grad_sync(i == accum - 1):
                out = self._forward(batch)
                self.scaler.scale(out.loss / accum).backward()
            self._record(dict(out.logs, loss=out.loss))
            self.stats.update(out.indices)
            if gan:
                outs.append(out)
        logs = {"grad_norm": self._optimizer_step(gen_opt, self.gen_params)}
        if gan:
            disc_opt = self.optimizers[1]
            disc_opt.zero_grad(set_to_none=True)  # also drops what the generator's loss left on them
            for i, (batch, out) in enumerate(zip(batches, outs)):
                with self._grad_sync(i == accum - 1):
                    d_loss, d_logs = self._forward(batch, discriminate=out)
                    self.scaler.scale(d_loss / accum).backward()
                self._record(dict(d_logs, d_loss=d_loss))
            logs["d_grad_norm"] = self._optimizer_step(disc_opt, self.disc_params)
        self._record(logs)
        self._lrs = [o.param_groups[0]["lr"] for o in self.optimizers]  # this step's, before the schedule moves
        self.scaler.update()
        with warnings.catch_warnings():  # a step the loss scaler skipped (inf gradients) still moves the schedule
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            for sched in self.schedulers:
                sched.step()
        self._window["steps"] += 1

    def _after_step(self, end: int):
        cfg = self.cfg
        if self._bar is not None:
            self._bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == end:
            self._log_window()
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < end:
            self.save()
        if cfg.image_every and self.step % cfg.image_every == 0:
            self._write_grid(self.out / "grids" / f"{step_name(self.step)}.png")

    # ---- logging
    def _reset_window(self):
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}
        self._window = {"start": time.perf_counter(), "steps": 0}
        self.stats.reset()

    def _record(self, logs: Dict[str, Any]):
        for k, v in logs.items():
            v = _scalar(v).to(self.device)
            self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._counts[k] = self._counts.get(k, 0) + 1

    def _log_window(self):
        """Logs the window's means (averaged over ranks), learning rates, codebook statistics (counts
        summed over ranks) and throughput; one host sync."""
        keys = sorted(self._sums)
        values = torch.stack([self._sums[k] / self._counts[k] for k in keys]) if keys else torch.zeros(0)
        if self.world > 1 and keys:
            dist.all_reduce(values)
            values = values / self.world
        codebooks = self.stats.summary(all_reduce=True)
        elapsed = max(time.perf_counter() - self._window["start"], 1e-9)
        steps = self._window["steps"]
        images = steps * self.cfg.batch_size * self.cfg.grad_accum * self.world
        record = {"kind": "train", "step": self.step, **dict(zip(keys, values.tolist())),
                  "lr": self._lrs[0], "steps_per_s": steps / elapsed,
                  "images_per_s": images / elapsed, **flatten_codebook_summary(codebooks)}
        if len(self._lrs) > 1:
            record["disc_lr"] = self._lrs[1]
        self._write_log(record)
        if self._bar is not None:
            postfix = {"loss": f"{record.get('loss', float('nan')):.4f}", "img/s": f"{record['images_per_s']:.0f}"}
            usage = mean_usage(codebooks)
            if usage is not None:
                postfix["usage"] = f"{usage:.0%}"
            self._bar.set_postfix(postfix, refresh=False)
        self._reset_window()

    def _write_log(self, record: Dict[str, Any]):
        if self._log_file is None:
            return
        self._log_file.write(json.dumps(dict(record, time=time.time())) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def _event(self, name: str, **fields):
        self._write_log({"kind": "event", "event": name, "step": self.step, **fields})

    def _print(self, message: str):
        if self.rank != 0:
            return
        if getattr(self, "_bar", None) is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    # ---- pictures and evaluation
    @contextlib.contextmanager
    def _evaluation(self):
        """Yields the plain model on the ranks that evaluate (all under FSDP, rank 0 otherwise; None
        elsewhere), with the training RNG streams untouched."""
        if not self.fsdp and self.rank != 0:
            yield None
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.fsdp:
                self.model.unshard()
            try:
                yield self.model
            finally:
                if self.fsdp:
                    self.model.reshard()

    def _grid_prompts(self) -> List[str]:
        """Up to 8 distinct captions of the held-out images (the training ones when none is held out)."""
        data = self.holdout_set if len(self.holdout_set) else self.train_set
        out: List[str] = []
        for i in range(min(len(data), 64)):
            caption = data[i]["caption"]
            if caption and caption not in out:
                out.append(caption)
            if len(out) == 8:
                break
        return out or [""]

    def _write_grid(self, path: Path):
        if len(self.holdout_set) == 0 and not self.generator_stage:
            return
        with self._evaluation() as model:
            if model is not None:
                if self.generator_stage:
                    prompts = self._grid_prompts() if model.conditioning == "text" else ("",)
                    grid = sample_grid(model, self.cfg.grid_images, seed=self.cfg.seed, prompts=prompts)
                else:
                    grid = reconstruction_grid(model, self.holdout_set, self.cfg.grid_images, self.device)
                if self.rank == 0:
                    save_png(grid, path)
        if self.world > 1:
            dist.barrier()

    def _final_evaluation(self) -> Optional[Dict[str, Any]]:
        if self.generator_stage:
            return self._final_generator_evaluation()
        if len(self.holdout_set) == 0:
            self._print("no held-out images: no reconstruction grid or evaluation")
            return None
        self._write_grid(self.out / "recon.png")
        result = None
        with self._evaluation() as model:
            if model is not None:
                result = evaluate(model, self.holdout_set, self.cfg.batch_size, self.device, self.cfg.eval_images)
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            self._write_log({"kind": "eval", "step": self.step, "psnr": result["psnr"], "ssim": result["ssim"],
                             "bits_per_image": result["bits_per_image"],
                             **flatten_codebook_summary(result["codebooks"], "eval_")})
            with open(self.out / "eval.json", "w", encoding="utf-8") as f:
                json.dump(dict(result, step=self.step), f, indent=2)
            self._print(f"held-out evaluation after {self.step} steps:\n{format_summary(result)}")
        return result

    def _final_generator_evaluation(self) -> Optional[Dict[str, Any]]:
        """``samples.png`` and the held-out cross-entropy; with a judge for the model and its data
        (:func:`models.eval.judgeable`: 10 classes on ``digits``, text on ``shapes``) also its scores:
        class accuracy or caption match, classifier FID (``train.judge_per_class`` samples per class, or
        10x that many held-out captions; 0: none)."""
        self._write_grid(self.out / "samples.png")
        if len(self.holdout_set) == 0:
            self._print("no held-out images: no held-out cross-entropy")
            return None
        result = None
        with self._evaluation() as model:
            if model is not None:
                judge = self.cfg.judge_per_class > 0 and judgeable(model, self.run.data.name)
                result = evaluate_generator(model, self.holdout_set, self.cfg.batch_size, self.device,
                                            self.cfg.eval_images, judge=judge, judge_per_class=self.cfg.judge_per_class)
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            self._write_log({"kind": "eval", "step": self.step,
                             **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
            with open(self.out / "eval.json", "w", encoding="utf-8") as f:
                json.dump(dict(result, step=self.step), f, indent=2)
            self._print(f"held-out evaluation after {self.step} steps:\n{format_generator_summary(result)}")
        return result


def _check_classes(run: RunConfig, train_set) -> None:
    """A class-conditional generator needs a data set with as many classes as it has; a text-conditioned
    one a data set with captions (its first images are looked at)."""
    if not hasattr(run.model, "num_classes"):
        if not any(train_set[i]["caption"] for i in range(min(16, len(train_set)))):
            raise ValueError(f"data set {run.data.name!r} has no captions: a text-conditioned generator trains on "
                             "shapes, digits or an image folder with a .txt caption beside each image")
        return
    n = run.model.num_classes
    have = len(getattr(train_set, "class_names", []))
    if n and have != n:
        raise ValueError(f"model.num_classes is {n} but data set {run.data.name!r} has {have} classes: set "
                         f"model.num_classes={have}" + (" (0: unconditional)" if have else " or 0 (unconditional)"))


def _tensorboard(out: Path):
    """A TensorBoard writer into ``<out>/tb`` when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


# ---------------------------------------------------------------- command line

def run_config_from_args(args, saved: Optional[Dict[str, Any]] = None) -> RunConfig:
    """The run configuration of parsed command-line ``args`` (on top of ``saved`` with --resume)."""
    return build_run_config(args.system, args.preset, args.config, args.sets, saved=saved, stage=args.stage,
                            tokenizer=args.tokenizer, data=args.data,
                            steps=args.steps, batch_size=args.batch_size, amp=args.amp, compile=args.compile)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("system", help="one of models.SYSTEMS")
    p.add_argument("--stage", default="tokenizer", choices=STAGES,
                   help="tokenizer (stage 1, default) or generator (stage 2, on a trained tokenizer's codes)")
    p.add_argument("--tokenizer", default=None, nargs="+", metavar="DIR",
                   help="--stage generator: the run folder of the trained tokenizer (one per tokenizer the "
                        "generator is built on: make_a_scene takes the vqgan's, then the scene's)")
    p.add_argument("--preset", default=None, help="tiny (default) or base")
    p.add_argument("--config", default=None, help="YAML file with sections model / train / data")
    p.add_argument("--data", default=None, help="built-in data set name or image folder")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch")
    p.add_argument("--out", default=None, help="run folder (default runs/SYSTEM-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run folder's newest checkpoint")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES), help="autocast dtype (fp16 with loss scaling)")
    p.add_argument("--compile", action="store_const", const=True, default=None, help="torch.compile the model")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.lr=1e-4 or model.codebook_size=512 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _init_distributed(device: torch.device) -> bool:
    """Joins the torchrun process group (nccl on GPUs, gloo on CPUs); False outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def leave_distributed(finished: bool) -> None:
    """Destroys the process group. When every rank finished, a barrier first: a rank that tears down its
    gloo connections while a peer still reads them can abort that peer (SIGABRT at exit). After an error
    the ranks are not in step, so no barrier (it could hang)."""
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        default_out = f"runs/{args.system}-{args.preset or 'tiny'}" + ("-gen" if args.stage == "generator" else "")
        out = Path(args.out or default_out)
        run = run_config_from_args(args, read_run_config(out) if args.resume else None)
        device = resolve_device(args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    created = _init_distributed(device)
    finished = False
    try:
        if device.type == "cuda" and dist.is_initialized():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        command = [sys.executable, "-m", "models.train", *(sys.argv[1:] if argv is None else argv)]
        try:
            trainer = Trainer(run, out, device=device, resume=args.resume, progress=not args.no_progress,
                              command=command)
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result = trainer.fit()
        finished = True
    finally:
        if created:
            leave_distributed(finished)
    return 128 + int(trainer._stop_signal or signal.SIGINT) if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
