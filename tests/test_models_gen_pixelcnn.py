"""The PixelCNN priors of models/pixelcnn.py (generators ``vqvae`` and ``vqvae2``): the masked
convolutions' receptive field (causal in raster order and free of the blind spot), the hierarchy of
the VQ-VAE-2 priors, sampling (valid ids, determinism, guidance, the ignored cache, greedy decoding
agreeing with teacher forcing), training, configuration errors and the presets. Tiny random-weight
models on tiny random-weight tokenizers; no trained runs."""

import os

import pytest
import torch

from models.generator import generator_system
from models.pixelcnn import (GatedLayer, GatedPixelCNN, PixelCNNConfig, PixelCNNPrior, PixelSNAIL, VQVAE2Prior,
                             VQVAE2PriorConfig, causal_conv, gate)
from models.sampling import SamplingConfig
from models.vqvae import VQVAE, VQVAEConfig
from models.vqvae2 import VQVAE2, VQVAE2Config

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

K = 16


def vqvae_tokenizer():
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(resolution=16, hidden=8, res_channels=4, num_res_blocks=1, embed_dim=4, codebook_size=K,
                             ema=True))


def vqvae2_tokenizer():
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config(resolution=32, hidden=8, res_channels=4, num_res_blocks=1, embed_dim=4,
                               codebook_size=K))


def pixelcnn(num_classes=3, **kw):
    torch.manual_seed(1)
    cfg = dict(num_classes=num_classes, dim=8, layers=4, kernel=3, out_hidden=16)
    cfg.update(kw)
    return PixelCNNPrior(PixelCNNConfig(**cfg), vqvae_tokenizer()).eval()


def hierarchical(num_classes=3, **kw):
    torch.manual_seed(1)
    cfg = dict(num_classes=num_classes, top_channels=8, top_res_channels=8, top_blocks=1, top_res_blocks=1,
               top_out_res_blocks=1, top_attn_dim=8, top_heads=2, top_kernel=3, bottom_dim=8, bottom_layers=4,
               bottom_kernel=3, bottom_out_hidden=8, cond_channels=8, cond_res_blocks=1)
    cfg.update(kw)
    return VQVAE2Prior(VQVAE2PriorConfig(**cfg), vqvae2_tokenizer()).eval()


def influence(net_logits, ids):
    """dep[p, q]: whether changing the code at raster position q changes the logits at position p (run
    the net in float64: a far code's influence through a deep random net can be ~1e-8)."""
    b, h, w = ids.shape
    with torch.no_grad():
        base = net_logits(ids).flatten(2)
        dep = torch.zeros(h * w, h * w, dtype=torch.bool)
        for q in range(h * w):
            other = ids.clone().view(b, -1)
            other[:, q] = (other[:, q] + 1 + torch.arange(b) % (K - 1)) % K
            changed = net_logits(other.view(b, h, w)).flatten(2)
            dep[:, q] = ((changed - base).abs().amax(dim=(0, 1)) > 1e-13)
    return dep


def strictly_before(n):
    return torch.ones(n, n, dtype=torch.bool).tril(-1)


# ---------------------------------------------------------------- receptive fields

def test_gated_pixelcnn_sees_exactly_the_positions_before_it_in_raster_order():
    """Position p's logits depend on every earlier code (no blind spot: the left neighbour, the one
    above, the ones above to the right) and on no code at or after p."""
    torch.manual_seed(0)
    net = GatedPixelCNN(K, 8, 4, 3, 16).double().eval()
    ids = torch.randint(0, K, (2, 4, 4))
    dep = influence(net, ids)
    assert torch.equal(dep, strictly_before(16))
    p = 1 * 4 + 2                                  # (1, 2)
    assert dep[p, p - 1] and dep[p, p - 4] and dep[p, p - 4 + 1] and dep[4, 3]  # left, above, above-right, (0, 3)
    assert not dep[p, p]


def test_first_layer_masks_A_and_the_others_B():
    torch.manual_seed(0)
    net = GatedPixelCNN(K, 4, 2, 5, 8)
    first, second = net.layers
    assert first.v_conv.mask.shape == (3, 5) and first.h_conv.mask.shape == (1, 3)
    assert first.v_conv.mask[-1].sum() == 0 and first.v_conv.mask[:-1].all()     # rows strictly above
    assert first.h_conv.mask[0].tolist() == [1, 1, 0]                             # strictly left
    assert second.v_conv.mask.all() and second.h_conv.mask.all()
    assert not first.residual and second.residual
    assert "layers.0.v_conv.mask" not in net.state_dict()


def test_one_gated_layer_is_the_papers_equations():
    """v' = tanh * sigmoid of the vertical convolution plus the class bias; h' = h + 1x1(gate(horizontal
    convolution + 1x1(vertical pre-activation) + class bias)); the vertical stack at row i never sees row i."""
    torch.manual_seed(0)
    layer = GatedLayer(4, 3, "B", num_labels=3)
    v, h, label = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.tensor([0, 2])
    v_out, h_out = layer(v, h, label)
    bias_v, bias_h = layer.label(label)[:, :, None, None].chunk(2, dim=1)
    v_pre = torch.nn.functional.conv2d(torch.nn.functional.pad(v, (1, 1, 1, 0)), layer.v_conv.weight,
                                       layer.v_conv.bias)
    h_pre = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (1, 0, 0, 0)), layer.h_conv.weight,
                                       layer.h_conv.bias) + layer.v_to_h(v_pre)
    a, b = (v_pre + bias_v).chunk(2, dim=1)
    assert torch.allclose(v_out, torch.tanh(a) * torch.sigmoid(b), atol=1e-6)
    a, b = (h_pre + bias_h).chunk(2, dim=1)
    assert torch.allclose(h_out, h + layer.h_out(torch.tanh(a) * torch.sigmoid(b)), atol=1e-6)
    assert torch.allclose(gate(torch.tensor([[0.5], [-1.0]])[None]), torch.tanh(torch.tensor(0.5)) * torch.sigmoid(
        torch.tensor(-1.0)))
    # the A layer's vertical output at row i ignores row i: features of rows above only
    first = GatedLayer(4, 3, "A")
    x = torch.randn(1, 4, 5, 5)
    y = x.clone()
    y[:, :, 2] = torch.randn(4, 5)
    assert torch.allclose(first(x, x)[0][:, :, :3], first(y, x)[0][:, :, :3]) and \
        not torch.allclose(first(x, x)[0][:, :, 3], first(y, x)[0][:, :, 3])


def test_pixelsnail_top_prior_is_causal_with_full_context():
    torch.manual_seed(0)
    net = PixelSNAIL(K, (4, 4), 8, 3, 2, 1, 8, 8, 2, 0.0, 1, num_labels=4).double().eval()
    ids = torch.randint(0, K, (2, 4, 4))
    label = torch.tensor([1, 3])
    assert torch.equal(influence(lambda x: net(x, label), ids), strictly_before(16))
    mask = causal_conv(2, 2, 5).mask
    assert mask[-1].tolist() == [1, 1, 0, 0, 0] and mask[:-1].all()   # current row: strictly left


def test_bottom_prior_depends_on_the_whole_top_map_and_causally_on_the_bottom():
    gen = hierarchical(bottom_layers=8).double()   # a receptive field over all of the 8x8 map
    torch.manual_seed(0)
    top, bottom = torch.randint(0, K, (2, 4, 4)), torch.randint(0, K, (2, 8, 8))
    label = torch.tensor([0, 2])
    dep = influence(lambda b: gen.forward_logits((top, b), label)[1], bottom)
    assert torch.equal(dep, strictly_before(64))
    with torch.no_grad():
        t_logits, b_logits = gen.forward_logits((top, bottom), label)
        other_top = top.clone()
        other_top[:, 3, 3] = (other_top[:, 3, 3] + 1) % K        # the last top code
        t2, b2 = gen.forward_logits((other_top, bottom), label)
        other_bottom = (bottom + 1) % K
        t3, _ = gen.forward_logits((top, other_bottom), label)
    assert not torch.allclose(b_logits[:, :, 0, 0], b2[:, :, 0, 0])  # even the first bottom position sees it
    assert torch.equal(t_logits, t3)                                  # the top prior ignores the bottom map
    assert torch.equal(t_logits[:, :, 3, 3], t2[:, :, 3, 3])


def test_class_labels_and_the_null_class_change_the_logits():
    gen = pixelcnn()
    assert gen.prior.layers[0].label.num_embeddings == 4              # 3 classes + the null class
    ids = torch.randint(0, K, (1, 4, 4))
    with torch.no_grad():
        logits = [gen.forward_logits(ids, torch.tensor([c])) for c in range(4)]
    assert all(not torch.allclose(logits[a], logits[b]) for a in range(4) for b in range(a))
    assert torch.equal(gen.forward_logits(ids, None), logits[3])       # no labels: the null class
    unconditional = pixelcnn(num_classes=0)
    assert unconditional.prior.layers[0].label is None
    assert unconditional.sample(2, seed=0).ids.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="cfg"):
        unconditional.sample(2, seed=0, cfg=2.0)
    assert hierarchical(num_classes=0).top.blocks[0].res_blocks[0].label is None


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("make", [pixelcnn, hierarchical])
def test_samples_are_valid_ids_of_the_tokenizers_format_and_deterministic(make):
    gen = make()
    s = gen.sample(4, [0, 1, 2, 0], seed=3, top_k=5)
    maps = s.ids if isinstance(s.ids, tuple) else (s.ids,)
    shapes = [(4, 4, 4), (4, 8, 8)] if len(maps) == 2 else [(4, 4, 4)]
    assert [tuple(m.shape) for m in maps] == shapes
    assert all(m.dtype == torch.long and m.min() >= 0 and m.max() < K for m in maps)
    side = gen.tokenizer.cfg.resolution
    assert s.images.shape == (4, 3, side, side) and s.images.abs().max() <= 1
    again = gen.sample(4, [0, 1, 2, 0], seed=3, top_k=5).ids
    other = gen.sample(4, [0, 1, 2, 0], seed=4, top_k=5).ids
    assert all(torch.equal(a, b) for a, b in zip(maps, again if len(maps) == 2 else (again,)))
    assert not all(torch.equal(a, b) for a, b in zip(maps, other if len(maps) == 2 else (other,)))


@pytest.mark.parametrize("make", [pixelcnn, hierarchical])
def test_no_cache_draws_the_same_tokens(make):
    gen = make()
    a = gen.sample(3, seed=0, cfg=2.0).ids
    b = gen.sample(3, seed=0, cfg=2.0, use_cache=False).ids
    assert all(torch.equal(x, y) for x, y in zip(*(t if isinstance(t, tuple) else (t,) for t in (a, b))))


@pytest.mark.parametrize("make", [pixelcnn, hierarchical])
def test_guidance_zero_is_the_null_class_model_and_one_the_conditional(make):
    gen = make()
    labels = torch.tensor([0, 1, 2])

    def as_tuple(t):
        return t if isinstance(t, tuple) else (t,)
    guided0 = as_tuple(gen.sample(3, labels, seed=5, cfg=0.0).ids)
    null = as_tuple(gen.generate(3, torch.full((3,), 3), SamplingConfig(), torch.Generator().manual_seed(5)))
    assert all(torch.equal(a, b) for a, b in zip(guided0, null))
    guided1 = as_tuple(gen.sample(3, labels, seed=5, cfg=1.0).ids)
    conditional = as_tuple(gen.sample(3, labels, seed=5).ids)
    assert all(torch.equal(a, b) for a, b in zip(guided1, conditional))
    assert not all(torch.equal(a, b) for a, b in zip(conditional, null))
    guided3 = as_tuple(gen.sample(3, labels, seed=5, cfg=3.0, cfg_schedule="linear").ids)
    assert all(m.min() >= 0 and m.max() < K for m in guided3)


def test_greedy_sampling_is_the_argmax_of_the_teacher_forced_logits():
    """Raster order: every greedy token is the argmax of the training forward's logits at its position
    given the tokens drawn before it (top map, then bottom map given the top)."""
    gen = pixelcnn()
    labels = torch.tensor([0, 2])
    ids = gen.sample(2, labels, seed=0, temperature=0).ids
    with torch.no_grad():
        assert torch.equal(gen.forward_logits(ids, labels).argmax(1), ids)
    gen = hierarchical()
    top, bottom = gen.sample(2, labels, seed=0, temperature=0).ids
    with torch.no_grad():
        t_logits, b_logits = gen.forward_logits((top, bottom), labels)
    assert torch.equal(t_logits.argmax(1), top) and torch.equal(b_logits.argmax(1), bottom)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("make", [pixelcnn, hierarchical])
def test_training_step_trains_the_prior_and_not_the_tokenizer(make):
    gen = make().train()
    side = gen.tokenizer.cfg.resolution
    batch = {"image": torch.rand(4, 3, side, side) * 2 - 1, "label": torch.tensor([0, 1, 2, -1])}
    out = gen.training_step(batch, 0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.recon is None
    out.loss.backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for p in gen.tokenizer.parameters())
    assert not any(k.startswith("tokenizer") for k in gen.state_dict())
    assert abs(out.loss.item() - torch.log(torch.tensor(float(K))).item()) < 1.5   # near log K at init
    if isinstance(gen, VQVAE2Prior):
        logs = out.logs
        assert set(logs) >= {"top_nll", "bottom_nll"}
        assert torch.allclose(out.loss.detach(), (16 * logs["top_nll"] + 64 * logs["bottom_nll"]) / 80, atol=1e-6)
        with torch.no_grad():
            gen.eval()
            top, bottom = gen.tokens(batch)
            t, b = gen.forward_logits((top, bottom), torch.tensor([0, 1, 2, 3]))
            flat = torch.cat([t.flatten(2), b.flatten(2)], 2)
            mean = torch.nn.functional.cross_entropy(flat, torch.cat([top.flatten(1), bottom.flatten(1)], 1))
            assert torch.allclose(gen.training_step(batch, 0).loss, mean, atol=1e-5)   # mean over all tokens


# ---------------------------------------------------------------- configuration and presets

@pytest.mark.parametrize("make, bad, field", [
    (pixelcnn, dict(kernel=4), "kernel"), (pixelcnn, dict(kernel=1), "kernel"), (pixelcnn, dict(dim=0), "dim"),
    (pixelcnn, dict(layers=0), "layers"), (pixelcnn, dict(class_dropout=1.0), "class_dropout"),
    (hierarchical, dict(top_heads=3), "top_heads"), (hierarchical, dict(top_kernel=2), "top_kernel"),
    (hierarchical, dict(bottom_kernel=6), "bottom_kernel"), (hierarchical, dict(cond_kernel=2), "cond_kernel"),
    (hierarchical, dict(dropout=1.0), "dropout"), (hierarchical, dict(top_blocks=0), "top_blocks"),
    (hierarchical, dict(cond_res_blocks=-1), "cond_res_blocks")])
def test_config_errors_name_the_field(make, bad, field):
    with pytest.raises(ValueError, match=field):
        make(**bad)


@pytest.mark.parametrize("name, tokenizer", [("vqvae", VQVAE), ("vqvae2", VQVAE2)])
def test_registry_and_presets(name, tokenizer):
    cls, presets, tokenizer_system = generator_system(name)
    assert tokenizer_system == name and set(presets) == {"tiny", "base"}
    assert presets["tiny"].data.name == "digits" and presets["tiny"].model.num_classes == 10
    from models import system
    for preset in ("tiny", "base"):
        with torch.device("meta"):
            tok = tokenizer(system(name).PRESETS[preset].model)
            gen = cls(presets[preset].model, tok)
        assert not any(k.startswith("tokenizer") for k in gen.state_dict())
    if name == "vqvae":
        assert gen.shape == (32, 32) and len(gen.prior.layers) == 20 and gen.cfg.dim == 384
    else:
        assert gen.top_shape == (32, 32) and gen.bottom_shape == (64, 64) and len(gen.top.blocks) == 4
