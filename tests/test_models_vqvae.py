"""VQ-VAE (models/vqvae.py): the paper's loss and gradients by hand, Sonnet's EMA update by hand,
the token round trip, the base preset's size and configuration errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.vqvae import PRESETS, VQVAE, VQVAEConfig

torch.set_num_threads(1)


def small(**kw):
    return VQVAEConfig(resolution=16, hidden=16, res_channels=8, num_res_blocks=1, embed_dim=4, codebook_size=8, **kw)


def images(seed=0):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def model(ema, seed=0):
    torch.manual_seed(seed)
    m = VQVAE(small(ema=ema))
    with torch.no_grad():  # codes at the encoder's scale, so that several are used
        codebook = m.quantize.codebook if ema else m.quantize.embedding.weight
        codebook.copy_(torch.randn(8, 4) * 0.3)
    return m


def capture_latent(m):
    """The pre-quantization latent of the next forward, with its gradient kept."""
    store = []

    def hook(_, __, out):
        out.retain_grad()
        store.append(out)
    m.pre_vq_conv.register_forward_hook(hook)
    return store


def nearest(rows, codebook):
    return torch.cdist(rows, codebook).argmin(1)


def test_loss_and_gradients_are_the_papers_codebook_plus_quarter_commitment():
    m, x = model(ema=False), images()
    latent = capture_latent(m)
    out = m({"image": x}, 0)
    out.loss.backward()
    z = latent[0]
    codebook = m.quantize.embedding.weight.detach()
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    ids = nearest(rows, codebook)
    assert torch.equal(out.indices["codes"].flatten(), ids) and ids.unique().numel() > 1
    # independent graph: straight-through latent, codebook term (weight 1), commitment (weight 0.25)
    z_ = z.detach().clone().requires_grad_()
    e_ = codebook.clone().requires_grad_()
    q_rows = e_[ids]
    q = q_rows.view(2, 4, 4, 4).permute(0, 3, 1, 2)
    recon = m.decoder(z_ + (q - z_).detach())
    expected = (F.mse_loss(recon, x) + ((rows - q_rows) ** 2).mean()
                + 0.25 * ((z_.permute(0, 2, 3, 1).reshape(-1, 4) - q_rows.detach()) ** 2).mean())
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.recon, recon)
    grad_z, grad_e = torch.autograd.grad(expected, (z_, e_))
    torch.testing.assert_close(z.grad, grad_z)
    torch.testing.assert_close(m.quantize.embedding.weight.grad, grad_e)


def test_learned_codebook_has_a_gradient_and_no_ema_state():
    m = model(ema=False)
    m({"image": images()}, 0).loss.backward()
    assert m.quantize.embedding.weight.grad.abs().sum() > 0
    assert not any("cluster_size" in k or "embed_avg" in k for k in m.state_dict())
    for part in (m.encoder, m.pre_vq_conv, m.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_ema_codebook_is_sonnets_update_and_loss_has_no_codebook_term():
    m, x = model(ema=True), images()
    assert not list(m.quantize.parameters())
    cb = m.quantize._codebook
    embed0, size0, avg0 = cb.embed[0].clone(), cb.cluster_size[0].clone(), cb.embed_avg[0].clone()
    latent = capture_latent(m)
    out = m({"image": x}, 0)
    out.loss.backward()
    rows = latent[0].detach().permute(0, 2, 3, 1).reshape(-1, 4)
    ids = nearest(rows, embed0)
    assert torch.equal(out.indices["codes"].flatten(), ids)
    q = embed0[ids]
    recon = m.decoder(q.view(2, 4, 4, 4).permute(0, 3, 1, 2))
    torch.testing.assert_close(out.loss, F.mse_loss(recon, x) + 0.25 * ((rows - q) ** 2).mean())
    # Sonnet VectorQuantizerEMA: decayed counts and sums, Laplace-smoothed counts, codes = sums / counts
    onehot = F.one_hot(ids, 8).float()
    size = 0.99 * size0 + 0.01 * onehot.sum(0)
    avg = 0.99 * avg0 + 0.01 * onehot.t() @ rows
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 8 * 1e-5) * n
    torch.testing.assert_close(cb.cluster_size[0], size)
    torch.testing.assert_close(cb.embed_avg[0], avg)
    torch.testing.assert_close(m.quantize.codebook, avg / smoothed[:, None])
    assert not torch.equal(m.quantize.codebook, embed0)
    for part in (m.encoder, m.pre_vq_conv, m.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize("ema", [False, True])
def test_encode_decode_round_trip(ema):
    m, x = model(ema).eval(), images(1)
    with torch.no_grad():
        ids = m.encode(x)
        assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64
        y = m.decode(ids)
        assert y.shape == x.shape
        torch.testing.assert_close(m.reconstruct(x), y, rtol=0, atol=0)
        torch.testing.assert_close(m({"image": x}, 0).recon, y)
    assert m.codebook_sizes() == {"codes": 8}


def test_base_preset_is_the_papers_model_size():
    cfg = PRESETS["base"].model
    with torch.device("meta"):
        m = VQVAE(cfg)

    def conv(i, o, k):  # Conv2d and ConvTranspose2d alike: i * o * k * k weights, o biases
        return i * o * k * k + o
    h, r, d, k = 256, 256, 64, 512  # the paper's 256 hidden units; D = 64 (Sonnet's example); K = 512
    res = conv(h, r, 3) + conv(r, h, 1)
    encoder = conv(3, h // 2, 4) + conv(h // 2, h, 4) + conv(h, h, 3) + 2 * res
    decoder = conv(d, h, 3) + 2 * res + conv(h, h // 2, 4) + conv(h // 2, 3, 4)
    assert sum(p.numel() for p in m.parameters()) == encoder + conv(h, d, 1) + k * d + decoder
    assert (cfg.resolution, cfg.beta, cfg.ema) == (128, 0.25, False)


@pytest.mark.parametrize("bad", [dict(resolution=18), dict(codebook_size=0), dict(hidden=15), dict(beta=-1.0),
                                 dict(decay=1.0), dict(eps=0.0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        VQVAE(dataclasses.replace(small(), **bad))
