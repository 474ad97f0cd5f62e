"""LQAE (models/lqae.py): the frozen word codebook and language model, the cosine nearest-word search,
the masking of half the words, the eval path through MiniLM by hand, words(), the base preset and
configuration errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import text
from models.lqae import LQAE, PRESETS, LQAEConfig

torch.set_num_threads(1)


def small(**kw):
    return LQAEConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, **kw)


def images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def table():
    return text.word_embeddings()


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return LQAE(small(**kw))


def capture(module, store):
    module.register_forward_hook(lambda _, __, out: store.append(out))


def test_nearest_word_is_the_cosine_nearest_and_the_codebook_is_frozen(table):
    m = model()
    feats = []
    capture(m.encoder, feats)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    before = m.quantize.codebook.clone()
    out = m({"image": images()}, 0)
    out.loss.backward()
    opt.step()
    z = feats[0].detach().permute(0, 2, 3, 1).reshape(-1, 384)
    expected = (F.normalize(z, dim=1) @ F.normalize(table, dim=1).T).argmax(1)
    assert torch.equal(out.indices["words"].flatten(), expected)
    # the layer's codebook is the l2-normalised table, not a parameter, unchanged by the step
    assert not any(p is m.quantize.codebook for p in m.parameters())
    torch.testing.assert_close(before, F.normalize(table, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(m.quantize.codebook, before)


def test_minilm_is_frozen_shared_and_outside_the_state_dict():
    m = model()
    lm = text.minilm()
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m({"image": images()}, 0).loss.backward()
    opt.step()
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in lm.parameters())
    own = {id(p) for p in m.parameters()}
    assert not any(id(p) in own for p in lm.parameters())
    assert not any("attention" in k or "word_embeddings" in k for k in m.state_dict())


def test_half_the_words_are_masked_in_training_and_the_rest_are_real_word_vectors(table):
    m = model(mask_ratio=0.5)
    seen = []
    language_model = m._language_model
    m._language_model = lambda words: seen.append(words.detach()) or language_model(words)
    fractions = []
    for seed in range(6):
        out = m({"image": images(4, seed)}, 0)
        rows = seen[-1].permute(0, 2, 3, 1).reshape(-1, 384)
        ids = out.indices["words"].flatten()
        masked = (rows == table[103]).all(1)
        torch.testing.assert_close(rows[~masked], table[ids[~masked]], rtol=0, atol=1e-6)
        fractions.append(masked.float().mean())
    assert 0.4 < torch.stack(fractions).mean() < 0.6
    m.eval()
    with torch.no_grad():
        m.reconstruct(images())
    assert not (seen[-1].permute(0, 2, 3, 1) == table[103]).all(-1).any()  # evaluation masks nothing


def test_eval_decode_is_the_decoder_on_minilm_of_the_words(table):
    m = model().eval()
    x = images()
    with torch.no_grad():
        ids = m.encode(x)
        assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64
        hidden = text.minilm()(inputs_embeds=table[ids.flatten(1)])
        expected = m.decoder(hidden.transpose(1, 2).reshape(2, 384, 4, 4))
        torch.testing.assert_close(m.decode(ids), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.reconstruct(x), m.decode(ids), rtol=0, atol=0)


def test_a_bf16_model_encodes_and_decodes():  # the frozen float32 MiniLM reads bf16 word vectors
    m = model().eval().to(torch.bfloat16)
    with torch.no_grad():
        out = m.decode(m.encode(images().to(torch.bfloat16)))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 16, 16) and torch.isfinite(out.float()).all()


def test_words_are_real_vocabulary_tokens():
    m = model().eval()
    with torch.no_grad():
        ids = m.encode(images())
    words = m.words(ids)
    vocab = text.vocabulary()
    assert len(words) == 2 and len(words[0]) == 4 and len(words[0][0]) == 4
    assert all(w == vocab[i] for row, irow in zip(words[0], ids[0].tolist()) for w, i in zip(row, irow))
    assert m.words(torch.tensor([2417, 4418])) == ["red", "circle"]
    assert m.codebook_sizes() == {"words": 30522}


def test_loss_is_reconstruction_plus_commitment_and_gradients_reach_encoder_and_decoder():
    m = model(mask_ratio=0.0, beta=0.5)
    feats = []
    capture(m.encoder, feats)
    x = images()
    out = m({"image": x}, 0)
    out.loss.backward()
    z = F.normalize(feats[0].detach().permute(0, 2, 3, 1).reshape(-1, 384), dim=1)
    code = m.quantize.codebook[out.indices["words"].flatten()]
    commit = 0.5 * ((z - code) ** 2).mean()
    torch.testing.assert_close(out.logs["commit_loss"], commit)
    torch.testing.assert_close(out.loss, F.mse_loss(out.recon, x) + commit)
    for part in (m.encoder, m.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_base_preset_is_the_authors_resnet_on_the_meta_device():
    cfg = PRESETS["base"].model
    assert (cfg.resolution, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.mask_ratio) == (256, 128, (1, 1, 2, 2, 4),
                                                                                          2, 0.5)
    with torch.device("meta"):
        m = LQAE(cfg)
    assert m.grid == 16 and m.codebook_sizes() == {"words": 30522}
    assert 50e6 < sum(p.numel() for p in m.parameters()) < 80e6


@pytest.mark.parametrize("bad, match", [(dict(mask_ratio=1.0), "mask_ratio"), (dict(beta=-1.0), "beta"),
                                        (dict(resolution=64, ch_mult=(1,)), "512 positions"),
                                        (dict(ch_mult=()), "ch_mult"), (dict(resolution=18), "resolution")])
def test_bad_configuration_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        LQAE(dataclasses.replace(small(), **bad))
