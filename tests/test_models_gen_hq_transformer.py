"""models.hq_transformer: the HQ-Transformer (generator system hqvae) over a tiny random-weight HQ-VAE (4 x 4 top
and 8 x 8 bottom codes, K = 16 / 12), both head types (parallel, top2bot): the grouping of a top code with the
2 x 2 bottom block under it, causality over the groups and within a group (the parallel head's mask), the loss
against a hand-computed cross-entropy, the kv-cache against recomputing, guidance, greedy decoding against
teacher forcing, determinism, gradients, the original's initialisation, configuration errors and the presets."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from models import hqvae
from models.generator import generator_system
from models.hq_transformer import HQTransformer, HQTransformerConfig, bottom_blocks, bottom_map
from models.rqvae import RQVAE, RQVAEConfig
from models.sampling import SamplingConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

KT, KB, T = 16, 12, 16
SMALL = dict(num_classes=3, class_dropout=0.0, dim=32, body_depth=2, head_depth=2, heads=4, dropout=0.0)


def _tokenizer():
    torch.manual_seed(0)
    return hqvae.HQVAE(hqvae.HQVAEConfig(resolution=16, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=4,
                                         codebook_size_top=KT, codebook_size_bottom=KB))


def _model(**changes):
    tok = _tokenizer()
    torch.manual_seed(1)
    g = HQTransformer(HQTransformerConfig(**{**SMALL, **changes}), tok).eval()
    with torch.no_grad():   # the original's normal(0, 0.02) start gives logits ~ 0: larger weights show more
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return g


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, "label": torch.arange(b) % 3}


def _groups(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, KT, (b, T), generator=g), torch.randint(0, KB, (b, T, 4), generator=g)


@pytest.fixture(scope="module", params=["parallel", "top2bot"])
def model(request):
    return _model(head_type=request.param)


def test_a_group_is_a_top_code_and_the_bottom_block_under_it_in_raster_order():
    bottom = torch.arange(64).view(1, 8, 8)
    blocks = bottom_blocks(bottom)
    assert blocks.shape == (1, 16, 4)
    assert blocks[0, 0].tolist() == [0, 1, 8, 9]          # top (0, 0): bottom (0, 0) (0, 1) (1, 0) (1, 1)
    assert blocks[0, 1].tolist() == [2, 3, 10, 11]        # top (0, 1)
    assert blocks[0, 4].tolist() == [16, 17, 24, 25]      # top (1, 0)
    assert torch.equal(bottom_map(blocks, (4, 4)), bottom)
    # the tokenizer's top code (i, j) comes from the pixel-unshuffled 2 x 2 block (2i.., 2j..) of the bottom map
    tok = _tokenizer()
    top, bot = tok.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert top.shape == (2, 4, 4) and bot.shape == (2, 8, 8)


@pytest.mark.parametrize("head_type", ["parallel", "top2bot"])
def test_logits_are_causal_over_groups_and_within_a_group(head_type):
    m = _model(head_type=head_type)
    top, bottom = _groups()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        base_t, base_b = m.logits(top, bottom, labels)
        assert base_t.shape == (2, T, KT) and base_b.shape == (2, T, 4, KB)
        for t in (0, 6, 15):
            other = top.clone()
            other[:, t] = (other[:, t] + 1) % KT
            out_t, out_b = m.logits(other, bottom, labels)
            assert torch.equal(out_t[:, :t + 1], base_t[:, :t + 1]) and torch.equal(out_b[:, :t], base_b[:, :t])
            assert not torch.allclose(out_b[:, t], base_b[:, t], atol=1e-4)      # the block's codes see its top
            if t + 1 < T:
                assert not torch.allclose(out_t[:, t + 1:], base_t[:, t + 1:], atol=1e-4)
            for j in range(4):
                other = bottom.clone()
                other[:, t, j] = (other[:, t, j] + 1) % KB
                out_t, out_b = m.logits(top, other, labels)
                assert torch.equal(out_t[:, :t + 1], base_t[:, :t + 1]) and torch.equal(out_b[:, :t], base_b[:, :t])
                # parallel: no bottom code of a block is an input to its own block; top2bot: causal in the block
                seen = 4 if head_type == "parallel" else j + 1
                assert torch.equal(out_b[:, t, :seen], base_b[:, t, :seen])
                if seen < 4:
                    assert not torch.allclose(out_b[:, t, seen:], base_b[:, t, seen:], atol=1e-4)
                if t + 1 < T:
                    assert not torch.allclose(out_t[:, t + 1:], base_t[:, t + 1:], atol=1e-4)
        out_t, _ = m.logits(top, bottom, torch.tensor([1, 1]))
    assert not torch.allclose(out_t[:, 0], base_t[:, 0], atol=1e-4)             # the class reaches the first code


def test_head_masks_are_the_originals():
    parallel = _model().depth_mask
    # ParallelBlock (code_level 2, parallel_len 4): the top output sees itself, the bottom outputs all five
    assert parallel.tolist() == [[True, False, False, False, False]] + [[True] * 5] * 4
    assert torch.equal(_model(head_type="top2bot").depth_mask, torch.ones(5, 5, dtype=torch.bool).tril())
    assert "depth_mask" not in _model().state_dict()


@pytest.mark.parametrize("head_type", ["parallel", "top2bot"])
def test_loss_is_the_hand_computed_cross_entropy(head_type):
    """iHQGPT's forward written out group by group: x_t = mean of [tok_emb_top + pos_emb_top, tok_emb_bot x 4]
    + pos_emb_emb (transformer1: no embedding block), the body on [sos, x_0 .. x_{T-2}] with ln_f, the head
    on its five inputs; loss (CE_top + 4 CE_bottom) / 5 = the mean over the 5T codes."""
    m = _model(head_type=head_type)
    batch = _batch()
    top_map, bottom_map_ = m.tokens(batch)
    top, bottom = top_map.flatten(1), bottom_blocks(bottom_map_)
    labels = batch["label"]
    pe = m.pos_emb_emb.weight
    with torch.no_grad():
        xs = [torch.stack([m.tok_emb_top.weight[top[:, t]] + m.pos_emb_top.weight[t] + pe[0]] +
                          [m.tok_emb_bot.weight[bottom[:, t, j]] + pe[1 + j] for j in range(4)], 1).mean(1)
              for t in range(T - 1)]
        h = m.body(torch.stack([m.sos.weight[labels]] + xs, 1), causal=True)
        nll, count = 0.0, 0
        for t in range(T):
            pos = m.pos_emb_depth.weight
            first = h[:, t] + m.sos_depth[0, 0]
            top_emb = m.tok_emb_top_depth.weight[top[:, t]]
            if head_type == "parallel":
                seq = [first] + [top_emb + pos[j] for j in range(4)]
            else:
                seq = [first, top_emb + pos[0]] + [m.tok_emb_bot_depth.weight[bottom[:, t, j - 1]] + pos[j]
                                                   for j in range(1, 4)]
            out = m.depths(torch.stack(seq, 1), mask=m.depth_mask)
            logit_t = F.layer_norm(out[:, 0], (32,), m.ln_top.weight, m.ln_top.bias) @ m.head_top.weight.T
            logit_b = F.layer_norm(out[:, 1:], (32,), m.ln_bot.weight, m.ln_bot.bias) @ m.head_bot.weight.T
            nll = nll - (logit_t - logit_t.logsumexp(-1, keepdim=True)).gather(-1, top[:, t, None]).sum()
            nll = nll - (logit_b - logit_b.logsumexp(-1, keepdim=True)).gather(-1, bottom[:, t, :, None]).sum()
            count += top.shape[0] * 5
        step = m.training_step(batch, 0)
    assert torch.allclose(step.loss, nll / count, atol=1e-5)
    assert torch.allclose(step.loss, (step.logs["top_nll"] + 4 * step.logs["bottom_nll"]) / 5, atol=1e-6)


def test_embedding_blocks_are_bidirectional_over_the_group():
    """transformer<N> with N > 1: N - 1 non-causal blocks over the five vectors before the mean, so the
    group's embedding changes with any of its codes, and the group embedding's top position is t."""
    m = _model(emb_layers=3)
    assert len(m.emb_blocks.blocks) == 2 and len(_model().emb_blocks.blocks) == 0
    top, bottom = _groups(1)
    with torch.no_grad():
        x = m.group_embedding(top, bottom)
        seq = torch.cat([(m.tok_emb_top(top) + m.pos_emb_top.weight)[:, :, None], m.tok_emb_bot(bottom)], 2)
        seq = seq + m.pos_emb_emb.weight
        for block in m.emb_blocks.blocks:
            seq = torch.stack([block(s) for s in seq.unbind(1)], 1)   # no mask: every vector sees all five
        assert torch.allclose(x, seq.mean(2), atol=1e-5)
        assert torch.allclose(m.group_embedding(top[:, 5:6], bottom[:, 5:6], 5), x[:, 5:6], atol=1e-6)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=4, top_p=0.9, temperature=0.8), dict(cfg=2.5),
                                    dict(cfg=3.0, cfg_schedule="linear")])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, kwargs):
    labels = [0, 1, 2, 0]
    a = model.sample(4, labels, seed=4, **kwargs).ids
    b = model.sample(4, labels, seed=4, use_cache=False, **kwargs).ids
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_greedy_decoding_agrees_with_teacher_forcing(model):
    out = model.sample(4, [0, 1, 2, 2], seed=0, temperature=0)
    top, bottom = out.ids[0].flatten(1), bottom_blocks(out.ids[1])
    with torch.no_grad():
        lt, lb = model.logits(top, bottom, out.labels)
    assert torch.equal(lt.argmax(-1), top) and torch.equal(lb.argmax(-1), bottom)


def test_guidance_zero_is_the_null_class_model_and_one_the_conditional(model):
    labels = torch.tensor([0, 1, 2, 1])
    guided = model.sample(4, labels, seed=7, cfg=0.0).ids
    null = model.generate(4, torch.full((4,), 3), SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(guided[0], null[0]) and torch.equal(guided[1], null[1])
    plain = model.sample(4, labels, seed=7).ids
    one = model.sample(4, labels, seed=7, cfg=1.0).ids
    assert torch.equal(one[0], plain[0]) and torch.equal(one[1], plain[1])
    assert not torch.equal(plain[1], null[1])


def test_samples_are_valid_decodable_and_deterministic(model):
    out = model.sample(6, seed=1, top_k=6, top_p=0.8)
    top, bottom = out.ids
    assert top.shape == (6, 4, 4) and bottom.shape == (6, 8, 8)
    assert top.dtype == bottom.dtype == torch.long
    assert 0 <= top.min() and top.max() < KT and 0 <= bottom.min() and bottom.max() < KB
    assert out.images.shape == (6, 3, 16, 16) and out.images.abs().max() <= 1
    assert torch.equal(model.tokenizer.decode(out.ids).clamp(-1, 1), out.images)
    a = model.sample(3, 2, seed=11).ids
    b = model.sample(3, 2, seed=11).ids
    c = model.sample(3, 2, seed=12).ids
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


# ---------------------------------------------------------------- training, configuration, presets

@pytest.mark.parametrize("head_type", ["parallel", "top2bot"])
def test_training_step_gradients_and_state_dict(head_type):
    m = _model(head_type=head_type, class_dropout=0.2, dropout=0.1, embd_pdrop=0.1, emb_layers=2).train()
    out = m.training_step(_batch(), 0)
    assert out.recon is None and torch.isfinite(out.loss) and set(out.logs) == {"nll", "top_nll", "bottom_nll"}
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert m.tokenizer.training is False
    keys = {k.split(".")[0] for k in m.state_dict()}
    expected = {"sos", "tok_emb_top", "tok_emb_bot", "pos_emb_emb", "emb_blocks", "pos_emb_top", "body", "sos_depth",
                "tok_emb_top_depth", "pos_emb_depth", "depths", "ln_top", "head_top", "ln_bot", "head_bot"}
    assert keys == expected | ({"tok_emb_bot_depth"} if head_type == "top2bot" else set())


def test_initialisation_is_the_originals():
    m = HQTransformer(HQTransformerConfig(**SMALL), _tokenizer())
    assert 0.015 < m.tok_emb_top.weight.std().item() < 0.025 and 0.015 < m.head_bot.weight.std().item() < 0.025
    assert m.head_top.bias is None and m.head_bot.bias is None
    assert 0.6 < m.sos_depth.std().item() < 1.4                       # torch.randn, untouched by _init_weights
    assert m.sos.num_embeddings == 4 and 0.01 < m.sos.weight.std().item() < 0.03   # 3 classes + null
    assert m.pos_emb_top.num_embeddings == T and m.pos_emb_emb.num_embeddings == 5
    # minGPT-style start: every code about equally likely, the first loss about log K
    assert abs(m.training_step(_batch(), 0).logs["top_nll"].item() - torch.log(torch.tensor(KT * 1.0)).item()) < 0.1


def test_unconditional_model():
    m = _model(num_classes=0)
    assert isinstance(m.sos, torch.nn.Parameter) and m.sos.shape == (1, 1, 32)
    a, b = m.sample(3, seed=0).ids, m.sample(3, seed=0, use_cache=False).ids
    assert a[0].shape == (3, 4, 4) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(m.training_step(_batch(), 0).loss)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, [0, 1])
    with pytest.raises(ValueError, match="cfg"):
        m.sample(2, cfg=2.0)


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(body_depth=0), "body_depth"),
                                           (dict(head_depth=0), "head_depth"), (dict(emb_layers=0), "emb_layers"),
                                           (dict(head_type="tree"), "head_type"), (dict(dropout=1.0), "dropout"),
                                           (dict(mlp_ratio=-1.0), "mlp_ratio"), (dict(num_classes=-1), "num_classes"),
                                           (dict(class_dropout=1.0), "class_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        HQTransformer(dataclasses.replace(HQTransformerConfig(**SMALL), **change), _tokenizer())


def test_refuses_a_tokenizer_without_top_and_bottom_maps():
    tok = RQVAE(RQVAEConfig(resolution=16, ch=8, ch_mult=(1, 2, 2), z_channels=8, embed_dim=4, codebook_size=16,
                            depth=2))
    with pytest.raises(ValueError, match="hqvae"):
        HQTransformer(HQTransformerConfig(**SMALL), tok)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_registry_and_presets():
    cls, presets, tokenizer_system = generator_system("hqvae")
    assert cls is HQTransformer and tokenizer_system == "hqvae" and set(presets) == {"tiny", "base"}
    tiny = presets["tiny"]
    m = HQTransformer(tiny.model, hqvae.Model(hqvae.PRESETS["tiny"].model))
    assert (m.shape, m.top_size, m.bottom_size) == ((4, 4), 512, 512)
    assert tiny.model.num_classes == 10 and tiny.data.name == "digits" and not tiny.data.hflip
    base = presets["base"].model
    with torch.device("meta"):   # hqtransformer-embtrans1-layer12-top8x8, built without memory
        big = HQTransformer(base, hqvae.Model(hqvae.PRESETS["base"].model))
    assert (big.shape, big.top_size, big.bottom_size, base.num_classes) == ((8, 8), 8192, 8192, 1000)
    assert (len(big.body.blocks), len(big.depths.blocks), len(big.emb_blocks.blocks), base.head_type) == (12, 4, 0,
                                                                                                           "parallel")
