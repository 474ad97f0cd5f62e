"""The vqkernels model suite: image tokenizers (stage 1) and the generators of their codes (stage 2),
trained and sampled through ``vqkernels.nn`` / ``torch.ops.vqkernels``.

``models.SYSTEMS`` names every system; :func:`system` imports one's module, which defines
``Model`` (a :class:`models.tokenizer.Tokenizer`) and ``PRESETS`` (``tiny``, ``base``: a
:class:`Preset` each). ``models.generator.GENERATORS`` names the generator systems (some share a
name with their tokenizer's system: ``vqgan``; others do not: ``maskgit``, ``var``). :func:`load`
rebuilds a trained model from its run folder.
"""

import importlib
from dataclasses import dataclass, field

from .config import DataConfig, TrainConfig

SYSTEMS = ("vae", "vqvae", "vqvae2", "vqgan", "vit_vqgan", "dvae", "rqvae", "hqvae", "var_vqvae", "lqae", "spae",
           "unicode", "scene")


@dataclass
class Preset:
    """A system's starting configuration: model, optimisation and data."""
    model: object
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def system(name: str):
    """The module of system ``name`` (``Model``, ``PRESETS``)."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; systems: {', '.join(SYSTEMS)}")
    return importlib.import_module(f"models.{name}")


def load(name: str, run_dir: str, device="cpu"):
    """The model of system ``name`` trained in ``run_dir`` (its newest checkpoint), in eval mode: a
    tokenizer, or for a generator run (``--stage generator``) a :class:`models.generator.Generator`
    holding its tokenizer, whose ``sample(...)`` gives images and token ids."""
    from .checkpoint import load_model
    return load_model(name, run_dir, device=device)


__all__ = ["SYSTEMS", "Preset", "system", "load"]
