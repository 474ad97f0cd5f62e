"""SPAE (models/spae.py): the token pyramid's shapes, streaming average quantization against a hand
computation (nearest words by cdist, running averages, the per-layer commitment), progressive
decoding, the caption loss only where captions exist, the base preset and configuration errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import text
from models.spae import PRESETS, SPAE, SPAEConfig

torch.set_num_threads(1)


def small(**kw):
    kw.setdefault("pyramid", (1, 2, 4))
    return SPAEConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, **kw)


def images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return SPAE(small(**kw))


def encoder_output(m):
    store = []
    m.encoder.register_forward_hook(lambda _, __, out: store.append(out))
    return store


def hand_saq(z, pyramid, table):
    """Streaming average quantization written out: per layer the ids, words and ||t - e||^2 means."""
    words, ids, errors = [], [], []
    for layer, side in enumerate(pyramid, start=1):
        z_l = F.adaptive_avg_pool2d(z, side)
        prev = sum(w.repeat_interleave(side // w.shape[-1], 2).repeat_interleave(side // w.shape[-1], 3)
                   for w in words) if words else 0
        t = layer * z_l - prev
        rows = t.permute(0, 2, 3, 1).reshape(-1, 384)
        i = torch.cdist(rows, table).argmin(1)
        e = table[i].view(z.shape[0], side, side, 384).permute(0, 3, 1, 2)
        words.append(e)
        ids.append(i.view(z.shape[0], side, side))
        errors.append(((rows - table[i]) ** 2).mean())
    return words, ids, errors


def test_pyramid_shapes_and_progressive_decoding():
    m = model().eval()
    with torch.no_grad():
        ids = m.encode(images())
        assert [tuple(i.shape) for i in ids] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
        assert m.codebook_sizes() == {"layer1": 30522, "layer2": 30522, "layer3": 30522}
        table = text.word_embeddings()
        coarse = m.decode(ids[:1])  # one word per image, copied over the whole 4x4 grid
        torch.testing.assert_close(coarse, m.decoder(table[ids[0]].permute(0, 3, 1, 2).expand(2, 384, 4, 4)))
        assert m.decode(ids).shape == (2, 3, 16, 16)
        with pytest.raises(ValueError, match="1 to 3 layers"):
            m.decode(ids + ids[:1])
    assert m.words(ids[0])[0][0][0] in text.vocabulary()


def test_streaming_average_quantization_matches_the_hand_computation():
    m = model(beta=0.5)
    feats = encoder_output(m)
    x = images()
    out = m({"image": x, "caption": ["", ""]}, 0)
    z = feats[0].detach()
    table = text.word_embeddings()
    words, ids, errors = hand_saq(z, (1, 2, 4), table)
    for level, i in zip(("layer1", "layer2", "layer3"), ids):
        assert torch.equal(out.indices[level], i)
    assert len({int(i) for i in ids[2].flatten()}) > 1
    # the decoder reads the running average of the three layers (each word copied over its cell)
    average = sum(w.repeat_interleave(4 // w.shape[-1], 2).repeat_interleave(4 // w.shape[-1], 3) for w in words) / 3
    torch.testing.assert_close(out.recon, m.decoder(average), rtol=0, atol=1e-5)
    commit = sum(0.5 * err / layer ** 2 for layer, err in enumerate(errors, start=1))
    torch.testing.assert_close(out.logs["commit_loss"], commit)
    torch.testing.assert_close(out.loss, F.mse_loss(out.recon, x) + commit)
    # the running average after l layers approximates the pooled features: layer 1's word is the nearest to z_1
    torch.testing.assert_close(words[0], table[ids[0]].permute(0, 3, 1, 2))
    out.loss.backward()
    for part in (m.encoder, m.decoder):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0


def test_semantic_loss_only_where_captions_exist():
    m = model(semantic_layers=2, semantic_weight=1.0)
    x = images()
    none = m({"image": x, "caption": ["", ""]}, 0)
    assert none.logs["semantic_loss"] == 0
    torch.testing.assert_close(none.loss, none.logs["rec_loss"] + none.logs["commit_loss"])
    one = m({"image": x, "caption": ["a red circle", ""]}, 0)
    # by hand: MiniLM reads "[CLS] w(layer 1) w(layer 2) x 4 [SEP]" of image 0 as a sentence
    lm, table = text.minilm(), text.word_embeddings()
    coarse = torch.cat([one.indices["layer1"][0].flatten(), one.indices["layer2"][0].flatten()])
    seq = table[torch.cat([torch.tensor([101]), coarse, torch.tensor([102])])].unsqueeze(0)
    image_sentence = F.normalize(lm(inputs_embeds=seq).mean(1), dim=-1)
    expected = 1 - (image_sentence * lm.sentence_embedding(["a red circle"])).sum()
    torch.testing.assert_close(one.logs["semantic_loss"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.loss, one.logs["rec_loss"] + one.logs["commit_loss"] + expected,
                               rtol=0, atol=1e-5)
    # an image without a caption does not count, whatever its words
    both = m({"image": x, "caption": ["a red circle", "a blue square"]}, 0)
    assert both.logs["semantic_loss"] != one.logs["semantic_loss"]
    # the loss's gradient reaches the encoder through MiniLM and the straight-through words
    m.zero_grad()
    words, _, _, _ = m.quantize_pyramid(m.encoder(x))
    m.semantic_loss(words, ["a red circle", ""]).backward()
    assert sum(p.grad.abs().sum() for p in m.encoder.parameters()) > 0


def test_base_preset_on_the_meta_device():
    cfg = PRESETS["base"].model
    assert cfg.pyramid == (1, 2, 4, 8, 16, 16) and cfg.semantic_layers == 5
    with torch.device("meta"):
        m = SPAE(cfg)
    assert m.grid == 16 and len(m.codebook_sizes()) == 6
    assert PRESETS["tiny"].data.name == "shapes"


@pytest.mark.parametrize("bad, match", [(dict(pyramid=(1, 3)), "pyramid"), (dict(pyramid=(2, 1)), "pyramid"),
                                        (dict(pyramid=()), "pyramid"), (dict(semantic_layers=4), "semantic_layers"),
                                        (dict(semantic_weight=-1.0), "semantic_weight"),
                                        (dict(resolution=18), "resolution")])
def test_bad_configuration_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        SPAE(dataclasses.replace(small(), **bad))
