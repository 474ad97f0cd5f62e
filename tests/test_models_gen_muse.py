"""models.muse: Muse's base and super-resolution masked transformers on a tiny random-weight vqgan: the
super-resolution conditioning (shapes of the low-resolution codes and of the cross-attention context; the
low-resolution codes change the output), bidirectional attention, the text padding mask in the
cross-attention, the masked-token loss, MaskGIT's decoder in both stages (a kept code is never re-masked,
counts on the schedule), guidance at 0 = the empty caption, the frozen MiniLM, errors, a tiny run through the
trainer and the presets."""

import dataclasses
import math

import pytest
import torch
from gen_helpers import caption_batch, jittered
import torch.nn.functional as F

import models
from models import text, vqgan
from models.generator import encode_prompts, generator_system
from models.maskgit import MaskGIT
from models.muse import PRESETS, Muse, MuseConfig, _Stage
from models.parti import text_states
from models.sampling import SamplingConfig
from models.train import Trainer, build_run_config, main as train_main

torch.set_num_threads(1)

# 16x16 images -> 8x8 codes (N = 64), K = 16; the base model on 8x8 images -> 4x4 codes (16); 8 text tokens
TOK = dict(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, norm_groups=1,
           embed_dim=4, n_embed=16, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=1)
SMALL = dict(text_length=8, text_dropout=0.0, dim=32, depth=2, heads=4, dropout=0.0, steps=6, sr_depth=2,
             sr_lowres_depth=1, sr_steps=4)
L, N, N_LOW, K = 8, 64, 16, 16


def _tokenizer():
    torch.manual_seed(0)
    return vqgan.VQGAN(vqgan.VQGANConfig(**TOK))


def _muse(**changes):
    return jittered(Muse, MuseConfig(**{**SMALL, **changes}), _tokenizer())


_batch = caption_batch


def _logits(net, ids, prompts, lowres=None):
    with torch.no_grad():
        return net(ids, *net.context(text_states(prompts), prompts.mask, lowres))


def _expected_masked(n0, steps):
    """MaskGIT's counts after each iteration (cosine): max(1, floor(N0 cos(pi/2 (t + 1) / T))), 0 at the end."""
    out, unknown = [], n0
    for t in range(steps - 1):
        unknown = min(max(1, math.floor(n0 * math.cos(math.pi / 2 * (t + 1) / steps))), max(unknown - 1, 0))
        out.append(unknown)
    return out + [0]


@pytest.fixture(scope="module")
def model():
    return _muse()


def test_superres_conditioning_shapes(model):
    assert model.shape == (8, 8) and model.lowres_shape == (4, 4) and model.codebook_size == K
    assert model.base.length == N_LOW and model.superres.length == N and model.base.mask_id == K
    assert not hasattr(model.base, "lowres_encoder") and model.superres.lowres_pos_emb.num_embeddings == N_LOW
    images = _batch()["image"]
    low = model.lowres_tokens(images)
    assert low.shape == (4, 4, 4) and torch.equal(low, model.tokenizer.encode(F.avg_pool2d(images, 2)))
    prompts = encode_prompts(["a red circle", "a blue triangle"], L)
    context, mask = model.superres.context(text_states(prompts), prompts.mask, low[:2].flatten(1))
    assert context.shape == (2, L + N_LOW, 32) and mask.shape == (2, L + N_LOW)
    assert torch.equal(mask[:, :L], prompts.mask) and mask[:, L:].all()
    ids = torch.full((2, N), K)
    base = _logits(model.superres, ids, prompts, low[:2].flatten(1))
    assert base.shape == (2, N, K)
    other = low[:2].flatten(1).clone()
    other[0, 5] = (other[0, 5] + 1) % K
    out = _logits(model.superres, ids, prompts, other)
    assert not torch.allclose(out[0], base[0], atol=1e-4) and torch.allclose(out[1], base[1], atol=1e-5)
    assert _logits(model.base, torch.full((2, N_LOW), K), prompts).shape == (2, N_LOW, K)


def test_bidirectional_and_the_text_padding_mask(model):
    prompts = encode_prompts(["a red circle", "a square"], L)
    pad = ~prompts.mask
    assert pad.any(1).all()
    ids = torch.randint(0, K, (2, N_LOW), generator=torch.Generator().manual_seed(0))
    base = _logits(model.base, ids, prompts)
    later = ids.clone()
    later[:, -1] = K
    assert not torch.allclose(_logits(model.base, later, prompts)[:, 0], base[:, 0], atol=1e-4)
    noisy = dataclasses.replace(prompts, ids=torch.where(pad, torch.randint(1000, 2000, pad.shape), prompts.ids))
    assert torch.allclose(_logits(model.base, ids, noisy), base, atol=1e-5)
    low = torch.randint(0, K, (2, N_LOW), generator=torch.Generator().manual_seed(1))
    hi = torch.full((2, N), K)
    assert torch.allclose(_logits(model.superres, hi, noisy, low), _logits(model.superres, hi, prompts, low), atol=1e-5)
    unmasked = dataclasses.replace(noisy, mask=torch.ones_like(prompts.mask))
    assert not torch.allclose(_logits(model.base, ids, unmasked), base, atol=1e-4)


def test_loss_is_on_masked_codes_of_both_stages():
    m = _muse()
    batch = _batch()
    torch.manual_seed(5)
    out = m.training_step(batch, 0)
    torch.manual_seed(5)
    masks = [MaskGIT.random_mask(_Stage(net, 1, "cosine"), 4, "cpu") for net in (m.base, m.superres)]
    prompts = m.prompts(batch)
    low = m.lowres_tokens(batch["image"]).flatten(1)
    codes = m.tokens(batch).flatten(1)
    losses = []
    for net, masked, target, lowres in zip((m.base, m.superres), masks, (low, codes), (None, low)):
        assert masked.sum(1).min() >= 1
        logits = _logits(net, torch.where(masked, torch.full_like(target, K), target), prompts, lowres)
        losses.append(F.cross_entropy(logits[masked], target[masked]))
    assert torch.allclose(out.logs["nll_base"], losses[0], atol=1e-5)
    assert torch.allclose(out.logs["nll_superres"], losses[1], atol=1e-5)
    assert torch.allclose(out.loss, (losses[0] + losses[1]) / 2, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(cfg=2.0, top_k=6), dict(steps=5, temperature=0.7, cfg=3.0,
                                                                          cfg_schedule="linear")])
def test_decoder_never_remasks_a_kept_code_in_either_stage(model, kwargs):
    trace = []
    prompts = encode_prompts(["a red circle", "", "a blue triangle"], L)
    ids = model.generate(3, prompts, SamplingConfig(**kwargs).check(), torch.Generator().manual_seed(0), trace)
    base_steps, sr_steps = kwargs.get("steps", 6), kwargs.get("steps", 4)
    assert len(trace) == base_steps + sr_steps
    for stage, n0, steps in ((trace[:base_steps], N_LOW, base_steps), (trace[base_steps:], N, sr_steps)):
        assert [(t == K).sum(1).tolist() for t in stage] == [[c] * 3 for c in _expected_masked(n0, steps)]
        for before, after in zip(stage, stage[1:]):
            known = before != K
            assert torch.equal(after[known], before[known])
    assert torch.equal(ids.flatten(1), trace[-1]) and ids.shape == (3, 8, 8) and ids.min() >= 0 and ids.max() < K


def test_guidance_zero_is_the_empty_prompt_and_determinism(model):
    uncond = model.sample(4, prompt="", seed=7)
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=0.0).ids, uncond.ids)
    cond = model.sample(4, prompt="a red circle", seed=7).ids
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=1.0).ids, cond)
    assert not torch.equal(cond, uncond.ids)
    assert not torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=4.0).ids, cond)
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7).ids, cond)
    assert not torch.equal(model.sample(4, prompt="a red circle", seed=8).ids, cond)
    assert uncond.ids.shape == (4, 8, 8) and uncond.images.shape == (4, 3, 16, 16)   # full resolution


def test_base_only_model():
    m = _muse(superres=False)
    assert m.superres is None and m.base.length == N and m.lowres_shape == (8, 8)
    out = m.training_step(_batch(), 0)
    assert set(out.logs) == {"nll", "accuracy"}
    trace = []
    ids = m.generate(2, encode_prompts(["a red circle"] * 2, L), SamplingConfig(), torch.Generator(), trace)
    assert ids.shape == (2, 8, 8) and len(trace) == 6
    assert {k.split(".")[0] for k in m.state_dict()} == {"base"}


def test_the_frozen_minilm_stays_frozen_and_out_of_the_model():
    m = _muse(text_dropout=0.5, dropout=0.1).train()
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
    assert {k.split(".")[0] for k in m.state_dict()} == {"base", "superres"}
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in lm.parameters())


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(depth=0), "depth"),
                                           (dict(sr_depth=0), "sr_depth"), (dict(sr_lowres_depth=0), "sr_lowres_depth"),
                                           (dict(steps=0), "steps"), (dict(sr_steps=0), "sr_steps"),
                                           (dict(mask_schedule="square"), "mask_schedule"),
                                           (dict(superres="yes"), "superres"),
                                           (dict(text_dropout=1.0), "text_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Muse(dataclasses.replace(MuseConfig(**SMALL), **change), _tokenizer())


def test_superres_needs_an_even_code_map():
    torch.manual_seed(0)
    odd = vqgan.VQGAN(vqgan.VQGANConfig(**{**TOK, "resolution": 14}))   # 7x7 codes
    with pytest.raises(ValueError, match="even code map"):
        Muse(MuseConfig(**SMALL), odd)


@pytest.mark.parametrize("kwargs, message", [(dict(labels=1), "conditioned on text"),
                                             (dict(steps=0), "steps"),
                                             (dict(prompt=["a", "b", "c"]), "3 prompts for 2 samples")])
def test_bad_sampling_requests(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.sample(2, **kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_trains_and_samples(tmp_path):
    tok_dir, out = tmp_path / "vqgan", tmp_path / "muse"
    quick = ["train.eval_images=32", "train.judge_per_class=0"]   # the run's own tests are elsewhere
    sets = [f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TOK.items()]
    sets += ["data.hflip=false"] + quick
    Trainer(build_run_config("vqgan", None, None, sets, data="shapes", steps=2, batch_size=4), tok_dir,
            progress=False).fit()
    assert train_main(["muse", "--stage", "generator", "--tokenizer", str(tok_dir), "--out", str(out), "--steps", "3",
                       "--batch-size", "4", "--no-progress", "--device", "cpu",
                       *sum([["--set", f"model.{k}={v}"] for k, v in SMALL.items()] + [["--set", q] for q in quick],
                            [])]) == 0
    m = models.load("muse", out)
    assert isinstance(m, Muse) and m.cfg.text_length == L and m.superres is not None
    s = m.sample(2, prompt="a red circle", seed=0, cfg=2.0, cfg_schedule="linear", steps=3)
    assert s.ids.shape == (2, 8, 8) and s.prompts == ["a red circle"] * 2 and s.images.shape == (2, 3, 16, 16)


@pytest.mark.filterwarnings("ignore:VQGANConfig")
def test_presets_shapes():
    cls, presets, tokenizer_system = generator_system("muse")
    assert cls is Muse and tokenizer_system == "vqgan" and set(presets) == {"tiny", "base"} and Muse.parallel_decoding
    tiny = PRESETS["muse"]["tiny"]
    assert tiny.data.name == "shapes" and not tiny.data.hflip
    m = Muse(tiny.model, vqgan.Model(vqgan.PRESETS["tiny"].model))
    assert m.shape == (8, 8) and m.lowres_shape == (4, 4) and m.codebook_size == 128
    assert m.lowres_tokens(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 4)   # 16 -> 32 pixels
    with torch.device("meta"):
        m = Muse(PRESETS["muse"]["base"].model, vqgan.Model(vqgan.PRESETS["base"].model))
        assert m.shape == (16, 16) and m.lowres_shape == (8, 8) and m.cfg.steps == 24 and m.cfg.sr_steps == 8


def test_a_bf16_model_samples():  # the frozen MiniLM's float32 states meet bf16 layers
    m = _muse().to(torch.bfloat16)
    out = m.sample(2, prompt="a red circle", cfg=2.0, seed=0)
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
