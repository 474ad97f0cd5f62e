"""UniCode (models/unicode.py): the pull C <- lambda C + (1 - lambda) C_LM applied exactly after the EMA
step (and the EMA statistics left consistent with it), C_LM as the word table's principal axes, ids
that are vocabulary ids, gradients, the base preset and configuration errors."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vqkernels
from models import text
from models.unicode import PRESETS, UniCode, UniCodeConfig, vocabulary_codes

torch.set_num_threads(1)


def small(**kw):
    kw.setdefault("embed_dim", 8)
    return UniCodeConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, depth=2, **kw)


def images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return UniCode(small(**kw))


def test_codebook_starts_at_the_vocabulary_in_its_principal_axes():
    table = text.word_embeddings().double()
    full = vocabulary_codes(384).double()
    # all 384 axes: a rotation of the centred table, so the distances between words are kept
    pick = torch.tensor([0, 101, 2417, 4418, 30000])
    torch.testing.assert_close(torch.cdist(full[pick], full[pick]), torch.cdist(table[pick], table[pick]))
    codes = vocabulary_codes(8).double()
    cov = codes.T @ codes / codes.shape[0]
    variances = cov.diagonal()
    assert torch.all(variances[:-1] >= variances[1:])                       # decreasing variance
    torch.testing.assert_close(cov - torch.diag(variances), torch.zeros(8, 8, dtype=torch.float64), atol=1e-9,
                               rtol=0)                                    # uncorrelated axes
    torch.testing.assert_close(codes.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-9, rtol=0)
    m = model()
    assert m.codebook.shape == (30522, 8)
    torch.testing.assert_close(m.codebook, codes.float())
    assert not any(k.endswith("lm_codes") for k in m.state_dict())


def test_pull_is_lambda_c_plus_one_minus_lambda_c_lm_after_the_ema_step():
    m = model(lm_pull=0.9)
    twin = copy.deepcopy(m)
    x = images()
    out = m({"image": x}, 0)
    # the same step without the pull: the layer's EMA update alone
    twin.quantizer(twin.encoder(x))
    ema = twin.codebook.clone()
    assert not torch.equal(ema, twin.lm_codes)  # the EMA step moved the codes the batch used
    expected = 0.9 * ema + 0.1 * m.lm_codes
    torch.testing.assert_close(m.codebook, expected, rtol=0, atol=1e-6)
    # the EMA statistics describe the pulled codebook: recomputing the codes from them changes nothing
    cb = m.codebook_state
    recomputed = torch.empty_like(cb.embed[0])
    vqkernels.ema_update_(recomputed, cb.cluster_size[0].clone(), cb.embed_avg[0].clone(),
                          torch.empty(0, 8), torch.empty(0, dtype=torch.int64), 1.0, cb.eps)
    torch.testing.assert_close(recomputed, m.codebook, rtol=1e-5, atol=1e-6)
    used = out.indices["level0"].unique()
    assert not torch.allclose(m.codebook[used], m.lm_codes[used])


def test_lambda_one_is_plain_ema_and_lambda_zero_is_the_vocabulary():
    x = images()
    plain, twin = model(lm_pull=1.0), model(lm_pull=1.0)
    plain({"image": x}, 0)
    twin.quantizer(twin.encoder(x))
    torch.testing.assert_close(plain.codebook, twin.codebook, rtol=0, atol=0)
    vocab = model(lm_pull=0.0)
    vocab({"image": x}, 0)
    torch.testing.assert_close(vocab.codebook, vocab.lm_codes, rtol=0, atol=0)
    # eval does not touch the codebook
    before = plain.codebook.clone()
    plain.eval()
    with torch.no_grad():
        plain.reconstruct(x)
    assert torch.equal(plain.codebook, before)


def test_ids_are_vocabulary_ids_and_round_trip():
    m = model().eval()
    x = images()
    with torch.no_grad():
        ids = m.encode(x)
        assert ids.shape == (2, 4, 4, 2) and ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < 30522
        expected = m.decoder((m.codebook[ids[..., 0]] + m.codebook[ids[..., 1]]).permute(0, 3, 1, 2))
        torch.testing.assert_close(m.decode(ids), expected, rtol=0, atol=1e-5)
    vocab = text.vocabulary()
    assert m.words(ids[0, 0, 0]) == [vocab[i] for i in ids[0, 0, 0].tolist()]
    assert m.codebook_sizes() == {"level0": 30522, "level1": 30522}


def test_loss_and_gradients_reach_encoder_and_decoder():
    m = model()
    x = images()
    out = m({"image": x}, 0)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, F.mse_loss(out.recon, x) + out.logs["commit_loss"])
    out.loss.backward()
    for part in (m.encoder, m.decoder):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    assert not any(p is m.codebook for p in m.parameters())  # the codebook learns by EMA and the pull only


def test_base_preset_on_the_meta_device():
    cfg = PRESETS["base"].model
    with torch.device("meta"):
        m = UniCode(cfg)
    assert m.codebook_sizes() == {f"level{d}": 30522 for d in range(4)}
    assert 50e6 < sum(p.numel() for p in m.parameters()) < 100e6


@pytest.mark.parametrize("bad, match", [(dict(embed_dim=385), "embed_dim"), (dict(depth=0), "depth"),
                                        (dict(lm_pull=1.5), "lm_pull"), (dict(decay=1.0), "decay"),
                                        (dict(resolution=18), "resolution")])
def test_bad_configuration_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        UniCode(dataclasses.replace(small(), **bad))
