"""Make-A-Scene's transformer (Gafni et al. 2022, "Make-A-Scene: Scene-Based Text-to-Image Generation with
Human Priors", arXiv:2203.13131) on the ``vqgan`` image tokenizer and the ``scene`` tokenizer (VQ-SEG,
:mod:`models.scene`); built as ``MakeAScene(cfg, vqgan_tokenizer, scene_tokenizer)``.

The paper's stage 2 is one autoregressive transformer over the concatenation ``[text tokens, scene
tokens, image tokens]``: the scene tokens are the VQ-SEG codes of the image's semantic map (training:
``batch["scene"]`` through the scene tokenizer's ``inputs`` / ``encode``), so at inference the scene is
optional: given (a map's codes are put in the prefix and only the image tokens are sampled) or sampled
by the transformer from the text before the image. The sequence model is DALL-E's
(:class:`models.dalle.TextTokenTransformer`: per-position text padding, one vocabulary
``[30522 words + text_length pads, scene codes, image codes]``, logits masks that keep each position to
its own ids, a row + column position embedding per grid, a weighted cross-entropy over every position
but the first), with dense causal attention.

Classifier-free guidance for the transformer (the paper's guidance section): the transformer is fine-tuned with
the text randomly replaced by padding tokens (here caption dropout ``text_dropout`` to the empty caption,
``[CLS] [SEP]`` + the per-position pads, from the start of training), and sampling runs two parallel
streams in one doubled batch: the conditional one reads the text, the unconditional one the empty text,
and each token is drawn from ``uncond + w (cond - uncond)``. The scene tokens are the same in both
streams: the paper's unconditional stream replaces only the text, so a given scene map conditions both
(guidance then amplifies the text alone), and when the scene is sampled each guided scene token is
appended to both streams, like every image token (my reading of the paper; it does not discuss the
scene in the unconditional stream).

Sampling: ``sample(n, prompt=..., scene=...)`` with ``scene`` an int64 map [H, W] (one for all samples)
or [n, H, W] of the scene tokenizer's class ids at its resolution (``python -m models.sample make_a_scene
--scene map.png``); ``scene=None`` samples the scene tokens too. ``Samples.ids`` are the image codes
[n, h, w] (what the vqgan decodes). Scene-based editing (the paper's scene editing results: change the
map, keep the text): :meth:`MakeAScene.edit` takes the prompts of an earlier result (a
:class:`models.generator.Samples` or the caption(s)) and the edited map and samples again with the same
text tokens, the new scene tokens and the same seed.

Deviations and guesses:
- Text: MiniLM's WordPiece ids (the paper: BPE, 128 text tokens).
- The paper's loss weights over text, scene and image tokens are not given: DALL-E's text : image = 1 : 7
  with the scene tokens weighted as the image's (``scene_loss_weight = 7``), a guess.
- The paper's transformer has 4B parameters; its width / depth / heads are not reproduced here from the
  paper's text: ``base`` takes 48 layers of width 2560 with 40 heads (about 3.8B + embeddings), a guess
  sized to 4B. Dense causal attention (the paper names no sparse pattern).
- No face-aware / object-aware VQ losses: those belong to the tokenizers (``vqgan``, ``scene``).
- The paper extracts an image's scene with pretrained panoptic / human / face segmentation networks (to edit a
  real image's scene); here the map comes from the data (``batch["scene"]``) or the user (an array or a PNG).
- ``text_loss_share`` (1 in ``base``): the tiny preset scores the text tokens of a quarter of each batch's
  captions, as :mod:`models.dalle`'s tiny preset.
- 128 text tokens in ``base`` as recalled from the paper, not re-checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import Preset
from .config import DataConfig, TrainConfig
from .dalle import TextTokenTransformer
from .generator import Prompts, Samples, TextConditionConfig
from .sampling import SamplingConfig
from .tokenizer import Tokenizer


@dataclass
class MakeASceneConfig(TextConditionConfig):
    """Make-A-Scene's transformer (defaults: ``base``'s guessed 4B sizes, 128 text tokens)."""
    text_length: int = 128
    dim: int = 2560
    depth: int = 48
    heads: int = 40
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_loss_weight: float = 1.0
    scene_loss_weight: float = 7.0
    image_loss_weight: float = 7.0
    text_loss_share: float = 1.0      # training: share of the batch's captions whose text tokens are scored (1: all)


@dataclass
class SceneCondition:
    """What :meth:`MakeAScene.generate` is conditioned on: the prompts, and the scene map [n, H, W] and its
    codes [n, hs * ws] (None: the scene tokens are sampled)."""
    prompts: Prompts
    scene: Optional[torch.Tensor] = None
    scene_tokens: Optional[torch.Tensor] = None


class MakeAScene(TextTokenTransformer):
    """The transformer over ``[text, scene codes, image codes]`` (see the module docstring)."""

    config_cls = MakeASceneConfig

    def __init__(self, cfg: MakeASceneConfig, tokenizer: Tokenizer, scene_tokenizer: Tokenizer):
        if not hasattr(scene_tokenizer.cfg, "num_classes"):
            raise ValueError(f"make_a_scene's second tokenizer must be a scene tokenizer (VQ-SEG), got "
                             f"{type(scene_tokenizer).__name__}")
        super().__init__(cfg, (tokenizer, scene_tokenizer),
                         [("scene", 1, cfg.scene_loss_weight), ("image", 0, cfg.image_loss_weight)],
                         cfg.text_loss_weight)

    @property
    def scene_tokenizer(self) -> Tokenizer:
        return self.tokenizers[1]

    # ---- scene maps
    def check_scene(self, scene, n: int, device) -> torch.Tensor:
        """``scene`` as int64 [n, R, R] on ``device``: a map [R, R] (repeated) or [n, R, R] of the scene
        tokenizer's class ids at its resolution R; ValueErrors name a wrong type, size or unknown classes."""
        t = torch.as_tensor(scene)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"scene must hold integer class ids (int64), got {t.dtype}")
        r = self.scene_tokenizer.cfg.resolution
        if t.dim() == 2:
            t = t.unsqueeze(0).expand(n, -1, -1)
        elif t.dim() != 3:
            raise ValueError(f"scene must be a map [H, W] or n maps [n, H, W], got shape {tuple(t.shape)}")
        if t.shape[0] != n:
            raise ValueError(f"{t.shape[0]} scene maps for {n} samples: give one map [H, W] or n")
        if tuple(t.shape[1:]) != (r, r):
            raise ValueError(f"scene map of size {t.shape[1]}x{t.shape[2]}: the scene tokenizer reads {r}x{r} maps")
        classes = self.scene_tokenizer.cfg.num_classes
        unknown = sorted(set(torch.unique(t).tolist()) - set(range(classes)))
        if unknown:
            raise ValueError(f"scene map has class id(s) {unknown} that the scene tokenizer does not know "
                             f"(its classes: 0..{classes - 1})")
        return t.long().contiguous().to(device)

    @torch.no_grad()
    def scene_codes(self, scene: torch.Tensor) -> torch.Tensor:
        """The scene tokenizer's codes [n, hs * ws] of checked maps [n, R, R]."""
        tok = self.scene_tokenizer
        return tok.encode(tok.inputs({"scene": scene})).flatten(1)

    def sampling_condition(self, n: int, labels, prompt, scene, device) -> SceneCondition:
        prompts = super().sampling_condition(n, labels, prompt, None, device)
        if scene is None:
            return SceneCondition(prompts)
        maps = self.check_scene(scene, n, device)
        return SceneCondition(prompts, maps, self.scene_codes(maps))

    # ---- sampling
    @torch.no_grad()
    def generate_tokens(self, n: int, cond: SceneCondition, params: SamplingConfig,
                        generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """``{"scene": [n, hs, ws], "image": [n, h, w]}``: the scene codes given (in the prefix, after the
        text) or sampled, then the image codes, one token at a time."""
        guided = params.cfg is not None
        prefix = self.text_prefix(cond.prompts, guided)
        if cond.scene_tokens is not None:
            scene = cond.scene_tokens + self.segment_of("scene").offset
            prefix = torch.cat([prefix, torch.cat([scene, scene]) if guided else scene], dim=1)
        return self.split(self.decode_tokens(prefix, params, generator, guided))

    def generate(self, n: int, cond: SceneCondition, params: SamplingConfig, generator: torch.Generator):
        """Image codes [n, h, w] (see :meth:`generate_tokens`)."""
        return self.generate_tokens(n, cond, params, generator)["image"]

    def edit(self, original: Union[Samples, str, Sequence[str]], scene, *, seed: int = 0, **sampling) -> Samples:
        """Scene-based editing: the same text, a changed map. ``original`` is an earlier result
        (:class:`Samples`, its prompts are kept) or its caption(s); ``scene`` the edited map ([H, W] or one
        per sample). Samples again with the original text tokens, the edited map's scene tokens and
        ``seed`` (the same seed and map give back the same image); ``sampling``: :meth:`sample`'s options."""
        if isinstance(original, Samples):
            if original.prompts is None:
                raise ValueError("edit: these samples carry no prompts (not a text-conditioned generator's)")
            texts: List[str] = list(original.prompts)
        else:
            texts = [original] if isinstance(original, str) else list(original)
        return self.sample(len(texts), prompt=texts, scene=scene, seed=seed, **sampling)


MODELS = {"make_a_scene": MakeAScene}

PRESETS = {
    "make_a_scene": {
        # shapes (32x32, captions, scene maps) on the vqgan tiny (8x8 codes, K = 128) and scene tiny (8x8 codes,
        # K = 256) tokenizers: 20 text + 64 scene + 64 image tokens. Width 96 and the text loss on a quarter of each
        # batch's captions (as dalle's tiny): 0.41 s/step on one thread (width 128, all captions: 0.80), 2.0 steps/s
        # in the trainer (one thread); 600 steps: 53% plain (scene IoU 0.48). Both threads of the 2-core machine: 3.2
        # steps/s in a 60-step trial, but 850 steps took 4.1 minutes (56% plain, 65.7% at cfg 3); 1050 steps took
        # 5.3 minutes (67.0% / 69.3%), so 1000.
        "tiny": Preset(model=MakeASceneConfig(text_length=20, text_dropout=0.1, dim=96, depth=4, heads=4, dropout=0.0,
                                              text_loss_share=0.25),
                       train=TrainConfig(steps=1000, batch_size=32, lr=2e-3, betas=(0.9, 0.96), weight_decay=0.01,
                                         warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0),
                       data=DataConfig(name="shapes", hflip=False)),
        # 4B parameters (the paper; sizes guessed, see the module docstring) over 128 text tokens and the base
        # vqgan's and scene tokenizer's 16x16 codes; the paper's optimisation is not reproduced: DALL-E's
        # (models.dalle), its step count a guess.
        "base": Preset(model=MakeASceneConfig(),
                       train=TrainConfig(steps=430_000, batch_size=1024, lr=4.5e-4, betas=(0.9, 0.96),
                                         weight_decay=4.5e-2, warmup_steps=5000, min_lr_ratio=0.0, grad_clip=4.0),
                       data=DataConfig(name="shapes")),
    },
}
