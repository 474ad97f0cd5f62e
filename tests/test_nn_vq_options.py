"""VectorQuantize's forward options and codebook-update options against vector-quantize-pytorch:
mask / lens, topk, directional_reparam, route_gradients_to_input, the in-place codebook optimizer,
manual / weighted / accumulated / skipped EMA updates, update_indices; and what only ours states:
padded tokens change nothing, dead codes restart from distinct valid rows, no host sync."""

import copy

import pytest
import torch

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn.codebook import Codebook
from vqkernels.nn.vq import VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch")

LENS = torch.tensor([9, 4, 1])
MASK = torch.arange(9) < LENS[:, None]


def _pair(kw):
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(**kw)
    # a module option (vq_bridge) is each layer's own: a copy for ours, which takes theirs' weights below
    ours = VectorQuantize(**{k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in kw.items()})
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _compare_steps(kw, forward_kw, steps=3, train=True, between=None):
    """Runs both layers on the same batches (same seed before each call): outputs, indices, losses,
    input and codebook gradients and every buffer agree after every step."""
    theirs, ours = _pair(kw)
    theirs.train(train)
    ours.train(train)
    for step in range(steps):
        x = torch.randn(3, 9, kw["dim"], generator=torch.Generator().manual_seed(100 + step))
        x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        q_t, i_t, l_t, *rest_t = theirs(x_t, **forward_kw(step))
        torch.manual_seed(step)
        q_o, i_o, l_o, *rest_o = ours(x_o, **forward_kw(step))
        if between is not None:
            between(theirs, ours, step)
        assert torch.equal(i_o, i_t), step
        assert q_o.shape == q_t.shape and l_o.shape == l_t.shape
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
        for b_o, b_t in zip(rest_o, rest_t):
            for name in b_t._fields:
                torch.testing.assert_close(getattr(b_o, name).detach().float(), getattr(b_t, name).detach().float(),
                                           rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        if train:
            (q_t.square().sum() + l_t.sum()).backward()
            (q_o.square().sum() + l_o.sum()).backward()
            torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-5, atol=1e-6)
            for (name, p_t), (_, p_o) in zip(theirs.named_parameters(), ours.named_parameters()):
                assert (p_t.grad is None) == (p_o.grad is None), name
                if p_t.grad is not None:  # sums over every token, in each BLAS's order: error ~ the largest entry
                    scale = float(p_t.grad.abs().max())
                    torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-5, atol=max(1e-6, 1e-5 * scale))
        state_t, state_o = theirs.state_dict(), ours.state_dict()
        for name, value in state_t.items():
            torch.testing.assert_close(state_o[name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"step {step} {name}: {m}")
    return theirs, ours


BASE = dict(dim=16, codebook_size=32)
LEARNED = dict(BASE, learnable_codebook=True, ema_update=False)


@pytest.mark.parametrize("kw", [dict(BASE, rotation_trick=False), BASE, LEARNED,
                                dict(BASE, threshold_ema_dead_code=0.5), dict(BASE, return_zeros_for_masked_padding=False)],
                         ids=str)
def test_mask_matches_vector_quantize_pytorch(kw):
    _compare_steps(kw, lambda step: dict(mask=MASK))


def test_mask_with_channel_first_tokens():
    """[B, dim, N] inputs take the same [B, N] mask (theirs fails there: it masks before transposing)."""
    torch.manual_seed(0)
    last, first = VectorQuantize(**BASE).eval(), VectorQuantize(**BASE, channel_last=False).eval()
    first.load_state_dict(last.state_dict())
    x = torch.randn(3, 9, 16)
    q_l, i_l, _ = last(x, mask=MASK)
    q_f, i_f, _ = first(x.transpose(1, 2), lens=LENS)
    assert torch.equal(i_f, i_l) and torch.equal(q_f, q_l.transpose(1, 2))


def test_lens_is_the_mask_of_the_lengths():
    _compare_steps(BASE, lambda step: dict(lens=LENS))
    layer = VectorQuantize(**BASE).train()
    x = torch.randn(3, 9, 16)
    q, idx, _ = layer(x, lens=LENS)
    assert torch.equal(idx >= 0, MASK) and torch.all(q[~MASK] == 0)


@pytest.mark.parametrize("kw", [dict(BASE, heads=2, codebook_dim=8),
                                dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True),
                                dict(BASE, codebook_dim=4, threshold_ema_dead_code=1e-3),
                                dict(BASE, use_cosine_sim=True)], ids=str)
def test_padded_tokens_change_nothing(kw):
    """A padded batch trains the layer exactly as its valid tokens alone ([1, M, dim]): same codebook
    state, loss and outputs of the valid tokens (padding: index -1, output 0, no gradient)."""
    torch.manual_seed(0)
    padded, alone = VectorQuantize(**kw).train(), VectorQuantize(**kw).train()
    alone.load_state_dict(padded.state_dict())
    for step in range(3):
        x = torch.randn(3, 9, 16).requires_grad_()
        valid = x.detach()[MASK].unsqueeze(0).requires_grad_()
        q_p, i_p, l_p = padded(x, mask=MASK)
        q_a, i_a, l_a = alone(valid)
        assert torch.equal(i_p[MASK], i_a[0]) and torch.all(i_p[~MASK] == -1)
        torch.testing.assert_close(q_p[MASK], q_a[0])
        assert torch.all(q_p[~MASK] == 0)
        torch.testing.assert_close(l_p, l_a, rtol=1e-5, atol=1e-7)
        (q_p.square().sum() + l_p).backward()
        (q_a.square().sum() + l_a).backward()
        torch.testing.assert_close(x.grad[MASK], valid.grad[0], rtol=1e-5, atol=1e-7)
        assert torch.all(x.grad[~MASK] == 0)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(padded.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"step {step} {name}: {m}")


def test_all_tokens_padded_gives_zero_losses_and_leaves_the_codes():
    layer = VectorQuantize(**BASE).train()
    before = layer.codebook.clone()
    q, idx, loss = layer(torch.randn(2, 5, 16), mask=torch.zeros(2, 5, dtype=torch.bool))
    assert float(loss) == 0.0 and torch.all(idx == -1) and torch.all(q == 0)
    # no rows: the EMA statistics decay towards zero counts; the codes are recomputed from them
    assert torch.isfinite(layer.codebook).all() and layer.codebook.shape == before.shape


@pytest.mark.parametrize("kw", [BASE, dict(BASE, rotation_trick=False, use_cosine_sim=True),
                                dict(LEARNED, rotation_trick=False), dict(BASE, codebook_dim=8, commitment_weight=0.5)],
                         ids=str)
@pytest.mark.parametrize("train", [False, True])
def test_topk_matches_vector_quantize_pytorch(kw, train):
    """topk: the k nearest codes, nearest first ([B, N, k] indices, [B, N, k, dim] outputs), a
    per-token loss [B, N, k]; no codebook update; padded tokens -1 / 0 / loss 0."""
    _compare_steps(kw, lambda step: dict(topk=3), train=train)
    _compare_steps(kw, lambda step: dict(topk=4, mask=MASK), train=train)


def test_topk_layouts_and_limits():
    layer = VectorQuantize(dim=8, codebook_size=5, accept_image_fmap=True).eval()
    q, idx, loss = layer(torch.randn(2, 8, 3, 4), topk=9)  # k is capped at the codebook size
    assert q.shape == (2, 8, 3, 4, 5) and idx.shape == (2, 3, 4, 5) and loss.shape == (2, 3, 4, 5)
    assert torch.equal(idx.sort(-1).values, torch.arange(5).expand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="topk"):
        VectorQuantize(dim=8, codebook_size=5, heads=2)(torch.randn(2, 3, 8), topk=2)


def test_directional_reparam_matches_vector_quantize_pytorch():
    """Defaults as theirs (learned codes, no EMA, no rotation, no commitment loss); the noise is drawn
    with the same generator calls, so outputs and gradients agree bit for bit up to rounding."""
    kw = dict(BASE, directional_reparam=True, threshold_ema_dead_code=1e-3)
    theirs, ours = _compare_steps(kw, lambda step: {})
    assert ours.learnable_codebook and not ours.ema_update and not ours.rotation_trick
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        VectorQuantize(dim=8, codebook_size=4, directional_reparam=True)
    with pytest.raises(ValueError, match="exclude"):
        VectorQuantize(dim=8, codebook_size=4, directional_reparam=True, rotation_trick=True,
                       threshold_ema_dead_code=1)


def test_route_gradients_to_input_false_sends_the_output_gradient_to_the_codes():
    theirs, ours = _compare_steps(dict(LEARNED, route_gradients_to_input=False), lambda step: {})
    x = torch.randn(2, 3, 16, requires_grad=True)
    q, _, _ = ours.train()(x)
    q.sum().backward()
    assert x.grad is None or torch.all(x.grad == 0)


@pytest.mark.parametrize("forward_kw", [dict(return_loss_breakdown=True), dict(mask=MASK)], ids=str)
def test_in_place_codebook_optimizer_matches_vector_quantize_pytorch(forward_kw):
    kw = dict(LEARNED, in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    theirs, ours = _compare_steps(kw, lambda step: forward_kw)
    assert ours.in_place_codebook_optimizer.param_groups[0]["params"] == [ours._codebook.embed]


def test_in_place_codebook_optimizer_manual_update():
    kw = dict(LEARNED, in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
              manual_in_place_optimizer_update=True)
    _compare_steps(kw, lambda step: {},
                   between=lambda theirs, ours, step: (theirs.update_in_place_optimizer(),
                                                       ours.update_in_place_optimizer()))
    with pytest.raises(ValueError, match="learnable_codebook"):
        VectorQuantize(dim=8, codebook_size=4, in_place_codebook_optimizer=torch.optim.SGD)


@pytest.mark.parametrize("kw,forward_kw", [
    (dict(BASE, threshold_ema_dead_code=1e-3), lambda step: dict(ema_update=False)),
    (BASE, lambda step: dict(ema_update=step != 1)),
    (BASE, lambda step: dict(ema_update_weight=torch.linspace(0, 1, 32))),
    (dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True),
     lambda step: dict(ema_update_weight=torch.rand(2, 32, generator=torch.Generator().manual_seed(1)))),
    (BASE, lambda step: dict(ema_update_weight=lambda sums, counts: (counts > 0).float())),
    (BASE, lambda step: dict(accum_ema_update=step < 2)),
    (dict(BASE, threshold_ema_dead_code=1e-3), lambda step: dict(accum_ema_update=step == 1, mask=MASK)),
], ids=["skip-with-dead-codes", "skip-one-step", "weight", "weight-per-head", "weight-fn", "accumulate",
        "accumulate-masked"])
def test_ema_update_options_match_vector_quantize_pytorch(kw, forward_kw):
    _compare_steps(kw, forward_kw)


def test_manual_ema_update_matches_vector_quantize_pytorch():
    def update(theirs, ours, step):
        if step == 1:
            theirs._codebook.update_ema()
            ours.update_ema()
    theirs, ours = _compare_steps(dict(BASE, manual_ema_update=True), lambda step: {}, between=update)
    # without the explicit call the codes stay; the statistics move
    codes, counts = ours.codebook.clone(), ours._codebook.cluster_size.clone()
    ours(torch.randn(2, 9, 16))
    assert torch.equal(ours.codebook, codes) and not torch.equal(ours._codebook.cluster_size, counts)


@pytest.mark.parametrize("kw", [BASE, dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True),
                                dict(BASE, use_cosine_sim=True, threshold_ema_dead_code=1e-3)], ids=str)
def test_update_indices_matches_vector_quantize_pytorch(kw):
    """update_indices / update_ema_indices: the codebook learns from given codes (masked tokens count nowhere)."""
    theirs, ours = _pair(kw)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 16, generator=g)
    shape = (3, 9, 2) if kw.get("heads") else (3, 9)
    codes = torch.randint(0, 32, shape, generator=g)
    theirs.update_indices(x, codes, mask=MASK)
    ours.update_indices(x, codes, mask=MASK)
    theirs.update_ema_indices(x, codes)
    ours.update_ema_indices(x, codes)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_mask_errors():
    layer = VectorQuantize(**BASE)
    x = torch.randn(3, 9, 16)
    with pytest.raises(ValueError, match="not both"):
        layer(x, mask=MASK, lens=LENS)
    with pytest.raises(ValueError, match="bool"):
        layer(x, mask=MASK.float())
    with pytest.raises(ValueError, match=r"\[B=3, N=9\]"):
        layer(x, mask=MASK[:, :5])
    with pytest.raises(ValueError, match="feature maps"):
        VectorQuantize(dim=16, codebook_size=8, accept_image_fmap=True)(torch.randn(3, 16, 2, 2), mask=MASK)
    with pytest.raises(ValueError, match="ema_update_weight"):
        layer.train()(x, ema_update_weight=torch.ones(7))


def test_dead_codes_restart_from_distinct_valid_rows():
    """More dead codes than valid rows: exactly that many codes restart, each from a different valid row;
    the padded rows are never drawn; over many draws every valid row is drawn about equally often."""
    counts = torch.zeros(6)
    for seed in range(300):
        torch.manual_seed(seed)
        cb = Codebook(4, 10, threshold_ema_dead_code=0.5)
        cb.cluster_size.zero_()  # every code dead
        rows = torch.arange(12.0).unsqueeze(1).expand(12, 4).contiguous()
        valid = torch.zeros(12, dtype=torch.bool)
        valid[[1, 3, 4, 7, 8, 11]] = True
        cb.update_(0, rows, torch.full((12,), -1), valid=valid, ema_update=False)
        restarted = cb.cluster_size[0] == 0.5
        assert int(restarted.sum()) == 6
        drawn = cb.embed[0][restarted][:, 0]
        assert sorted(drawn.tolist()) == [1.0, 3.0, 4.0, 7.0, 8.0, 11.0]
        first = drawn[torch.argsort(restarted.nonzero()[:, 0])][0]
        counts[[1, 3, 4, 7, 8, 11].index(int(first))] += 1
    # the row taken by the lowest restarted code: uniform over the 6 valid rows (50 expected each)
    assert counts.min() > 25 and counts.max() < 80, counts


def test_masked_training_compiles_without_graph_breaks():
    from nn_helpers import assert_compiled_training_matches_eager

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vq = VectorQuantize(dim=16, codebook_size=32, threshold_ema_dead_code=1.0)

        def forward(self, x):
            return self.vq(x, mask=MASK[:2])

    g = torch.Generator().manual_seed(5)
    assert_compiled_training_matches_eager(Masked, [torch.randn(2, 9, 16, generator=g) for _ in range(3)])


@pytest.mark.parametrize("kw", [dict(BASE, stochastic_sample_codes=True, sample_codebook_temp=0.5),
                                dict(BASE, stochastic_sample_codes=True, use_cosine_sim=True, sample_codebook_temp=0.1),
                                dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                     stochastic_sample_codes=True)], ids=str)
def test_stochastic_sample_codes_matches_vector_quantize_pytorch(kw, monkeypatch):
    """Sampled codes in training: the same scores and Gumbel noise as theirs, drawn from the generator in the
    same order even in small row chunks, so the same draws for the same seed; outputs, losses, gradients and
    EMA codebooks follow."""
    from vqkernels.nn import _scores
    monkeypatch.setattr(_scores, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(_scores, "SAMPLE_CHUNK_ELEMENTS", 100)
    _compare_steps(kw, lambda step: {})
    # theirs' masked commitment loss reads the raw input (differs with cosine) and fails with heads
    masked = kw.get("heads", 1) == 1 and not kw.get("use_cosine_sim")
    _compare_steps(kw, lambda step: dict(sample_codebook_temp=2.0, **(dict(mask=MASK) if masked else {})))


def test_sampled_codes_follow_the_softmax_of_minus_the_distance():
    """One row, 4 codes: over 4000 draws each code's frequency is within 5 standard deviations of
    softmax(-||x - c|| / T); eval mode and temperature 0 take the nearest code."""
    layer = VectorQuantize(dim=2, codebook_size=4, stochastic_sample_codes=True, sample_codebook_temp=0.7,
                           ema_update=False, rotation_trick=False)
    with torch.no_grad():
        layer.codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.5, -1.5]])
    x = torch.full((1, 4000, 2), 0.2)
    torch.manual_seed(0)
    _, idx, _ = layer.train()(x)
    freq = torch.bincount(idx.reshape(-1), minlength=4).double() / idx.numel()
    want = torch.softmax(-torch.cdist(x[0, :1].double(), layer.codebook.double())[0] / 0.7, -1)
    sd = (want * (1 - want) / idx.numel()).sqrt()
    assert torch.all((freq - want).abs() < 5 * sd), (freq, want)
    assert torch.all(layer(x, sample_codebook_temp=0.0)[1] == 0)
    assert torch.all(layer.eval()(x)[1] == 0)


def test_sampled_training_compiles_without_graph_breaks():
    layer = VectorQuantize(**BASE, stochastic_sample_codes=True).train()
    step = torch.compile(lambda x: layer(x), fullgraph=True)
    q, idx, loss = step(torch.randn(2, 9, 16))
    assert q.shape == (2, 9, 16) and idx.min() >= 0 and idx.max() < 32 and torch.isfinite(loss)


@pytest.mark.parametrize("kw", [dict(BASE, codebook_dim=8, layernorm_after_project_in=True),
                                dict(BASE, vq_bridge=torch.nn.Linear(16, 16), rotation_trick=False),
                                dict(LEARNED, sync_update_v=0.5),
                                dict(LEARNED, sync_update_v=0.25, route_gradients_to_input=False)], ids=str)
def test_projection_bridge_and_sync_update_match_vector_quantize_pytorch(kw):
    """layernorm_after_project_in (their state_dict names), vq_bridge (a learned map of the codes before the
    search: same outputs, bridge gradients and codes) and sync_update_v."""
    theirs, ours = _compare_steps(kw, lambda step: {})
    if "vq_bridge" in kw:
        assert ours._codebook.vq_bridge.weight.grad is not None
        ours.eval()
        q, idx, _ = ours(torch.randn(2, 5, 16))
        torch.testing.assert_close(ours.get_output_from_indices(idx), q)
    with pytest.raises(ValueError, match="sync_update_v"):
        VectorQuantize(**BASE, sync_update_v=0.5)


FIXED = dict(BASE, ema_update=False)


@pytest.mark.parametrize("kw", [dict(FIXED, commitment_use_cross_entropy_loss=True),
                                dict(LEARNED, commitment_use_cross_entropy_loss=True, rotation_trick=False),
                                dict(FIXED, heads=2, codebook_dim=8, commitment_use_cross_entropy_loss=True),
                                dict(FIXED, codebook_diversity_loss_weight=0.5),
                                dict(FIXED, codebook_diversity_loss_weight=1.0, codebook_diversity_temperature=3.0,
                                     heads=2, codebook_dim=8, separate_codebook_per_head=True),
                                dict(LEARNED, codebook_diversity_loss_weight=0.3),
                                dict(FIXED, straight_through=True, rotation_trick=False, route_gradients_to_input=False,
                                     sample_codebook_temp=0.7),
                                dict(BASE, straight_through=True, rotation_trick=False)], ids=str)
def test_score_losses_match_vector_quantize_pytorch(kw, monkeypatch):
    """The options theirs computes from the full [N, K] scores, here in checkpointed row chunks (a small chunk,
    so several run): the cross-entropy commitment, the codebook-diversity entropy and the Gumbel
    straight-through gradient; same losses, breakdown, input and codebook gradients. Codebooks that do not
    move during the step: with an EMA codebook theirs' backward reads the codes its update wrote in place
    after the scores were computed (``embed.data.copy_``), ours the codes the scores used."""
    from vqkernels.nn import _scores
    monkeypatch.setattr(_scores, "CHUNK_ELEMENTS", 200)
    _compare_steps(kw, lambda step: dict(return_loss_breakdown=True))


def test_score_losses_with_an_ema_codebook_use_the_codes_of_the_forward():
    """With EMA updates the values still match theirs; the input gradient is the exact one of the scores
    computed with the step's codes (checked against autograd on a float64 copy)."""
    torch.manual_seed(0)
    layer = VectorQuantize(**BASE, commitment_use_cross_entropy_loss=True, rotation_trick=False).train()
    codes = layer.codebook.detach().double().clone()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    xo = x.float().requires_grad_()
    _, idx, loss = layer(xo)
    loss.backward()
    xd = x.clone().requires_grad_()
    d = (xd.reshape(-1, 16).square().sum(-1, keepdim=True) + codes.square().sum(-1) - 2 * xd.reshape(-1, 16) @ codes.T)
    want = torch.nn.functional.cross_entropy(-d.clamp(min=1e-8).sqrt(), idx.reshape(-1))
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_cross_entropy_to_given_indices_matches_vector_quantize_pytorch(train):
    theirs, ours = _pair(FIXED)
    theirs.train(train)
    ours.train(train)
    x = torch.randn(3, 9, 16)
    codes = torch.randint(0, 32, (3, 9))
    codes[0, 2] = -1  # ignored
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_t, ce_t = theirs(x_t, indices=codes)
    q_o, ce_o = ours(x_o, indices=codes)
    torch.testing.assert_close(q_o, q_t)
    torch.testing.assert_close(ce_o, ce_t)
    ce_t.backward()
    ce_o.backward()
    torch.testing.assert_close(x_o.grad, x_t.grad)


@pytest.mark.parametrize("kw,forward_kw", [(dict(BASE, affine_param=True), {}),
                                           (dict(BASE, affine_param=True, affine_param_batch_decay=0.5,
                                                 affine_param_codebook_decay=0.7, threshold_ema_dead_code=1e-3),
                                            dict(mask=MASK)),
                                           (dict(BASE, affine_param=True, heads=2, codebook_dim=8,
                                                 separate_codebook_per_head=True), {})], ids=str)
def test_affine_param_matches_vector_quantize_pytorch(kw, forward_kw):
    """affine_param: running batch and codebook statistics (the batch ones also in eval mode, as theirs), the
    search on the mapped codes, the EMA in code space: same outputs, losses, gradients and buffers, in training
    and then in eval mode."""
    theirs, ours = _compare_steps(kw, lambda step: forward_kw)
    theirs.eval()
    ours.eval()
    x = torch.randn(3, 9, 16)
    q_t, i_t, _ = theirs(x, **forward_kw)
    q_o, i_o, _ = ours(x, **forward_kw)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value)
    fresh = VectorQuantize(**kw)
    fresh.load_state_dict(ours.state_dict())  # batch statistics created by the load
    torch.testing.assert_close(fresh._codebook.batch_variance, ours._codebook.batch_variance)
    with pytest.raises(ValueError, match="affine_param"):
        VectorQuantize(**BASE, affine_param=True, use_cosine_sim=True)


@pytest.mark.parametrize("kw", [LEARNED, dict(BASE, rotation_trick=False)], ids=str)
def test_codebook_transform_fn_matches_vector_quantize_pytorch(kw):
    """Forward's codebook_transform_fn: every token searches its own codes (here theirs' QINCo MLP conditioned
    per token); same indices, outputs, losses, input and transform gradients."""
    from vector_quantize_pytorch.residual_vq import MLP
    theirs, ours = _pair(kw)
    mlp_t, mlp_o = MLP(16), MLP(16)
    mlp_o.load_state_dict(mlp_t.state_dict())
    for step in range(2):
        x, cond = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_t, i_t, l_t = theirs(x_t, codebook_transform_fn=lambda codes: mlp_t(codes, condition=cond))
        q_o, i_o, l_o = ours(x_o, codebook_transform_fn=lambda codes: mlp_o(codes, condition=cond))
        assert torch.equal(i_o, i_t)
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_o, l_t)
        (q_t.square().sum() + l_t).backward()
        (q_o.square().sum() + l_o).backward()
        torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-5, atol=1e-5)
        for p_t, p_o in zip(mlp_t.parameters(), mlp_o.parameters()):
            assert (p_t.grad is None) == (p_o.grad is None)
            if p_t.grad is not None:
                torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-5, atol=1e-6)


def test_masked_sequences_without_tokens():
    """A masked batch of empty sequences: empty outputs and indices, zero losses (the masked mean of no row)."""
    from vqkernels.nn import ResidualVQ
    empty, no_tokens = torch.randn(2, 0, 16), torch.ones(2, 0, dtype=torch.bool)
    q, idx, loss = VectorQuantize(**BASE).train()(empty, mask=no_tokens)
    assert q.shape == (2, 0, 16) and idx.shape == (2, 0) and float(loss) == 0.0
    q, idx, losses = ResidualVQ(dim=16, num_quantizers=2, codebook_size=8).train()(empty, mask=no_tokens)
    assert q.shape == (2, 0, 16) and idx.shape == (2, 0, 2) and torch.all(losses == 0)
