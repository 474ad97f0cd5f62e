"""Typed run configuration: a model dataclass per system and a shared ``TrainConfig``.

A run's configuration is a :class:`RunConfig` (``model``, ``train``, ``data``), built from a
system's preset, then a YAML file, then ``--set key=value`` items, in that order. Keys are
``model.<field>``, ``train.<field>`` or ``data.<field>``; an unprefixed key is looked up in the
three sections and must name exactly one field. Values are parsed as YAML scalars / lists and
checked against the field's type, so a typo or a wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import yaml


@dataclass
class DataConfig:
    """What to train on (see :mod:`models.data`); the image side is the model's ``resolution``."""
    name: str = "photos"          # a built-in set (photos, faces, digits, shapes) or a folder path
    hflip: bool = True            # random horizontal flips in training
    holdout_fraction: float = 0.1  # the deterministic held-out split's share
    num_images: int = 0           # images / crops in both splits together (0: the set's default; folders: all)
    seed: int = 0                 # the split and built-in sets' generation
    max_crop_scale: float = 4.0   # photos: crop windows span 1x to this many times the resolution (log-uniform)
    half_resolution: float = 0.0  # tokenizer training: share of batches box-downsampled by 2 (a conv tokenizer
    #                               that also encodes half-resolution images, as Muse's low-resolution stage reads)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping, the same for every system."""
    steps: int = 1000
    batch_size: int = 32          # per process, per micro-batch
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 2e-4
    betas: Tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0        # max global grad norm (0: off)
    disc_lr: float = 0.0          # discriminator learning rate (0: same as lr)
    seed: int = 0
    log_every: int = 10
    image_every: int = 0          # write a reconstruction grid every N steps (0: only at the end)
    ckpt_every: int = 0           # checkpoint every N steps (0: only at the end and on Ctrl-C)
    keep_last: int = 2            # checkpoints kept
    amp: str = "none"             # none | bf16 | fp16
    compile: bool = False
    fsdp: bool = False            # FSDP2 fully_shard instead of DDP under torchrun
    grid_images: int = 8          # held-out images in the reconstruction grids
    eval_images: int = 0          # held-out images evaluated after training (0: all)
    judge_per_class: int = 20     # after training, generators on digits: samples per class the judge scores;
                                  # text generators on shapes: 10x this many held-out captions, a sample each (0: none)


@dataclass
class RunConfig:
    system: str
    preset: str
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: str = "tokenizer"      # tokenizer | generator
    tokenizer: Any = ""           # generator runs: the tokenizer's run folder (absolute path), a list for several

    def to_dict(self) -> Dict[str, Any]:
        out = {"system": self.system, "preset": self.preset, "stage": self.stage}
        if self.stage == "generator":
            out["tokenizer"] = self.tokenizer
        return dict(out, model=to_dict(self.model), train=to_dict(self.train), data=to_dict(self.data))


def to_dict(cfg) -> Dict[str, Any]:
    """A dataclass as plain YAML-able values (tuples as lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _coerce(value, tp, key):
    """``value`` (parsed YAML) as type ``tp``, or a ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"config key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value


def _field_types(cfg) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(cfg))
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg)}


def replace(cfg, key_prefix: str, updates: Dict[str, Any]):
    """A copy of dataclass ``cfg`` with ``updates`` applied, each value type-checked."""
    types = _field_types(cfg)
    out = {}
    for k, v in updates.items():
        if k not in types:
            raise ValueError(f"unknown config key {key_prefix + k!r}; known: {', '.join(sorted(types))}")
        out[k] = _coerce(v, types[k], key_prefix + k)
    return dataclasses.replace(cfg, **out)


_SECTIONS = ("model", "train", "data")


def apply_overrides(run: RunConfig, items: Dict[str, Any]) -> RunConfig:
    """Apply ``{key: value}`` overrides (``section.field`` or a bare unique field name)."""
    per_section: Dict[str, Dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in items.items():
        section, _, name = key.partition(".")
        if name and section in _SECTIONS:
            per_section[section][name] = value
            continue
        owners = [s for s in _SECTIONS if key in _field_types(getattr(run, s))]
        if len(owners) != 1:
            where = f"it is in {' and '.join(owners)}" if owners else "no section has it"
            raise ValueError(f"config key {key!r}: write it as section.{key} (section: model, train or data); {where}")
        per_section[owners[0]][key] = value
    for s in _SECTIONS:
        if per_section[s]:
            setattr(run, s, replace(getattr(run, s), s + ".", per_section[s]))
    return run


def parse_set_items(items) -> Dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a.b": 1, "c": [1, 2]}`` (values parsed as YAML)."""
    out = {}
    for item in items or ():
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_yaml_overrides(path: str) -> Dict[str, Any]:
    """A YAML file with sections ``model:``, ``train:``, ``data:`` as flat ``section.field`` overrides."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with sections model / train / data")
    out = {}
    for section, values in doc.items():
        if section in ("system", "preset", "stage", "tokenizer"):
            continue
        if section not in _SECTIONS or not isinstance(values, dict):
            raise ValueError(f"{path}: top-level keys must be model, train or data (mappings); got {section!r}")
        out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


def from_dict(run_dict: Dict[str, Any], model_cls_cfg) -> RunConfig:
    """The inverse of :meth:`RunConfig.to_dict` for a system whose model config class is given."""
    run = RunConfig(run_dict["system"], run_dict["preset"], model_cls_cfg(), stage=run_dict.get("stage", "tokenizer"),
                    tokenizer=run_dict.get("tokenizer", ""))
    flat = {f"{s}.{k}": v for s in _SECTIONS for k, v in run_dict.get(s, {}).items()}
    return apply_overrides(run, flat)


def check_fields(cfg, at_least: Optional[Dict[str, int]] = None, non_negative: Tuple[str, ...] = (),
                 unit_open: Tuple[str, ...] = (), multipliers: Tuple[str, ...] = ()) -> None:
    """ValueErrors naming the config class and the field for the common range rules of model configs:
    ``at_least`` {field: minimum}, ``non_negative`` fields (>= 0), ``unit_open`` fields (in (0, 1)) and
    ``multipliers`` (non-empty sequences of ints >= 1)."""
    name = type(cfg).__name__
    for key, low in (at_least or {}).items():
        if getattr(cfg, key) < low:
            raise ValueError(f"{name}: {key} must be >= {low}, got {getattr(cfg, key)}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ValueError(f"{name}: {key} must be >= 0, got {getattr(cfg, key)}")
    for key in unit_open:
        if not 0.0 < getattr(cfg, key) < 1.0:
            raise ValueError(f"{name}: {key} must be in (0, 1), got {getattr(cfg, key)}")
    for key in multipliers:
        value = getattr(cfg, key)
        if not value or min(value) < 1:
            raise ValueError(f"{name}: {key} must be a non-empty list of positive multipliers, got {value}")
