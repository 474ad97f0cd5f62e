"""Gaussian VAE (models/vae.py): the loss (MSE + weighted KL) recomputed by hand with torch.distributions,
gradients, the latent round trip, the base preset's size and configuration errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from models.vae import PRESETS, VAE, VAEConfig

torch.set_num_threads(1)


def small(**kw):
    return VAEConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=3, **kw)


def images(seed=0):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loss_is_mse_plus_weighted_kl_of_a_reparameterised_sample():
    torch.manual_seed(0)
    m, x = VAE(small(kl_weight=0.5)), images()
    torch.manual_seed(1)
    out = m({"image": x}, 0)
    with torch.no_grad():
        moments = m.quant_conv(m.encoder(x))
        mean, logvar = moments[:, :3], moments[:, 3:]
        torch.manual_seed(1)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        recon = m.decoder(m.post_quant_conv(z))
        kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum() / 2  # per image
        expected = F.mse_loss(recon, x) + 0.5 * kl / (3 * 16 * 16)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.logs["kl"], kl)
    torch.testing.assert_close(out.loss, expected)
    assert out.indices == {} and m.codebook_sizes() == {}


def test_gradients_reach_encoder_decoder_and_the_moment_convolutions():
    torch.manual_seed(0)
    m = VAE(small())
    out = m({"image": images()}, 0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (m.encoder.conv_in, m.quant_conv, m.post_quant_conv, m.decoder.conv_out):
        assert part.weight.grad.abs().sum() > 0


def test_kl_weight_scales_only_the_kl_term():
    torch.manual_seed(0)
    m, x = VAE(small(kl_weight=0.0)), images()
    torch.manual_seed(1)
    a = m({"image": x}, 0)
    m.cfg = dataclasses.replace(m.cfg, kl_weight=2.0)
    torch.manual_seed(1)
    b = m({"image": x}, 0)
    torch.testing.assert_close(b.loss - a.loss, 2.0 * a.logs["kl"] / (3 * 16 * 16))


def test_encode_is_the_posterior_mean_and_decode_inverts_it():
    torch.manual_seed(0)
    m, x = VAE(small()).eval(), images(1)
    with torch.no_grad():
        latent = m.encode(x)
        assert latent.shape == (2, 3, 8, 8) and latent.dtype == torch.float32
        torch.testing.assert_close(latent, m.quant_conv(m.encoder(x))[:, :3])
        y = m.decode(latent)
        assert y.shape == x.shape
        torch.testing.assert_close(m.reconstruct(x), y, rtol=0, atol=0)


def test_base_preset_is_latent_diffusions_kl_f8_autoencoder():
    cfg = PRESETS["base"].model
    with torch.device("meta"):
        m = VAE(cfg)
    # 83,653,863: the parameter count of latent-diffusion's / Stable Diffusion v1's kl-f8 AutoencoderKL
    # (encoder, decoder, quant_conv, post_quant_conv; the loss module's logvar and discriminator excluded)
    assert sum(p.numel() for p in m.parameters()) == 83_653_863
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1) and shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3) and shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)


@pytest.mark.parametrize("bad", [dict(resolution=17), dict(kl_weight=-1.0), dict(ch_mult=()), dict(embed_dim=0),
                                 dict(dropout=1.0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        VAE(dataclasses.replace(small(), **bad))
