"""models.rqvae: RQ-VAE's residual quantization, cumulative commitment loss, EMA codebook with
dead-code restart, and the base preset's layout (kakaobrain/rq-vae-transformer in256-rqvae-8x8x4)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.rqvae import PRESETS, RQVAE

torch.set_num_threads(1)

# in256-rqvae-8x8x4's encoder, decoder, quant_conv and post_quant_conv, counted from RQ-VAE's own
# modules (rqvae/models/rqvae/modules.py) on the meta device; its codebook is a buffer here
BASE_PARAMETERS = 100_207_491


def _tiny(**changes):
    torch.manual_seed(0)
    small = dict(ch=16, z_channels=16, embed_dim=8, codebook_size=64)
    cfg = dataclasses.replace(PRESETS["tiny"].model, **{**small, **changes})
    return RQVAE(cfg)


def _images(b=2):
    torch.manual_seed(1)
    return torch.rand(b, 3, 32, 32) * 2 - 1


def _codebook(model):
    return model.quantizer.layers[0]._codebook.embed[0].clone()


def test_training_step_finite_and_gradients_reach_encoder_and_decoder_not_the_ema_codebook():
    model = _tiny().train()
    out = model({"image": _images()}, step=0)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    params = dict(model.named_parameters())
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight",
                 "post_quant_conv.weight", "decoder.conv_out.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert not any("codebook" in n for n in params)  # the EMA codebook is a buffer
    # one shared codebook: one key, the ids of every depth
    assert set(out.indices) == set(model.codebook_sizes()) == {"codes"}
    assert out.indices["codes"].shape == (2, 4, 4, 4) and out.indices["codes"].dtype == torch.int64


def test_separate_codebooks_are_one_level_each():
    model = _tiny(shared_codebook=False).eval()
    books = [layer._codebook for layer in model.quantizer.layers]
    assert len({id(b) for b in books}) == 4
    with torch.no_grad():
        ids = model.encode(_images())  # before the training step updates the codebooks
    out = model.train()({"image": _images()}, step=0)
    assert set(out.indices) == set(model.codebook_sizes()) == {"level0", "level1", "level2", "level3"}
    assert torch.equal(ids, torch.stack([out.indices[f"level{d}"] for d in range(4)], dim=-1))


def test_cumulative_commitment_loss_against_a_hand_computation():
    model = _tiny(threshold_ema_dead_code=0.0).train()
    x = _images()
    codebook = _codebook(model)  # the step updates the codebook after its search
    out = model({"image": x}, step=0)
    with torch.no_grad():
        z = model.features(x).permute(0, 2, 3, 1)  # [B, h, w, C]
    ids = out.indices["codes"]
    partial = torch.zeros_like(z)
    per_level = []
    for d in range(4):
        partial = partial + codebook[ids[..., d]]
        per_level.append(((z - partial) ** 2).mean())
    torch.testing.assert_close(torch.stack([out.logs[f"commit_level{d}"] for d in range(4)]), torch.stack(per_level))
    commit = torch.stack(per_level).mean()
    torch.testing.assert_close(out.logs["commit_loss"], commit)
    torch.testing.assert_close(out.loss.detach(), F.mse_loss(out.recon.detach(), x) + 0.25 * commit)
    # residual quantization picks, at every depth, the code nearest to what the earlier depths left
    residual = z.reshape(-1, z.shape[-1])
    for d in range(4):
        nearest = torch.cdist(residual, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        assert torch.equal(nearest, ids[..., d].reshape(-1))
        residual = residual - codebook[nearest]


def test_l1_pixel_loss_option():
    model = _tiny(pixel_loss="l1").train()
    x = _images()
    out = model({"image": x}, step=0)
    torch.testing.assert_close(out.logs["pixel_loss"], F.l1_loss(out.recon.detach(), x))
    torch.testing.assert_close(out.loss.detach(), out.logs["pixel_loss"] + 0.25 * out.logs["commit_loss"])


def test_gan_terms_where_configured():
    plain = _tiny()
    assert plain.loss is None and plain.discriminator_parameters() == []
    with pytest.raises(NotImplementedError):
        plain.discriminator_loss({"image": _images()}, plain({"image": _images()}, step=0), step=0)
    model = _tiny(disc_weight=0.75, disc_start=0, disc_ndf=8).train()
    x = _images()
    out = model({"image": x}, step=0)
    assert out.logs["d_weight"] > 0 and torch.isfinite(out.logs["g_loss"])
    out.loss.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    disc = model.discriminator_parameters()
    assert disc and {id(p) for p in disc} == {id(p) for p in model.loss.discriminator.parameters()}
    for p in disc:
        p.grad = None
    d_loss, _ = model({"image": x}, step=0, discriminate=out)
    d_loss.backward()
    assert torch.isfinite(d_loss) and all(p.grad is not None for p in disc)
    assert model.decoder.conv_out.weight.grad is not None
    assert any(k.startswith("loss.discriminator.") for k in model.state_dict())


def test_ema_codebook_changes_in_training_only():
    model = _tiny(threshold_ema_dead_code=0.0)
    x = _images()
    before = _codebook(model)
    model.eval()
    with torch.no_grad():
        model.reconstruct(x)
    assert torch.equal(_codebook(model), before)
    model.train()
    out = model({"image": x}, step=0)
    after = _codebook(model)
    used = torch.unique(torch.stack(list(out.indices.values())))
    assert not torch.allclose(after[used], before[used])


def _restart_candidates(model, x, codebook, ids):
    """The rows every depth's EMA update sees: the features and their residuals after each depth."""
    with torch.no_grad():
        residual = model.features(x).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    rows = []
    for d in range(ids.shape[-1]):
        rows.append(residual)
        residual = residual - codebook[ids[..., d].reshape(-1)]
    return torch.cat(rows)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_dead_codes_restart_from_the_batch_where_configured(threshold):
    model = _tiny(codebook_size=256, threshold_ema_dead_code=threshold).train()
    x = _images()
    before = _codebook(model)
    out = model({"image": x}, step=0)
    ids = out.indices["codes"]
    candidates = _restart_candidates(model, x, before, ids)
    after = _codebook(model)
    copies = (after[:, None] == candidates[None]).all(-1).any(1).sum().item()  # exact copies of batch rows
    if threshold == 0:
        assert copies == 0
    else:  # codes unused this step (EMA count 0.99 < 1) now hold rows of the batch: at every depth's update
        # as many as that depth has rows, distinct (vector-quantize-pytorch 1.32's rule), the rest later
        unused = 256 - torch.unique(ids).numel()
        rows_per_depth = candidates.shape[0] // ids.shape[-1]
        assert copies >= min(unused, rows_per_depth) and unused > 0


def check_round_trip(model, x):
    """decode(encode(x)) is reconstruct(x) and the training forward's reconstruction (whose codes are
    searched before its codebook update); returns the ids."""
    model.eval()
    with torch.no_grad():
        ids = model.encode(x)
        y = model.decode(ids)
        assert y.shape == x.shape
        torch.testing.assert_close(model.reconstruct(x), y, rtol=0, atol=0)
        model.train()
        recon = model({"image": x}, step=0).recon
    torch.testing.assert_close(recon, y, atol=1e-5, rtol=1e-5)
    return ids


def test_encode_decode_shapes_and_round_trip():
    ids = check_round_trip(_tiny(), _images())
    assert ids.shape == (2, 4, 4, 4) and ids.dtype == torch.int64


@pytest.mark.filterwarnings("ignore:rqvae. perceptual term OFF")
def test_base_preset_is_rq_vaes_imagenet_model():
    with torch.device("meta"):
        model = RQVAE(PRESETS["base"].model).eval()
        assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("loss.")) == BASE_PARAMETERS
        assert model.loss.perceptual_weight == 0  # no LPIPS weights given: the term is off
        assert len(model.loss.discriminator.main) == 3 * 2 + 3  # RQ-VAE's 2-layer PatchGAN
        assert _codebook(model).shape == (16384, 256)
        assert all(layer._codebook is model.quantizer.layers[0]._codebook for layer in model.quantizer.layers)
        ids = model.encode(torch.empty(1, 3, 256, 256))
        assert ids.shape == (1, 8, 8, 4)
        assert model.decode(ids).shape == (1, 3, 256, 256)
    train = PRESETS["base"].train
    assert (train.lr, train.betas) == (4e-5, (0.5, 0.9))


@pytest.mark.parametrize("changes, option", [
    (dict(pixel_loss="mse"), "pixel_loss"),
    (dict(depth=0), "depth"),
    (dict(resolution=36), "resolution"),
])
def test_bad_configuration_is_a_value_error_naming_the_option(changes, option):
    with pytest.raises(ValueError, match=option):
        _tiny(**changes)
