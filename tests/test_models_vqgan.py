"""models.vqgan (taming's VQModel / GumbelVQ), models.losses (VQLPIPSWithDiscriminator, LPIPS) and
models.discriminator (NLayerDiscriminator): checkpoint layout against the key list taming's own code
printed (tests/data/vqgan_taming_keys.txt), forwards and losses against independent computations."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.discriminator import NLayerDiscriminator
from models.losses import LPIPS, PerceptualGANLoss, adaptive_weight, load_lpips_state_dict
from models.vqgan import PRESETS, VQGAN, VQGANConfig, gumbel_temperature

torch.set_num_threads(1)

KEYS_FILE = Path(__file__).parent / "data" / "vqgan_taming_keys.txt"
# the configuration the key file was printed for
SMALL = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8, embed_dim=4,
             n_embed=32, disc_num_layers=2, disc_ndf=8, perceptual_weight=0.0, disc_start=0, disc_weight=0.8)
# taming's VQModel for configs/imagenet_vqgan.yaml and GumbelVQ for the released vqgan_gumbel_f8, counted from
# taming's own modules: state_dict elements outside ``loss.``, and of ``loss.discriminator.``
BASE_MODEL_NUMEL, BASE_DISC_NUMEL, GUMBEL_F8_MODEL_NUMEL = 72_141_699, 2_767_428, 68_995_971


def _taming_keys():
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, shape = line.partition(" ")
            out[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out


def _model(**changes):
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(**{**SMALL, **changes}))


def _images(b=2, side=16, seed=1):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A taming-layout LPIPS state dict with random weights, saved as a file."""
    torch.manual_seed(5)
    sd = LPIPS().state_dict()
    for k, v in sd.items():
        if not k.startswith("scaling_layer"):
            v.copy_(torch.rand_like(v) if k.startswith("lin") else torch.randn_like(v) * 0.05)
    path = tmp_path_factory.mktemp("lpips") / "lpips.pth"
    torch.save(sd, path)
    return str(path), sd


# ---------------------------------------------------------------- checkpoint layout

def test_state_dict_is_taming_vqmodel_s_without_lpips_keys_when_perceptual_is_off():
    expected = {k: s for k, s in _taming_keys().items() if not k.startswith("loss.perceptual_loss.")}
    got = {k: tuple(v.shape) for k, v in _model().state_dict().items()}
    assert list(got) == list(expected) and got == expected
    assert len(_taming_keys()) - len(expected) == 33  # 13 VGG16 convolutions x 2, 5 heads, 2 buffers


def test_a_taming_checkpoint_loads_strictly_with_its_own_lpips_weights(tmp_path):
    torch.manual_seed(3)
    sd = {k: torch.randn(s) if s else torch.tensor(7) for k, s in _taming_keys().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    model = _model(perceptual_weight=1.0, lpips_path=str(ckpt))
    assert list(model.state_dict()) == list(sd)
    torch.testing.assert_close(model.loss.perceptual_loss.lin2.model[1].weight,
                               sd["loss.perceptual_loss.lin2.model.1.weight"])
    model.load_state_dict(sd, strict=True)
    torch.testing.assert_close(model.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert int(model.loss.discriminator.main[3].num_batches_tracked) == 7


def test_gumbel_layout_is_gumbelvq_s():
    model = _model(quantizer="gumbel", embed_dim=8)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.startswith(("encoder.", "decoder.", "loss."))}
    # printed by taming's GumbelVQ for SMALL with embed_dim 8 (= z_channels, which taming's GumbelVQ needs)
    assert got == {"quantize.proj.weight": (32, 8, 1, 1), "quantize.proj.bias": (32,), "quantize.embed.weight": (32, 8),
                   "quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,), "post_quant_conv.weight": (8, 8, 1, 1),
                   "post_quant_conv.bias": (8,)}


def test_base_presets_have_taming_s_sizes():
    with pytest.warns(UserWarning, match="perceptual term OFF"), torch.device("meta"):
        base = VQGAN(PRESETS["base"].model)
        gumbel = VQGAN(PRESETS["gumbel_f8"].model)

    def numel(model, inside):
        return sum(v.numel() for k, v in model.state_dict().items() if k.startswith("loss.") == inside and
                   (not inside or k.startswith("loss.discriminator.")))
    assert numel(base, False) == BASE_MODEL_NUMEL and numel(base, True) == BASE_DISC_NUMEL
    assert numel(gumbel, False) == GUMBEL_F8_MODEL_NUMEL
    assert base.cfg.n_embed == 1024 and base.cfg.disc_start == 250001 and base.cfg.disc_weight == 0.8


# ---------------------------------------------------------------- the forward, computed independently

def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, stride=1, pad=None):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride, w.shape[-1] // 2 if pad is None else pad)


def _res(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = _conv(F.silu(_gn(h, sd, p + ".norm2")), sd, p + ".conv2")
    return (_conv(x, sd, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p):
    h = _gn(x, sd, p + ".norm")
    q, k, v = (_conv(h, sd, f"{p}.{n}").flatten(2) for n in "qkv")  # [B, C, N]
    w = torch.softmax(q.transpose(1, 2) @ k * q.shape[1] ** -0.5, dim=2)  # [B, Nq, Nk]
    return x + _conv((v @ w.transpose(1, 2)).view_as(x), sd, p + ".proj_out")


def _mid(h, sd, p):
    return _res(_attn(_res(h, sd, p + ".mid.block_1"), sd, p + ".mid.attn_1"), sd, p + ".mid.block_2")


def _taming_forward(sd, x):
    """taming's VQModel.forward for SMALL, written from taming's modules: (recon, codes)."""
    h = _res(_conv(x, sd, "encoder.conv_in"), sd, "encoder.down.0.block.0")             # 16x16, no attention
    h = _conv(F.pad(h, (0, 1, 0, 1)), sd, "encoder.down.0.downsample.conv", stride=2, pad=0)
    h = _attn(_res(h, sd, "encoder.down.1.block.0"), sd, "encoder.down.1.attn.0")      # 8x8, attention
    h = _conv(F.silu(_gn(_mid(h, sd, "encoder"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
    h = _conv(h, sd, "quant_conv")
    rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    codes = torch.cdist(rows.double(), sd["quantize.embedding.weight"].double()).argmin(1)
    z_q = sd["quantize.embedding.weight"][codes].view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
    h = _mid(_conv(_conv(z_q, sd, "post_quant_conv"), sd, "decoder.conv_in"), sd, "decoder")
    for i in range(2):
        h = _attn(_res(h, sd, f"decoder.up.1.block.{i}"), sd, f"decoder.up.1.attn.{i}")
    h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, "decoder.up.1.upsample.conv")
    for i in range(2):
        h = _res(h, sd, f"decoder.up.0.block.{i}")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out"), codes.view(h.shape[0], 8, 8)


def test_forward_matches_taming_s_computed_from_the_state_dict():
    model = _model()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 0.5)
    sd = model.state_dict()
    x = _images()
    want, codes = _taming_forward(sd, x)
    assert codes.unique().numel() > 3
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), codes, rtol=0, atol=0)
        torch.testing.assert_close(model.reconstruct(x), want, rtol=1e-4, atol=1e-5)
    model.train()
    out = model({"image": x}, step=0)
    torch.testing.assert_close(out.recon.detach(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.indices["codes"], codes, rtol=0, atol=0)


# ---------------------------------------------------------------- losses

def _quant_loss_by_hand(model, x, beta=0.25):
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        e = model.quantize.embedding.weight
        return (1 + beta) * ((rows - e[torch.cdist(rows, e).argmin(1)]) ** 2).mean()


def test_generator_loss_is_l1_plus_adaptive_gan_plus_codebook_by_hand():
    model = _model(disc_weight=0.8)
    x = _images()
    out = model({"image": x}, step=3)
    recon = out.recon
    nll = (x - recon).abs().mean()
    g = -model.loss.discriminator(recon).mean()  # train-mode BatchNorm: batch statistics, the same logits
    last = model.decoder.conv_out.weight
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(g_nll.norm() / (g_g.norm() + 1e-4), 0, 1e4) * 0.8
    quant = _quant_loss_by_hand(model, x)
    torch.testing.assert_close(out.logs["d_weight"], d_weight)
    torch.testing.assert_close(out.logs["quant_loss"], quant, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, nll + d_weight * g + quant, rtol=1e-5, atol=1e-7)
    assert out.logs["disc_factor"] == 1.0 and out.logs["p_loss"] == 0


def test_adaptive_weight_clamps_and_is_zero_without_autograd():
    w = torch.ones(3, requires_grad=True)
    assert adaptive_weight((w * 1e3).sum(), (w * 1e-9).sum(), w, 0.5) == pytest.approx(0.5e4)
    torch.testing.assert_close(adaptive_weight((w * 2).sum(), (w * 4).sum(), w, 1.0),
                               torch.tensor(2 * 3 ** 0.5 / (4 * 3 ** 0.5 + 1e-4)))
    with torch.no_grad():
        assert adaptive_weight((w * 2).sum(), (w * 4).sum(), w, 1.0) == 0


def test_disc_start_gates_the_gan_terms_of_both_passes():
    model = _model(disc_start=10)
    x = _images()
    before = model({"image": x}, step=9)
    assert before.logs["disc_factor"] == 0 and before.logs["d_weight"] > 0  # computed, but multiplied by 0
    torch.testing.assert_close(before.loss, before.logs["nll_loss"] + before.logs["quant_loss"])
    d_loss, logs = model({"image": x}, step=9, discriminate=before)
    assert d_loss == 0 and set(logs) == {"logits_real", "logits_fake"}
    after = model({"image": x}, step=10)
    assert after.logs["disc_factor"] == 1.0
    d_loss, logs = model({"image": x}, step=10, discriminate=after)
    real, fake = model.loss.discriminator(x), model.loss.discriminator(after.recon.detach())
    torch.testing.assert_close(d_loss, 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()))
    torch.testing.assert_close(logs["logits_fake"], fake.mean().detach())


def test_vanilla_d_loss_and_the_discriminator_step_reaching_only_the_discriminator():
    model = _model(disc_loss="vanilla")
    x = _images()
    out = model({"image": x}, step=0)
    model.zero_grad(set_to_none=True)
    d_loss, _ = model({"image": x}, step=0, discriminate=out)
    real, fake = model.loss.discriminator(x), model.loss.discriminator(out.recon.detach())
    torch.testing.assert_close(d_loss, 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()))
    d_loss.backward()
    assert all(p.grad is not None for p in model.discriminator_parameters())
    disc = {id(p) for p in model.discriminator_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in disc)


def test_gradients_reach_encoder_decoder_codebook_and_1x1_convolutions():
    model = _model()
    model({"image": _images()}, step=0).loss.backward()
    for name in ("encoder.conv_in.weight", "encoder.down.1.attn.0.q.weight", "decoder.conv_out.weight",
                 "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pixel_loss_mean_not_sum_and_l2_option():
    loss = PerceptualGANLoss(pixel_loss="l2", perceptual_weight=0.0, disc_ndf=8, disc_num_layers=1, adaptive=False,
                             disc_weight=0.5)
    x, r = _images(), _images(seed=2)
    total, logs = loss.generator_loss(x, r, torch.tensor(0.25), step=0, last_layer=None)
    g = -loss.discriminator(r).mean()
    torch.testing.assert_close(logs["nll_loss"], ((x - r) ** 2).mean())
    torch.testing.assert_close(total, ((x - r) ** 2).mean() + 0.5 * g + 0.25)


# ---------------------------------------------------------------- discriminator and LPIPS

def test_discriminator_is_taming_s_patchgan():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 8, 3)
    block = ["Conv2d", "BatchNorm2d", "LeakyReLU"]
    assert [type(m).__name__ for m in d.main] == ["Conv2d", "LeakyReLU"] + block * 3 + ["Conv2d"]
    assert [m.out_channels for m in d.main if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32, 64, 1]
    assert [m.stride[0] for m in d.main if isinstance(m, torch.nn.Conv2d)] == [2, 2, 2, 1, 1]
    assert d.main[2].bias is None and d.main[0].bias is not None
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    model = _model()  # the loss module applies taming's weights_init
    main = model.loss.discriminator.main
    assert abs(main[2].weight.std().item() - 0.02) < 0.004 and abs(main[3].weight.mean().item() - 1) < 0.02
    assert main[3].bias.abs().max() == 0


def _lpips_by_hand(sd, x, y):
    """LPIPS-VGG from the state dict: VGG16's convolutions in order (ReLU after each, 2x2 max-pool
    before convolutions 3, 5, 8 and 11), the taps after convolutions 2, 4, 7, 10 and 13."""
    convs = sorted((k for k in sd if k.startswith("net.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]))
    taps = []
    for t in (x, y):
        h, feats = (t - sd["scaling_layer.shift"]) / sd["scaling_layer.scale"], []
        for i, key in enumerate(convs, 1):
            if i in (3, 5, 8, 11):
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, sd[key], sd[key.replace("weight", "bias")], padding=1))
            if i in (2, 4, 7, 10, 13):
                feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        taps.append(feats)
    return sum((F.conv2d((a - b) ** 2, sd[f"lin{k}.model.1.weight"])).mean((2, 3), keepdim=True)
               for k, (a, b) in enumerate(zip(*taps)))


def test_lpips_matches_its_definition_and_is_zero_for_equal_images(lpips_file):
    path, sd = lpips_file
    lp = LPIPS.from_files(path).eval()
    assert all(not p.requires_grad for p in lp.parameters())
    x, y = _images(side=32), _images(side=32, seed=2)
    torch.testing.assert_close(lp(x, y), _lpips_by_hand(sd, x, y), rtol=1e-4, atol=1e-6)
    assert lp(x, y).shape == (2, 1, 1, 1) and lp(x, x).abs().max() == 0


def test_lpips_weight_file_layouts(lpips_file, tmp_path):
    path, sd = lpips_file
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}   # taming's / richzhang's vgg.pth
    torch.save(lin, tmp_path / "vgg.pth")
    index = {f"net.slice{s}.{i}": i for s, ends in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), 1)
             for i in range(*ends)}
    tv = {f"features.{index[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v
          for k, v in sd.items() if k.startswith("net.")}
    tv["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(tv, tmp_path / "vgg16-397923af.pth")
    got = load_lpips_state_dict(str(tmp_path / "vgg.pth"), str(tmp_path / "vgg16-397923af.pth"))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="vgg_path"):
        load_lpips_state_dict(str(tmp_path / "vgg.pth"))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_lpips_state_dict(str(tmp_path / "partial.pth"), str(tmp_path / "vgg16-397923af.pth"))


def test_perceptual_term_without_weights_is_off_with_a_warning_and_on_with_them(lpips_file):
    with pytest.warns(UserWarning, match="perceptual term OFF"):
        model = _model(perceptual_weight=1.0)
    assert model.loss.perceptual_weight == 0 and not hasattr(model.loss, "perceptual_loss")
    model = _model(perceptual_weight=0.5, lpips_path=lpips_file[0])
    model.loss.perceptual_loss.eval()  # no dropout, for the comparison
    x = _images()
    out = model({"image": x}, step=0)
    p = model.loss.perceptual_loss(x, out.recon)
    torch.testing.assert_close(out.logs["nll_loss"], ((x - out.recon).abs() + 0.5 * p).mean())
    torch.testing.assert_close(out.logs["p_loss"], p.mean().detach())


# ---------------------------------------------------------------- Gumbel variant

def test_gumbel_temperature_is_taming_s_warmup_cosine_schedule():
    cfg = VQGANConfig(temp_warmup_steps=10, temp_decay_steps=110, temp_start=0.5, temp_max=0.9, temp_min=0.1)
    assert gumbel_temperature(0, cfg) == pytest.approx(0.5)
    assert gumbel_temperature(5, cfg) == pytest.approx(0.7)
    assert gumbel_temperature(10, cfg) == pytest.approx(0.9)
    assert gumbel_temperature(60, cfg) == pytest.approx(0.5)
    assert gumbel_temperature(110, cfg) == pytest.approx(0.1) and gumbel_temperature(10**6, cfg) == pytest.approx(0.1)
    released = PRESETS["gumbel_f8"].model  # vqgan_gumbel_f8: 0.9 constant warm-up, cosine to 1e-6 at 1000001
    assert gumbel_temperature(0, released) == pytest.approx(0.9)
    assert gumbel_temperature(500_000, released) == pytest.approx(1e-6 + 0.5 * (0.9 - 1e-6) * (1 + math.cos(
        math.pi * 500_000 / 1_000_001)))


def test_gumbel_training_uses_the_scheduled_temperature_and_encode_takes_the_argmax():
    model = _model(quantizer="gumbel", temp_decay_steps=100, temp_min=0.1, kl_weight=1e-3)
    x = _images()
    out = model({"image": x}, step=50)
    assert out.logs["temperature"] == pytest.approx(gumbel_temperature(50, model.cfg))
    assert out.indices["codes"].shape == (2, 8, 8) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.quantize.proj.weight.grad.abs().sum() > 0 and model.quantize.embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(x)))  # quant_conv, then proj (taming's order)
        ids = model.encode(x)
        torch.testing.assert_close(ids, logits.argmax(1), rtol=0, atol=0)
        torch.testing.assert_close(model.decode(ids), model.decode_latent(
            model.quantize.embed.weight[ids].permute(0, 3, 1, 2)))


# ---------------------------------------------------------------- tokens and configuration

def test_encode_decode_shapes_and_round_trip():
    model = _model().eval()
    x = _images()
    with torch.no_grad():
        ids = model.encode(x)
        assert ids.shape == (2, 8, 8) and ids.dtype == torch.int64 and model.codebook_sizes() == {"codes": 32}
        torch.testing.assert_close(model.decode(ids), model.reconstruct(x))


@pytest.mark.parametrize("changes, match", [
    (dict(quantizer="ema"), "quantizer"), (dict(n_embed=0), "n_embed"), (dict(disc_loss="wgan"), "disc_loss"),
    (dict(resolution=17), "resolution"), (dict(ch_mult=()), "ch_mult"), (dict(disc_weight=-1.0), "disc_weight"),
    (dict(quantizer="gumbel", temp_decay_steps=0), "temperature"), (dict(norm_groups=0), "norm_groups"),
])
def test_bad_configuration_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        VQGAN(dataclasses.replace(VQGANConfig(**SMALL), **changes))


def test_tiny_preset_builds_without_warnings(recwarn):
    VQGAN(PRESETS["tiny"].model)
    assert not [w for w in recwarn if "perceptual" in str(w.message)]
