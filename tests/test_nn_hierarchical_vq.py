"""vqkernels.nn.HierarchicalVQ against vector-quantize-pytorch's: state_dict, training steps (outputs, indices,
losses, input / parameter gradients, buffers), mask / lens, nested dropout's draws, get_output_from_indices;
k-means init and dead-code restart, odd inputs, dtypes, torch.compile, errors."""

import copy
import inspect
import random

import pytest
import torch

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import HierarchicalVQ
from vqkernels.nn.vq import VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch")
their_module = pytest.importorskip("vector_quantize_pytorch.hierarchical_vq")

TOL = dict(rtol=1e-5, atol=1e-6)
# Exact comparisons start from the same codes (no k-means init, whose draws differ) and without dead-code
# restart (theirs draws the restarted rows differently); both are tested on their own below.
EXACT = dict(kmeans_init=False, threshold_ema_dead_code=0)
SEQ = dict(EXACT, dim=8, codebook_size=16, scales=(1, 2, 4))

CONFIGS = {
    "seq": (SEQ, (3, 8, 7)),
    "seq-per-level-codebooks": (dict(SEQ, codebook_size=(16, 8, 32), shared_codebook=False, decay=0.8,
                                     commitment_weight=0.5), (3, 8, 7)),
    "image-rect-scales-two-phis": (dict(EXACT, dim=8, codebook_size=(16, 8, 4, 12), scales=(1, 2, (2, 3), (4, 5)),
                                        shared_codebook=False, share_quant_resi=2, accept_image_fmap=True),
                                   (2, 8, 6, 5)),
    "video-channel-last-no-phi": (dict(EXACT, dim=8, codebook_size=16, scales=(1, (1, 2, 2), (2, 3, 3)),
                                       accept_3d_fmap=True, channel_first=False, quant_resi=0.0), (2, 3, 4, 5, 8)),
    "phi-per-level-rotation": (dict(SEQ, scales=(1, 3, 5, 7), share_quant_resi=0, rotation_trick=True,
                                    quant_resi=-0.3), (2, 8, 9)),
    "orthogonal-reg": (dict(SEQ, codebook_size=(16, 8, 32), shared_codebook=False, orthogonal_reg_weight=0.3,
                            orthogonal_reg_active_codes_only=True), (3, 8, 7)),
    "finest-above-input": (dict(SEQ, scales=(2, 5, 11)), (2, 8, 7)),
}


def _pair(kw, dtype=torch.float32):
    torch.manual_seed(0)
    theirs = vqp.HierarchicalVQ(**kw).to(dtype)
    ours = HierarchicalVQ(**kw).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _batch(shape, step, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + step), dtype=dtype)


def _run_step(theirs, ours, x, step, forward_kw=None, backward=True, tol=TOL):
    """One call of both on copies of x (same torch seed before each): indices, reconstruction, loss, cutoff,
    and after a backward the input and parameter gradients and every buffer agree. Returns ours' results."""
    forward_kw = forward_kw or {}
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(step)
    r_t, i_t, l_t, c_t = theirs(x_t, return_cutoff=True, **forward_kw)
    torch.manual_seed(step)
    r_o, i_o, l_o, c_o = ours(x_o, return_cutoff=True, **forward_kw)
    assert c_o == c_t, step
    assert len(i_o) == len(i_t) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(i_o, i_t)), step
    assert r_o.shape == r_t.shape and r_o.dtype == r_t.dtype and l_o.shape == l_t.shape
    torch.testing.assert_close(r_o, r_t, **tol, msg=lambda m: f"step {step} reconstruction: {m}")
    torch.testing.assert_close(l_o, l_t, **tol, msg=lambda m: f"step {step} loss: {m}")
    if backward:
        weight = torch.randn(r_t.shape, generator=torch.Generator().manual_seed(step), dtype=r_t.dtype)
        ((r_t * weight).sum() + l_t).backward()
        ((r_o * weight).sum() + l_o).backward()
        torch.testing.assert_close(x_o.grad, x_t.grad, **tol, msg=lambda m: f"step {step} x.grad: {m}")
        params_o = dict(ours.named_parameters())
        for name, p_t in theirs.named_parameters():
            assert (p_t.grad is None) == (params_o[name].grad is None), name
            if p_t.grad is not None:
                torch.testing.assert_close(params_o[name].grad, p_t.grad, **tol,
                                           msg=lambda m, name=name: f"step {step} {name}.grad: {m}")
    state_o = ours.state_dict()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(state_o[name], value, **tol, msg=lambda m, name=name: f"step {step} {name}: {m}")
    return r_o, i_o, l_o, c_o


def _compare_steps(kw, shape, forward_kw=lambda step: {}, steps=3, train=True, dtype=torch.float32, tol=TOL):
    theirs, ours = _pair(kw, dtype)
    theirs.train(train)
    ours.train(train)
    for step in range(steps):
        _run_step(theirs, ours, _batch(shape, step, dtype), step, forward_kw(step), backward=train, tol=tol)
    return theirs, ours


@pytest.mark.parametrize("method", ["__init__", "forward", "get_output_from_indices", "get_vq"])
def test_signatures_are_theirs(method):
    """Same keywords, order and defaults as theirs (a drop-in)."""
    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, method)).parameters.values()]
    assert params(HierarchicalVQ) == params(vqp.HierarchicalVQ)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trips_with_theirs(name):
    kw, _ = CONFIGS[name]
    theirs, ours = _pair(kw)  # their state loads strictly into ours
    state_t, state_o = theirs.state_dict(), ours.state_dict()
    assert set(state_o) == set(state_t)
    assert all(state_o[k].shape == state_t[k].shape and state_o[k].dtype == state_t[k].dtype for k in state_t)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}
    fresh = vqp.HierarchicalVQ(**kw)
    fresh.load_state_dict(state_o, strict=True)  # and ours into theirs
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state_o.items())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_steps_match_theirs(name):
    kw, shape = CONFIGS[name]
    _compare_steps(kw, shape)


@pytest.mark.parametrize("name", ["seq", "image-rect-scales-two-phis", "video-channel-last-no-phi"])
def test_eval_and_get_output_from_indices_match_theirs(name):
    kw, shape = CONFIGS[name]
    theirs, ours = _compare_steps(kw, shape, steps=2)  # trained a little, then evaluated
    theirs.eval()
    ours.eval()
    x = _batch(shape, 7)
    r_o, i_o, l_o, c_o = _run_step(theirs, ours, x, 7, backward=False)
    assert float(l_o) == 0.0 and c_o is None
    spatial = x.shape[2:] if ours.channel_first else x.shape[1:-1]
    decoded = ours.get_output_from_indices(i_o, full_shape=tuple(spatial))
    torch.testing.assert_close(decoded, theirs.get_output_from_indices(i_o, full_shape=tuple(spatial)), **TOL)
    torch.testing.assert_close(decoded, r_o, **TOL)  # the eval reconstruction, from the indices alone
    # default size: the finest scale; index -1 contributes nothing
    holes = tuple(i.masked_fill(torch.rand(i.shape, generator=torch.Generator().manual_seed(3)) < 0.4, -1)
                  for i in i_o)
    torch.testing.assert_close(ours.get_output_from_indices(holes), theirs.get_output_from_indices(holes), **TOL)


MASK = torch.tensor([[True] * 7, [True, True, True, False, False, False, False], [False] * 7])


@pytest.mark.parametrize("forward_kw", [dict(mask=MASK), dict(lens=torch.tensor([7, 3, 1]))], ids=["mask", "lens"])
@pytest.mark.parametrize("name", ["seq", "seq-per-level-codebooks"])
def test_mask_and_lens_match_theirs(name, forward_kw):
    """Masked pooling (the coarsest level: the masked mean), a level's token valid when any position of its
    window is, the VQs' masks, padded positions 0; a row with no valid position (MASK's last) included."""
    kw, shape = CONFIGS[name]
    _compare_steps(kw, shape, lambda step: forward_kw)


def test_image_mask_matches_theirs():
    kw, shape = CONFIGS["image-rect-scales-two-phis"]
    mask = torch.rand(shape[0], *shape[2:], generator=torch.Generator().manual_seed(4)) > 0.5
    _, ours = _compare_steps(kw, shape, lambda step: dict(mask=mask))
    r = ours(_batch(shape, 9), mask=mask)[0]
    assert torch.all(r.masked_select(~mask.unsqueeze(1)) == 0)


def test_masked_positions_change_nothing():
    """Whatever the padded positions hold, the layer's results and its codebook updates are the same."""
    kw, shape = CONFIGS["seq-per-level-codebooks"]
    _, a = _pair(kw)
    _, b = _pair(kw)
    for step in range(2):
        x = _batch(shape, step)
        noisy = torch.where(MASK.unsqueeze(1), x, 1e3 * torch.randn_like(x))
        r_a, i_a, l_a = a(x, mask=MASK)
        r_b, i_b, l_b = b(noisy, mask=MASK)
        assert all(torch.equal(p, q) for p, q in zip(i_a, i_b))
        torch.testing.assert_close(r_b, r_a)
        torch.testing.assert_close(l_b, l_a)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)


@pytest.mark.parametrize("levels,probability,min_levels", [(4, 0.5, 1), (5, 1.0, 3), (3, 0.0, 1), (3, 0.9, 3),
                                                           (1, 0.9, 1)])
def test_nested_dropout_draws_are_theirs(monkeypatch, levels, probability, min_levels):
    """Their cutoff comes from random.Random(seed), the seed drawn from torch's generator; ours from Python's
    random: in the same state (random.seed(seed)) both give the same cutoff, so the distribution is theirs."""
    kw = dict(SEQ, scales=tuple(range(1, levels + 1)), nested_dropout=probability,
              nested_dropout_min_levels=min_levels)
    theirs, ours = _pair(kw)
    drawn = []
    for seed in range(300):
        monkeypatch.setattr(their_module, "get_maybe_sync_seed", lambda device, seed=seed: seed)
        random.seed(seed)
        cutoff = ours.sample_nested_cutoff()
        assert cutoff == theirs.sample_nested_cutoff("cpu"), seed
        drawn.append(cutoff)
    cut = [c for c in drawn if c is not None]
    if probability == 0 or min_levels >= levels:
        assert not cut
    else:
        assert abs(len(cut) / len(drawn) - probability) < 0.1
        assert set(cut) == set(range(min_levels - 1, levels - 1))
    ours.eval()
    assert ours.sample_nested_cutoff() is None


def test_nested_dropout_training_matches_theirs(monkeypatch):
    """With the same draw: the reconstruction after the cutoff level, the mean loss of the kept levels; every
    level still runs and updates its codebook."""
    kw = dict(SEQ, codebook_size=(16, 8, 32, 16), scales=(1, 2, 4, 7), shared_codebook=False, nested_dropout=0.7)
    theirs, ours = _pair(kw)
    before = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith("embed")}
    cutoffs = []
    for step, seed in enumerate([0, 1, 3, 5, 6]):
        monkeypatch.setattr(their_module, "get_maybe_sync_seed", lambda device, seed=seed: seed)
        random.seed(seed)
        cutoffs.append(_run_step(theirs, ours, _batch((3, 8, 7), step), step)[3])
    assert None in cutoffs and len(set(cutoffs) - {None}) >= 2, cutoffs
    assert all(not torch.equal(ours.state_dict()[k], v) for k, v in before.items())


def test_nested_dropout_keeps_a_prefix_of_the_levels():
    """A cut reconstruction is the sum of the kept levels only: decoding the kept levels' indices (the others -1)
    with the codes of before the step gives it (one codebook per level: each moves only after its level; no phi,
    whose bias a level of indices -1 would still add)."""
    torch.manual_seed(0)
    layer = HierarchicalVQ(**dict(CONFIGS["seq-per-level-codebooks"][0], nested_dropout=1.0, quant_resi=0.0))
    before = copy.deepcopy(layer).eval()
    random.seed(4)
    r, idx, _, cutoff = layer(_batch((2, 8, 7), 0), return_cutoff=True)
    assert cutoff is not None and cutoff < 2
    kept = tuple(i if level <= cutoff else torch.full_like(i, -1) for level, i in enumerate(idx))
    torch.testing.assert_close(r, before.get_output_from_indices(kept, full_shape=7), **TOL)


def test_kmeans_init_then_matches_theirs():
    """k-means init (default) draws differently from theirs: ours initialises the shared codebook on the first
    training call from level 0's tokens; from their state after init, the next steps agree."""
    kw = dict(dim=8, codebook_size=16, scales=(1, 2, 4), threshold_ema_dead_code=0)
    theirs, ours = _pair(kw)
    assert not ours.vq._codebook.initted
    x = _batch((20, 8, 7), 0)
    ours(x)
    assert ours.vq._codebook.initted and torch.isfinite(ours.vq.codebook).all()
    assert ours.vq.codebook.std(0).min() > 0  # distinct codes
    theirs(x)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not ours.vq._codebook.needs_init
    for step in range(1, 3):
        _run_step(theirs, ours, _batch((3, 8, 7), step), step)


def test_dead_codes_restart_from_their_level_tokens():
    """Default dead-code restart (threshold 2, every code dead at first): each level's restarted codes are that
    level's pooled tokens, as many as theirs restarts."""
    kw = dict(dim=8, codebook_size=(16, 16, 32), scales=(1, 2, 4), kmeans_init=False, shared_codebook=False)
    theirs, ours = _pair(kw)
    seen = {}
    for level, vq in enumerate(ours.vqs):
        vq.register_forward_hook(lambda mod, args, out, level=level: seen.__setitem__(level, args[0].detach()))
    x = _batch((3, 8, 7), 0)
    theirs(x)
    ours(x)
    for level, vq in enumerate(ours.vqs):
        restarted = vq._codebook.cluster_size[0] == 2
        assert int(restarted.sum()) == int((theirs.vqs[level]._codebook.cluster_size[0] == 2).sum()) > 0
        tokens = seen[level].reshape(-1, 8)
        distances = torch.cdist(vq.codebook[restarted], tokens)
        assert torch.all(distances.min(-1).values < 1e-5), level


def test_odd_inputs():
    kw, _ = CONFIGS["seq-per-level-codebooks"]
    # one position (every level upsampled from it), trains as theirs
    _compare_steps(kw, (2, 8, 1))
    # no samples: empty results, loss 0 (theirs: NaN, the mean of nothing); codebooks stay finite
    _, ours = _pair(kw)
    r, idx, loss = ours(torch.randn(0, 8, 7, requires_grad=True))
    assert r.shape == (0, 8, 7) and [i.shape for i in idx] == [(0, 1), (0, 2), (0, 4)]
    assert float(loss.detach()) == 0.0
    assert all(torch.isfinite(vq.codebook).all() for vq in ours.vqs)
    # every position padded: reconstruction 0, indices -1, loss 0 (theirs NaN), no codebook moves
    codes = [vq.codebook.clone() for vq in ours.vqs]
    r, idx, loss = ours(torch.randn(2, 8, 7), mask=torch.zeros(2, 7, dtype=torch.bool))
    assert torch.all(r == 0) and all(torch.all(i == -1) for i in idx) and float(loss.detach()) == 0.0
    assert all(torch.isfinite(vq.codebook).all() for vq in ours.vqs)
    assert all(c.shape == vq.codebook.shape for c, vq in zip(codes, ours.vqs))


def test_float64_matches_theirs():
    kw, shape = CONFIGS["image-rect-scales-two-phis"]
    # the codebooks' EMA statistics take the rows in float32 (VectorQuantize's Codebook), theirs in float64
    _compare_steps(kw, shape, dtype=torch.float64, tol=dict(rtol=1e-5, atol=1e-8))


def test_trains_under_cpu_autocast():
    kw, shape = CONFIGS["image-rect-scales-two-phis"]
    _, ours = _pair(kw)
    x = _batch(shape, 0).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, _, loss = ours(x)
    assert torch.isfinite(r.float()).all() and torch.isfinite(loss)
    (r.float().square().sum() + loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_stochastic_sample_codes_match_theirs():
    """Passed on to every level's VectorQuantize: theirs' sampled codes (the forward temperature overriding)."""
    kw = dict(SEQ, stochastic_sample_codes=True, sample_codebook_temp=1.0)
    _compare_steps(kw, (3, 8, 7))
    _compare_steps(kw, (3, 8, 7), lambda step: dict(sample_codebook_temp=0.5))
    # sampling: not always the nearest code
    _, ours = _pair(kw)
    x = _batch((3, 8, 7), 0)
    torch.manual_seed(0)
    sampled = ours(x)[1]
    ours.eval()
    assert any(not torch.equal(s, n) for s, n in zip(sampled, ours(x)[1]))


def test_vector_quantize_refusals_pass_through():
    """What VectorQuantize refuses, HierarchicalVQ refuses with VectorQuantize's error."""
    with pytest.raises(ValueError) as refused:
        VectorQuantize(dim=8, codebook_size=16, orthogonal_reg_max_codes=0)
    with pytest.raises(ValueError) as ours_refused:
        HierarchicalVQ(**dict(SEQ, orthogonal_reg_max_codes=0))
    assert str(ours_refused.value) == str(refused.value) and "orthogonal_reg_max_codes" in str(refused.value)


def test_phi_of_each_level_is_theirs():
    kw = dict(SEQ, scales=(1, 2, 3, 4, 5, 6), share_quant_resi=4)
    theirs, ours = _pair(kw)
    assert len(ours.phi_levels) == 4
    for level in range(6):
        want = list(theirs.phi_levels).index(theirs.choose_phi(level))
        assert ours._phi(level) is ours.phi_levels[want]


@pytest.mark.parametrize("name,forward_kw", [("seq", {}), ("image-rect-scales-two-phis", {}),
                                             ("seq-per-level-codebooks", dict(mask=MASK[:2]))])
def test_compiled_training_matches_eager(name, forward_kw):
    from nn_helpers import assert_compiled_training_matches_eager
    kw, shape = CONFIGS[name]

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = HierarchicalVQ(**kw)

        def forward(self, x):
            return self.layer(x, **forward_kw)

    assert_compiled_training_matches_eager(Step, [_batch((2, *shape[1:]), step) for step in range(3)])


def test_dead_code_restart_compiles_in_one_graph():
    """Default dead-code restart under torch.compile(fullgraph=True): the step's results are eager's and as many
    codes restart. (Which rows they take differs: inductor reorders the levels' randperm draws.)"""
    torch._dynamo.reset()
    kw = dict(dim=8, codebook_size=(16, 16, 32), scales=(1, 2, 4), kmeans_init=False, shared_codebook=False)
    torch.manual_seed(0)
    eager = HierarchicalVQ(**kw)
    compiled_layer = HierarchicalVQ(**kw)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = _batch((3, 8, 7), 0)
    r_e, i_e, l_e = eager(x)
    r_c, i_c, l_c = compiled(x)
    assert all(torch.equal(a, b) for a, b in zip(i_c, i_e))
    torch.testing.assert_close(r_c, r_e, **TOL)
    torch.testing.assert_close(l_c, l_e, **TOL)
    for vq_e, vq_c in zip(eager.vqs, compiled_layer.vqs):
        restarted = vq_c._codebook.cluster_size == 2
        assert int(restarted.sum()) == int((vq_e._codebook.cluster_size == 2).sum()) > 0
        assert torch.isfinite(vq_c.codebook).all()


def test_nested_dropout_under_compile_draws_eagerly():
    """The host draw runs outside the graph (a graph break; fullgraph refuses it), so compiled training draws
    afresh every call, as eager."""
    torch._dynamo.reset()
    kw = dict(SEQ, nested_dropout=0.8)
    torch.manual_seed(0)
    eager = HierarchicalVQ(**kw)
    compiled_layer = HierarchicalVQ(**kw)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(lambda x: compiled_layer(x, return_cutoff=True))
    cutoffs = []
    for step in range(6):
        x = _batch((2, 8, 7), step)
        random.seed(step)
        r_e, _, l_e, c_e = eager(x, return_cutoff=True)
        random.seed(step)
        r_c, _, l_c, c_c = compiled(x)
        assert c_c == c_e
        torch.testing.assert_close(r_c, r_e, **TOL)
        torch.testing.assert_close(l_c, l_e, **TOL)
        cutoffs.append(c_e)
    assert len(set(cutoffs)) > 1


def test_errors():
    layer = HierarchicalVQ(**SEQ)
    x = torch.randn(2, 8, 7)
    for bad in (torch.randn(2, 7, 7), torch.randn(2, 8), torch.randn(2, 8, 7, 3), torch.randn(2, 8, 0)):
        with pytest.raises(ValueError, match="HierarchicalVQ"):
            layer(bad)
    with pytest.raises(ValueError, match=r"\[B, H, W, dim\]"):
        HierarchicalVQ(**dict(SEQ, accept_image_fmap=True, channel_first=False))(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="not both"):
        layer(x, mask=MASK[:2], lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="bool"):
        layer(x, mask=MASK[:2].float())
    with pytest.raises(ValueError, match="bool"):
        layer(x, mask=MASK[:2, :5])
    with pytest.raises(ValueError, match="lens"):
        HierarchicalVQ(**dict(SEQ, accept_image_fmap=True))(torch.randn(2, 8, 4, 4), lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="get_output_from_indices"):
        layer(x, indices=(torch.zeros(2, 1),))
    for bad_kw, match in [(dict(accept_image_fmap=True, accept_3d_fmap=True), "exclude"),
                          (dict(nested_dropout=1.5), "nested_dropout"),
                          (dict(nested_dropout_min_levels=0), "nested_dropout_min_levels"),
                          (dict(scales=(2, 1)), "non-decreasing"), (dict(scales=()), "at least one"),
                          (dict(scales=(1, 0)), "at least one"), (dict(scales=(1, (2, 2))), "1 sizes"),
                          (dict(codebook_size=(8, 8)), "2 codebook sizes for 3 levels"),
                          (dict(codebook_size=(8, 8, 4)), "shared codebook"),
                          (dict(share_quant_resi=0.5), "share_quant_resi")]:
        with pytest.raises(ValueError, match=match):
            HierarchicalVQ(**dict(SEQ, **bad_kw))
    _, idx, _ = layer.eval()(x)
    with pytest.raises(ValueError, match="3 levels"):
        layer.get_output_from_indices(idx[:2])
    with pytest.raises(ValueError, match=r"level 1's indices must be \[B, 2\]"):
        layer.get_output_from_indices((idx[0], idx[2], idx[2]))
