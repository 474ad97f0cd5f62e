"""models.maskgit: MaskGIT over a tiny random-weight vqgan tokenizer: the bidirectional layout, the training
mask (ceil(gamma(r) N) codes, loss on them only), the parallel decoder against its per-step trace (known codes
never re-masked, masked counts on the schedule, confidence order), editing, guidance, determinism, gradients,
configuration errors and the presets' shapes."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models import vqgan
from models.generator import generator_system
from models.maskgit import PRESETS, MaskGIT, MaskGITConfig
from models.sampling import SamplingConfig, sample_logits

torch.set_num_threads(1)

# 16x16 images -> 8x8 codes (N = 64), K = 16
TOK = dict(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, norm_groups=1,
           embed_dim=4, n_embed=16, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=1)
SMALL = dict(num_classes=3, class_dropout=0.0, dim=32, depth=2, heads=4, dropout=0.0, label_smoothing=0.1, steps=8)
N, K = 64, 16


def _tokenizer():
    torch.manual_seed(0)
    return vqgan.VQGAN(vqgan.VQGANConfig(**TOK))


def _maskgit(**changes):
    tok = _tokenizer()
    torch.manual_seed(1)
    m = MaskGIT(MaskGITConfig(**{**SMALL, **changes}), tok).eval()
    with torch.no_grad():   # larger than the 0.02 initialisation, so that logits depend on the inputs
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, "label": torch.arange(b) % 3}


def _run(model, n=3, labels=(0, 1, 2), seed=0, **kwargs):
    trace = []
    ids = model.generate(n, None if labels is None else torch.tensor(labels), SamplingConfig(**kwargs).check(),
                         torch.Generator().manual_seed(seed), trace=trace)
    return ids, trace


def _expected_masked(n0, steps, schedule="cosine"):
    """MaskGIT's counts after each iteration: max(1, floor(N0 gamma((t + 1) / T))), at most the unknown - 1."""
    gamma = {"cosine": lambda r: math.cos(math.pi / 2 * r), "arccos": lambda r: math.acos(r) / (math.pi / 2),
             "linear": lambda r: 1 - r}[schedule]
    out, unknown = [], n0
    for t in range(steps - 1):
        unknown = min(max(1, math.floor(n0 * gamma((t + 1) / steps))), max(unknown - 1, 0))
        out.append(unknown)
    return out + [0]


@pytest.fixture(scope="module")
def model():
    return _maskgit()


def test_layout_and_bidirectional_attention(model):
    assert model.shape == (8, 8) and model.length == N and model.codebook_size == K
    assert model.mask_id == K + 3 + 1 and model.tok_emb.num_embeddings == K + 5
    assert model.pos_emb.num_embeddings == N + 1
    assert model.class_tokens(torch.tensor([0, 2, 3]), 3).tolist() == [16, 18, 19]
    ids = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.logits(ids, torch.tensor([0, 1]))
        assert base.shape == (2, N, K)
        later = ids.clone()
        later[:, -1] = model.mask_id
        out = model.logits(later, torch.tensor([0, 1]))
    assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-4)   # no causal mask: the first code sees the last


def test_training_mask_counts_follow_the_cosine_schedule(model):
    masked = model.random_mask(500, "cpu", torch.Generator().manual_seed(3))
    r = torch.rand(500, generator=torch.Generator().manual_seed(3))
    want = torch.ceil(torch.cos(math.pi / 2 * r.double()) * N).long().clamp(min=1)
    assert torch.equal(masked.sum(1), want) and (masked.sum(1) >= 1).all()
    assert abs(masked.float().mean().item() - 2 / math.pi) < 0.03       # E[cos(pi r / 2)] = 2 / pi
    per_position = masked.float().mean(0)                               # positions drawn uniformly
    assert (per_position - per_position.mean()).abs().max() < 0.12


def test_loss_is_on_masked_codes_only_and_label_smoothing_trains_only():
    m = _maskgit()
    batch = _batch()
    torch.manual_seed(5)
    out = m.training_step(batch, 0)          # eval mode: no smoothing, no dropout
    torch.manual_seed(5)
    masked = m.random_mask(4, "cpu")
    ids = m.tokens(batch).flatten(1)
    logits = m.logits(torch.where(masked, torch.full_like(ids, m.mask_id), ids), batch["label"])
    assert torch.allclose(out.loss, F.cross_entropy(logits[masked], ids[masked]), atol=1e-6)
    assert torch.allclose(out.logs["mask_ratio"], masked.float().mean())
    m.train()
    torch.manual_seed(5)
    trained = m.training_step(batch, 0)
    assert torch.allclose(trained.logs["nll"], out.loss, atol=1e-6)
    assert torch.allclose(trained.loss, F.cross_entropy(logits[masked], ids[masked], label_smoothing=0.1), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(steps=5, mask_schedule="arccos"), dict(cfg=2.0, top_k=6),
                                    dict(steps=12, temperature=0.7, top_p=0.9, cfg=3.0, cfg_schedule="linear")])
def test_decoder_never_remasks_a_known_code_and_follows_the_schedule(model, kwargs):
    ids, trace = _run(model, **kwargs)
    steps = kwargs.get("steps", 8)
    assert len(trace) == steps
    counts = [(t == model.mask_id).sum(1).tolist() for t in trace]
    want = _expected_masked(N, steps, kwargs.get("mask_schedule", "cosine"))
    assert counts == [[c] * 3 for c in want]
    for before, after in zip(trace, trace[1:]):
        known = before != model.mask_id
        assert torch.equal(after[known], before[known])
    assert torch.equal(ids.flatten(1), trace[-1]) and ids.min() >= 0 and ids.max() < K


def test_remasking_keeps_the_most_confident_draws_without_noise(model):
    labels = torch.tensor([0, 2])
    ids, trace = _run(model, 2, (0, 2), temperature=0, gumbel_temperature=0.0)
    with torch.no_grad():
        logits = model.logits(torch.full((2, N), model.mask_id), labels)
    confidence, greedy = logits.softmax(-1).max(-1)
    kept = trace[0] != model.mask_id
    n_kept = N - _expected_masked(N, 8)[0]
    top = confidence.argsort(dim=1, descending=True)[:, :n_kept]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, top, True))
    assert torch.equal(trace[0][kept], greedy[kept])


def test_one_step_decodes_everything_at_once(model):
    ids, trace = _run(model, steps=1, seed=9)
    assert len(trace) == 1 and not (trace[0] == model.mask_id).any()
    with torch.no_grad():
        logits = model.logits(torch.full((3, N), model.mask_id), torch.tensor([0, 1, 2]))
    assert torch.equal(ids.flatten(1), sample_logits(logits, torch.Generator().manual_seed(9)))


def test_default_steps_guidance_zero_and_determinism(model):
    _, trace = _run(model)
    assert len(trace) == model.cfg.steps == 8
    labels = torch.tensor([0, 1, 2, 1])
    guided = model.sample(4, labels, seed=7, cfg=0.0).ids
    null = model.generate(4, torch.full((4,), 3), SamplingConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(guided, null)
    a = model.sample(4, labels, seed=7)
    assert not torch.equal(a.ids, null)
    assert torch.equal(a.ids, model.sample(4, labels, seed=7).ids)
    assert not torch.equal(a.ids, model.sample(4, labels, seed=8).ids)
    assert a.ids.shape == (4, 8, 8) and a.images.shape == (4, 3, 16, 16) and a.images.abs().max() <= 1
    assert torch.equal(model.sample(4, labels, seed=7, temperature=0, gumbel_temperature=0.0).ids,
                       model.sample(4, labels, seed=1, temperature=0, gumbel_temperature=0.0).ids)


def test_edit_keeps_the_codes_of_kept_patches(model):
    images = _batch(2)["image"]
    keep = torch.zeros(2, 16, 16, dtype=torch.bool)
    keep[0, :, :9] = True          # pixel columns 0..8: code columns 0..3 (patch 2) whole, column 4 half
    keep[1, 4:12, 4:12] = True     # a centre box: outpainting
    tokens = model.keep_tokens(keep)
    want = torch.zeros(2, 8, 8, dtype=torch.bool)
    want[0, :, :4] = True
    want[1, 2:6, 2:6] = True
    assert torch.equal(tokens, want)
    codes = model.tokenizer.encode(images)
    trace = []
    out = model.edit(images, keep, labels=[1, 2], seed=3, trace=trace)
    assert out.ids.shape == (2, 8, 8) and out.images.shape == (2, 3, 16, 16)
    assert torch.equal(out.ids[want], codes[want])
    assert not torch.equal(out.ids[~want], codes[~want])
    n0 = (~want).flatten(1).sum(1).tolist()          # the schedule counts the codes to regenerate
    counts = [(t == model.mask_id).sum(1).tolist() for t in trace]
    assert counts == [list(c) for c in zip(*(_expected_masked(n, 8) for n in n0))]
    assert torch.equal(model.edit(images, torch.ones(2, 16, 16, dtype=torch.bool)).ids, codes)
    unconditional = model.edit(images, keep, seed=3)
    assert unconditional.labels.tolist() == [3, 3]
    with pytest.raises(ValueError, match="keep_mask"):
        model.edit(images, keep.float())
    with pytest.raises(ValueError, match="keep_mask"):
        model.edit(images[:, :, :15, :15], keep[:, :15, :15])


def test_training_step_gradients_and_state_dict():
    m = _maskgit(class_dropout=0.2, dropout=0.1).train()
    out = m.training_step(_batch(), 0)
    assert out.recon is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.tokenizer.parameters())
    assert {k.split(".")[0] for k in m.state_dict()} == {"tok_emb", "pos_emb", "emb_ln", "transformer", "mlm_dense",
                                                          "mlm_ln", "mlm_bias"}


def test_unconditional_model():
    m = _maskgit(num_classes=0)
    assert m.mask_id == K + 1
    ids, trace = _run(m, 2, None)
    assert ids.shape == (2, 8, 8) and len(trace) == 8
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, [0, 1])


@pytest.mark.parametrize("change, field", [(dict(dim=30), "heads"), (dict(depth=0), "depth"), (dict(steps=0), "steps"),
                                           (dict(label_smoothing=1.0), "label_smoothing"),
                                           (dict(dropout=-0.1), "dropout"), (dict(num_classes=-1), "num_classes"),
                                           (dict(mask_schedule="square"), "mask_schedule")])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        MaskGIT(dataclasses.replace(MaskGITConfig(**SMALL), **change), _tokenizer())


@pytest.mark.filterwarnings("ignore:VQGANConfig")
def test_registry_and_presets():
    cls, presets, tokenizer_system = generator_system("maskgit")
    assert cls is MaskGIT and tokenizer_system == "vqgan" and MaskGIT.parallel_decoding
    tiny = MaskGIT(presets["tiny"].model, vqgan.Model(vqgan.PRESETS["tiny"].model))
    assert tiny.shape == (8, 8) and tiny.codebook_size == 128 and presets["tiny"].data.name == "digits"
    with torch.device("meta"):    # MaskGIT's ImageNet 256 transformer: 24 layers of width 768 on 16x16 codes
        base = MaskGIT(PRESETS["maskgit"]["base"].model, vqgan.Model(vqgan.PRESETS["base"].model))
    assert base.shape == (16, 16) and base.cfg.steps == 8 and base.cfg.label_smoothing == 0.1
    assert 165e6 < sum(p.numel() for p in base.parameters()) < 180e6
