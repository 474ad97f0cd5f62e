"""models.rq_transformer: the RQ-Transformer (generator system rqvae) over a tiny random-weight RQ-VAE (4 x 4
positions x 3 depths, K = 16): causality over positions and over depths within a position, the embeddings
read from the tokenizer's codebook (the partial sums of the depth context, the input bias counted per depth),
the loss against a hand-computed cross-entropy, the kv-cache against recomputing, guidance, greedy decoding
against teacher forcing, determinism, gradients, configuration errors and the presets' shapes (the base preset
is the original's 1.4B model)."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from models import rqvae
from models.generator import generator_system
from models.rq_transformer import RQTransformer, RQTransformerConfig
from models.sampling import SamplingConfig
from models.vqvae import VQVAE, VQVAEConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

K, D, T = 16, 3, 16
SMALL = dict(num_classes=3, class_dropout=0.0, dim=32, body_depth=2, head_depth=2, heads=4, dropout=0.0)
VARIANTS = [dict(),                                                   # the released configurations' flags
            dict(input_emb_vqvae=False, head_emb_vqvae=False),        # one learned table for all depths
            dict(head_emb_vqvae=False, shared_tok_emb=False),         # one learned table per depth
            dict(cumsum_depth_ctx=False, shared_cls_emb=False)]       # code d alone; a classifier per depth


def _tokenizer():
    torch.manual_seed(0)
    return rqvae.RQVAE(rqvae.RQVAEConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), z_channels=8, embed_dim=4,
                                         codebook_size=K, depth=D))


def _model(**changes):
    tok = _tokenizer()
    torch.manual_seed(1)
    g = RQTransformer(RQTransformerConfig(**{**SMALL, **changes}), tok).eval()
    with torch.no_grad():   # larger weights: the tests see every dependency clearly
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return g


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, "label": torch.arange(b) % 3}


def _codes(b=2, seed=0):
    return torch.randint(0, K, (b, T, D), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return _model()


# ---------------------------------------------------------------- the factorisation

@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_are_causal_over_positions_and_over_depths(variant):
    """Changing code (t, d) leaves the logits of every earlier position and of depths <= d at position t
    unchanged, and changes those of the later depths at t and of the later positions."""
    m = _model(**variant)
    codes, labels = _codes(), torch.tensor([0, 2])
    with torch.no_grad():
        base = m.logits(codes, labels)
        assert base.shape == (2, T, D, K)
        for t, d in ((0, 0), (5, 1), (9, 0), (15, 2), (15, 0), (3, 2)):
            other = codes.clone()
            other[:, t, d] = (other[:, t, d] + 1 + torch.arange(2)) % K
            out = m.logits(other, labels)
            assert torch.equal(out[:, :t], base[:, :t])
            assert torch.equal(out[:, t, :d + 1], base[:, t, :d + 1])
            if d + 1 < D:
                assert not torch.allclose(out[:, t, d + 1:], base[:, t, d + 1:], atol=1e-4)
            if t + 1 < T:
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)
        other_class = m.logits(codes, torch.tensor([1, 1]))
    assert not torch.allclose(other_class[:, 0, 0], base[:, 0, 0], atol=1e-4)   # the class reaches code (0, 0)


def test_embeddings_read_the_tokenizers_codebook(model):
    """input_emb_vqvae: u_t = sum_d input_mlp(e_d) + pos_emb_hw[t] (the bias once per depth); head_emb_vqvae
    with cumsum_depth_ctx: v_{t,d} = head_mlp(e_0 + ... + e_d), e the tokenizer's code vectors, read live."""
    codes = _codes(1, seed=3)
    book = model.tokenizer.quantizer.codebooks[0]                  # the shared codebook [K, 4]
    vectors = book[codes]                                          # [1, T, D, 4]
    mlp = model.input_mlp
    with torch.no_grad():
        expected = vectors.sum(2) @ mlp.weight.T + D * mlp.bias + model.pos_emb_hw
        assert torch.allclose(model.spatial_inputs(codes), expected, atol=1e-5)
        partial = torch.stack([vectors[:, :, :d + 1].sum(2) for d in range(D)], 2)
        assert torch.allclose(model.depth_inputs(codes), model.head_mlp(partial), atol=1e-5)
        assert model.tok_emb is None and "tokenizer" not in "".join(model.state_dict())
        before = model.logits(codes, torch.tensor([0]))
        saved = book.clone()
        try:
            model.tokenizer.quantizer.layers[0]._codebook.embed[0].mul_(2.0)
            after = model.logits(codes, torch.tensor([0]))
        finally:
            model.tokenizer.quantizer.layers[0]._codebook.embed[0].copy_(saved)
    assert not torch.allclose(before, after, atol=1e-4)


def test_loss_is_the_hand_computed_cross_entropy_of_the_two_transformers(model):
    """The original's forward written out position by position: the spatial transformer on [c, u_0 ..
    u_{T-2}], the depth transformer on [h_t, v_{t,0} .. v_{t,D-2}] + pos_emb_d, LayerNorm and the classifier;
    the loss is the mean over all T * D codes of -log softmax at the target."""
    batch = _batch()
    codes = model.tokens(batch).flatten(1, 2)
    labels = batch["label"]
    book = model.tokenizer.quantizer.codebooks[0]
    with torch.no_grad():
        c = model.cond_emb.weight[labels][:, None] + model.pos_emb_cond
        u = [sum(model.input_mlp(book[codes[:, t, d]]) for d in range(D)) + model.pos_emb_hw[:, t]
             for t in range(T - 1)]
        h = model.body_transformer(torch.cat([c] + [x[:, None] for x in u], 1), causal=True)
        total = 0.0
        for t in range(T):
            ctx = [h[:, t]] + [model.head_mlp(book[codes[:, t, :d + 1]].sum(1)) for d in range(D - 1)]
            out = model.head_transformer(torch.stack(ctx, 1) + model.pos_emb_d, causal=True)
            norm = model.classifier_norm
            logits = model.classifier(F.layer_norm(out, (32,), norm.weight, norm.bias))
            logp = logits - logits.logsumexp(-1, keepdim=True)
            total = total - logp.gather(-1, codes[:, t, :, None]).sum()
        hand = total / codes.numel()
        step = model.training_step(batch, 0)
    assert torch.allclose(step.loss, hand, atol=1e-5)
    assert set(step.logs) == {"nll", "nll_depth0", "nll_depth1", "nll_depth2"}
    assert torch.allclose(torch.stack([step.logs[f"nll_depth{d}"] for d in range(D)]).mean(), step.loss, atol=1e-6)


def test_position_and_condition_embeddings_are_the_originals():
    m = RQTransformer(RQTransformerConfig(**SMALL), _tokenizer())
    assert m.pos_emb_hw.shape == (1, T, 32) and m.pos_emb_d.shape == (1, D, 32) and m.pos_emb_cond.shape == (1, 1, 32)
    assert 0.01 < m.pos_emb_hw.std().item() < 0.03                  # normal(0, 0.02)
    assert m.cond_emb.num_embeddings == 4                           # 3 classes + the null class
    assert m.input_mlp.in_features == 4 and m.head_mlp.in_features == 4   # the tokenizer's code width
    per_depth = RQTransformer(RQTransformerConfig(**SMALL, head_emb_vqvae=False, shared_tok_emb=False), _tokenizer())
    assert per_depth.tok_emb.num_embeddings == D * K and 0.01 < per_depth.tok_emb.weight.std().item() < 0.03
    codes = _codes(1)
    with torch.no_grad():   # TupleEmbedding: depth d reads rows d * K + code
        row = per_depth.tok_emb.weight[2 * K + codes[0, 4, 2]]
        assert torch.equal(per_depth.learned_embedding(codes)[0, 4, 2], row)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=5, top_p=0.9, temperature=0.8), dict(cfg=2.5),
                                    dict(cfg=3.0, cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, kwargs):
    labels = [0, 1, 2, 0, 1]
    cached = model.sample(5, labels, seed=4, **kwargs).ids
    assert torch.equal(cached, model.sample(5, labels, seed=4, use_cache=False, **kwargs).ids)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_kv_cache_equals_recomputing_with_other_embeddings(variant):
    m = _model(**variant)
    assert torch.equal(m.sample(3, seed=2, cfg=2.0).ids, m.sample(3, seed=2, cfg=2.0, use_cache=False).ids)


def test_greedy_decoding_agrees_with_teacher_forcing(model):
    out = model.sample(6, [0, 1, 2, 2, 1, 0], seed=0, temperature=0)
    codes = out.ids.flatten(1, 2)
    with torch.no_grad():
        assert torch.equal(model.logits(codes, out.labels).argmax(-1), codes)
    assert torch.equal(model.sample(6, [0, 1, 2, 2, 1, 0], seed=5, top_k=1).ids, out.ids)


def test_guidance_zero_is_the_null_class_model_and_one_the_conditional(model):
    labels = torch.tensor([0, 1, 2, 1])
    guided = model.sample(4, labels, seed=7, cfg=0.0).ids
    null = model.generate(4, torch.full((4,), 3), SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(guided, null)
    assert torch.equal(model.sample(4, labels, seed=7, cfg=1.0).ids, model.sample(4, labels, seed=7).ids)
    assert not torch.equal(model.sample(4, labels, seed=7).ids, null)
    assert not torch.equal(model.sample(4, labels, seed=7, cfg=3.0).ids, model.sample(4, labels, seed=7).ids)


def test_samples_are_valid_decodable_and_deterministic(model):
    out = model.sample(8, seed=1, top_k=8, top_p=0.8)
    assert out.ids.shape == (8, 4, 4, D) and out.ids.dtype == torch.long
    assert out.ids.min() >= 0 and out.ids.max() < K
    assert out.images.shape == (8, 3, 16, 16) and out.images.abs().max() <= 1
    assert out.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert torch.equal(model.tokenizer.decode(out.ids).clamp(-1, 1), out.images)
    a = model.sample(4, 2, seed=11).ids
    assert torch.equal(a, model.sample(4, 2, seed=11).ids)
    assert not torch.equal(a, model.sample(4, 2, seed=12).ids)


# ---------------------------------------------------------------- training, configuration, presets

def test_training_step_gradients_and_state_dict():
    m = _model(class_dropout=0.2, dropout=0.1, embd_pdrop=0.1).train()
    out = m.training_step(_batch(), 0)
    assert out.recon is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert m.tokenizer.training is False
    assert {k.split(".")[0] for k in m.state_dict()} == {
        "cond_emb", "input_mlp", "head_mlp", "pos_emb_cond", "pos_emb_hw", "pos_emb_d", "body_transformer",
        "head_transformer", "classifier_norm", "classifier"}
    assert "body_transformer.ln_f.weight" not in m.state_dict()        # AttentionStack: no final LayerNorm


def test_unconditional_model():
    m = _model(num_classes=0)
    assert m.cond_emb.num_embeddings == 1                              # the start token (vocab_size_cond 1)
    ids = m.sample(3, seed=0).ids
    assert ids.shape == (3, 4, 4, D) and torch.equal(ids, m.sample(3, seed=0, use_cache=False).ids)
    assert torch.isfinite(m.training_step(_batch(), 0).loss)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, [0, 1])
    with pytest.raises(ValueError, match="cfg"):
        m.sample(2, cfg=2.0)
    with pytest.raises(ValueError, match="steps"):
        _model().sample(2, steps=4)


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(body_depth=0), "body_depth"),
                                           (dict(head_depth=0), "head_depth"), (dict(dropout=1.0), "dropout"),
                                           (dict(embd_pdrop=-0.1), "embd_pdrop"), (dict(mlp_ratio=0.0), "mlp_ratio"),
                                           (dict(num_classes=-1), "num_classes"),
                                           (dict(class_dropout=1.0), "class_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        RQTransformer(dataclasses.replace(RQTransformerConfig(**SMALL), **change), _tokenizer())


def test_refuses_a_tokenizer_without_code_stacks():
    tok = VQVAE(VQVAEConfig(resolution=16, hidden=8, res_channels=4, num_res_blocks=1, embed_dim=4, codebook_size=K))
    with pytest.raises(ValueError, match="rqvae"):
        RQTransformer(RQTransformerConfig(**SMALL), tok)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_registry_and_presets():
    cls, presets, tokenizer_system = generator_system("rqvae")
    assert cls is RQTransformer and tokenizer_system == "rqvae" and set(presets) == {"tiny", "base"}
    tiny = presets["tiny"]
    m = RQTransformer(tiny.model, rqvae.Model(rqvae.PRESETS["tiny"].model))
    assert (m.shape, m.depth, m.codebook_size) == ((4, 4), 4, 512)
    assert tiny.model.num_classes == 10 and tiny.data.name == "digits" and not tiny.data.hflip
    base = presets["base"].model
    with torch.device("meta"):   # the original's in256-rqtransformer-8x8x4-1400M, built without memory
        big = RQTransformer(base, rqvae.Model(rqvae.PRESETS["base"].model))
    assert (big.shape, big.depth, big.codebook_size, base.num_classes) == ((8, 8), 4, 16384, 1000)
    assert 1.35e9 < sum(p.numel() for p in big.parameters()) < 1.45e9
