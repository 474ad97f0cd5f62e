"""SPAE (Yu et al. 2023, "SPAE: Semantic Pyramid AutoEncoder for Multimodal Generation with Frozen
LLMs", arXiv:2306.17842): an image as a coarse-to-fine pyramid of words of a frozen language
model's vocabulary.

The encoder maps the image to a grid of vectors in the word-embedding space (MiniLM's 30522 x 384
table here, :mod:`models.text`; SPAE: a PaLM 2 / GPT-3.5 vocabulary embedded by CLIP's text
encoder). Pyramid layer l = 1..L has a ``pyramid[l-1]`` x ``pyramid[l-1]`` token grid (e.g. 1, 2,
4, 8: one word for the whole image, then 4, 16, 64), read from the feature map averaged over each
token's cell.

Streaming average quantization (SAQ): the reconstruction after l layers is the running average of
the quantized layers, ``z_hat_l = (1 / l) * sum_{i <= l} up(e_i)`` (``up``: each coarse word copied
over its cell), and layer l quantizes what makes that average equal the features::

    t_l = l * z_l - sum_{i < l} up(e_i)      (so that z_hat_l = z_l when e_l = t_l)
    e_l = nearest word of t_l                (squared l2 to the frozen table, straight-through)

The decoder reconstructs from ``z_hat_L`` at the finest grid; ``decode`` of the first l layers'
ids alone gives the coarser reconstruction ``z_hat_l`` (SPAE's progressive decoding). The
commitment term of layer l is taken on the running average, ``beta * ||z_l - sg(z_hat_l)||^2 =
beta / l^2 * ||t_l - sg(e_l)||^2``. Quantization goes through one ``vqkernels.nn.VectorQuantize``
with ``frozen_codebook=`` the table (l2 metric: an average of unit vectors could not match the
features' lengths).

Semantic loss: SPAE makes the coarse layers' words relevant to the image through CLIP (image-text
relevance of each vocabulary word as the target of the quantizer's distribution). Here, where an
image has a caption (``batch["caption"]`` non-empty), the words of the first ``semantic_layers``
layers, read by MiniLM as one sentence (``[CLS] words [SEP]``, mean pooled, l2-normalised as
sentence-transformers), are tied to the caption's MiniLM sentence embedding by ``1 - cosine``,
weighted by ``semantic_weight`` and averaged over captioned images (0 when none). Its gradient
reaches the encoder through the frozen MiniLM and the straight-through words.

Deviations and guesses: SPAE's coarse layers use a dilation subsampler (a subset of positions);
here each coarse token reads the average of its cell. The CLIP relevance target is replaced by the
caption-sentence loss above. The encoder / decoder are the taming-style conv stacks; ``base``'s
pyramid (1, 2, 4, 8, 16, 16 at 16x16 features) and semantic layers (all but the last) follow our
reading of SPAE's 6-layer configuration and are not verified against the paper's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from vqkernels.nn import VectorQuantize

from . import Preset, text
from .config import DataConfig, TrainConfig
from .blocks import ConvAEConfig, conv_autoencoder, token_grid
from .tokenizer import StepOutput, Tokenizer


@dataclass
class SPAEConfig(ConvAEConfig):
    pyramid: Tuple[int, ...] = (1, 2, 4, 8)   # token grid side of each layer, coarse to fine (divide the grid)
    semantic_layers: int = 2                  # the first layers whose words the caption loss reads (0: off)
    semantic_weight: float = 0.1
    beta: float = 0.25                        # commitment weight (on the running averages)


def _check(cfg: SPAEConfig, grid: int) -> None:
    p = cfg.pyramid
    if not p or any(s < 1 or grid % s for s in p) or any(a > b for a, b in zip(p, p[1:])):
        raise ValueError(f"SPAEConfig: pyramid must be non-decreasing token grid sides that divide the feature grid "
                         f"{grid} (resolution / 2 ** (len(ch_mult) - 1)), got {p}")
    if not 0 <= cfg.semantic_layers <= len(p):
        raise ValueError(f"SPAEConfig: semantic_layers must be in [0, {len(p)}], got {cfg.semantic_layers}")
    if sum(s * s for s in p[:cfg.semantic_layers]) + 2 > text.MiniLMConfig().max_position_embeddings:
        raise ValueError("SPAEConfig: the semantic layers hold more words than MiniLM reads (510)")
    if cfg.semantic_weight < 0 or cfg.beta < 0:
        raise ValueError("SPAEConfig: semantic_weight and beta must be >= 0")


def upsample(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, D, s, s] -> [B, D, side, side], each token copied over its cell."""
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="nearest")


class SPAE(Tokenizer):
    """Encoder -> a pyramid of MiniLM words by streaming average quantization -> decoder."""

    config_cls = SPAEConfig

    def __init__(self, cfg: SPAEConfig):
        super().__init__(cfg)
        width = text.MiniLMConfig().hidden_size
        self.encoder, self.decoder = conv_autoencoder(cfg, cfg.in_channels, width)
        self.grid = token_grid(cfg)
        _check(cfg, self.grid)
        table = text.word_embeddings()
        self.quantize = VectorQuantize(width, table.shape[0], frozen_codebook=table, commitment_weight=cfg.beta,
                                       rotation_trick=False, accept_image_fmap=True)

    def words(self, ids: torch.Tensor):
        """The WordPiece tokens of one layer's word ids, as nested lists."""
        return text.words(ids)

    def _levels(self):
        return [f"layer{i + 1}" for i in range(len(self.cfg.pyramid))]

    def quantize_pyramid(self, z: torch.Tensor):
        """SAQ of features [B, 384, g, g]: per layer the words e_l [B, 384, s, s], ids [B, s, s] and
        the commitment loss, and the running average after the last layer [B, 384, g, g]."""
        words, ids, loss = [], [], z.new_zeros(())
        for layer, side in enumerate(self.cfg.pyramid, start=1):
            z_l = F.adaptive_avg_pool2d(z, side)
            target = layer * z_l - sum((upsample(e, side) for e in words), torch.zeros_like(z_l))
            e, i, commit = self.quantize(target)
            words.append(e)
            ids.append(i)
            loss = loss + commit / layer ** 2
        return words, ids, loss, self._average(words)

    def _average(self, words: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(upsample(e, self.grid) for e in words) / len(words)

    def semantic_loss(self, words: Sequence[torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
        """Mean over captioned images of 1 - cos(MiniLM sentence of the coarse layers' words, caption's)."""
        coarse = torch.cat([e.flatten(2) for e in words[:self.cfg.semantic_layers]], dim=2).transpose(1, 2)
        lm = text.minilm(coarse.device)
        tok = text.tokenizer()
        special = lm.embeddings.word_embeddings.weight[[tok.cls_id, tok.sep_id]].to(coarse.dtype)
        b = coarse.shape[0]
        seq = torch.cat([special[0].expand(b, 1, -1), coarse, special[1].expand(b, 1, -1)], dim=1)
        image_sentence = text.mean_pool(lm(inputs_embeds=seq), torch.ones(seq.shape[:2], device=seq.device))
        has = torch.tensor([bool(c) for c in captions], dtype=coarse.dtype, device=coarse.device)
        cos = (image_sentence * text.sentence_embeddings(captions, coarse.device).to(coarse.dtype)).sum(-1)
        return ((1 - cos) * has).sum() / has.sum().clamp_min(1)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        words, ids, commit, z_hat = self.quantize_pyramid(self.encoder(x))
        recon = self.decoder(z_hat)
        rec_loss = F.mse_loss(recon, x)
        captions = batch.get("caption") or []
        if self.cfg.semantic_layers and self.cfg.semantic_weight > 0 and any(captions):
            semantic = self.semantic_loss(words, captions)
        else:
            semantic = rec_loss.new_zeros(())
        loss = rec_loss + commit + self.cfg.semantic_weight * semantic
        return StepOutput(loss=loss, recon=recon, indices=dict(zip(self._levels(), ids)),
                          logs={"rec_loss": rec_loss.detach(), "commit_loss": commit.detach(),
                                "semantic_loss": semantic.detach()})

    def encode(self, x):
        """Word ids per pyramid layer: a tuple of [B, s, s] tensors, coarse to fine."""
        return tuple(self.quantize_pyramid(self.encoder(x))[1])

    def decode(self, indices):
        """The reconstruction from the ids of the first l <= L layers (all of ``encode``'s: the full one)."""
        if not 1 <= len(indices) <= len(self.cfg.pyramid):
            raise ValueError(f"SPAE.decode: expected the ids of 1 to {len(self.cfg.pyramid)} layers, "
                             f"got {len(indices)}")
        return self.decoder(self._average([self.quantize.get_output_from_indices(i) for i in indices]))

    def codebook_sizes(self):
        return {level: self.quantize.codebook_size for level in self._levels()}


Model = SPAE

PRESETS = {
    # Shapes (captions such as "a red circle and a blue triangle"), so the semantic loss has text to tie the
    # 1 + 4 coarse words to; 32x32 -> 8x8 features, layers of 1, 2x2, 4x4 and 8x8 words (85 per image).
    "tiny": Preset(model=SPAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, pyramid=(1, 2, 4, 8),
                                    semantic_layers=2, semantic_weight=0.1),
                   train=TrainConfig(steps=640, batch_size=8, lr=1e-3, betas=(0.9, 0.99), warmup_steps=30),
                   data=DataConfig(name="shapes")),
    # Guessed from SPAE's 6-layer pyramid (1, 4, 16, 64, 256, 256 tokens) over 16x16 features at 256x256,
    # semantic loss on all layers but the last; VQGAN-sized conv stacks; Adam 1e-4 (not verified).
    "base": Preset(model=SPAEConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                    attn_resolutions=(16,), pyramid=(1, 2, 4, 8, 16, 16), semantic_layers=5,
                                    semantic_weight=0.1),
                   train=TrainConfig(steps=500_000, batch_size=256, lr=1e-4, betas=(0.9, 0.99)),
                   data=DataConfig(name="photos")),
}
