"""UniCode (Zheng et al. 2024, "UniCode: Learning a Unified Codebook for Multimodal Large Language
Models", arXiv:2403.09072): a visual tokenizer whose codebook is the language model's vocabulary.

The codebook has one code per vocabulary entry (MiniLM's 30522 WordPiece tokens, :mod:`models.text`;
UniCode: the LLM's), so an image token id IS a vocabulary id. Its codes are learned by the VQ-VAE
exponential moving average toward the visual features assigned to them and, after every such
update, pulled toward the language model's embeddings (UniCode's language-driven iterative
training)::

    C <- lambda * C + (1 - lambda) * C_LM          (lambda: ``lm_pull``)

C_LM is MiniLM's word table brought to the code width: its centred rows in the table's top
``embed_dim`` principal axes (a rotation when ``embed_dim`` = 384, so distances between words are
kept); the codebook starts at C_LM. Stacked quantization: each position holds ``depth`` codes of
the one shared codebook by residual quantization (``vqkernels.nn.ResidualVQ``, ``shared_codebook``,
EMA decay ``decay``). The loss is ``mse(x_hat, x) + beta * mean_l commitment_l`` (RQ-VAE's
cumulative commitment). ``encode`` gives vocabulary ids [B, h, w, depth]; :meth:`UniCode.words`
shows them as WordPiece tokens.

The pull runs right after the layer's EMA step and rewrites the layer's EMA statistics with it:
``embed_avg`` becomes the pulled codes times their Laplace-smoothed counts (the normalisation of
:func:`vqkernels.ema_update_`), so the next EMA step continues from the pulled codebook.

Guesses and deviations: the projection of C_LM to the code width (UniCode's LLM embeddings are
projected; the form is not given here: principal axes are our choice), lambda = 0.99 per step, and
``base``'s shapes (256x256 -> 16x16 x 4 codes of width 256, RQ-VAE-like) are not verified against
the paper; UniCode's LLM is trained on the codes in a later stage (not part of this tokenizer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqkernels.nn import ResidualVQ

from . import Preset, text
from .config import DataConfig, TrainConfig, check_fields
from .blocks import ConvAEConfig, conv_autoencoder
from .tokenizer import StepOutput, Tokenizer


@dataclass
class UniCodeConfig(ConvAEConfig):
    embed_dim: int = 64        # code width (C_LM: the word table in its top embed_dim principal axes)
    depth: int = 2             # stacked codes per position
    lm_pull: float = 0.99      # lambda in C <- lambda C + (1 - lambda) C_LM, after every EMA step
    decay: float = 0.99        # EMA decay of the codebook
    beta: float = 0.25         # commitment weight


@functools.lru_cache(maxsize=None)
def _principal_axes() -> torch.Tensor:
    """The word table's mean [384] and principal axes [384, 384] (columns, by decreasing variance), float64."""
    with torch.device("cpu"):
        table = text.word_embeddings().double()
        mean = table.mean(0)
        centred = table - mean
        variances, axes = torch.linalg.eigh(centred.T @ centred)
        axes = axes[:, variances.argsort(descending=True)]
        signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        return mean, axes * signs


def vocabulary_codes(dim: int) -> torch.Tensor:
    """MiniLM's word table [30522, 384], centred, in its top ``dim`` principal axes: [30522, dim]
    (each axis signed so that its largest component is positive, for a unique result)."""
    mean, axes = _principal_axes()
    with torch.device("cpu"):
        return ((text.word_embeddings().double() - mean) @ axes[:, :dim]).float()


def smoothed_counts(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """The Laplace-smoothed EMA counts :func:`vqkernels.ema_update_` divides the sums by."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.numel() * eps) * n


class UniCode(Tokenizer):
    """Encoder -> stacked quantization with the vocabulary-sized codebook pulled toward MiniLM -> decoder."""

    config_cls = UniCodeConfig

    def __init__(self, cfg: UniCodeConfig):
        super().__init__(cfg)
        width = text.MiniLMConfig().hidden_size
        if not 1 <= cfg.embed_dim <= width:
            raise ValueError(f"UniCodeConfig: embed_dim must be in [1, {width}] (MiniLM's width), got {cfg.embed_dim}")
        check_fields(cfg, at_least={"depth": 1}, non_negative=("beta",), unit_open=("decay",))
        if not 0.0 <= cfg.lm_pull <= 1.0:
            raise ValueError(f"UniCodeConfig: lm_pull must be in [0, 1], got {cfg.lm_pull}")
        self.encoder, self.decoder = conv_autoencoder(cfg, cfg.in_channels, cfg.embed_dim)
        lm_codes = vocabulary_codes(cfg.embed_dim)
        self.quantizer = ResidualVQ(dim=cfg.embed_dim, num_quantizers=cfg.depth, codebook_size=lm_codes.shape[0],
                                    shared_codebook=True, accept_image_fmap=True, decay=cfg.decay,
                                    commitment_weight=cfg.beta, rotation_trick=False)
        # derived from the package at construction, so not saved
        self.register_buffer("lm_codes", lm_codes, persistent=False)
        with torch.no_grad():  # the codebook starts at C_LM (counts 1: smoothed counts 1, sums = codes)
            cb = self.codebook_state
            cb.embed = lm_codes.to(cb.embed.device).unsqueeze(0).clone()
            cb.embed_avg.copy_(lm_codes.unsqueeze(0))

    @property
    def codebook_state(self):
        """The shared codebook's state (``embed`` [1, K, D], ``embed_avg``, ``cluster_size`` [1, K])."""
        return self.quantizer.layers[0]._codebook

    @property
    def codebook(self) -> torch.Tensor:
        """The codes [30522, embed_dim]; row k is vocabulary token k's."""
        return self.codebook_state.embed[0]

    @torch.no_grad()
    def pull_toward_vocabulary_(self) -> None:
        """C <- lambda C + (1 - lambda) C_LM, with the EMA statistics rewritten to match."""
        cb, lam = self.codebook_state, self.cfg.lm_pull
        pulled = lam * cb.embed[0] + (1 - lam) * self.lm_codes.to(cb.embed.dtype)
        cb.embed_avg[0].copy_(pulled * smoothed_counts(cb.cluster_size[0], cb.eps).unsqueeze(1))
        cb.embed = pulled.unsqueeze(0)  # a new tensor: this step's backward may still hold the old codebook

    def words(self, ids: torch.Tensor):
        """The WordPiece tokens of code ids (vocabulary ids), as nested lists."""
        return text.words(ids)

    def training_step(self, batch, step) -> StepOutput:
        x = self.inputs(batch)
        z_q, ids, commit = self.quantizer(self.encoder(x))
        if self.training:
            self.pull_toward_vocabulary_()
        recon = self.decoder(z_q)
        rec_loss = F.mse_loss(recon, x)
        commit_loss = commit.mean()
        return StepOutput(loss=rec_loss + commit_loss, recon=recon,
                          indices={f"level{d}": ids[..., d] for d in range(self.cfg.depth)},
                          logs={"rec_loss": rec_loss.detach(), "commit_loss": commit_loss.detach()})

    def encode(self, x):
        """Vocabulary ids [B, h, w, depth]."""
        return self.quantizer(self.encoder(x))[1]

    def decode(self, indices):
        return self.decoder(self.quantizer.get_output_from_indices(indices))

    def codebook_sizes(self):
        return {f"level{d}": self.quantizer.codebook_size for d in range(self.cfg.depth)}


Model = UniCode

PRESETS = {
    # 32x32 photos -> 8x8 positions x 2 stacked codes from the full 30522-word vocabulary at width 32 (the
    # search over 30522 codes costs about as much as the conv stacks).
    "tiny": Preset(model=UniCodeConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=32, depth=2),
                   train=TrainConfig(steps=1200, batch_size=32, lr=1e-3, betas=(0.9, 0.99), warmup_steps=50),
                   data=DataConfig(name="photos")),
    # Guessed (RQ-VAE-like): 256x256 -> 16x16 x 4 codes of width 256, VQGAN-sized conv stacks, Adam 1e-4.
    "base": Preset(model=UniCodeConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                       attn_resolutions=(16,), embed_dim=256, depth=4),
                   train=TrainConfig(steps=500_000, batch_size=128, lr=1e-4, betas=(0.9, 0.99)),
                   data=DataConfig(name="photos")),
}
