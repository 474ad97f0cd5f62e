"""Run folders and checkpoints of :mod:`models.train`.

A run folder ``<out>`` holds::

    config.yaml              the run's configuration (RunConfig.to_dict(): system, preset, model, train,
                             data) plus git_commit, git_dirty and the command line
    log.jsonl                one JSON object a line: {"kind": "train" | "eval" | "event", "step": ...}
    ckpt/step_0000100/       one complete checkpoint:
        model.safetensors        the model's state_dict (parameters and buffers)
        state.pt                 optimizers, LR schedulers, grad scaler, step, data position (epoch,
                                 offset), RNG states of every rank (torch.save, loads with weights_only)
    ckpt/latest              the name of the newest complete checkpoint folder
    grids/step_0000100.png   held-out originals (odd rows) over their reconstructions (even rows)
    recon.png                the grid after training
    eval.json                the held-out evaluation (models.eval)
    tb/                      TensorBoard events (when the tensorboard package is installed)

Every write is atomic: a checkpoint is written into ``ckpt/.tmp-<name>-<pid>``, each file fsynced,
the folder renamed to its final name and ``ckpt`` fsynced; ``latest`` and ``config.yaml`` are
replaced by rename. A run killed at any moment leaves the previous checkpoint complete, and
:func:`latest_checkpoint` never returns a half-written one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import system
from .config import from_dict

WEIGHTS = "model.safetensors"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the model (another system or other shapes)."""


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path, text: str):
    """Writes ``text`` to ``path`` through a fsynced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def git_state() -> Dict[str, Any]:
    """The commit of the repository holding this package and whether its tree has changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}
    if head.returncode != 0:
        return {"git_commit": "unknown", "git_dirty": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def write_run_config(run_dir, run_dict: Dict[str, Any], command: Optional[List[str]] = None):
    """``<run_dir>/config.yaml``: the run configuration, the git commit and the command line."""
    doc = dict(run_dict, **git_state(), command=list(command or []))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def read_run_config(run_dir) -> Dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _checkpoints(run_dir) -> List[Path]:
    """Complete checkpoint folders, oldest first."""
    ckpt = Path(run_dir) / "ckpt"
    if not ckpt.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / WEIGHTS).is_file() and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint ``ckpt/latest`` names, or the newest complete one when that is missing."""
    pointer = Path(run_dir) / "ckpt" / "latest"
    if pointer.is_file():
        path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(path.name) and (path / WEIGHTS).is_file() and (path / STATE).is_file():
            return path
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir, step: int, model_state: Mapping[str, torch.Tensor], state: Dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Writes ``ckpt/step_<step>`` atomically, points ``latest`` at it and keeps the newest ``keep_last``."""
    ckpt = Path(run_dir) / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    final = ckpt / step_name(step)
    tmp = ckpt / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clones: tensors sharing storage (tied weights) are saved as separate tensors and load back tied
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"step": str(step)})
    _fsync_file(tmp / WEIGHTS)
    with open(tmp / STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (a resumed run saving where it started)
        old = ckpt / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt)
    atomic_write_text(ckpt / "latest", final.name + "\n")
    for old in _checkpoints(run_dir)[:-max(keep_last, 1)]:
        if old != final:
            shutil.rmtree(old)
    for stale in ckpt.glob(".tmp-*"):  # left by killed runs
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_weights(path) -> Dict[str, torch.Tensor]:
    return load_file(str(Path(path) / WEIGHTS))


def read_state(path) -> Dict[str, Any]:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def _listing(items: List[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def check_compatible(model_state: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], where: str):
    """Raises :class:`CheckpointMismatch` naming missing / unexpected keys and shape mismatches."""
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    shapes = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
              for k, v in model_state.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not the checkpoint): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not the model): {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise CheckpointMismatch(f"checkpoint {where} does not fit the model; " + "; ".join(problems))


def load_weights(model: torch.nn.Module, path) -> None:
    """Loads ``path``'s weights into ``model`` (strict: keys and shapes must match)."""
    saved = read_weights(path)
    check_compatible(model.state_dict(), saved, str(path))
    model.load_state_dict(saved)


def load_model(name: str, run_dir, device="cpu", checkpoint=None):
    """The model trained in ``run_dir`` by a run of system ``name`` (a tokenizer, or for a generator run
    the generator with its tokenizer loaded from the run folder its config names), rebuilt from its
    config.yaml with the weights of ``checkpoint`` (default: the newest), in eval mode on ``device``."""
    saved = read_run_config(run_dir)
    if saved.get("system") != name:
        raise ValueError(f"{run_dir} holds a run of system {saved.get('system')!r}, not {name!r}")
    stage = saved.get("stage", "tokenizer")
    if stage == "generator":
        from .generator import generator_system
        model_cls = generator_system(name)[0]
        run = from_dict(saved, model_cls.config_cls)
        tokenizers = load_tokenizers(name, run.tokenizer, device)

        def make(cfg):
            return model_cls(cfg, *tokenizers)
    else:
        model_cls = system(name).Model
        run = from_dict(saved, model_cls.config_cls)
        make = model_cls
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
    model = make(run.model)
    load_weights(model, path)
    return model.to(device).eval()


def load_tokenizers(name: str, run_dirs, device="cpu") -> tuple:
    """The trained tokenizers generator system ``name`` is built on, from ``run_dirs`` (one run folder,
    or a list with one per tokenizer system of its :data:`models.generator.GENERATORS` entry)."""
    from .generator import tokenizer_systems
    systems = tokenizer_systems(name)
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if len(run_dirs) != len(systems):
        raise ValueError(f"the {name} generator is built on {len(systems)} tokenizer(s) ({', '.join(systems)}): "
                         f"give one run folder for each (--tokenizer DIR ...), got {len(run_dirs)}")
    return tuple(load_tokenizer(s, d, device) for s, d in zip(systems, run_dirs))


def load_tokenizer(tokenizer_system: str, run_dir, device="cpu"):
    """The trained tokenizer of a generator: ``run_dir`` must hold a tokenizer run of ``tokenizer_system``."""
    saved = read_run_config(run_dir)
    if saved.get("stage", "tokenizer") != "tokenizer" or saved.get("system") != tokenizer_system:
        raise ValueError(f"{run_dir} holds a {saved.get('stage', 'tokenizer')} run of system {saved.get('system')!r}; "
                         f"this generator needs a tokenizer run of system {tokenizer_system!r}")
    return load_model(tokenizer_system, run_dir, device)
