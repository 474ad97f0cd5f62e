"""models.word_generators: lqae (masked prior, MaskGIT decoding), spae (causal LM over [caption, pyramid words]),
unicode (one causal LM for generation and captioning) on tiny random-weight word tokenizers (16x16 images)."""

import pytest
import torch

import models
from models import lqae, spae, unicode
from models.generator import encode_prompts, generator_system
from models.sampling import SamplingConfig
from models.train import Trainer, build_run_config, main as train_main
from models.word_generators import (CAPTION, MASK, MODELS, PRESETS, VOCAB, LQAEGenerator, SPAEGenerator,
                                    UniCodeGenerator, WordGeneratorConfig)

torch.set_num_threads(1)

CONV = dict(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1)
TOKENIZERS = {"lqae": lambda: lqae.LQAE(lqae.LQAEConfig(**CONV)),
              "spae": lambda: spae.SPAE(spae.SPAEConfig(**CONV, pyramid=(1, 2, 4))),
              "unicode": lambda: unicode.UniCode(unicode.UniCodeConfig(**CONV, depth=2))}
SMALL = dict(text_length=8, text_dropout=0.0, dim=32, depth=2, heads=4, dropout=0.0, steps=4)
L = 8


def _model(name, **changes):
    torch.manual_seed(0)
    tok = TOKENIZERS[name]()
    torch.manual_seed(1)
    m = MODELS[name](WordGeneratorConfig(**{**SMALL, **changes}), tok).eval()
    with torch.no_grad():   # larger than the initialisation, so that logits depend on the inputs
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.fixture(scope="module")
def gens():
    return {name: _model(name) for name in MODELS}


def _batch(b=3):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1,
            "caption": ["a red circle", "", "a blue triangle"][:b]}


def test_layout(gens):
    assert gens["lqae"].length == 16 and gens["spae"].length == 1 + 4 + 16 and gens["unicode"].length == 32
    for m in gens.values():   # one shared network class, tied output layer, vocabulary-sized
        assert m.net.tok_emb.num_embeddings == VOCAB and not hasattr(m.net, "to_logits")
    s = gens["spae"].sample(2, prompt="a red circle", seed=0)
    assert isinstance(s.ids, tuple) and [t.shape for t in s.ids] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert gens["unicode"].sample(1, seed=0).ids.shape == (1, 4, 4, 2)
    assert gens["lqae"].sample(1, seed=0).ids.shape == (1, 4, 4)


@pytest.mark.parametrize("name", ["spae", "unicode"])
def test_causality(gens, name):
    m = gens[name]
    seq = torch.randint(0, VOCAB, (1, 20))
    a = m.logits(seq)
    seq2 = seq.clone()
    seq2[0, 12] = (seq[0, 12] + 1) % VOCAB
    b = m.logits(seq2)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-5) and not torch.allclose(a[0, 12:], b[0, 12:])


@pytest.mark.parametrize("name", ["spae", "unicode"])
def test_kv_cache_equals_recompute(gens, name):
    m = gens[name]
    a = m.flatten(m.sample(2, prompt="a red circle", seed=3, use_cache=True).ids)
    b = m.flatten(m.sample(2, prompt="a red circle", seed=3, use_cache=False).ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["lqae", "spae", "unicode"])
def test_guidance_zero_is_unconditional_and_ids_valid(gens, name):
    m = gens[name]
    a = m.flatten(m.sample(2, prompt="a red circle", seed=5, cfg=0.0).ids)
    b = m.flatten(m.sample(2, prompt="", seed=5).ids)
    c = m.flatten(m.sample(2, prompt="a red circle", seed=5).ids)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert a.min() >= 0 and a.max() < VOCAB and not (a == MASK).any()


def test_lqae_never_remasks_a_kept_token(gens):
    m = gens["lqae"]
    trace = []
    m.generate(2, encode_prompts(["a red circle"] * 2, L), SamplingConfig(steps=4).check(),
               torch.Generator().manual_seed(0), trace)
    assert len(trace) == 4 and (trace[-1] != MASK).all()
    for before, after in zip(trace, trace[1:]):
        kept = before != MASK
        assert torch.equal(after[kept], before[kept])
        assert (after != MASK).sum() > kept.sum()
    assert LQAEGenerator.parallel_decoding and not SPAEGenerator.parallel_decoding


def test_lqae_prefix_conditions(gens):
    m = gens["lqae"]
    words = torch.full((1, 16), MASK)
    a = m.logits(encode_prompts(["a red circle"], L).ids, words)
    b = m.logits(encode_prompts(["a blue circle"], L).ids, words)
    assert not torch.allclose(a, b)
    assert len(m.words(m.sample(1, seed=0).ids)[0]) == 16


def test_captioning_strings_deterministic(gens):
    m = gens["unicode"]
    images = _batch()["image"]
    a, b = m.caption(images), m.caption(images)
    assert a == b and len(a) == 3 and all(isinstance(c, str) for c in a)
    assert m.caption(images, seed=1, temperature=1.0) == m.caption(images, seed=1, temperature=1.0)
    assert CAPTION == 2
    with pytest.raises(ValueError, match="images must be"):
        m.caption(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="max_length"):
        m.caption(images, max_length=99)


@pytest.mark.parametrize("name", ["lqae", "spae", "unicode"])
def test_training_step_gradients_frozen_tokenizer(name):
    m = _model(name).train()
    before = [p.clone() for p in m.tokenizer.parameters()]
    out = m.training_step(_batch(), 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.net.tok_emb.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, m.tokenizer.parameters()))
    if name == "unicode":
        assert "caption_nll" in out.logs


def test_bad_inputs(gens):
    with pytest.raises(ValueError, match="steps"):
        gens["spae"].sample(1, steps=4)
    with pytest.raises(ValueError, match="prompt"):
        gens["lqae"].sample(2, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="steps must be"):
        _model("lqae", steps=0)
    with pytest.raises(ValueError, match="depth"):
        _model("spae", depth=0)
    with pytest.warns(UserWarning, match="truncated"):
        gens["spae"].sample(1, prompt="a red circle and a blue triangle and a green ellipse")


@pytest.mark.parametrize("name", ["lqae", "spae", "unicode"])
def test_tiny_run_trains_and_samples(tmp_path, name):
    tok_dir, out = tmp_path / name, tmp_path / f"{name}_gen"
    sets = [f"model.{k}={v}" for k, v in CONV.items() if k != "ch_mult"] + ["data.hflip=false", "train.eval_images=4"]
    if name == "spae":
        sets.append("model.pyramid=[1,2,4]")
    Trainer(build_run_config(name, None, None, sets, data="shapes", steps=1, batch_size=2), tok_dir,
            progress=False).fit()
    assert train_main([name, "--stage", "generator", "--tokenizer", str(tok_dir), "--out", str(out), "--steps", "2",
                       "--batch-size", "2", "--no-progress", "--device", "cpu", "--set", "train.eval_images=4",
                       *sum([["--set", f"model.{k}={v}"] for k, v in SMALL.items()], [])]) == 0
    m = models.load(name, out)
    assert isinstance(m, MODELS[name]) and m.cfg.text_length == L
    s = m.sample(2, prompt="a red circle", seed=0, cfg=2.0)
    assert s.images.shape == (2, 3, 16, 16) and s.prompts == ["a red circle"] * 2
    if isinstance(m, UniCodeGenerator):
        assert len(m.caption(s.images)) == 2


def test_presets():
    for name in MODELS:
        cls, presets, tok = generator_system(name)
        assert cls is MODELS[name] and tok == name and set(presets) == {"tiny", "base"}
        assert PRESETS[name]["tiny"].data.name == "shapes"
