"""DALL-E's dVAE (models/dvae.py): the module layout of openai/DALL-E's dall_e package, the
logit-Laplace NLL and the relaxed ELBO recomputed by hand, the tau / KL-weight schedules, gradients,
the token round trip, the base preset's size and configuration errors."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models.dvae import DVAE, PRESETS, DVAEConfig, logit_laplace_nll

torch.set_num_threads(1)

# openai/DALL-E's Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512) and Decoder(n_init=32, n_hid=64,
# n_blk_per_group=1, vocab_size=512): state_dict keys and shapes in order, printed from the dall_e package.
ENCODER_KEYS = {
    "blocks.input.w": (64, 3, 7, 7), "blocks.input.b": (64,),
    "blocks.group_1.block_1.res_path.conv_1.w": (16, 64, 3, 3), "blocks.group_1.block_1.res_path.conv_1.b": (16,),
    "blocks.group_1.block_1.res_path.conv_2.w": (16, 16, 3, 3), "blocks.group_1.block_1.res_path.conv_2.b": (16,),
    "blocks.group_1.block_1.res_path.conv_3.w": (16, 16, 3, 3), "blocks.group_1.block_1.res_path.conv_3.b": (16,),
    "blocks.group_1.block_1.res_path.conv_4.w": (64, 16, 1, 1), "blocks.group_1.block_1.res_path.conv_4.b": (64,),
    "blocks.group_2.block_1.id_path.w": (128, 64, 1, 1), "blocks.group_2.block_1.id_path.b": (128,),
    "blocks.group_2.block_1.res_path.conv_1.w": (32, 64, 3, 3), "blocks.group_2.block_1.res_path.conv_1.b": (32,),
    "blocks.group_2.block_1.res_path.conv_2.w": (32, 32, 3, 3), "blocks.group_2.block_1.res_path.conv_2.b": (32,),
    "blocks.group_2.block_1.res_path.conv_3.w": (32, 32, 3, 3), "blocks.group_2.block_1.res_path.conv_3.b": (32,),
    "blocks.group_2.block_1.res_path.conv_4.w": (128, 32, 1, 1), "blocks.group_2.block_1.res_path.conv_4.b": (128,),
    "blocks.group_3.block_1.id_path.w": (256, 128, 1, 1), "blocks.group_3.block_1.id_path.b": (256,),
    "blocks.group_3.block_1.res_path.conv_1.w": (64, 128, 3, 3), "blocks.group_3.block_1.res_path.conv_1.b": (64,),
    "blocks.group_3.block_1.res_path.conv_2.w": (64, 64, 3, 3), "blocks.group_3.block_1.res_path.conv_2.b": (64,),
    "blocks.group_3.block_1.res_path.conv_3.w": (64, 64, 3, 3), "blocks.group_3.block_1.res_path.conv_3.b": (64,),
    "blocks.group_3.block_1.res_path.conv_4.w": (256, 64, 1, 1), "blocks.group_3.block_1.res_path.conv_4.b": (256,),
    "blocks.group_4.block_1.id_path.w": (512, 256, 1, 1), "blocks.group_4.block_1.id_path.b": (512,),
    "blocks.group_4.block_1.res_path.conv_1.w": (128, 256, 3, 3), "blocks.group_4.block_1.res_path.conv_1.b": (128,),
    "blocks.group_4.block_1.res_path.conv_2.w": (128, 128, 3, 3), "blocks.group_4.block_1.res_path.conv_2.b": (128,),
    "blocks.group_4.block_1.res_path.conv_3.w": (128, 128, 3, 3), "blocks.group_4.block_1.res_path.conv_3.b": (128,),
    "blocks.group_4.block_1.res_path.conv_4.w": (512, 128, 1, 1), "blocks.group_4.block_1.res_path.conv_4.b": (512,),
    "blocks.output.conv.w": (512, 512, 1, 1), "blocks.output.conv.b": (512,),
}
DECODER_KEYS = {
    "blocks.input.w": (32, 512, 1, 1), "blocks.input.b": (32,), "blocks.group_1.block_1.id_path.w": (512, 32, 1, 1),
    "blocks.group_1.block_1.id_path.b": (512,), "blocks.group_1.block_1.res_path.conv_1.w": (128, 32, 1, 1),
    "blocks.group_1.block_1.res_path.conv_1.b": (128,), "blocks.group_1.block_1.res_path.conv_2.w": (128, 128, 3, 3),
    "blocks.group_1.block_1.res_path.conv_2.b": (128,), "blocks.group_1.block_1.res_path.conv_3.w": (128, 128, 3, 3),
    "blocks.group_1.block_1.res_path.conv_3.b": (128,), "blocks.group_1.block_1.res_path.conv_4.w": (512, 128, 3, 3),
    "blocks.group_1.block_1.res_path.conv_4.b": (512,), "blocks.group_2.block_1.id_path.w": (256, 512, 1, 1),
    "blocks.group_2.block_1.id_path.b": (256,), "blocks.group_2.block_1.res_path.conv_1.w": (64, 512, 1, 1),
    "blocks.group_2.block_1.res_path.conv_1.b": (64,), "blocks.group_2.block_1.res_path.conv_2.w": (64, 64, 3, 3),
    "blocks.group_2.block_1.res_path.conv_2.b": (64,), "blocks.group_2.block_1.res_path.conv_3.w": (64, 64, 3, 3),
    "blocks.group_2.block_1.res_path.conv_3.b": (64,), "blocks.group_2.block_1.res_path.conv_4.w": (256, 64, 3, 3),
    "blocks.group_2.block_1.res_path.conv_4.b": (256,), "blocks.group_3.block_1.id_path.w": (128, 256, 1, 1),
    "blocks.group_3.block_1.id_path.b": (128,), "blocks.group_3.block_1.res_path.conv_1.w": (32, 256, 1, 1),
    "blocks.group_3.block_1.res_path.conv_1.b": (32,), "blocks.group_3.block_1.res_path.conv_2.w": (32, 32, 3, 3),
    "blocks.group_3.block_1.res_path.conv_2.b": (32,), "blocks.group_3.block_1.res_path.conv_3.w": (32, 32, 3, 3),
    "blocks.group_3.block_1.res_path.conv_3.b": (32,), "blocks.group_3.block_1.res_path.conv_4.w": (128, 32, 3, 3),
    "blocks.group_3.block_1.res_path.conv_4.b": (128,), "blocks.group_4.block_1.id_path.w": (64, 128, 1, 1),
    "blocks.group_4.block_1.id_path.b": (64,), "blocks.group_4.block_1.res_path.conv_1.w": (16, 128, 1, 1),
    "blocks.group_4.block_1.res_path.conv_1.b": (16,), "blocks.group_4.block_1.res_path.conv_2.w": (16, 16, 3, 3),
    "blocks.group_4.block_1.res_path.conv_2.b": (16,), "blocks.group_4.block_1.res_path.conv_3.w": (16, 16, 3, 3),
    "blocks.group_4.block_1.res_path.conv_3.b": (16,), "blocks.group_4.block_1.res_path.conv_4.w": (64, 16, 3, 3),
    "blocks.group_4.block_1.res_path.conv_4.b": (64,), "blocks.output.conv.w": (6, 64, 1, 1),
    "blocks.output.conv.b": (6,),
}


def small(**kw):
    return DVAEConfig(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8, vocab_size=16,
                      kl_warmup_steps=10, tau_anneal_steps=20, **kw)


def images(seed=0):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_module_layout_is_dall_es():
    m = DVAE(DVAEConfig(resolution=32, n_hid=64, n_blk_per_group=1, n_init=32, vocab_size=512))
    assert [(k, tuple(v.shape)) for k, v in m.encoder.state_dict().items()] == list(ENCODER_KEYS.items())
    assert [(k, tuple(v.shape)) for k, v in m.decoder.state_dict().items()] == list(DECODER_KEYS.items())


def test_base_preset_is_the_released_dvae():
    cfg = PRESETS["base"].model
    with torch.device("meta"):
        m = DVAE(cfg)
    # dall_e's Encoder() and Decoder() defaults (n_hid 256, 2 blocks per group, K 8192, n_init 128) hold
    # 53,786,240 and 43,829,766 parameters (counted with the dall_e package).
    assert sum(p.numel() for p in m.encoder.parameters()) == 53_786_240
    assert sum(p.numel() for p in m.decoder.parameters()) == 43_829_766
    assert (cfg.resolution, cfg.vocab_size, cfg.kl_weight, cfg.tau_end) == (256, 8192, 6.6, 1 / 16)


def test_logit_laplace_nll_is_the_papers_density():
    x, mu, log_b = torch.tensor([0.1, 0.3, 0.85]), torch.tensor([0.2, -1.0, 1.5]), torch.tensor([0.0, -1.2, 0.4])
    for xi, mi, li in zip(x.tolist(), mu.tolist(), log_b.tolist()):
        b = math.exp(li)
        density = math.exp(-abs(math.log(xi / (1 - xi)) - mi) / b) / (2 * b * xi * (1 - xi))
        torch.testing.assert_close(logit_laplace_nll(torch.tensor(xi), torch.tensor(mi), torch.tensor(li)),
                                   torch.tensor(-math.log(density)))
    # a density on (0, 1): it integrates to 1
    grid = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:-1]
    p = torch.exp(-logit_laplace_nll(grid, torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.5)))
    torch.testing.assert_close(torch.trapezoid(p, grid).item(), 1.0, rtol=0, atol=1e-3)


def test_schedules():
    m = DVAE(small())
    assert m.temperature(0) == 1.0 and m.temperature(20) == m.temperature(10 ** 6) == 1 / 16
    assert m.temperature(10) == pytest.approx((1 + 1 / 16) / 2)
    assert m.temperature(5) == pytest.approx(1 / 16 + (1 - 1 / 16) * (1 + math.cos(math.pi / 4)) / 2)
    assert m.beta(0) == 0.0 and m.beta(5) == pytest.approx(3.3) and m.beta(10) == m.beta(999) == 6.6
    taus, betas = [m.temperature(s) for s in range(25)], [m.beta(s) for s in range(25)]
    assert taus == sorted(taus, reverse=True) and betas == sorted(betas)


def test_relaxed_elbo_by_hand():
    torch.manual_seed(0)
    m, x, step = DVAE(small()), images(), 7
    torch.manual_seed(3)
    out = m({"image": x}, step)
    with torch.no_grad():
        y = 0.8 * (x + 1) / 2 + 0.1
        logits = m.encoder.blocks(y)  # [2, K, 4, 4]
        torch.manual_seed(3)
        rows = logits.permute(0, 2, 3, 1).reshape(-1, 16)
        gumbels = -torch.empty_like(rows).exponential_().log()
        tau, beta = m.temperature(step), m.beta(step)
        relaxed = F.softmax((rows + gumbels) / tau, dim=1).view(2, 4, 4, 16).permute(0, 3, 1, 2)
        stats = m.decoder.blocks(relaxed)  # the full decoder, its input 1x1 convolution included
        mu, log_b = stats[:, :3], stats[:, 3:]
        b = log_b.exp()
        nll = (torch.log(2 * b * y * (1 - y)) + (torch.log(y / (1 - y)) - mu).abs() / b).mean()
        q = F.softmax(rows, dim=1)
        kl = (q * torch.log(q * 16)).sum(1).mean()  # KL(q || uniform over 16 codes) per position
        expected = nll + beta * kl * 16 / (3 * 16 * 16)  # per image: 16 positions, 768 pixel values
        recon = ((torch.sigmoid(mu) - 0.1) / 0.8).clamp(0, 1) * 2 - 1
    assert 0 < beta < 6.6 and 1 / 16 < tau < 1
    torch.testing.assert_close(out.logs["kl"], kl)
    torch.testing.assert_close(out.logs["nll"], nll)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.recon, recon)
    assert torch.equal(out.indices["codes"].flatten(), (rows + gumbels).argmax(1))


def test_gradients_reach_encoder_decoder_and_the_codebook():
    torch.manual_seed(0)
    m = DVAE(small())
    out = m({"image": images()}, 15)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the codebook (the decoder's input convolution) is learned by gradient, every code of it (soft samples)
    assert (m.decoder.blocks.input.w.grad[:, :, 0, 0].abs().sum(0) > 0).all()
    assert m.encoder.blocks.input.w.grad.abs().sum() > 0 and m.decoder.blocks.output.conv.w.grad.abs().sum() > 0


def test_encode_is_the_argmax_and_decode_is_the_one_hot_decoder():
    torch.manual_seed(0)
    m, x = DVAE(small()).eval(), images(1)
    with torch.no_grad():
        ids = m.encode(x)
        assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64
        assert torch.equal(ids, m.encoder.blocks(0.8 * (x + 1) / 2 + 0.1).argmax(1))
        y = m.decode(ids)
        one_hot = F.one_hot(ids, 16).permute(0, 3, 1, 2).float()
        expected = ((torch.sigmoid(m.decoder(one_hot)[:, :3]) - 0.1) / 0.8).clamp(0, 1) * 2 - 1
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(m.reconstruct(x), y, rtol=0, atol=0)
    assert m.codebook_sizes() == {"codes": 16}


@pytest.mark.parametrize("bad", [dict(resolution=18), dict(n_hid=18), dict(vocab_size=0), dict(tau_end=0.0),
                                 dict(kl_weight=-1.0), dict(logit_laplace_eps=0.5), dict(group_count=0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        DVAE(dataclasses.replace(small(), **bad))
