"""models.hqvae: the pixel-unshuffle top level, the residual bottom level, EMA codebooks with
dead-code restart, the commitment losses, and the base preset (kakaobrain/hqtransformer's
hqvae-pixelshuffle-top8x8)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.hqvae import PRESETS, HQVAE
from test_models_rqvae import check_round_trip

torch.set_num_threads(1)


def _tiny(**changes):
    torch.manual_seed(0)
    small = dict(ch=16, z_channels=16, embed_dim=8, codebook_size_top=64, codebook_size_bottom=32)
    return HQVAE(dataclasses.replace(PRESETS["tiny"].model, **{**small, **changes}))


def _images(b=2):
    torch.manual_seed(1)
    return torch.rand(b, 3, 32, 32) * 2 - 1


def _codebooks(model):
    return model.quantize_t.codebook.clone(), model.quantize_b.codebook.clone()


def _nearest(rows, codebook):
    return torch.cdist(rows, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)


def test_training_step_finite_and_gradients_reach_encoder_and_decoder():
    model = _tiny().train()
    out = model({"image": _images()}, step=0)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    params = dict(model.named_parameters())
    for name in ("encoder.conv_in.weight", "quant_conv_b.weight", "post_quant_conv_b.weight",
                 "decoder.conv_out.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert not any("codebook" in n for n in params)  # EMA codebooks are buffers
    assert set(out.indices) == set(model.codebook_sizes()) == {"top", "bottom"}
    assert out.indices["top"].shape == (2, 4, 4) and out.indices["bottom"].shape == (2, 8, 8)


def test_top_quantizes_the_unshuffled_features_and_bottom_the_residual_with_commitment_losses():
    model = _tiny(threshold_ema_dead_code=0.0).train()
    x = _images()
    top_cb, bottom_cb = _codebooks(model)  # the step updates the codebooks after its search
    out = model({"image": x}, step=0)
    with torch.no_grad():
        h = model.quant_conv_b(model.encoder(x))  # [B, 8, 8, 8]
    # the top rows: each 2 x 2 block of h, channel-major (pixel-unshuffle's order)
    top_rows = h.reshape(2, 8, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 32)
    ids_t = _nearest(top_rows, top_cb)
    assert torch.equal(ids_t.reshape(2, 4, 4), out.indices["top"])
    q_t = top_cb[ids_t].reshape(2, 4, 4, 8, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 8, 8, 8)  # pixel-shuffle
    residual = (h - q_t).permute(0, 2, 3, 1).reshape(-1, 8)
    ids_b = _nearest(residual, bottom_cb)
    assert torch.equal(ids_b.reshape(2, 8, 8), out.indices["bottom"])
    commit = F.mse_loss(top_rows, top_cb[ids_t]) + F.mse_loss(residual, bottom_cb[ids_b])
    torch.testing.assert_close(out.logs["quant_loss"], 0.25 * commit)
    torch.testing.assert_close(out.loss.detach(), F.mse_loss(out.recon.detach(), x) + 0.25 * commit)


def test_the_residual_passes_no_gradient_to_the_features():
    """As the reference: the top codes are straight-through, so h - pixel_shuffle(q_top) is constant in h."""
    model = _tiny().train()
    h = torch.randn(2, 8, 8, 8, requires_grad=True)
    q_t, _, _ = model.quantize_t(F.pixel_unshuffle(h, 2))
    (grad,) = torch.autograd.grad((h - F.pixel_shuffle(q_t, 2)).square().sum(), h, retain_graph=True)
    assert not grad.any()
    (grad,) = torch.autograd.grad(F.pixel_shuffle(q_t, 2).sum(), h)
    assert torch.equal(grad, torch.ones_like(h))


def test_ema_codebooks_change_in_training_only():
    model = _tiny(threshold_ema_dead_code=0.0)
    x = _images()
    before = _codebooks(model)
    model.eval()
    with torch.no_grad():
        model.reconstruct(x)
    assert all(torch.equal(a, b) for a, b in zip(_codebooks(model), before))
    model.train()
    out = model({"image": x}, step=0)
    for level, old, new in zip(("top", "bottom"), before, _codebooks(model)):
        used = torch.unique(out.indices[level])
        assert not torch.allclose(new[used], old[used]), level


def test_dead_codes_restart_from_the_batch_where_configured():
    x = _images()
    for threshold in (0.0, 1.0):
        model = _tiny(threshold_ema_dead_code=threshold).train()
        top_cb, _ = _codebooks(model)
        out = model({"image": x}, step=0)
        with torch.no_grad():
            rows = F.pixel_unshuffle(model.quant_conv_b(model.encoder(x)), 2).permute(0, 2, 3, 1).reshape(-1, 32)
        new_top = model.quantize_t.codebook
        copies = (new_top[:, None] == rows[None]).all(-1).any(1).sum().item()  # exact copies of the batch's rows
        unused = 64 - torch.unique(out.indices["top"]).numel()
        assert unused > 0
        # every dead code restarts from its own row of the batch; with more dead codes than rows, as many as
        # there are rows (the rest wait for later steps, as vector-quantize-pytorch 1.32)
        assert copies == (min(unused, rows.shape[0]) if threshold else 0), threshold
        assert not torch.equal(new_top, top_cb)


def test_encode_decode_shapes_and_round_trip():
    ids_t, ids_b = check_round_trip(_tiny(), _images())
    assert ids_t.shape == (2, 4, 4) and ids_b.shape == (2, 8, 8) and ids_t.dtype == torch.int64


@pytest.mark.filterwarnings("ignore:hqvae. perceptual term OFF")
def test_base_preset_is_the_imagenet_top8x8_model():
    with torch.device("meta"):
        model = HQVAE(PRESETS["base"].model).eval()
        assert model.quantize_t.codebook.shape == (8192, 1024) and model.quantize_b.codebook.shape == (8192, 256)
        ids_t, ids_b = model.encode(torch.empty(1, 3, 256, 256))
        assert ids_t.shape == (1, 8, 8) and ids_b.shape == (1, 16, 16)
        assert model.decode((ids_t, ids_b)).shape == (1, 3, 256, 256)
    train = PRESETS["base"].train
    assert (train.lr, train.betas, train.batch_size) == (4e-5, (0.5, 0.9), 128)


@pytest.mark.parametrize("resolution", [36, 33])
def test_resolution_the_two_levels_cannot_take_is_a_value_error(resolution):
    with pytest.raises(ValueError, match="resolution"):
        _tiny(resolution=resolution)
