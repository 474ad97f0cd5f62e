"""models.var_vqvae: VAR's VQVAE layout (vae_ch160v4096z32's keys and shapes) and outputs against VAR's code.

The reference data in tests/data were produced once by FoundationVision/VAR's own ``models/vqvae.py``,
``basic_vae.py`` and ``quant.py`` (run outside the repository): ``var_vqvae_ch160v4096z32_keys.txt`` is
``build_vae_var``'s VQVAE state_dict (key and shape per line), ``var_vqvae_reference.json`` VAR's results
for a small VQVAE (vocab 64, Cvae 8, ch 32, scales 1-4, 64 x 64 images) whose weights and inputs are
filled by :func:`det_fill_` / :func:`det_input` below (no torch RNG, so they are the same anywhere).
"""

import dataclasses
import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from models.var_vqvae import PRESETS, VarVQVAE, VarVQVAEConfig

torch.set_num_threads(1)
DATA = pathlib.Path(__file__).parent / "data"
BASE_PARAMETERS = 108_948_355  # VAR's VQVAE(ch=160, V=4096, Cvae=32): parameters, as counted from VAR's code


def _uniform(n, k):
    """n deterministic pseudo-random values of unit variance in [-sqrt(3), sqrt(3)), stream k."""
    i = torch.arange(n, dtype=torch.float64)
    u = torch.frac(torch.sin(i * 12.9898 + k * 78.233) * 43758.5453).abs()
    return (2 * u - 1) * math.sqrt(3)


def det_fill_(module):
    """Weights without torch's RNG: 1 / sqrt(fan_in) scaled for kernels, near 1 for norms, small biases."""
    with torch.no_grad():
        for k, (name, p) in enumerate(module.named_parameters()):
            t = _uniform(p.numel(), k)
            if name.endswith("embedding.weight"):
                v = 0.5 * t
            elif p.dim() > 1:
                v = t / math.sqrt(p[0].numel())
            elif "norm" in name and name.endswith("weight"):
                v = 1.0 + 0.1 * t
            else:
                v = 0.05 * t
            p.copy_(v.reshape(p.shape).to(p.dtype))


def det_input(b, r):
    return (0.5 * _uniform(b * 3 * r * r, 999).reshape(b, 3, r, r)).float()


def _reference_model():
    cfg = VarVQVAEConfig(resolution=64, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4),
                         num_res_blocks=2, v_patch_nums=(1, 2, 3, 4))
    model = VarVQVAE(cfg)
    det_fill_(model)
    return model


def _tiny(**changes):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"].model, **changes)
    return VarVQVAE(cfg)


def _close(actual, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("ignore:var_vqvae. perceptual term OFF")
def test_base_preset_has_exactly_the_keys_and_shapes_of_vae_ch160v4096z32():
    with torch.device("meta"):
        model = VarVQVAE(PRESETS["base"].model)
    state = model.state_dict()
    # the training-only GAN discriminator comes after VAR's modules, under loss.*
    ours = [f"{k} {tuple(v.shape)}" for k, v in state.items() if not k.startswith("loss.")]
    expected = (DATA / "var_vqvae_ch160v4096z32_keys.txt").read_text().splitlines()
    assert len(expected) == 324
    assert ours == expected
    assert list(state)[:324] == [line.split(" ")[0] for line in expected]
    assert all(k.startswith("loss.discriminator.") for k in list(state)[324:])
    vae = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("loss."))
    assert vae == BASE_PARAMETERS


@pytest.mark.filterwarnings("ignore:var_vqvae. perceptual term OFF")
def test_base_preset_encodes_256_images_into_vars_ten_scales():
    with torch.device("meta"):
        model = VarVQVAE(PRESETS["base"].model).eval()
        ids = model.img_to_idxBl(torch.empty(1, 3, 256, 256))
        assert [t.shape[1] for t in ids] == [pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
        tokens = model.encode(torch.empty(1, 3, 256, 256))
        assert tokens.shape == (1, 680)  # VAR's L
        assert model.decode(tokens).shape == (1, 3, 256, 256)


def test_training_step_matches_vars_code():
    ref = json.loads((DATA / "var_vqvae_reference.json").read_text())
    model = _reference_model().train()
    x = det_input(2, 64)
    out = model({"image": x}, step=0)
    out.loss.backward()  # VAR's paper objective: mse(x_hat, x) + the quantizer's loss, as the reference's
    assert out.indices["codes"].tolist() == [sum(scales, []) for scales in zip(*ref["ids"])]
    _close(out.recon.detach()[:, :, ::16, ::16].flatten(), ref["rec"])
    _close(out.logs["vq_loss"], ref["vq_loss"], atol=1e-6)
    _close(out.loss.detach(), ref["loss"], atol=1e-6)
    grads = dict(model.named_parameters())
    for key, name in [("grad_embedding_sq", "quantize.embedding.weight"), ("grad_conv_in_sq", "encoder.conv_in.weight"),
                      ("grad_phi0_sq", "quantize.quant_resi.qresi_ls.0.weight"),
                      ("grad_quant_conv_sq", "quant_conv.weight"), ("grad_dec_conv_out_sq", "decoder.conv_out.weight")]:
        _close(grads[name].grad.square().sum(), ref[key], rtol=1e-4, atol=1e-8)


def test_tokens_images_and_var_input_match_vars_code():
    ref = json.loads((DATA / "var_vqvae_reference.json").read_text())
    model = _reference_model().eval()
    x = det_input(2, 64)
    with torch.no_grad():
        ids = model.img_to_idxBl(x)
        assert [t.tolist() for t in ids] == ref["ids"]
        torch.testing.assert_close(model.encode(x), torch.cat(ids, dim=1), rtol=0, atol=0)
        img = model.decode(model.encode(x))
        var_in = model.quantize.idxBl_to_var_input(ids)
    _close(img[:, :, ::16, ::16].flatten(), ref["img"])
    _close(img.mean(), ref["img_mean"], atol=1e-6)
    assert list(var_in.shape) == ref["var_input_shape"]
    _close(var_in.mean(), ref["var_input_mean"], atol=1e-6)
    _close(var_in.square().mean(), ref["var_input_sq"], atol=1e-6)


def test_training_step_is_finite_and_reaches_encoder_decoder_codebook_and_phi():
    model = _tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    hits = model.quantize.ema_vocab_hit_SV.clone()
    out = model({"image": x}, step=0)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.logs.values())
    torch.testing.assert_close(out.loss.detach(), out.logs["pixel_loss"] + out.logs["vq_loss"])
    out.loss.backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                 "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not torch.equal(model.quantize.ema_vocab_hit_SV, hits)  # codebook hit statistics counted
    assert set(out.indices) == set(model.codebook_sizes()) == {"codes"}  # one codebook shared by the scales
    assert out.indices["codes"].shape == (2, 1 + 4 + 16 + 64)


def test_indices_of_the_training_step_are_those_of_the_forward_search():
    model = _tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model({"image": x}, step=0)
    with torch.no_grad():
        again = model.img_to_idxBl(x)
    assert torch.equal(out.indices["codes"], torch.cat(again, dim=1))


def test_encode_decode_round_trip_and_vars_helpers():
    model = _tiny().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ids = model.encode(x)
        assert ids.shape == (2, 85) and ids.dtype == torch.int64
        y = model.decode(ids)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
        torch.testing.assert_close(model.reconstruct(x), y, rtol=0, atol=0)
        steps = model.idxBl_to_img(model.img_to_idxBl(x), same_shape=True, last_one=False)
        assert len(steps) == 4 and all(s.shape == x.shape for s in steps)
        torch.testing.assert_close(steps[-1], y)
        f_hat = model.quantize.f_to_idxBl_or_fhat(model.features(x), to_fhat=True)[-1]
        torch.testing.assert_close(model.fhat_to_img(f_hat), y)
        # the training forward's reconstruction is the decoder's output before the clamp
        model.train()
        recon = model({"image": x}, step=0).recon
        torch.testing.assert_close(recon.clamp(-1, 1), y, atol=1e-5, rtol=1e-5)


def test_state_dict_is_vars_layout_and_loads_a_checkpoint_of_another_scale_count():
    model = _tiny()
    keys = set(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
    sd = model.state_dict()
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, model.V)  # as VAR: a 10-scale checkpoint into 4 scales
    other = _tiny(v_patch_nums=(1, 2, 4, 8))
    other.load_state_dict(sd)
    assert other.quantize.ema_vocab_hit_SV.shape == (4, model.V)
    torch.testing.assert_close(other.quantize.embedding.weight, model.quantize.embedding.weight)


@pytest.mark.parametrize("changes, option", [
    (dict(resolution=64), "resolution"),
    (dict(v_patch_nums=(1, 2, 4, 16)), "resolution"),
    (dict(v_patch_nums=(1, 4, 2, 8)), "v_patch_nums"),
    (dict(quant_conv_ks=2), "quant_conv_ks"),
    (dict(share_quant_resi=-1), "share_quant_resi"),
])
def test_bad_configuration_is_a_value_error_naming_the_option(changes, option):
    cfg = dataclasses.replace(PRESETS["tiny"].model, **changes)
    with pytest.raises(ValueError, match=option):
        VarVQVAE(cfg)


def test_vq_loss_weight_scales_the_quantizer_term():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = _tiny()({"image": x}, step=0)
    b = _tiny(vq_weight=3.0)({"image": x}, step=0)
    torch.testing.assert_close(b.loss, a.logs["pixel_loss"] + 3.0 * a.logs["vq_loss"])
    assert F.mse_loss(a.recon, x).item() == pytest.approx(a.logs["pixel_loss"].item())


def test_a_var_checkpoint_loads_strictly_into_a_model_training_with_the_gan():
    var_layout = _tiny().state_dict()  # no loss modules: VAR's keys only
    model = _tiny(disc_weight=0.8, disc_ndf=8)
    assert any(k.startswith("loss.discriminator.") for k in model.state_dict())
    model.load_state_dict(var_layout)
    torch.testing.assert_close(model.quantize.embedding.weight, var_layout["quantize.embedding.weight"])
    model.load_state_dict(model.state_dict())  # its own checkpoint, loss modules included
    broken = dict(var_layout)
    del broken["quant_conv.weight"]
    with pytest.raises(RuntimeError, match="quant_conv.weight"):
        model.load_state_dict(broken)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model.train()({"image": x}, step=0)
    d_loss, _ = model({"image": x}, step=0, discriminate=out)
    assert torch.isfinite(out.loss) and torch.isfinite(d_loss) and model.discriminator_parameters()


def test_a_bf16_model_decodes_and_trains_outside_autocast():
    """The quantizer keeps f_hat in float32; the model's convolutions in bf16 must still take it."""
    torch.manual_seed(0)
    m = VarVQVAE(VarVQVAEConfig(resolution=16, vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2),
                                v_patch_nums=(1, 2, 4, 8))).to(torch.bfloat16)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).bfloat16()
    ids = m.encode(x)
    image = m.decode(ids)
    assert image.dtype == torch.bfloat16 and image.shape == (2, 3, 16, 16) and torch.isfinite(image.float()).all()
    out = m.training_step({"image": x}, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss.float()) and m.post_quant_conv.weight.grad is not None
