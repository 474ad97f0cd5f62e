"""models.vit_vqgan (ViT-VQGAN) and models.vit: patch embedding and regrouping, attention, position
embeddings, the factorised l2-normalised EMA codebook, the loss against a hand computation, presets."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.vit import Attention, ViTDecoder, ViTEncoder, sincos_2d
from models.vit_vqgan import PRESETS, ViTVQGAN, ViTVQGANConfig

torch.set_num_threads(1)

SMALL = dict(resolution=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, enc_mlp_dim=48, dec_dim=24,
             dec_depth=1, dec_heads=3, dec_mlp_dim=40, codebook_size=16, codebook_dim=8, perceptual_weight=0.0,
             disc_ndf=8, disc_num_layers=1, disc_start=0)


def _model(**changes):
    torch.manual_seed(0)
    return ViTVQGAN(ViTVQGANConfig(**{**SMALL, **changes}))


def _images(b=2, side=16, seed=1):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_patch_embedding_is_a_linear_map_of_each_patch():
    torch.manual_seed(0)
    enc = ViTEncoder(image_size=8, patch_size=4, dim=6, depth=1, heads=2, mlp_dim=8, out_dim=5)
    x = _images(1, 8)
    tokens = enc.patch_embed(x).flatten(2).transpose(1, 2)
    w, b = enc.patch_embed.weight.reshape(6, -1), enc.patch_embed.bias
    for i in range(2):
        for j in range(2):
            patch = x[0, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1)
            torch.testing.assert_close(tokens[0, 2 * i + j], w @ patch + b)
    assert enc(x).shape == (1, 4, 5)


def test_decoder_regroups_patch_vectors_row_major_as_height_width_channel():
    torch.manual_seed(0)
    dec = ViTDecoder(image_size=8, patch_size=4, out_channels=3, in_dim=5, dim=6, depth=1, heads=2, mlp_dim=8)
    patches = torch.randn(2, 4, 48)

    class Fixed(torch.nn.Module):
        def forward(self, _):
            return patches

    dec.head = Fixed()
    img = dec(torch.randn(2, 4, 5))
    for n in range(4):
        i, j = divmod(n, 2)
        torch.testing.assert_close(img[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4],
                                   patches[:, n].view(2, 4, 4, 3).permute(0, 3, 1, 2))


def test_attention_is_multi_head_softmax_attention_by_hand():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., s])
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)))


def test_position_embeddings_learned_or_fixed_sincos():
    learned = _model()
    assert learned.encoder.pos_embed.requires_grad and "encoder.pos_embed" in learned.state_dict()
    fixed = _model(pos_embed="sincos")
    assert "encoder.pos_embed" not in fixed.state_dict() and "decoder.pos_embed" not in fixed.state_dict()
    pe = sincos_2d(8, 3, 3)
    # position (row 1, column 2): rows in the first half, columns in the second, sin then cos each
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    torch.testing.assert_close(pe[1 * 3 + 2], torch.cat([torch.sin(omega), torch.cos(omega), torch.sin(2 * omega),
                                                         torch.cos(2 * omega)]))
    torch.testing.assert_close(fixed.decoder.pos_embed[0], sincos_2d(24, 4, 4))


def test_codes_are_factorised_l2_normalised_and_searched_by_cosine():
    model = _model()
    q = model.quantize
    assert q.project_in.weight.shape == (8, 32) and q.project_out.weight.shape == (32, 8)
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(16))
    model.eval()
    x = _images()
    with torch.no_grad():
        tokens = model.encoder(x)
        low = F.normalize(q.project_in(tokens), dim=-1)
        ids = model.encode(x)
        torch.testing.assert_close(ids.view(2, -1), (low @ q.codebook.t()).argmax(-1), rtol=0, atol=0)
        assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64
        torch.testing.assert_close(model.decode(ids), model.decoder(q.project_out(q.codebook[ids.view(2, -1)])))
        torch.testing.assert_close(model.decode(ids), model.reconstruct(x))


def test_loss_is_l2_plus_fixed_gan_weight_plus_commitment_by_hand():
    model = _model(disc_weight=0.1, beta=0.25)
    x = _images()
    with torch.no_grad():
        low = F.normalize(model.quantize.project_in(model.encoder(x)), dim=-1)
        codes = model.quantize.codebook.clone()
    commit = ((low - codes[(low @ codes.t()).argmax(-1)]) ** 2).mean()
    out = model({"image": x}, step=0)
    g = -model.loss.discriminator(out.recon).mean()
    torch.testing.assert_close(out.logs["nll_loss"], ((x - out.recon) ** 2).mean())
    torch.testing.assert_close(out.logs["quant_loss"], 0.25 * commit)
    assert out.logs["d_weight"] == pytest.approx(0.1)
    torch.testing.assert_close(out.loss, ((x - out.recon) ** 2).mean() + 0.1 * g + 0.25 * commit)


def test_disc_start_and_the_adaptive_option():
    model = _model(disc_start=5)
    out = model({"image": _images()}, step=4)
    torch.testing.assert_close(out.loss, out.logs["nll_loss"] + out.logs["quant_loss"])
    assert model({"image": _images()}, step=4, discriminate=out)[0] == 0
    adaptive = _model(adaptive_weight=True, disc_weight=0.5)
    out = adaptive({"image": _images()}, step=0)
    assert out.logs["d_weight"] != pytest.approx(0.5) and out.logs["d_weight"] > 0


def test_gradients_reach_encoder_decoder_projections_and_the_ema_codebook_moves_without_them():
    model = _model()
    before = model.quantize.codebook.clone()
    out = model({"image": _images()}, step=0)
    out.loss.backward()
    params = dict(model.named_parameters())
    for name in ("encoder.patch_embed.weight", "encoder.pos_embed", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.head.fc2.weight", "quantize.project_in.weight", "quantize.project_out.weight",
                 "decoder.proj_in.weight", "decoder.blocks.0.mlp.0.weight", "decoder.head.fc2.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert not any("codebook" in n or "embed_avg" in n for n in params)  # EMA buffers, not parameters
    assert not torch.equal(model.quantize.codebook, before)
    torch.testing.assert_close(model.quantize.codebook.norm(dim=-1), torch.ones(16))
    frozen = model.quantize.codebook.clone()
    model.encode(_images())  # train mode, but encode never updates the codebook
    assert torch.equal(model.quantize.codebook, frozen)


def test_base_preset_is_vit_vqgan_base():
    with pytest.warns(UserWarning, match="perceptual term OFF"), torch.device("meta"):
        model = ViTVQGAN(PRESETS["base"].model)
    enc, dec = model.encoder, model.decoder
    assert len(enc.blocks) == len(dec.blocks) == 12 and enc.grid == 32
    assert enc.patch_embed.weight.shape == (768, 3, 8, 8) and enc.blocks[0].attn.qkv.weight.shape == (2304, 768)
    assert enc.blocks[0].mlp[0].weight.shape == (3072, 768) and dec.head.fc2.weight.shape == (8 * 8 * 3, 3072)
    assert model.quantize.codebook.shape == (8192, 32) and model.quantize.use_cosine_sim
    cfg = model.cfg
    assert (cfg.perceptual_weight, cfg.disc_weight, cfg.beta, cfg.adaptive_weight) == (0.1, 0.1, 0.25, False)
    train = PRESETS["base"].train
    assert train.batch_size * train.grad_accum == 256 and train.lr == 1e-4 and train.betas == (0.9, 0.99)


@pytest.mark.parametrize("changes, match", [
    (dict(resolution=18), "resolution"), (dict(enc_heads=3), "divisible"), (dict(pos_embed="rope"), "pos_embed"),
    (dict(decay=1.0), "decay"), (dict(codebook_dim=0), "codebook_dim"), (dict(disc_loss="wgan"), "disc_loss"),
    (dict(pos_embed="sincos", dec_dim=30), "divisible by 4"),
])
def test_bad_configuration_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        ViTVQGAN(dataclasses.replace(ViTVQGANConfig(**SMALL), **changes))
