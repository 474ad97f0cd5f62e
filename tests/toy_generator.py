"""Toy generators for the trainer / sampler / loader tests: independent categorical codes per
position of a vqvae code map, their logits a table per class (and the null class), or for the text
one the mean of a table's rows over the prompt's WordPiece ids."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Preset
from models.config import DataConfig, TrainConfig
from models.generator import ConditionConfig, Generator, TextConditionConfig
from models.sampling import guidance_scale, guide, sample_logits, with_null_labels
from models.tokenizer import StepOutput


@dataclass
class ToyConfig(ConditionConfig):
    scale: float = 1.0   # initial logit scale


class Toy(Generator):
    config_cls = ToyConfig

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        side = tokenizer.cfg.resolution // 4
        self.shape, self.k = (side, side), tokenizer.cfg.codebook_size
        self.table = nn.Embedding(cfg.num_classes + 1, side * side * self.k)
        nn.init.normal_(self.table.weight, 0, cfg.scale)

    def logits(self, labels, n=None):
        if labels is None:  # unconditional: the table's one row
            labels = torch.zeros(n, dtype=torch.long, device=self.table.weight.device)
        return self.table(labels).view(-1, self.shape[0] * self.shape[1], self.k)

    def training_step(self, batch, step):
        ids = self.tokens(batch).flatten(1)
        labels = self.labels(batch)
        loss = F.cross_entropy(self.logits(labels, ids.shape[0]).flatten(0, 1), ids.flatten())
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach()})

    def generate(self, n, labels, params, generator):
        if params.cfg is None:
            logits = self.logits(labels, n)
        else:
            cond, uncond = self.logits(with_null_labels(labels, self.num_classes)).chunk(2)
            logits = guide(cond, uncond, guidance_scale(params.cfg, params.cfg_schedule, 1.0))
        ids = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
        return ids.view(n, *self.shape)


@dataclass
class ToyTextConfig(TextConditionConfig):
    scale: float = 1.0


class ToyText(Generator):
    """Text-conditioned; built on one vqvae tokenizer, or two (the second unused: the plumbing test)."""
    config_cls = ToyTextConfig
    conditioning = "text"

    def __init__(self, cfg, tokenizer, *more):
        super().__init__(cfg, tokenizer, *more)
        side = tokenizer.cfg.resolution // 4
        self.shape, self.k = (side, side), tokenizer.cfg.codebook_size
        self.table = nn.Embedding(30522, side * side * self.k)
        nn.init.normal_(self.table.weight, 0, cfg.scale)

    def logits(self, prompts):
        rows = self.table(prompts.ids) * prompts.mask.unsqueeze(-1)
        return (rows.sum(1) / prompts.mask.sum(1, keepdim=True)).view(-1, self.shape[0] * self.shape[1], self.k)

    def training_step(self, batch, step):
        ids = self.tokens(batch).flatten(1)
        loss = F.cross_entropy(self.logits(self.prompts(batch)).flatten(0, 1), ids.flatten())
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach()})

    def generate(self, n, prompts, params, generator):
        if params.cfg is None:
            logits = self.logits(prompts)
        else:
            cond, uncond = self.logits(prompts.cat(self.null_prompts(n, prompts.ids.device))).chunk(2)
            logits = guide(cond, uncond, guidance_scale(params.cfg, params.cfg_schedule, 1.0))
        ids = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
        return ids.view(n, *self.shape)


MODELS = {"toy": Toy, "toy_on_vqgan": Toy, "toy_text": ToyText, "toy_pair": ToyText}
PRESETS = {"toy": {"tiny": Preset(model=ToyConfig(), train=TrainConfig(steps=4, batch_size=8, warmup_steps=1,
                                                                        judge_per_class=0),
                                  data=DataConfig(name="digits", hflip=False))}}
PRESETS["toy_on_vqgan"] = PRESETS["toy"]
PRESETS["toy_text"] = {"tiny": Preset(model=ToyTextConfig(), train=TrainConfig(steps=3, batch_size=8, warmup_steps=1,
                                                                                judge_per_class=0),
                                      data=DataConfig(name="shapes", num_images=48, hflip=False))}
PRESETS["toy_pair"] = PRESETS["toy_text"]
