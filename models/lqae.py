"""LQAE (Liu, Yan and Abbeel 2023, "Language Quantized AutoEncoders: Towards Unsupervised Text-Image
Alignment", arXiv:2302.00902), after the authors' code (forhaoliu/language-quantized-autoencoders,
``lqae/models/lqae.py`` and the README's training command).

An image is encoded to a grid of vectors in a frozen language model's word-embedding space; each
is quantized to the nearest word of the vocabulary by cosine similarity (the authors' run:
``l2_normalize=True``, both sides l2-normalised before the squared distance); a random half of the
words (each position independently with probability ``mask_ratio`` = 0.5, the run's
``bert_min_ratio = bert_max_ratio = 0.5``) is replaced by the ``[MASK]`` word; the frozen language
model runs over the sequence (no special tokens, positions 0..N-1) and the decoder reconstructs the
image from its last hidden states (``use_bert_ste=False``, ``bert_channel_image_loss_weight=1``,
``nochannel_image_loss_weight=0``). Gradients reach the encoder only through the frozen language
model (straight-through estimator at the quantizer) and the commitment term. Evaluation and
``decode`` mask nothing (the authors' evaluation sets both ratios to 0). The loss is
``mse(x_hat, x) + beta * commitment``.

Here the language model is all-MiniLM-L6-v2 (:mod:`models.text`; 30522 words of width 384) in place
of RoBERTa-base (50265 x 768). The quantizer is ``vqkernels.nn.VectorQuantize`` with
``frozen_codebook=`` the word table and ``use_cosine_sim=True``: its search is the nearest
l2-normalised word to the l2-normalised encoder output (the authors' metric) and its output is that
unit vector; it is scaled back to the word's own length, so the language model reads its real word
embeddings (the authors feed the raw codebook rows as well). ``encode`` returns word ids and
:meth:`LQAE.words` shows them as WordPiece tokens.

Deviations: the commitment term is on the l2-normalised vectors (the layer's cosine codebook; the
authors compare raw vectors, and their code counts the term twice through an identity latent
projection, so their 0.005 acts as 0.01); RoBERTa's masked-token prediction loss (weight 1e-4 in the
authors' run) is left out because all-MiniLM-L6-v2 ships no MLM head; the encoder and decoder are
the taming-style conv stacks of :mod:`models.blocks` (the authors' code offers a ResNet with
filters 128, channel multipliers 1, 1, 2, 2, 4 and 2 residual blocks, which ``base`` uses; their
README's run uses ViT-B/16 instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqkernels.nn import VectorQuantize

from . import Preset, text
from .blocks import ConvAEConfig, conv_autoencoder, token_grid
from .config import DataConfig, TrainConfig
from .tokenizer import StepOutput, Tokenizer


@dataclass
class LQAEConfig(ConvAEConfig):
    mask_ratio: float = 0.5       # probability that a word is replaced by [MASK] in training
    beta: float = 0.01            # commitment weight (on l2-normalised vectors)


class LQAE(Tokenizer):
    """Encoder -> nearest MiniLM word (cosine) -> half masked -> frozen MiniLM -> decoder."""

    config_cls = LQAEConfig

    def __init__(self, cfg: LQAEConfig):
        super().__init__(cfg)
        if not 0.0 <= cfg.mask_ratio < 1.0:
            raise ValueError(f"LQAEConfig: mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
        if cfg.beta < 0:
            raise ValueError(f"LQAEConfig: beta must be >= 0, got {cfg.beta}")
        width = text.MiniLMConfig().hidden_size
        self.encoder, self.decoder = conv_autoencoder(cfg, cfg.in_channels, width)
        self.grid = token_grid(cfg)
        if self.grid ** 2 > text.MiniLMConfig().max_position_embeddings:
            raise ValueError(f"LQAEConfig: {self.grid ** 2} tokens exceed MiniLM's 512 positions; "
                             f"lower the resolution or add ch_mult levels")
        table = text.word_embeddings()
        self.quantize = VectorQuantize(width, table.shape[0], frozen_codebook=table, use_cosine_sim=True,
                                       commitment_weight=cfg.beta, rotation_trick=False, accept_image_fmap=True)
        # derived from the package at construction, so not saved: each word's length and the [MASK] word
        self.register_buffer("word_norms", table.norm(dim=1), persistent=False)
        self.register_buffer("mask_word", table[text.tokenizer().mask_id].clone(), persistent=False)

    def words(self, ids: torch.Tensor):
        """The WordPiece tokens of word ids (e.g. ``encode``'s), as nested lists."""
        return text.words(ids)

    def _language_model(self, words: torch.Tensor) -> torch.Tensor:
        """MiniLM's last hidden states of a [B, 384, h, w] map of word vectors, as a [B, 384, h, w] map in the
        words' dtype (the frozen MiniLM runs in float32)."""
        b, d, h, w = words.shape
        hidden = text.minilm(words.device)(inputs_embeds=words.flatten(2).transpose(1, 2))
        return hidden.to(words.dtype).transpose(1, 2).reshape(b, d, h, w)

    def _mask(self, words: torch.Tensor) -> torch.Tensor:
        """Each position's word replaced by [MASK] with probability ``mask_ratio``."""
        b, _, h, w = words.shape
        masked = torch.rand(b, 1, h, w, device=words.device) < self.cfg.mask_ratio
        return torch.where(masked, self.mask_word.to(words.dtype).view(1, -1, 1, 1), words)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        unit, ids, commit = self.quantize(self.encoder(x))
        words = unit * self.word_norms[ids].unsqueeze(1)
        recon = self.decoder(self._language_model(self._mask(words)))
        rec_loss = F.mse_loss(recon, x)
        return StepOutput(loss=rec_loss + commit, recon=recon, indices={"words": ids},
                          logs={"rec_loss": rec_loss.detach(), "commit_loss": commit.detach()})

    def encode(self, x):
        return self.quantize(self.encoder(x))[1]

    def decode(self, indices):
        words = self.quantize.get_output_from_indices(indices) * self.word_norms[indices].unsqueeze(1)
        return self.decoder(self._language_model(words))

    def codebook_sizes(self):
        return {"words": self.quantize.codebook_size}


Model = LQAE

PRESETS = {
    # 32x32 photos -> 8x8 words. Each image costs ~4.6 GFLOP a step (the search over 30522 words of width 384,
    # MiniLM forward and backward over its 64 words, the conv stacks), so few, small steps fit in minutes.
    "tiny": Preset(model=LQAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, beta=0.25),
                   train=TrainConfig(steps=600, batch_size=8, lr=1e-3, betas=(0.9, 0.95), warmup_steps=30),
                   data=DataConfig(name="photos")),
    # The authors' code default encoder / decoder (ResNet: filters 128, multipliers 1, 1, 2, 2, 4, 2 blocks) at
    # 256x256 -> 16x16 words; their README run: AdamW (0.9, 0.95), peak lr 1.5e-4 x batch / 256 = 3e-4 at batch
    # 512, weight decay 5e-4, 100 ImageNet epochs (250k steps) with 5 warm-up epochs, cosine decay to 0.
    "base": Preset(model=LQAEConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                    mid_attn=False, beta=0.01),
                   train=TrainConfig(steps=250_000, batch_size=512, lr=3e-4, betas=(0.9, 0.95), weight_decay=5e-4,
                                     warmup_steps=12_500, min_lr_ratio=0.0, grad_clip=0.0),
                   data=DataConfig(name="photos")),
}
