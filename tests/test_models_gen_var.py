"""models.var: VAR's next-scale prediction transformer (system var) over a tiny random-weight var_vqvae
tokenizer: the state_dict layout of VAR-d16 (a table taken from the original FoundationVision/VAR model),
VAR's attention / adaLN block / initialisation, the block-causal mask by scale, teacher forcing through the
quantizer's idxBl_to_var_input, the kv-cache against recomputing the prefix, guidance (VAR's linear ramp,
cfg 0 = the null class), valid ids, determinism, gradients, configuration errors and the presets."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models.generator import generator_system
from models.sampling import SamplingConfig, block_causal_mask
from models.var import PRESETS, VAR, AdaLNSelfAttn, SelfAttention, VARConfig
from models.var_vqvae import PRESETS as TOKENIZER_PRESETS
from models.var_vqvae import VarVQVAE, VarVQVAEConfig
from models.vqvae import VQVAE, VQVAEConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# 16x16 images -> scales 1, 2, 3, 5, 8 (L = 103 tokens), V = 32 codes of width Cvae = 8
PATCH_NUMS = (1, 2, 3, 5, 8)
SIZES = [pn * pn for pn in PATCH_NUMS]
L, V = sum(SIZES), 32
SMALL = dict(num_classes=3, class_dropout=0.0, depth=2, embed_dim=32, num_heads=4)

# VAR-d16's state_dict, read off the original: FoundationVision/VAR models.VAR built as build_vae_var(depth=16)
# builds it (embed_dim 1024, 16 heads, 1000 classes, attn_l2_norm, shared_aln False, drop_path 0.1 * 16 / 24, the
# vae_ch160v4096z32 VQVAE: Cvae 32, V 4096, patch_nums 1..16), in its state_dict order; 220 entries, 310,762,984
# numbers, 310,283,520 parameters. Blocks 0..15 each hold BLOCK under "blocks.<i>.".
D16_HEAD = [("pos_start", (1, 1, 1024)), ("pos_1LC", (1, 680, 1024)), ("lvl_1L", (1, 680)),
            ("attn_bias_for_masking", (1, 1, 680, 680)), ("word_embed.weight", (1024, 32)), ("word_embed.bias", (1024,)),
            ("class_emb.weight", (1001, 1024)), ("lvl_embed.weight", (10, 1024))]
D16_BLOCK = [("attn.scale_mul_1H11", (1, 16, 1, 1)), ("attn.q_bias", (1024,)), ("attn.v_bias", (1024,)),
             ("attn.zero_k_bias", (1024,)), ("attn.mat_qkv.weight", (3072, 1024)), ("attn.proj.weight", (1024, 1024)),
             ("attn.proj.bias", (1024,)), ("ffn.fc1.weight", (4096, 1024)), ("ffn.fc1.bias", (4096,)),
             ("ffn.fc2.weight", (1024, 4096)), ("ffn.fc2.bias", (1024,)), ("ada_lin.1.weight", (6144, 1024)),
             ("ada_lin.1.bias", (6144,))]
D16_TAIL = [("head_nm.ada_lin.1.weight", (2048, 1024)), ("head_nm.ada_lin.1.bias", (2048,)),
            ("head.weight", (4096, 1024)), ("head.bias", (4096,))]
D16_PARAMETERS = 310_283_520
# the original with shared_aln=True, attn_l2_norm=False, embed_dim 128, 2 heads: block 0's entries and the shared layer
SALN_BLOCK = [("ada_gss", (1, 1, 6, 128)), ("attn.q_bias", (128,)), ("attn.v_bias", (128,)), ("attn.zero_k_bias", (128,)),
              ("attn.mat_qkv.weight", (384, 128)), ("attn.proj.weight", (128, 128)), ("attn.proj.bias", (128,)),
              ("ffn.fc1.weight", (512, 128)), ("ffn.fc1.bias", (512,)), ("ffn.fc2.weight", (128, 512)),
              ("ffn.fc2.bias", (128,))]
SALN_SHARED = [("shared_ada_lin.1.weight", (768, 128)), ("shared_ada_lin.1.bias", (768,))]


def d16_table():
    """[(key, shape)] of VAR-d16's state_dict, in order."""
    blocks = [(f"blocks.{i}.{k}", s) for i in range(16) for k, s in D16_BLOCK]
    return D16_HEAD + blocks + D16_TAIL


def _tokenizer():
    torch.manual_seed(0)
    return VarVQVAE(VarVQVAEConfig(resolution=16, vocab_size=V, z_channels=8, ch=8, ch_mult=(1, 2),
                                   v_patch_nums=PATCH_NUMS)).eval()


def _var(noise=0.1, **changes):
    tok = _tokenizer()
    torch.manual_seed(1)
    m = VAR(VARConfig(**{**SMALL, **changes}), tok).eval()
    # VAR's init gates every residual branch by ~1e-5: perturb so that the tests see real dependencies
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * noise)
    return m


def _images(b=4, seed=0):
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(b=4, seed=0):
    return {"image": _images(b, seed), "label": torch.arange(b) % 3}


@pytest.fixture(scope="module")
def model():
    return _var()


def _base_meta():
    """VAR-d16 (our base preset) on the base tokenizer without its training-only loss modules, on the meta device."""
    tok_cfg = dataclasses.replace(TOKENIZER_PRESETS["base"].model, perceptual_weight=0.0, disc_weight=0.0)
    with torch.device("meta"):
        return VAR(PRESETS["var"]["base"].model, VarVQVAE(tok_cfg))


# ---------------------------------------------------------------- VAR's layout

def test_base_state_dict_is_var_d16():
    m = _base_meta()
    state = m.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == d16_table()
    assert state["lvl_1L"].dtype == torch.int64
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "lvl_1L")
    assert sum(p.numel() for p in m.parameters()) == D16_PARAMETERS
    assert m.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and (m.Cvae, m.V, m.L) == (32, 4096, 680)
    # a checkpoint of these shapes loads strictly; a wrong shape or a missing buffer does not
    ckpt = {k: torch.empty(s, device="meta", dtype=torch.int64 if k == "lvl_1L" else torch.float32)
            for k, s in d16_table()}
    result = m.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="head.weight"):
        m.load_state_dict({**ckpt, "head.weight": torch.empty(4095, 1024, device="meta")})
    with pytest.raises(RuntimeError, match="zero_k_bias"):
        m.load_state_dict({k: v for k, v in ckpt.items() if k != "blocks.3.attn.zero_k_bias"})


def test_state_dict_loads_strictly_with_values():
    m = _var(noise=0.0)
    g = torch.Generator().manual_seed(3)
    state = {k: (v.clone() if v.dtype == torch.int64 else torch.randn(v.shape, generator=g))
             for k, v in m.state_dict().items()}
    other = _var(noise=0.0)
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    assert not any(k.startswith("tokenizer") or k.startswith("quantize") for k in state)


def test_shared_aln_and_plain_attention_layout():
    """shared_aln: one shared_ada_lin [6C, D] and a per-block ada_gss, no per-block ada_lin; attn_l2_norm off:
    no scale_mul_1H11 (the original's keys at embed_dim 128, 2 heads)."""
    m = _var(noise=0.0, embed_dim=128, num_heads=2, shared_aln=True, attn_l2_norm=False)
    state = m.state_dict()
    assert [(k, tuple(state[k].shape)) for k, _ in SALN_SHARED] == SALN_SHARED
    block0 = [(k[len("blocks.0."):], tuple(v.shape)) for k, v in state.items() if k.startswith("blocks.0.")]
    assert block0 == SALN_BLOCK
    assert list(state)[4:6] == ["word_embed.weight", "word_embed.bias"]
    assert list(state)[8:10] == [k for k, _ in SALN_SHARED]


def test_buffers_levels_and_block_causal_bias(model):
    assert model.lvl_1L.shape == (1, L)
    assert model.lvl_1L[0].tolist() == [i for i, s in enumerate(SIZES) for _ in range(s)]
    bias = model.attn_bias_for_masking
    assert bias.shape == (1, 1, L, L)
    allowed = block_causal_mask(SIZES, "cpu")
    assert torch.equal(bias[0, 0] == 0, allowed) and torch.isneginf(bias[0, 0][~allowed]).all()
    # a position of scale 2 (rows 5..13) sees scales 0..2 (columns 0..13), all of its own scale included
    assert (bias[0, 0, 5, :14] == 0).all() and torch.isneginf(bias[0, 0, 5, 14:]).all()
    assert all((b.attn.zero_k_bias == 0).all() for b in model.blocks)


# ---------------------------------------------------------------- VAR's maths

@pytest.mark.parametrize("l2", [True, False])
def test_attention_is_vars(l2):
    torch.manual_seed(0)
    attn = SelfAttention(16, 4, 0.0, 0.0, attn_l2_norm=l2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        if l2:
            attn.scale_mul_1H11.copy_(torch.tensor([0.3, 1.0, 4.0, 9.0]).view(1, 4, 1, 1))  # 9 > log 100: clamped
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    q, k, v = (x @ attn.mat_qkv.weight.T).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias                           # the key has no bias
    q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in (q, k, v))
    if l2:
        s = torch.tensor([0.3, 1.0, 4.0, math.log(100)]).exp().view(1, 4, 1, 1)
        logits = (F.normalize(q, dim=-1) * s) @ F.normalize(k, dim=-1).transpose(-1, -2)
    else:
        logits = q @ k.transpose(-1, -2) * (0.25 / math.sqrt(4))
    y = ((logits + mask).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16)
    assert torch.allclose(attn(x, mask), attn.proj(y), atol=1e-5)
    if l2:
        assert torch.allclose(SelfAttention(16, 4, 0.0, 0.0, True).scale_mul_1H11, torch.full((1, 4, 1, 1), math.log(4)))


def test_adaln_block_is_vars():
    """x + gamma1 attn(LN(x)(1 + scale1) + shift1), then x + gamma2 ffn(LN(x)(1 + scale2) + shift2), the six
    modulations ada_lin(cond) in the order gamma1, gamma2, scale1, scale2, shift1, shift2; LN without affine."""
    torch.manual_seed(0)
    block = AdaLNSelfAttn(16, 4, 2.0, 0.0, 0.0, 0.0, 1e-6, shared_aln=False, attn_l2_norm=True)
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 16)
    g1, g2, s1, s2, b1, b2 = (t[:, None] for t in block.ada_lin(cond).chunk(6, dim=-1))
    ln = F.layer_norm(x, (16,), eps=1e-6)
    h = x + block.attn(ln * (1 + s1) + b1, None) * g1
    ln = F.layer_norm(h, (16,), eps=1e-6)
    ffn = block.ffn.fc2(F.gelu(block.ffn.fc1(ln * (1 + s2) + b2), approximate="tanh"))
    assert torch.allclose(block(x, cond, None), h + ffn * g2, atol=1e-5)
    assert block.ffn.fc1.out_features == 32 and not block.ln_wo_grad.elementwise_affine


def test_init_is_vars_init_weights():
    """init_std sqrt(1 / (3 C)); head x 0.02; ada_lin gate rows x init_adaln_gamma, the rest x init_adaln; proj
    and fc2 / sqrt(2 depth); zero biases; q / v biases 0, scale_mul log 4."""
    torch.manual_seed(0)
    c, depth = 256, 2
    m = VAR(VARConfig(num_classes=3, depth=depth, embed_dim=c, num_heads=4, init_adaln_gamma=1e-3), _tokenizer())
    std = math.sqrt(1 / c / 3)

    def close(t, expected):
        return abs(t.std().item() / expected - 1) < 0.05

    assert close(m.class_emb.weight, std) and close(m.pos_1LC, std) and close(m.word_embed.weight, std)
    assert close(m.head.weight, std * 0.02) and close(m.head_nm.ada_lin[1].weight, std * 0.5)
    b = m.blocks[1]
    assert close(b.attn.mat_qkv.weight, std) and close(b.ffn.fc1.weight, std)
    assert close(b.attn.proj.weight, std / math.sqrt(2 * depth)) and close(b.ffn.fc2.weight, std / math.sqrt(2 * depth))
    assert close(b.ada_lin[1].weight[:2 * c], std * 1e-3) and close(b.ada_lin[1].weight[2 * c:], std * 0.5)
    assert all((p == 0).all() for n, p in m.named_parameters() if n.endswith("bias"))
    assert torch.allclose(b.attn.scale_mul_1H11, torch.full((1, 4, 1, 1), math.log(4)))
    # the head starts near zero: the first loss is about log V
    assert abs(m.training_step(_batch(), 0).loss.item() - math.log(V)) < 0.05


# ---------------------------------------------------------------- next-scale prediction

def test_scale_k_logits_never_see_scale_k_or_later_tokens(model):
    ids = model.tokens({"image": _images(2, 1)})
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        base = model.forward_logits(labels, model.teacher_inputs(ids))
        for k in range(len(SIZES)):
            begin, end = sum(SIZES[:k]), sum(SIZES[:k + 1])
            changed = ids.clone()
            changed[:, begin:end] = (changed[:, begin:end] + 1 + torch.arange(end - begin)) % V
            out = model.forward_logits(labels, model.teacher_inputs(changed))
            assert torch.equal(out[:, :end], base[:, :end])          # scales <= k: unchanged
            if k < len(SIZES) - 1:
                assert not torch.allclose(out[:, end:], base[:, end:], atol=1e-4)
        assert not torch.allclose(model.forward_logits(torch.tensor([1, 1]), model.teacher_inputs(ids))[:, 0],
                                  base[:, 0], atol=1e-4)              # the class reaches scale 0


def test_positions_of_one_scale_see_each_other(model):
    """An input position of scale k reaches every position of scale k (earlier ones in raster order too) and
    of the later scales, never the earlier scales."""
    ids = model.tokens({"image": _images(2, 2)})
    labels = torch.tensor([1, 0])
    x = model.teacher_inputs(ids)
    with torch.no_grad():
        base = model.forward_logits(labels, x)
        for k in (1, 2, 4):
            begin, end = sum(SIZES[:k]), sum(SIZES[:k + 1])
            pos = end - 1                                             # the last position of scale k
            x2 = x.clone()
            x2[:, pos - 1] += 1.0                                     # x holds no row for scale 0
            out = model.forward_logits(labels, x2)
            assert torch.equal(out[:, :begin], base[:, :begin])
            moved = (out - base).abs().amax(dim=(0, 2))
            assert (moved[begin:] > 1e-6).all()


def test_teacher_inputs_are_idxBl_to_var_input_and_loss_is_vars(model):
    """Training: the codes are the tokenizer's img_to_idxBl scale by scale (encode's order), the input is the
    quantizer's idxBl_to_var_input of them [B, L - 1, Cvae], the loss the mean cross-entropy over the L positions."""
    images = _images(3, 4)
    ms_idx = model.tokenizer.img_to_idxBl(images)
    x = model.tokenizer.quantize.idxBl_to_var_input(ms_idx)
    assert x.shape == (3, L - 1, 8)
    assert torch.equal(model.teacher_inputs(torch.cat(ms_idx, 1)), x)
    labels = torch.tensor([0, 1, 2])
    out = model.training_step({"image": images, "label": labels}, 0)
    logits = model.forward_logits(labels, x)
    assert torch.allclose(out.loss, F.cross_entropy(logits.reshape(-1, V), torch.cat(ms_idx, 1).reshape(-1)), atol=1e-6)
    assert set(out.logs) == {"nll", "tail_nll", "accuracy"} and out.recon is None


def test_greedy_sampling_agrees_with_teacher_forcing(model):
    """The sampler's inputs (f_hat through get_next_autoregressive_input) are the teacher-forcing inputs of the
    sampled codes: greedy codes are the argmax of the teacher-forced logits of themselves, at every scale."""
    labels = torch.tensor([0, 1, 2, 1])
    for cache in (True, False):
        ids = model.generate(4, labels, SamplingConfig(temperature=0, use_cache=cache), torch.Generator())
        logits = model.forward_logits(labels, model.teacher_inputs(ids))
        assert torch.equal(logits.argmax(-1), ids)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=5, top_p=0.8, temperature=0.7), dict(cfg=2.5),
                                    dict(cfg=3.0, cfg_schedule="linear", top_k=10)])
def test_kv_cache_equals_recomputing_the_prefix(model, kwargs):
    labels = [0, 1, 2, 0, 1, 2]
    cached = model.sample(6, labels, seed=4, **kwargs).ids
    assert torch.equal(cached, model.sample(6, labels, seed=4, use_cache=False, **kwargs).ids)


def test_guidance_zero_is_the_null_class_and_the_linear_ramp_starts_conditional(model):
    labels = torch.tensor([0, 1, 2, 1])
    null = model.generate(4, torch.full((4,), 3), SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(model.sample(4, labels, seed=7, cfg=0.0).ids, null)
    plain = model.sample(4, labels, seed=7).ids
    assert not torch.equal(plain, null)
    assert torch.equal(model.sample(4, labels, seed=7, cfg=1.0).ids, plain)
    # VAR's ramp: the first scale unguided (w = 1), guided afterwards
    ramp = model.sample(4, labels, seed=7, cfg=8.0, cfg_schedule="linear").ids
    assert torch.equal(ramp[:, :1], plain[:, :1]) and not torch.equal(ramp, plain)
    assert not torch.equal(model.sample(4, labels, seed=7, cfg=8.0).ids[:, :1], plain[:, :1])


def test_valid_ids_images_and_determinism(model):
    out = model.sample(6, seed=1, top_k=8, top_p=0.9)
    assert out.ids.shape == (6, L) and out.ids.dtype == torch.long
    assert out.ids.min() >= 0 and out.ids.max() < V
    assert out.images.shape == (6, 3, 16, 16) and out.images.abs().max() <= 1
    assert out.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(model.sample(6, seed=1, top_k=8, top_p=0.9).ids, out.ids)
    assert not torch.equal(model.sample(6, seed=2, top_k=8, top_p=0.9).ids, out.ids)
    greedy = model.sample(3, 1, seed=0, temperature=0).ids
    assert torch.equal(model.sample(3, 1, seed=5, top_k=1).ids, greedy) and (greedy == greedy[:1]).all()


# ---------------------------------------------------------------- training, errors, presets

def test_training_step_gradients_and_state_dict():
    m = _var(class_dropout=0.3, drop_path_rate=0.2, drop_rate=0.1, shared_aln=True).train()
    out = m.training_step(_batch(), 0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert m.tokenizer.training is False
    assert {k.split(".")[0] for k in m.state_dict()} == {"pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking",
                                                        "word_embed", "class_emb", "lvl_embed", "shared_ada_lin",
                                                        "blocks", "head_nm", "head"}
    # stochastic depth rises linearly from 0 (block 0: none) to drop_path_rate
    assert isinstance(m.blocks[0].drop_path, torch.nn.Identity) and m.blocks[1].drop_path.p == pytest.approx(0.2)
    batch = _batch()
    assert not torch.equal(m.training_step(batch, 0).loss, m.training_step(batch, 0).loss)
    m.eval()
    assert torch.equal(m.training_step(batch, 0).loss, m.training_step(batch, 0).loss)


def test_unconditional_model():
    m = _var(num_classes=0)
    assert m.class_emb.num_embeddings == 1
    ids = m.sample(3, seed=0).ids
    assert ids.shape == (3, L) and torch.equal(ids, m.sample(3, seed=0, use_cache=False).ids)
    assert torch.isfinite(m.train().training_step({"image": _images(2)}, 0).loss)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, [0, 1])


@pytest.mark.parametrize("change, field", [(dict(embed_dim=30), "num_heads"), (dict(depth=0), "depth"),
                                           (dict(mlp_ratio=0.0), "mlp_ratio"), (dict(drop_rate=1.0), "drop_rate"),
                                           (dict(drop_path_rate=-0.1), "drop_path_rate"),
                                           (dict(norm_eps=0.0), "norm_eps"), (dict(num_classes=-1), "num_classes"),
                                           (dict(class_dropout=1.0), "class_dropout")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        VAR(dataclasses.replace(VARConfig(**SMALL), **change), _tokenizer())


def test_needs_a_multiscale_tokenizer():
    tok = VQVAE(VQVAEConfig(resolution=16, hidden=8, res_channels=4, num_res_blocks=1, embed_dim=4, codebook_size=8))
    with pytest.raises(ValueError, match="tokenizer"):
        VAR(VARConfig(**SMALL), tok)
    with pytest.raises(ValueError, match="steps"):
        _var().sample(2, steps=4)


def test_registry_and_presets():
    cls, presets, tokenizer_system = generator_system("var")
    assert cls is VAR and tokenizer_system == "var_vqvae" and set(presets) == {"tiny", "base"}
    tiny = presets["tiny"]
    assert tiny.data.name == "digits" and not tiny.data.hflip and tiny.model.num_classes == 10
    m = VAR(tiny.model, VarVQVAE(TOKENIZER_PRESETS["tiny"].model))
    assert m.patch_nums == (1, 2, 4, 8) and (m.V, m.Cvae, m.L) == (512, 16, 85)
    base = presets["base"].model
    assert (base.depth, base.embed_dim, base.num_heads, base.num_classes) == (16, 1024, 16, 1000)
    assert base.attn_l2_norm and not base.shared_aln and base.norm_eps == 1e-6 and base.class_dropout == 0.1
    assert base.drop_path_rate == pytest.approx(0.1 * 16 / 24)
