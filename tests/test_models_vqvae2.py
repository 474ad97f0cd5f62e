"""VQ-VAE-2 (models/vqvae2.py): the two-level pipeline and loss recomputed from the submodules,
both EMA codebooks updated without gradients, the token round trip, the base preset's size and
configuration errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.vqvae2 import PRESETS, VQVAE2, VQVAE2Config

torch.set_num_threads(1)

# rosinality/vq-vae-2-pytorch's VQVAE(channel=16, n_res_block=1, n_res_channel=8, embed_dim=4, n_embed=8):
# named_parameters in order, printed from its vqvae.py (its codebooks are buffers, ``quantize_t.embed`` [D, K]).
ROSINALITY_PARAMETERS = {
    "enc_b.blocks.0.weight": (8, 3, 4, 4), "enc_b.blocks.0.bias": (8,), "enc_b.blocks.2.weight": (16, 8, 4, 4),
    "enc_b.blocks.2.bias": (16,), "enc_b.blocks.4.weight": (16, 16, 3, 3), "enc_b.blocks.4.bias": (16,),
    "enc_b.blocks.5.conv.1.weight": (8, 16, 3, 3), "enc_b.blocks.5.conv.1.bias": (8,),
    "enc_b.blocks.5.conv.3.weight": (16, 8, 1, 1), "enc_b.blocks.5.conv.3.bias": (16,),
    "enc_t.blocks.0.weight": (8, 16, 4, 4), "enc_t.blocks.0.bias": (8,), "enc_t.blocks.2.weight": (16, 8, 3, 3),
    "enc_t.blocks.2.bias": (16,), "enc_t.blocks.3.conv.1.weight": (8, 16, 3, 3), "enc_t.blocks.3.conv.1.bias": (8,),
    "enc_t.blocks.3.conv.3.weight": (16, 8, 1, 1), "enc_t.blocks.3.conv.3.bias": (16,),
    "quantize_conv_t.weight": (4, 16, 1, 1), "quantize_conv_t.bias": (4,), "dec_t.blocks.0.weight": (16, 4, 3, 3),
    "dec_t.blocks.0.bias": (16,), "dec_t.blocks.1.conv.1.weight": (8, 16, 3, 3), "dec_t.blocks.1.conv.1.bias": (8,),
    "dec_t.blocks.1.conv.3.weight": (16, 8, 1, 1), "dec_t.blocks.1.conv.3.bias": (16,),
    "dec_t.blocks.3.weight": (16, 4, 4, 4), "dec_t.blocks.3.bias": (4,), "quantize_conv_b.weight": (4, 20, 1, 1),
    "quantize_conv_b.bias": (4,), "upsample_t.weight": (4, 4, 4, 4), "upsample_t.bias": (4,),
    "dec.blocks.0.weight": (16, 8, 3, 3), "dec.blocks.0.bias": (16,), "dec.blocks.1.conv.1.weight": (8, 16, 3, 3),
    "dec.blocks.1.conv.1.bias": (8,), "dec.blocks.1.conv.3.weight": (16, 8, 1, 1), "dec.blocks.1.conv.3.bias": (16,),
    "dec.blocks.3.weight": (16, 8, 4, 4), "dec.blocks.3.bias": (8,), "dec.blocks.5.weight": (8, 3, 4, 4),
    "dec.blocks.5.bias": (3,),
}


def small(**kw):
    return VQVAE2Config(resolution=16, hidden=16, res_channels=8, num_res_blocks=1, embed_dim=4, codebook_size=8,
                        **kw)


def images(seed=0):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def model(seed=0):
    torch.manual_seed(seed)
    m = VQVAE2(small())
    for level in (m.quantize_t, m.quantize_b):  # codes at the encoders' scale
        level._codebook.embed.copy_(torch.randn(1, 8, 4) * 0.3)
    return m


def nearest_codes(z, codebook):
    """(ids [B, h, w], codes [B, D, h, w]) of the nearest codes, searched here with cdist."""
    b, d, h, w = z.shape
    ids = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, d), codebook).argmin(1)
    return ids.view(b, h, w), codebook[ids].view(b, h, w, d).permute(0, 3, 1, 2)


def test_pipeline_and_loss_by_hand_and_both_ema_codebooks_update():
    m, x = model(), images()
    top0, bottom0 = m.quantize_t.codebook.clone(), m.quantize_b.codebook.clone()
    out = m({"image": x}, 0)
    out.loss.backward()
    with torch.no_grad():
        enc_b = m.enc_b(x)
        z_t = m.quantize_conv_t(m.enc_t(enc_b))
        ids_t, q_t = nearest_codes(z_t, top0)
        z_b = m.quantize_conv_b(torch.cat([m.dec_t(q_t), enc_b], 1))
        ids_b, q_b = nearest_codes(z_b, bottom0)
        recon = m.dec(torch.cat([m.upsample_t(q_t), q_b], 1))
        expected = F.mse_loss(recon, x) + 0.25 * (F.mse_loss(z_t, q_t) + F.mse_loss(z_b, q_b))
    assert torch.equal(out.indices["top"], ids_t) and torch.equal(out.indices["bottom"], ids_b)
    assert ids_t.shape == (2, 2, 2) and ids_b.shape == (2, 4, 4)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.loss, expected)
    # EMA codebooks: buffers that moved this step, no parameters, no gradient
    assert not list(m.quantize_t.parameters()) and not list(m.quantize_b.parameters())
    assert not torch.equal(m.quantize_t.codebook, top0) and not torch.equal(m.quantize_b.codebook, bottom0)
    for name in ("enc_b", "enc_t", "quantize_conv_t", "dec_t", "quantize_conv_b", "upsample_t", "dec"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_parameters_are_rosinalitys():
    m = VQVAE2(small())
    assert [(k, tuple(p.shape)) for k, p in m.named_parameters()] == list(ROSINALITY_PARAMETERS.items())


def test_encode_decode_round_trip():
    m, x = model().eval(), images(1)
    with torch.no_grad():
        ids_t, ids_b = m.encode(x)
        assert ids_t.shape == (2, 2, 2) and ids_b.shape == (2, 4, 4) and ids_t.dtype == torch.int64
        y = m.decode((ids_t, ids_b))
        assert y.shape == x.shape
        torch.testing.assert_close(m.reconstruct(x), y, rtol=0, atol=0)
        torch.testing.assert_close(m({"image": x}, 0).recon, y)
    assert m.codebook_sizes() == {"top": 8, "bottom": 8}


def test_base_preset_is_the_papers_imagenet_model():
    cfg = PRESETS["base"].model
    with torch.device("meta"):
        m = VQVAE2(cfg)

    def conv(i, o, k):  # Conv2d and ConvTranspose2d alike
        return i * o * k * k + o
    ch, r, d, k = 128, 64, 64, 512  # the paper's appendix: 128 hidden, 64 residual units, D 64, K 512
    res = 2 * (conv(ch, r, 3) + conv(r, ch, 1))
    enc_b = conv(3, ch // 2, 4) + conv(ch // 2, ch, 4) + conv(ch, ch, 3) + res
    enc_t = conv(ch, ch // 2, 4) + conv(ch // 2, ch, 3) + res
    dec_t = conv(d, ch, 3) + res + conv(ch, d, 4)
    dec = conv(2 * d, ch, 3) + res + conv(ch, ch // 2, 4) + conv(ch // 2, 3, 4)
    total = enc_b + enc_t + conv(ch, d, 1) + dec_t + conv(d + ch, d, 1) + conv(d, d, 4) + dec
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(b.numel() for n, b in m.named_buffers() if n.endswith("_codebook.embed")) == 2 * k * d
    assert (cfg.resolution, cfg.beta, cfg.decay) == (256, 0.25, 0.99)


@pytest.mark.parametrize("bad", [dict(resolution=20), dict(embed_dim=0), dict(decay=0.0), dict(beta=-0.1),
                                 dict(dead_code_threshold=-1.0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        VQVAE2(dataclasses.replace(small(), **bad))
