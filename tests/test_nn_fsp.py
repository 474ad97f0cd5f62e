"""vqkernels.nn.FSP as a drop-in for vector-quantize-pytorch 1.32.0's FSP (finite scalar perturbation): with the
same seed the same outputs bit for bit in training (perturbation noise included) and eval, indices, losses,
statistics, input and projection gradients over training steps; public methods; state_dict; half precision;
odd inputs; bad options; torch.compile."""

import pytest
import torch
import vector_quantize_pytorch as vqp
from vector_quantize_pytorch.finite_scalar_perturbation import VectorNorm as TheirVectorNorm

from nn_helpers import assert_compiled_training_matches_eager, assert_same, pair_with_theirs
from vq_helpers import gen
from vqkernels.nn import FSP
from vqkernels.nn.fsp import VECTOR_NORM_PRESETS, VectorNorm

# (keywords, input shape, input scale)
CASES = {
    "default": (dict(levels=[8, 5, 5, 5]), (2, 33, 4), 1.0),
    "projections": (dict(levels=[8, 5, 5, 5], dim=16), (2, 33, 16), 1.0),
    "no-bias-rate": (dict(levels=[7, 6, 4], dim=8, projection_has_bias=False, quantize_rate=0.5), (3, 17, 8), 1.0),
    "sigmoid-var": (dict(levels=[6, 5, 3], act_name="sigmoid", vector_norm="var_sigmoid"), (2, 25, 3), 3.0),
    "normal-kurt": (dict(levels=[4, 4, 4], dim=5, act_name="normal", vector_norm="kurt", quantize_rate=0.25),
                    (2, 25, 5), 1.0),
    "laplace-inverse": (dict(levels=[7, 3], act_name="laplace", need_inv_act=True, quantize_rate=0.3,
                             vector_norm="var_laplace"), (2, 40, 2), 2.0),
    "cauchy-inverse-channel-first": (dict(levels=[6, 5], dim=5, act_name="cauchy", need_inv_act=True,
                                          channel_first=True, vector_norm="var"), (2, 5, 4, 3), 1.0),
    "channel-first-video": (dict(levels=[8, 5, 2], dim=6, channel_first=True, vector_norm="none"), (2, 6, 2, 3, 4),
                            1.0),
    "level-one-rate-one": (dict(levels=[5, 1, 9], quantize_rate=1.0), (2, 9, 3), 1.0),
    "float64": (dict(levels=[10, 3, 7], act_name="normal"), (2, 33, 3), 1.0),
}
DTYPES = {"float64": torch.float64}


def pair(kw, seed=0):
    return pair_with_theirs(vqp.FSP, FSP, kw, seed)


def run(module, x, seed):
    """A forward on a copy of x that takes gradients, after seeding torch's generator: (x copy, outputs)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    return x, module(x)


def assert_same_outputs(a, b):
    """Every output: quantized, indices, norm loss, the info dict (level indices, statistics, acceptance)."""
    for what, u, v in zip(("quantized", "indices", "norm_loss"), a, b):
        assert_same(u, v, what)
    assert set(a[3]) == set(b[3]) and set(a[3]["norm_info"]) == set(b[3]["norm_info"])
    assert_same(a[3]["level_indices"], b[3]["level_indices"], "level_indices")
    for name, stat in a[3]["norm_info"].items():
        assert_same(stat, b[3]["norm_info"][name], name)
    if "p_accept_prob" in a[3]:
        assert_same(a[3]["p_accept_prob"], b[3]["p_accept_prob"], "p_accept_prob")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_matches_vqp(case, training):
    """One seeded step: every output bitwise equal (in training the perturbation draws are theirs, call for
    call), then input and parameter gradients of sum(quantized * G) + norm_loss equal."""
    kw, shape, scale = CASES[case]
    theirs, ours = pair(kw)
    dtype = DTYPES.get(case, torch.float32)
    theirs.to(dtype).train(training), ours.to(dtype).train(training)
    x = (torch.randn(shape, generator=gen(1)) * scale).to(dtype)
    xa, a = run(theirs, x, 5)
    xb, b = run(ours, x, 5)
    assert_same_outputs(a, b)
    assert ("p_accept_prob" in b[3]) == (training and ours.quantize_rate < 1)
    assert b[0].requires_grad and b[2].requires_grad
    g = torch.randn(a[0].shape, generator=gen(2)).to(dtype)
    ((a[0] * g).sum() + a[2]).backward()
    ((b[0] * g).sum() + b[2]).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-7)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", ["projections", "no-bias-rate", "normal-kurt", "cauchy-inverse-channel-first"])
def test_training_steps_match_vqp(case):
    """Four SGD steps on the quantized output and the norm loss, each seeded alike: outputs, indices, losses,
    input gradients and parameters stay with theirs."""
    kw, shape, scale = CASES[case]
    theirs, ours = pair(kw)
    theirs.train(), ours.train()
    opt_a = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(4):
        x = torch.randn(shape, generator=gen(10 + step)) * scale
        target = torch.randn(shape, generator=gen(20 + step))
        xa, a = run(theirs, x, step)
        xb, b = run(ours, x, step)
        assert torch.equal(a[1], b[1]), f"step {step} indices"
        torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step} quantized: {m}")
        torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step} norm_loss: {m}")
        for opt, out in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            ((out[0] - target).square().mean() + out[2]).backward()
            opt.step()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} x.grad: {m}")
        for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"step {step} {name}: {m}")


def test_perturbation_behaviour():
    """Training (quantize_rate 0.25): about 75% of the values are the activation moved by at most half a bin
    (kept inside (0, 1)), the others their bin's midpoint; p_accept_prob is the share of offsets kept; another
    seed draws other noise; eval mode and quantize_rate 1 quantize everything; the indices never carry noise."""
    levels = torch.tensor([8, 5, 3])
    layer = FSP(levels=[8, 5, 3], quantize_rate=0.25, vector_norm="none")
    x = torch.randn(4, 2000, 3, generator=gen(3)) * 1.5
    act = (torch.tanh(x) + 1) / 2
    q_eval, idx_eval, _, info_eval = layer.eval()(x)
    midpoint = q_eval * 0.28867513459481287 + 0.5
    assert torch.allclose(midpoint, (info_eval["level_indices"] + 0.5) / levels, atol=1e-6)
    assert ((act - midpoint).abs() <= 0.5 / levels + 1e-6).all()
    torch.manual_seed(0)
    q_train, idx_train, _, info = layer.train()(x)
    assert torch.equal(idx_train, idx_eval) and torch.equal(info["level_indices"], info_eval["level_indices"])
    p = q_train * 0.28867513459481287 + 0.5
    quantized = (p - midpoint).abs() < 1e-6
    assert abs(quantized.float().mean().item() - 0.25) < 0.01
    moved = ~quantized
    assert ((p - act).abs()[moved] <= (0.5 / levels + 1e-6).expand_as(p)[moved]).all()
    assert ((p > 0) & (p < 1)).all()
    # a refused offset leaves the activation itself; p_accept_prob is the share kept, and an offset is refused
    # only where it would leave (0, 1), so at most for the activations within half a bin of 0 or 1
    refused = ((p - act).abs() < 1e-7) & moved
    accept = info["p_accept_prob"].item()
    assert abs(refused.sum().item() / moved.sum().item() - (1 - accept)) < 0.02
    near_edge = ((act < 0.5 / levels) | (act > 1 - 0.5 / levels)).float().mean().item()
    assert 1 - near_edge - 1e-3 <= accept < 0.99
    torch.manual_seed(1)
    assert not torch.equal(layer(x)[0], q_train)
    layer.quantize_rate = 1.0
    assert torch.equal(layer(x)[0], q_eval)


@pytest.mark.parametrize("name", list(VECTOR_NORM_PRESETS))
def test_vector_norm_presets_match_vqp(name):
    """Every preset: loss and statistics bitwise equal to theirs, the loss's gradient equal (the terms without
    weight, which ours leaves out, contribute nothing), and the attributes theirs has."""
    z = torch.randn(300, 5, generator=gen(4)) * 1.3 + 0.2
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    theirs, ours = TheirVectorNorm.build(name), VectorNorm.build(name)
    (la, sa), (lb, sb) = theirs(za), ours(zb)
    assert_same(la, lb, "loss")
    for stat in sa:
        assert_same(sa[stat], sb[stat], stat)
    la.backward(), lb.backward()
    torch.testing.assert_close(zb.grad, za.grad, rtol=1e-6, atol=1e-9)
    for attr in ("l1_target", "l1_weight", "l2_target", "l2_weight", "l3_target", "l3_weight", "l4_target",
                 "l4_weight", "eps"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


def test_norm_loss_drives_the_statistics():
    """The kurt preset's loss pulls the projected tokens' statistics to its targets: descending it alone moves
    mean, variance, skewness and kurtosis towards 0, 1, 0, 0."""
    torch.manual_seed(0)
    layer = FSP(levels=[8, 5, 5], dim=6, vector_norm="kurt")
    opt = torch.optim.Adam(layer.project_in.parameters(), lr=0.03)
    x = torch.distributions.Exponential(1.0).sample((512, 6)) * 3.0  # skewed, heavy-tailed, off-centre
    first = None
    for _ in range(150):
        _, _, loss, info = layer(x)
        first = first or (loss.item(), {k: v.detach().abs().mean().item() for k, v in info["norm_info"].items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first[0]
    stats = info["norm_info"]
    assert (stats["variance"] - 1).abs().max() < 0.2 and stats["mean"].abs().max() < 0.1


def test_methods_match_vqp():
    """indices_to_codes over the whole codebook (theirs', and the eval forward's output of those codes),
    indices_to_level_indices, indices_to_act_value, level_indices_to_indices and quantize_act_value."""
    for kw in (dict(levels=[8, 5, 3], dim=6), dict(levels=[6, 4], act_name="laplace", need_inv_act=True),
               dict(levels=[5, 4, 3], dim=7, channel_first=True)):
        theirs, ours = pair(kw)
        idx = torch.arange(ours.codebook_size, dtype=torch.int32).reshape(1, 1, -1)
        assert ours.codebook_size == theirs.codebook_size and ours.codebook_dim == theirs.codebook_dim
        assert_same(ours.indices_to_codes(idx), theirs.indices_to_codes(idx), "indices_to_codes")
        assert_same(ours.indices_to_codes(idx, eps=1e-3), theirs.indices_to_codes(idx, eps=1e-3), "eps")
        assert_same(ours.indices_to_level_indices(idx), theirs.indices_to_level_indices(idx), "level indices")
        assert_same(ours.indices_to_act_value(idx), theirs.indices_to_act_value(idx), "act values")
        level_indices = theirs.indices_to_level_indices(idx).float()
        assert_same(ours.level_indices_to_indices(level_indices), idx, "level_indices_to_indices")
        act = torch.rand(50, ours.codebook_dim, generator=gen(5), requires_grad=True)
        (qa, la), (qb, lb) = theirs.quantize_act_value(act, 1e-6), ours.quantize_act_value(act, 1e-6)
        assert_same(qa, qb, "quantize_act_value")
        assert_same(la, lb, "quantize_act_value levels")
        qb.sum().backward()
        assert torch.equal(act.grad, torch.ones_like(act))
        # the codes of the forward's indices are its eval output (up to the straight-through's rounding)
        shape = (2, kw.get("dim", len(kw["levels"])), 3, 4) if kw.get("channel_first") else (2, 9, kw.get("dim", 2))
        out, indices, _, _ = ours.eval()(torch.randn(shape, generator=gen(6)))
        torch.testing.assert_close(ours.indices_to_codes(indices), out, rtol=1e-6, atol=1e-6)


def test_out_of_range_indices_and_nan_rows():
    """Ours: indices outside the codebook decode to NaN (theirs wraps them around) and a row holding a NaN gets
    index -1, as vqkernels.nn.FSQ; the other rows are unaffected."""
    layer = FSP(levels=[4, 3], dim=5)
    codes = layer.indices_to_codes(torch.tensor([[0, 11, 12, -1]]))
    assert codes[0, :2].isfinite().all() and codes[0, 2:].isnan().all()
    assert layer.indices_to_act_value(torch.tensor([12])).isnan().all()
    x = torch.randn(1, 4, 5, generator=gen(7))
    x[0, 2, 3] = float("nan")
    _, indices, _, _ = layer.eval()(x)
    clean = layer(x[:, [0, 1, 3]])[1]
    assert indices[0, 2] == -1 and torch.equal(indices[0, [0, 1, 3]], clean[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """A half-precision layer and input. Eval: everything theirs returns is equal bit for bit, but the indices,
    which theirs sums in the half dtype (wrong in bfloat16 past 256 codes): ours are the level indices' exact
    mixed-radix sum. Training without projections: theirs promotes the output to float32, ours is that
    rounded to the input's dtype. Training with projections (theirs fails) and indices_to_codes work in the
    half dtype."""
    theirs, ours = pair(dict(levels=[8, 5, 5, 5], dim=16))
    theirs.to(dtype).eval(), ours.to(dtype).eval()
    x = (torch.randn(2, 200, 16, generator=gen(8)) * 1.5).to(dtype)
    a, b = theirs(x), ours(x)
    for what, u, v in (("quantized", a[0], b[0]), ("norm_loss", a[2], b[2]),
                       ("level_indices", a[3]["level_indices"], b[3]["level_indices"])):
        assert_same(u, v, what)
    exact = (b[3]["level_indices"].long() * torch.tensor([1, 8, 40, 200])).sum(-1).int()
    assert torch.equal(b[1], exact)
    if dtype == torch.bfloat16:
        assert not torch.equal(a[1], exact)
    assert ours.indices_to_codes(b[1]).dtype == dtype
    ours.train()
    torch.manual_seed(1)
    assert ours(x)[0].dtype == dtype
    theirs, ours = pair(dict(levels=[8, 5, 5, 5]))
    theirs.train(), ours.train()
    x4 = x[..., :4].contiguous()
    _, a = run(theirs, x4, 2)
    xb, b = run(ours, x4, 2)
    assert a[0].dtype == torch.float32
    assert_same(a[0].to(dtype), b[0], "quantized")
    assert_same(a[3]["level_indices"], b[3]["level_indices"], "level_indices")
    b[0].float().sum().backward()
    assert xb.grad.dtype == dtype and xb.grad.isfinite().all()


def test_large_codebook_indices_are_exact():
    """levels 256 x 256 x 300 (19.7M codes, past float32's 2**24): ours index every code exactly."""
    layer = FSP(levels=[256, 256, 300])
    idx = torch.tensor([0, 2 ** 24 + 1, 19660799, 12345677])
    level_indices = layer.indices_to_level_indices(idx).float()
    assert torch.equal(layer.level_indices_to_indices(level_indices), idx.int())
    out, got, _, _ = layer.eval()(torch.randn(1, 500, 3, generator=gen(9)) * 0.5)
    torch.testing.assert_close(layer.indices_to_codes(got), out, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:var_mean... degrees of freedom:UserWarning")
def test_odd_inputs():
    """One token (theirs gives NaN statistics: equal), a single vector [dim], channel-first [b, dim] and no tokens
    (theirs fails to reshape; ours gives empty outputs and NaN statistics)."""
    theirs, ours = pair(dict(levels=[8, 5, 5], dim=6))
    for x in (torch.randn(1, 1, 6, generator=gen(10)), torch.randn(6, generator=gen(11))):
        got = run(ours, x, 3)[1]
        assert_same_outputs(run(theirs, x, 3)[1], got)
        assert got[2].isnan() and got[0].shape == x.shape and got[1].shape == x.shape[:-1]
    channel_first = pair(dict(levels=[8, 5, 5], dim=6, channel_first=True))
    x = torch.randn(3, 6, generator=gen(12))
    assert_same_outputs(run(channel_first[0], x, 4)[1], run(channel_first[1], x, 4)[1])
    for layer in (ours, channel_first[1]):
        empty = torch.randn(2, 6, 0) if layer.channel_first else torch.randn(2, 0, 6)
        out, indices, loss, info = layer.train()(empty.requires_grad_())
        assert out.shape == empty.shape and indices.shape == (2, 0) and indices.dtype == torch.int32
        assert info["level_indices"].shape == (2, 0, 3) and loss.isnan()
        out.sum().backward()


def test_rejects_wrong_inputs():
    with pytest.raises(ValueError, match=r"vqkernels\.nn\.FSP: expected the feature dimension 6, got shape \(2, 3, 5\)"):
        FSP(levels=[8, 5, 5], dim=6)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"expected the feature dimension 6, got shape \(2, 5, 3\) \(channel_first: the features are dimension 1\)"):
        FSP(levels=[8, 5, 5], dim=6, channel_first=True)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"channel_first expects \[b, dim, \.\.\.\] inputs"):
        FSP(levels=[8, 5, 5], channel_first=True)(torch.randn(3))
    with pytest.raises(ValueError, match=r"expected the feature dimension 3, got shape \(\)"):
        FSP(levels=[8, 5, 5])(torch.tensor(1.0))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(levels=[8, 5], quantize_rate=1.5), ValueError, r"quantize_rate must be in \[0, 1\]"),
    (dict(levels=[8, 5], act_name="relu"), ValueError, r"act_name='relu' is not a CDF activation"),
    (dict(levels=[8, 5], vector_norm="l2"), ValueError, r"vector_norm='l2' is not a preset"),
    (dict(levels=[]), ValueError, r"levels must be a non-empty list of positive integers"),
    (dict(levels=[8, 0]), ValueError, r"levels must be a non-empty list of positive integers"),
    (dict(levels=[2 ** 16, 2 ** 15]), ValueError, r"must fit int32 indices"),
    (dict(levels=[8, 5], not_an_option=1), TypeError, r"not_an_option"),
])
def test_rejects_bad_configurations(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FSP(**kwargs)


def test_state_dict_round_trip():
    """Keys are theirs (projections only when dim != len(levels), no bias with projection_has_bias=False), and a
    state_dict of ours loads into theirs and ours with the same eval outputs."""
    assert list(FSP(levels=[8, 5]).state_dict()) == []
    assert list(FSP(levels=[8, 5], dim=4, projection_has_bias=False).state_dict()) == ["project_in.weight",
                                                                                      "project_out.weight"]
    kw = dict(levels=[8, 5, 5], dim=12)
    ours, again, theirs = FSP(**kw), FSP(**kw), vqp.FSP(**kw)
    assert list(ours.state_dict()) == ["project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"]
    again.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 12, generator=gen(13))
    expected = ours.eval()(x)
    for other in (again, theirs):
        assert_same_outputs(other.eval()(x), expected)


@pytest.mark.parametrize("kw, shape", [
    (dict(levels=[8, 5, 5, 5], dim=16, quantize_rate=0.5, vector_norm="kurt"), (2, 9, 16)),
    (dict(levels=[7, 3], act_name="laplace", need_inv_act=True, channel_first=True), (2, 2, 3, 4)),
])
def test_compiled_training_matches_eager(kw, shape):
    """torch.compile(fullgraph=True) (a host sync would break the graph) of the training step, perturbation
    included (Inductor's fallback_random draws eager's numbers), gives eager's results over three steps."""
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_training_matches_eager(lambda: FSP(**kw), [torch.randn(shape, generator=gen(14 + s))
                                                                    for s in range(3)])
