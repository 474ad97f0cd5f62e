"""models.gpt: taming's class-conditional GPT (system vqgan) and VIM (system vit_vqgan) over tiny random-weight
tokenizers: the causal layout [class, z_0 .. z_{N-2}] -> z_0 .. z_{N-1}, pkeep corruption, the kv-cache against
recomputing the prefix, guidance, top-k, determinism, gradients, configuration errors and the presets' shapes."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models import vit_vqgan, vqgan
from models.generator import generator_system
from models.gpt import GPT, PRESETS, GPTConfig, code_map_shape
from models.sampling import SamplingConfig

torch.set_num_threads(1)

# vqgan: 16x16 images -> 4x4 codes, K = 16; vit_vqgan: 16x16 images, 4x4 patches -> 4x4 codes, K = 16
TOK_VQGAN = dict(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                 norm_groups=1, embed_dim=4, n_embed=16, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=1)
TOK_VIT = dict(resolution=16, patch_size=4, enc_dim=16, enc_depth=1, enc_heads=2, enc_mlp_dim=16, dec_dim=16,
               dec_depth=1, dec_heads=2, dec_mlp_dim=16, codebook_size=16, codebook_dim=4, perceptual_weight=0.0,
               disc_ndf=8, disc_num_layers=1)
SMALL = dict(num_classes=3, class_dropout=0.0, dim=32, depth=2, heads=4, dropout=0.0, pkeep=1.0)


def _tokenizer(system="vqgan"):
    torch.manual_seed(0)
    if system == "vqgan":
        return vqgan.VQGAN(vqgan.VQGANConfig(**TOK_VQGAN))
    return vit_vqgan.ViTVQGAN(vit_vqgan.ViTVQGANConfig(**TOK_VIT))


def _gpt(system="vqgan", **changes):
    tok = _tokenizer(system)
    torch.manual_seed(1)
    g = GPT(GPTConfig(**{**SMALL, **changes}), tok).eval()
    # minGPT starts at logits ~ 0; larger weights make the tests see real dependencies
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return g


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, "label": torch.arange(b) % 3}


@pytest.fixture(scope="module")
def model():
    return _gpt()


def test_layout_and_causal_mask(model):
    assert model.shape == (4, 4) and model.length == 16 and model.codebook_size == 16
    assert model.tok_emb.num_embeddings == 16 + 3 + 1 and model.head.out_features == 16
    assert model.condition_tokens(torch.tensor([0, 2, 3]), 3).tolist() == [16, 18, 19]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (2, 16), generator=g)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        base = model.logits(ids, labels)
        for t in (0, 5, 15):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 16
            out = model.logits(changed, labels)
            # output i predicts z_i from [c, z_<i]: outputs 0..t never see z_t
            assert torch.equal(out[:, :t + 1], base[:, :t + 1])
            if t < 15:
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)
        other = model.logits(ids, torch.tensor([2, 2]))
    assert not torch.allclose(other[:, 0], base[:, 0], atol=1e-4)   # the class token reaches the first output


def test_cached_logits_match_teacher_forcing(model):
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        full = model.logits(ids, labels)
        cache = model.transformer.new_cache()
        x = torch.cat([model.condition_tokens(labels, 2)[:, None], ids[:, :-1]], 1)
        steps = [model.forward_tokens(x[:, i:i + 1], i, cache) for i in range(16)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_pkeep_corruption_rate_and_uncorrupted_targets():
    m = _gpt(pkeep=0.7)
    ids = torch.randint(0, 16, (400, 500), generator=torch.Generator().manual_seed(0))
    out = m.corrupt(ids, torch.Generator().manual_seed(1))
    # a replaced token keeps its id with chance 1/K
    assert abs((out != ids).float().mean().item() - 0.3 * 15 / 16) < 0.005
    assert torch.bincount(out[out != ids], minlength=16).min() > 0 and out.max() < 16
    assert torch.equal(_gpt(pkeep=1.0).corrupt(ids), ids)
    # training: inputs corrupted with the global RNG, targets the clean codes
    batch = _batch()
    m.train()
    torch.manual_seed(5)
    loss = m.training_step(batch, 0).loss
    torch.manual_seed(5)
    clean = m.tokens(batch).flatten(1)
    logits = m.logits(m.corrupt(clean), batch["label"])
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), clean.flatten()), atol=1e-6)
    m.eval()   # eval: no corruption
    assert torch.allclose(m.training_step(batch, 0).loss,
                          F.cross_entropy(m.logits(clean, batch["label"]).flatten(0, 1), clean.flatten()), atol=1e-6)
    assert not torch.allclose(m.training_step(batch, 0).loss, loss, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=5, top_p=0.9, temperature=0.8), dict(cfg=2.5),
                                    dict(cfg=3.0, cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, kwargs):
    cached = model.sample(6, [0, 1, 2, 0, 1, 2], seed=4, **kwargs).ids
    plain = model.sample(6, [0, 1, 2, 0, 1, 2], seed=4, use_cache=False, **kwargs).ids
    assert torch.equal(cached, plain)


def test_guidance_zero_is_the_null_class_model(model):
    labels = torch.tensor([0, 1, 2, 1])
    guided = model.sample(4, labels, seed=7, cfg=0.0).ids
    null = model.generate(4, torch.full((4,), 3), SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(guided, null)
    assert torch.equal(model.sample(4, labels, seed=7, cfg=1.0).ids, model.sample(4, labels, seed=7).ids)
    assert not torch.equal(model.sample(4, labels, seed=7).ids, null)


def test_top_k_one_is_greedy_and_ids_are_valid(model):
    greedy = model.sample(5, 1, seed=0, temperature=0)
    assert torch.equal(model.sample(5, 1, seed=3, top_k=1).ids, greedy.ids)
    assert (greedy.ids == greedy.ids[:1]).all()   # greedy: one answer per class
    out = model.sample(8, seed=1, top_k=8, top_p=0.8)
    assert out.ids.shape == (8, 4, 4) and out.ids.dtype == torch.long
    assert out.ids.min() >= 0 and out.ids.max() < 16
    assert out.images.shape == (8, 3, 16, 16) and out.images.abs().max() <= 1
    assert out.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_determinism(model):
    a = model.sample(4, 2, seed=11).ids
    assert torch.equal(a, model.sample(4, 2, seed=11).ids)
    assert not torch.equal(a, model.sample(4, 2, seed=12).ids)


def test_training_step_gradients_and_state_dict():
    m = _gpt(pkeep=0.9, class_dropout=0.2, dropout=0.1).train()
    out = m.training_step(_batch(), 0)
    assert out.recon is None and torch.isfinite(out.loss) and set(out.logs) == {"nll", "accuracy"}
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert m.tokenizer.training is False
    keys = set(m.state_dict())
    assert {k.split(".")[0] for k in keys} == {"tok_emb", "pos_emb", "transformer", "head"}
    # minGPT's initialisation: logits near 0, so the first loss is about log K
    fresh = GPT(GPTConfig(**SMALL), _tokenizer())
    assert abs(fresh.training_step(_batch(), 0).loss.item() - math.log(16)) < 0.05


def test_unconditional_model_and_label_errors():
    m = _gpt(num_classes=0)
    assert m.tok_emb.num_embeddings == 17
    ids = m.sample(3, seed=0).ids
    assert ids.shape == (3, 4, 4)
    assert torch.equal(ids, m.sample(3, seed=0, use_cache=False).ids)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, [0, 1])
    with pytest.raises(ValueError, match="cfg"):
        m.sample(2, cfg=2.0)
    with pytest.raises(ValueError, match="steps"):
        _gpt().sample(2, steps=4)


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(depth=0), "depth"),
                                           (dict(pkeep=0.0), "pkeep"), (dict(pkeep=1.5), "pkeep"),
                                           (dict(dropout=1.0), "dropout"), (dict(mlp_ratio=0.0), "mlp_ratio"),
                                           (dict(num_classes=-1), "num_classes"),
                                           (dict(class_dropout=1.0), "class_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        GPT(dataclasses.replace(GPTConfig(**SMALL), **change), _tokenizer())


def test_vit_vqgan_system_and_registry():
    cls, presets, tokenizer_system = generator_system("vit_vqgan")
    assert cls is GPT and tokenizer_system == "vit_vqgan" and set(presets) == {"tiny", "base"}
    assert generator_system("vqgan")[0] is GPT and generator_system("vqgan")[2] == "vqgan"
    m = _gpt("vit_vqgan")
    assert m.shape == (4, 4) and m.codebook_size == 16
    out = m.sample(3, [0, 1, 2], seed=0, top_k=4)
    assert out.images.shape == (3, 3, 16, 16) and out.ids.max() < 16
    assert torch.equal(out.ids, m.sample(3, [0, 1, 2], seed=0, top_k=4, use_cache=False).ids)


@pytest.mark.filterwarnings("ignore:VQGANConfig", "ignore:ViTVQGANConfig")
def test_presets_shapes():
    # tiny: 8x8 codes of the tiny tokenizers (vqgan K = 128, vit_vqgan K = 512)
    for system, tok_module, k in (("vqgan", vqgan, 128), ("vit_vqgan", vit_vqgan, 512)):
        tok = tok_module.Model(tok_module.PRESETS["tiny"].model)
        preset = PRESETS[system]["tiny"]
        assert preset.data.name == "digits" and preset.model.num_classes == 10 and preset.model.pkeep < 1
        m = GPT(preset.model, tok)
        assert code_map_shape(tok) == (8, 8) and m.codebook_size == k
    # base, built without memory: taming's 1.4B cIN transformer (16x16 codes) and VIM-Base (32x32 codes, 650M)
    with torch.device("meta"):
        for system, tok_module, grid, low, high in (("vqgan", vqgan, 16, 1.3e9, 1.5e9),
                                                    ("vit_vqgan", vit_vqgan, 32, 0.6e9, 0.75e9)):
            m = GPT(PRESETS[system]["base"].model, tok_module.Model(tok_module.PRESETS["base"].model))
            assert m.shape == (grid, grid) and m.cfg.num_classes == 1000
            assert low < sum(p.numel() for p in m.parameters()) < high
