"""models.parti: Parti's encoder-decoder on a tiny random-weight ViT-VQGAN: the decoder's causality, the text
padding mask in the encoder and the cross-attention (a padded position never changes an output), the
kv-cache against recomputing the prefix, guidance at 0 = the empty caption, top-k, the frozen MiniLM (no
gradient, unchanged by an optimizer step, not in the state_dict), errors, a tiny run through the trainer and
the presets."""

import dataclasses

import pytest
import torch
from gen_helpers import caption_batch, jittered

import models
from models import text, vit_vqgan
from models.generator import encode_prompts, generator_system
from models.parti import PRESETS, Parti, PartiConfig, text_states
from models.sampling import SamplingConfig
from models.train import Trainer, build_run_config, main as train_main
from models.transformer import Transformer

torch.set_num_threads(1)

# 16x16 images -> 4x4 codes (N = 16), K = 16; 8 text tokens
TOK = dict(resolution=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, enc_mlp_dim=48, dec_dim=24,
           dec_depth=1, dec_heads=3, dec_mlp_dim=40, codebook_size=16, codebook_dim=8, perceptual_weight=0.0,
           disc_ndf=8, disc_num_layers=1, disc_start=0)
SMALL = dict(text_length=8, text_dropout=0.0, dim=32, enc_depth=1, dec_depth=2, heads=4, dropout=0.0)
L, N, K = 8, 16, 16


def _tokenizer():
    torch.manual_seed(0)
    return vit_vqgan.ViTVQGAN(vit_vqgan.ViTVQGANConfig(**TOK))


def _parti(**changes):
    return jittered(Parti, PartiConfig(**{**SMALL, **changes}), _tokenizer())


_batch = caption_batch


@pytest.fixture(scope="module")
def model():
    return _parti()


def test_layout_and_decoder_causality(model):
    assert model.shape == (4, 4) and model.length == N and model.codebook_size == K
    assert model.tok_emb.num_embeddings == K + 1 and model.text_pos_emb.num_embeddings == L
    assert model.decoder.cross and not model.encoder.cross
    prompts = encode_prompts(["a red circle", "a blue triangle"], L)
    codes = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.logits(codes, prompts)
        later = codes.clone()
        later[:, 9] = (later[:, 9] + 1) % K
        out = model.logits(later, prompts)
        other = model.logits(codes, encode_prompts(["a green ellipse", "a blue triangle"], L))
    assert base.shape == (2, N, K)
    assert torch.allclose(out[:, :10], base[:, :10], atol=1e-5)      # code 9 is read at position 10
    assert not torch.allclose(out[:, 10:], base[:, 10:], atol=1e-4)
    assert not torch.allclose(other[0], base[0], atol=1e-4) and torch.allclose(other[1], base[1], atol=1e-5)


def test_a_padded_text_position_never_changes_an_output(model):
    prompts = encode_prompts(["a red circle", "a square"], L)
    pad = ~prompts.mask
    assert pad.any(1).all()
    codes = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(1))
    noisy = dataclasses.replace(prompts, ids=torch.where(pad, torch.randint(1000, 2000, pad.shape), prompts.ids))
    with torch.no_grad():
        base, out = model.logits(codes, prompts), model.logits(codes, noisy)
        enc, enc_noisy = model.encode_text(prompts), model.encode_text(noisy)
    assert torch.allclose(out, base, atol=1e-5)
    assert torch.allclose(enc[prompts.mask], enc_noisy[prompts.mask], atol=1e-5)
    assert not torch.allclose(enc[pad], enc_noisy[pad], atol=1e-3)     # padded outputs differ, and are never read
    unmasked = dataclasses.replace(noisy, mask=torch.ones_like(prompts.mask))
    with torch.no_grad():
        assert not torch.allclose(model.logits(codes, unmasked), base, atol=1e-4)   # the mask is what protects them


def test_cross_attention_mask_in_the_transformer():
    torch.manual_seed(0)
    t = Transformer(16, 2, 2, cross=True).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    noisy = torch.where(mask[..., None], ctx, torch.randn(2, 6, 16) * 10)
    with torch.no_grad():
        base = t(x, context=ctx, context_mask=mask)
        assert torch.allclose(t(x, context=noisy, context_mask=mask), base, atol=1e-6)
        assert torch.allclose(t(x, context=t.context_kv(ctx), context_mask=mask), base)   # precomputed keys / values
        assert not torch.allclose(t(x, context=noisy), base, atol=1e-3)
    with pytest.raises(ValueError, match="needs a context"):
        t(x)
    with pytest.raises(ValueError, match="no cross-attention"):
        Transformer(16, 1, 2)(x, context=ctx)


@pytest.mark.parametrize("kwargs", [dict(), dict(cfg=3.0, top_k=5), dict(temperature=0.8, top_p=0.9, cfg=2.0,
                                                                          cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, kwargs):
    cached = model.sample(3, prompt=["a red circle", "", "a blue triangle"], seed=4, **kwargs).ids
    assert torch.equal(cached, model.sample(3, prompt=["a red circle", "", "a blue triangle"], seed=4,
                                            use_cache=False, **kwargs).ids)
    assert cached.shape == (3, 4, 4) and cached.min() >= 0 and cached.max() < K


def test_guidance_zero_is_the_empty_prompt_and_the_prompt_matters(model):
    uncond = model.sample(4, prompt="", seed=7).ids
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=0.0).ids, uncond)
    assert torch.equal(model.sample(4, seed=7).ids, uncond)
    cond = model.sample(4, prompt="a red circle", seed=7).ids
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=1.0).ids, cond)
    assert not torch.equal(cond, uncond)
    assert not torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=4.0).ids, cond)


def test_top_k_sampling_and_determinism(model):
    greedy = model.sample(3, prompt="a red circle", temperature=0).ids
    assert torch.equal(model.sample(3, prompt="a red circle", seed=5, top_k=1).ids, greedy)
    prompts = encode_prompts(["a red circle"] * 64, L)
    first = model.generate(64, prompts, SamplingConfig(top_k=3).check(), torch.Generator().manual_seed(0))[:, 0, 0]
    with torch.no_grad():   # the first code's logits read only the start token and the caption
        top3 = model.logits(torch.zeros(1, N, dtype=torch.long), encode_prompts(["a red circle"], L))[0, 0].topk(3)[1]
    assert set(first.tolist()) <= set(top3.tolist()) and len(set(first.tolist())) > 1
    a = model.sample(3, prompt="a red circle", seed=11, top_k=8).ids
    assert torch.equal(a, model.sample(3, prompt="a red circle", seed=11, top_k=8).ids)
    assert not torch.equal(a, model.sample(3, prompt="a red circle", seed=12, top_k=8).ids)


def test_the_frozen_minilm_stays_frozen_and_out_of_the_model():
    m = _parti(text_dropout=0.5, dropout=0.1).train()
    lm = text.minilm("cpu")
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    out = m.training_step(_batch(), 0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in lm.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    prompts = encode_prompts(["a red circle", "a blue square", "a red circle"], L)
    plain = text_states(prompts)
    assert not plain.requires_grad and plain.shape == (3, L, 384)
    real = prompts.mask
    for _ in range(2):                     # training's per-caption cache: the real tokens' states, zeros at padding
        cached = text_states(prompts, cache=True)
        assert torch.allclose(cached[real], plain[real], atol=1e-5) and not cached[~real].any()
    codes = torch.randint(0, K, (3, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m.eval().logits(codes, prompts, cache=True), m.logits(codes, prompts), atol=1e-5)
    n_lm = sum(p.numel() for p in lm.parameters())
    assert sum(p.numel() for p in m.parameters()) < n_lm and not any(k.startswith(("embeddings", "minilm"))
                                                                      for k in m.state_dict())
    assert {k.split(".")[0] for k in m.state_dict()} == {"text_proj", "text_pos_emb", "encoder", "tok_emb", "pos_emb",
                                                          "decoder", "head"}


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(enc_depth=0), "enc_depth"),
                                           (dict(dec_depth=0), "dec_depth"), (dict(dropout=1.0), "dropout"),
                                           (dict(text_length=1), "text_length"),
                                           (dict(text_dropout=1.0), "text_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Parti(dataclasses.replace(PartiConfig(**SMALL), **change), _tokenizer())


@pytest.mark.parametrize("kwargs, message", [(dict(labels=1), "conditioned on text"),
                                             (dict(scene=torch.zeros(16, 16, dtype=torch.long)), "does not read scene"),
                                             (dict(steps=4), "only parallel decoders"),
                                             (dict(prompt=["a", "b", "c"]), "3 prompts for 2 samples"),
                                             (dict(prompt=3), "prompt must be")])
def test_bad_sampling_requests(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.sample(2, **kwargs)


def test_a_long_prompt_is_truncated_with_a_warning(model):
    with pytest.warns(UserWarning, match="truncated"):
        model.sample(1, prompt="a red circle and a blue triangle and a green ellipse")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_trains_and_samples(tmp_path):
    tok_dir, out = tmp_path / "vit_vqgan", tmp_path / "parti"
    quick = ["train.eval_images=32", "train.judge_per_class=0"]   # the run's own tests are elsewhere
    sets = [f"model.{k}={v}" for k, v in TOK.items()] + ["data.hflip=false"] + quick
    Trainer(build_run_config("vit_vqgan", None, None, sets, data="shapes", steps=2, batch_size=4), tok_dir,
            progress=False).fit()
    assert train_main(["parti", "--stage", "generator", "--tokenizer", str(tok_dir), "--out", str(out), "--steps", "3",
                       "--batch-size", "4", "--no-progress", "--device", "cpu",
                       *sum([["--set", f"model.{k}={v}"] for k, v in SMALL.items()] + [["--set", q] for q in quick],
                            [])]) == 0
    m = models.load("parti", out)
    assert isinstance(m, Parti) and m.cfg.text_length == L
    s = m.sample(2, prompt="a red circle", seed=0, top_k=4, cfg=2.0)
    assert s.ids.shape == (2, 4, 4) and s.prompts == ["a red circle"] * 2 and s.images.shape == (2, 3, 16, 16)


@pytest.mark.filterwarnings("ignore:ViTVQGANConfig")
def test_presets_shapes():
    cls, presets, tokenizer_system = generator_system("parti")
    assert cls is Parti and tokenizer_system == "vit_vqgan" and set(presets) == {"tiny", "base"}
    tiny = PRESETS["parti"]["tiny"]
    assert tiny.data.name == "shapes" and not tiny.data.hflip
    m = Parti(tiny.model, vit_vqgan.Model(vit_vqgan.PRESETS["tiny"].model))
    assert m.shape == (8, 8) and m.codebook_size == 512
    with torch.device("meta"):   # Parti-350M: 12 + 12 layers of width 1024 over 32x32 codes, K = 8192
        m = Parti(PRESETS["parti"]["base"].model, vit_vqgan.Model(vit_vqgan.PRESETS["base"].model))
        assert m.shape == (32, 32) and m.cfg.text_length == 128
        assert 330e6 < sum(p.numel() for p in m.parameters()) < 400e6


def test_a_bf16_model_samples():  # the frozen MiniLM's float32 states meet bf16 layers
    m = _parti().to(torch.bfloat16)
    out = m.sample(2, prompt="a red circle", cfg=2.0, seed=0)
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
