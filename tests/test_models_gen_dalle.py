"""models.dalle: DALL-E's transformer over [text, image codes] on a tiny random-weight dVAE: per-position pad
ids, the vocabulary layout and logits masks (no text id at an image position and the reverse), the 1 : 7 loss,
the sparse row / column / conv attention masks, causality, the kv-cache against recomputing the prefix,
guidance at 0 = the empty prompt, top-k, configuration errors, a tiny run through the trainer and the presets."""

import dataclasses

import pytest
import torch
from gen_helpers import caption_batch, jittered
import torch.nn.functional as F

import models
from models import dvae
from models.dalle import (DALLE, PRESETS, WORDS, DALLEConfig, image_attention_mask, sparse_layer_kinds,
                          token_map_shape)
from models.generator import encode_prompts, generator_system
from models.sampling import SamplingConfig, sample_logits
from models.train import Trainer, build_run_config, main as train_main

torch.set_num_threads(1)

# 16x16 images -> 8x8 codes (group_count 2), K = 16; 8 text tokens
TOK = dict(resolution=16, group_count=2, n_hid=8, n_blk_per_group=1, n_init=8, vocab_size=16)
SMALL = dict(text_length=8, text_dropout=0.0, dim=32, depth=3, heads=4, dropout=0.0, conv_kernel=3)
L, N, K = 8, 64, 16
V_TEXT = WORDS + L


def _tokenizer():
    torch.manual_seed(0)
    return dvae.DVAE(dvae.DVAEConfig(**TOK))


def _dalle(**changes):
    return jittered(DALLE, DALLEConfig(**{**SMALL, **changes}), _tokenizer())


_batch = caption_batch


def _sequence(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = encode_prompts(["a red circle", "a blue triangle"][:b], L)
    return model.sequence(prompts, [torch.randint(0, K, (b, N), generator=g)])


@pytest.fixture(scope="module")
def model():
    return _dalle()


def test_layout_and_per_position_padding(model):
    assert token_map_shape(model.tokenizer) == (8, 8) and model.seq_len == L + N
    assert model.text_vocab == 30522 + L and model.total_tokens == V_TEXT + K
    assert model.text_emb.num_embeddings == V_TEXT and model.image_emb.num_embeddings == K
    assert model.to_logits.out_features == V_TEXT + K
    p = encode_prompts(["a red circle", ""], L)
    t = model.text_tokens(p)
    assert torch.equal(t[p.mask], p.ids[p.mask])                    # real WordPiece ids kept
    for row in range(2):
        pads = (~p.mask[row]).nonzero().flatten()
        assert torch.equal(t[row, pads], WORDS + pads)              # pad at position i is 30522 + i
    assert t[1].tolist()[2:] == [WORDS + i for i in range(2, L)]    # "" = [CLS] [SEP] + 6 distinct pads
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "text_emb", "text_pos_emb", "image_emb", "image_row_emb", "image_col_emb", "transformer", "to_logits"}


def test_logits_masks_keep_text_ids_at_text_positions_and_image_ids_at_image_positions(model):
    seq = _sequence(model)
    with torch.no_grad():
        logits = model.logits(seq)
    assert logits.shape == (2, L + N - 1, V_TEXT + K)
    text_out, image_out = logits[:, :L - 1], logits[:, L - 1:]      # outputs predicting text / image targets
    assert torch.isinf(text_out[..., V_TEXT:]).all() and torch.isfinite(text_out[..., :V_TEXT]).all()
    assert torch.isinf(image_out[..., :V_TEXT]).all() and torch.isfinite(image_out[..., V_TEXT:]).all()
    # drawn from the masked logits (temperature 2, no filter): never an id of the other kind
    draws = sample_logits(logits.unsqueeze(0).expand(20, -1, -1, -1), torch.Generator().manual_seed(0), 2.0)
    assert (draws[..., :L - 1] < V_TEXT).all() and (draws[..., L - 1:] >= V_TEXT).all()
    assert (draws[..., L - 1:] - V_TEXT).unique().numel() == K      # every image id reachable
    # sampling fills the image positions from image ids only and leaves the text prefix as given
    prompts = encode_prompts(["a red circle"] * 3, L)
    out = model.decode_tokens(model.text_tokens(prompts), SamplingConfig(temperature=2.0).check(),
                              torch.Generator().manual_seed(1), guided=False)
    assert torch.equal(out[:, :L], model.text_tokens(prompts))
    assert (out[:, L:] >= V_TEXT).all() and (out[:, L:] < V_TEXT + K).all()


def test_loss_weighting_text_1_image_7(model):
    batch = _batch()
    out = model.training_step(batch, 0)
    seq = model.sequence(model.prompts(batch), [model.tokens(batch).flatten(1)])
    logits = model.logits(seq)
    text = F.cross_entropy(logits[:, :L - 1].flatten(0, 1), seq[:, 1:L].flatten())
    image = F.cross_entropy(logits[:, L - 1:].flatten(0, 1), seq[:, L:].flatten())
    assert torch.allclose(out.loss, (text + 7 * image) / 8, atol=1e-5)
    assert torch.allclose(out.logs["nll"], image, atol=1e-5) and torch.allclose(out.logs["text_nll"], text, atol=1e-5)
    assert not torch.allclose(out.loss, (text + image) / 2, atol=1e-3)
    # the padded text positions are targets too, with their own ids
    assert (seq[1, 1:L] >= WORDS).sum() == (~model.prompts(batch).mask[1]).sum()
    # training: the text loss on the first text_loss_share of the rows
    m = _dalle(text_loss_share=0.5).train()
    got = m.training_step(batch, 0)
    text_half = F.cross_entropy(logits[:2, :L - 1].flatten(0, 1), seq[:2, 1:L].flatten())
    assert torch.allclose(got.logs["text_nll"], text_half, atol=1e-5)
    m.eval()
    assert torch.allclose(m.training_step(batch, 0).logs["text_nll"], text, atol=1e-5)


def test_held_out_cross_entropy_is_the_image_tokens(model):  # not the 1 : 7 weighted loss
    from models.eval import evaluate_generator
    batch = _batch()
    items = [{"image": batch["image"][i], "caption": batch["caption"][i], "label": -1} for i in range(4)]
    out = model.training_step(batch, 0)
    got = evaluate_generator(model, items, batch_size=4)["nll"]
    assert got == pytest.approx(out.logs["nll"].item(), rel=1e-5) and got != pytest.approx(out.loss.item(), rel=1e-3)


def test_sparse_masks_are_the_papers():
    assert sparse_layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    h = w = 4
    tl = 3
    row, col, conv = (image_attention_mask(k, tl, (h, w), 3) for k in ("row", "column", "conv"))
    causal = torch.tril(torch.ones(tl + 16, tl + 16, dtype=torch.bool))
    for m in (row, col, conv):
        assert not (m & ~causal).any()                     # causal
        assert torch.equal(m[:tl, :tl], causal[:tl, :tl])  # text: causal over text
        assert m[tl:, :tl].all()                           # every image token sees every text token

    def seen(mask, i):  # image raster indices query i attends to
        return (mask[tl + i, tl:].nonzero().flatten()).tolist()
    assert seen(row, 9) == [5, 6, 7, 8, 9]                 # itself and the w tokens before it
    assert seen(col, 9) == [1, 5, 9]                        # its column, above it
    assert seen(conv, 9) == [4, 5, 6, 8, 9]                 # 3x3 kernel: the row above (cols 0-2) and its left
    assert seen(conv, 4) == [0, 1, 4]


def test_a_layers_mask_is_what_the_model_attends_with():
    m = _dalle(depth=1)                                     # one layer: the conv attention (kernel 3)
    seq = _sequence(m)
    with torch.no_grad():
        base = m.hidden(seq)
        q = L + 2 * 8 + 4                                   # image token (2, 4)
        for r, c, changes in ((1, 3, True), (1, 5, True), (0, 4, False), (1, 6, False), (2, 3, True)):
            s = seq.clone()
            s[:, L + r * 8 + c] = V_TEXT + (s[:, L + r * 8 + c] - V_TEXT + 1) % K
            moved = not torch.allclose(m.hidden(s)[:, q], base[:, q], atol=1e-5)
            assert moved == changes, (r, c)
    dense = _dalle(depth=1, attention="dense")
    with torch.no_grad():
        s = seq.clone()
        s[:, L] = V_TEXT + (s[:, L] - V_TEXT + 1) % K       # image token (0, 0): outside the kernel, seen densely
        assert not torch.allclose(dense.hidden(s)[:, q], dense.hidden(seq)[:, q], atol=1e-5)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_causality(attention):
    m = _dalle(attention=attention)
    seq = _sequence(m)
    with torch.no_grad():
        base = m.logits(seq)
        for t in (3, L, L + 20, L + N - 1):
            s = seq.clone()
            s[:, t] = (s[:, t] + 1) if t < L else V_TEXT + (s[:, t] - V_TEXT + 1) % K
            out = m.logits(s)
            assert torch.equal(out[:, :t], base[:, :t])    # outputs 0..t-1 predict positions <= t
            if t < L + N - 1:
                assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=4, temperature=0.8), dict(cfg=3.0, top_p=0.9),
                                    dict(cfg=2.0, cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, kwargs):
    prompt = ["a red circle", "", "a blue triangle"]
    cached = model.sample(3, prompt=prompt, seed=4, **kwargs)
    assert torch.equal(cached.ids, model.sample(3, prompt=prompt, seed=4, use_cache=False, **kwargs).ids)
    assert cached.ids.shape == (3, 8, 8) and cached.ids.min() >= 0 and cached.ids.max() < K
    assert cached.images.shape == (3, 3, 16, 16) and cached.prompts == prompt and cached.labels is None


def test_guidance_zero_is_the_empty_prompt_and_the_prompt_matters(model):
    uncond = model.sample(4, prompt="", seed=7).ids
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=0.0).ids, uncond)
    assert torch.equal(model.sample(4, seed=7).ids, uncond)
    cond = model.sample(4, prompt="a red circle", seed=7).ids
    assert torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=1.0).ids, cond)
    assert not torch.equal(cond, uncond)
    assert not torch.equal(model.sample(4, prompt="a red circle", seed=7, cfg=4.0).ids, cond)


def test_top_k_one_is_greedy_and_determinism(model):
    greedy = model.sample(3, prompt="a red circle", temperature=0).ids
    assert torch.equal(model.sample(3, prompt="a red circle", seed=5, top_k=1).ids, greedy)
    assert (greedy == greedy[:1]).all()
    a = model.sample(3, prompt="a red circle", seed=11, top_k=8).ids
    assert torch.equal(a, model.sample(3, prompt="a red circle", seed=11, top_k=8).ids)
    assert not torch.equal(a, model.sample(3, prompt="a red circle", seed=12, top_k=8).ids)


def test_gradients_and_frozen_tokenizer():
    m = _dalle(text_dropout=0.5, dropout=0.1).train()
    out = m.training_step(_batch(), 0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert m.tokenizer.training is False


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(depth=0), "depth"),
                                           (dict(attention="axial"), "attention"), (dict(conv_kernel=4), "conv_kernel"),
                                           (dict(image_loss_weight=-1.0), "loss weights"),
                                           (dict(text_loss_share=0.0), "text_loss_share"),
                                           (dict(text_length=1), "text_length"), (dict(text_dropout=1.0), "text_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        DALLE(dataclasses.replace(DALLEConfig(**SMALL), **change), _tokenizer())


@pytest.mark.parametrize("kwargs, message", [(dict(labels=1), "conditioned on text"),
                                             (dict(scene=torch.zeros(16, 16, dtype=torch.long)), "does not read scene"),
                                             (dict(steps=4), "only parallel decoders"),
                                             (dict(prompt=["a", "b", "c"]), "3 prompts for 2 samples")])
def test_bad_sampling_requests(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.sample(2, **kwargs)


def test_a_long_prompt_is_truncated_with_a_warning(model):
    with pytest.warns(UserWarning, match="truncated"):
        model.sample(1, prompt="a red circle and a blue triangle and a green ellipse")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_trains_and_samples(tmp_path):
    tok_dir, out = tmp_path / "dvae", tmp_path / "dalle"
    sets = [f"model.{k}={v}" for k, v in TOK.items()] + ["data.hflip=false"]
    Trainer(build_run_config("dvae", None, None, sets, data="shapes", steps=2, batch_size=4), tok_dir,
            progress=False).fit()
    assert train_main(["dalle", "--stage", "generator", "--tokenizer", str(tok_dir), "--out", str(out), "--steps", "3",
                       "--batch-size", "4", "--no-progress", "--device", "cpu",
                       *sum([["--set", f"model.{k}={v}"] for k, v in SMALL.items()], [])]) == 0
    m = models.load("dalle", out)
    assert isinstance(m, DALLE) and m.cfg.text_length == L
    s = m.sample(2, prompt="a red circle", seed=0, top_k=4, cfg=2.0)
    assert s.ids.shape == (2, 8, 8) and s.prompts == ["a red circle"] * 2 and s.images.shape == (2, 3, 16, 16)


@pytest.mark.filterwarnings("ignore:DVAEConfig")
def test_presets_shapes():
    cls, presets, tokenizer_system = generator_system("dalle")
    assert cls is DALLE and tokenizer_system == "dvae" and set(presets) == {"tiny", "base"}
    tiny = PRESETS["dalle"]["tiny"]
    assert tiny.data.name == "shapes" and not tiny.data.hflip
    m = DALLE(tiny.model, dvae.Model(dvae.PRESETS["tiny"].model))
    assert m.segments[0].shape == (8, 8) and m.segments[0].size == 256 and m.cfg.image_loss_weight == 7
    assert len(m.attention_masks()) == 4
    with torch.device("meta"):   # the paper's 12B transformer over 256 text + 32x32 image tokens
        m = DALLE(PRESETS["dalle"]["base"].model, dvae.Model(dvae.PRESETS["base"].model))
        assert m.seq_len == 256 + 1024 and m.cfg.heads == 62 and m.cfg.depth == 64
        assert 11.5e9 < sum(p.numel() for p in m.parameters()) < 12.5e9
