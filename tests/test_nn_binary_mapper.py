"""vqkernels.nn.BinaryMapper as a drop-in for vector-quantize-pytorch 1.32.0's: the same sampled codes with the same
seed, one-hot outputs, aux losses, log probabilities and input gradients; the straight-through's gradient is that of
the joint code probabilities; odd inputs, dtypes, torch.compile, state_dict."""

import math

import pytest
import torch
from vector_quantize_pytorch.binary_mapper import BinaryMapper as TheirBinaryMapper

from nn_helpers import assert_compiled_training_matches_eager
from vq_helpers import gen, vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import BinaryMapper

# (constructor keywords, forward keywords, logits shape, logits scale)
CASES = {
    "one-bit": (dict(), dict(), (6, 1), 1.0),
    "tokens": (dict(bits=6), dict(temperature=0.5), (2, 7, 6), 2.0),
    "video-no-threshold": (dict(bits=8, kl_loss_threshold=0.0), dict(), (2, 3, 4, 8), 1.5),
    "per-token-loss": (dict(bits=5, kl_loss_threshold=2.0), dict(reduce_aux_kl_loss=False, temperature=2.0),
                       (3, 9, 5), 3.0),
    "deterministic": (dict(bits=7), dict(deterministic=True), (4, 5, 7), 1.0),
    "one-token": (dict(bits=4), dict(), (4,), 2.0),
    "aux-loss-only": (dict(bits=6), dict(straight_through=False), (2, 5, 6), 2.0),
}


def _layers(kw):
    theirs, ours = TheirBinaryMapper(**kw), BinaryMapper(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _exact_one_hot(out, indices, num_codes):
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.one_hot(indices, num_codes).float())


@pytest.mark.parametrize("case", CASES)
def test_training_matches_vector_quantize_pytorch(case):
    """Three training calls from one seed: the same codes (theirs' bernoulli draws), one-hot (ours exactly 0/1),
    aux loss and input gradient of sum(one_hot * G) + aux loss, at every call."""
    kw, fkw, shape, scale = CASES[case]
    theirs, ours = _layers(kw)
    theirs.train(), ours.train()
    torch.manual_seed(7)
    states = []
    for step in range(3):
        x = torch.randn(shape, generator=gen(step)) * scale
        g = torch.randn(*shape[:-1], ours.num_codes, generator=gen(10 + step))
        got = []
        for layer in (theirs, ours):
            torch.manual_seed(100 + step)
            xx = x.clone().requires_grad_()
            out, idx, aux = layer(xx, return_indices=True, **fkw)
            ((out * g).sum() + aux.sum()).backward()
            got.append((out, idx, aux, xx.grad))
            states.append(torch.random.get_rng_state())
        (o_t, i_t, a_t, g_t), (o_o, i_o, a_o, g_o) = got
        assert torch.equal(i_o, i_t) and i_o.shape == shape[:-1]
        assert torch.equal(states[-1], states[-2])  # the same draws consumed
        _exact_one_hot(o_o.detach(), i_o, ours.num_codes)
        torch.testing.assert_close(o_o, o_t, rtol=0, atol=2e-7)
        # the aux loss: ours within float32 rounding of the float64 truth, and of theirs (whose two log-sigmoids
        # err by up to 4e-4 relative per bit, ours by 3e-7: a per-token loss differs by about 1e-6)
        truth = theirs.calc_aux_loss(x.double(), fkw.get("reduce_aux_kl_loss", True))
        torch.testing.assert_close(a_o.double(), truth, rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(a_o, a_t, rtol=1e-6, atol=2e-6)
        if fkw.get("straight_through", True):
            assert g_t.abs().max() > 0
        torch.testing.assert_close(g_o, g_t, rtol=1e-5, atol=1e-6 * float(g_t.abs().max()) + 1e-12)


@pytest.mark.parametrize("deterministic_on_eval", [False, True])
def test_eval_matches_vector_quantize_pytorch(deterministic_on_eval):
    """Eval: no gradient, aux loss 0, codes drawn (or thresholded with deterministic_on_eval) as theirs; the
    threshold is the code of highest probability."""
    kw = dict(bits=6, deterministic_on_eval=deterministic_on_eval)
    theirs, ours = _layers(kw)
    theirs.eval(), ours.eval()
    x = torch.randn(3, 11, 6, generator=gen(3)).requires_grad_()
    got = []
    for layer in (theirs, ours):
        torch.manual_seed(5)
        got.append(layer(x, return_indices=True))
    (o_t, i_t, a_t), (o_o, i_o, a_o) = got
    assert torch.equal(i_o, i_t) and torch.equal(o_o, o_t)
    assert not o_o.requires_grad and float(a_o) == float(a_t) == 0.0
    if deterministic_on_eval:
        best = ours.log_prob(x.unsqueeze(-2).expand(3, 11, 64, 6), indices=torch.arange(64).expand(3, 11, 64))
        assert torch.equal(i_o, best.argmax(-1))
    else:  # drawn: different seeds draw different codes
        torch.manual_seed(6)
        assert not torch.equal(ours(x, return_indices=True)[1], i_o)


def test_straight_through_gradient_is_the_joint_probability_gradient():
    """The one-hot's gradient is that of G[c] = prod_b p_b**c_b (1 - p_b)**(1 - c_b), built here in float64
    by an explicit product (independently of both implementations)."""
    layer = BinaryMapper(bits=5).train()
    x = torch.randn(4, 6, 5, generator=gen(1), dtype=torch.float64) * 2
    g = torch.randn(4, 6, 32, generator=gen(2)).double()  # float32 values: the one-hot's gradient is exact
    xx = x.clone().requires_grad_()
    out, _ = layer(xx, calc_aux_loss=False)
    (out * g).sum().backward()

    xr = x.clone().requires_grad_()
    code_bits = ((torch.arange(32).unsqueeze(-1) >> torch.arange(5)) & 1).double()
    p = xr.sigmoid().unsqueeze(-2)
    joint = (p * code_bits + (1 - p) * (1 - code_bits)).prod(-1)
    torch.testing.assert_close(joint.sum(-1), torch.ones(4, 6, dtype=torch.float64))
    (joint * g).sum().backward()
    assert out.dtype == torch.float32 and xx.grad.dtype == torch.float64
    torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-12, atol=1e-14)


def test_sampling_distribution():
    """Over many draws each bit is 1 with probability sigmoid(logit / temperature) (the same seed already gives
    theirs' draws; this checks the draws mean what they should), within 5 standard errors."""
    layer = BinaryMapper(bits=3).train()
    logits = torch.tensor([-2.0, 0.3, 1.5])
    torch.manual_seed(0)
    _, idx, _ = layer(logits.expand(20000, 3), temperature=1.5, return_indices=True)
    ones = ((idx.unsqueeze(-1) >> torch.arange(3)) & 1).double().mean(0)
    p = (logits / 1.5).sigmoid().double()
    assert torch.all((ones - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt()), (ones, p)


def test_log_prob_aux_loss_and_entropy_match_vector_quantize_pytorch():
    theirs, ours = _layers(dict(bits=6, kl_loss_threshold=0.5))
    x = torch.randn(3, 4, 6, generator=gen(4)) * 2
    indices = torch.randint(0, 64, (3, 4), generator=gen(5))
    one_hot = torch.nn.functional.one_hot(indices, 64).float()
    for kw in (dict(indices=indices), dict(one_hot=one_hot), dict(indices=indices, sum_bits=False)):
        torch.testing.assert_close(ours.log_prob(x, **kw), theirs.log_prob(x, **kw), rtol=1e-6, atol=1e-6)
    # a distribution over the 64 codes
    every = ours.log_prob(x.unsqueeze(-2).expand(3, 4, 64, 6), indices=torch.arange(64).expand(3, 4, 64))
    torch.testing.assert_close(every.logsumexp(-1), torch.zeros(3, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.binary_entropy(x), theirs.binary_entropy(x))
    for reduce in (True, False):
        torch.testing.assert_close(ours.calc_aux_loss(x, reduce), theirs.calc_aux_loss(x, reduce))
    # uniform bits: no KL; confident bits: KL close to bits * ln 2, less the threshold
    assert float(ours.calc_aux_loss(torch.zeros(5, 6))) == 0.0
    assert abs(float(ours.calc_aux_loss(torch.full((5, 6), 30.0))) - (6 * math.log(2) - 0.5)) < 1e-5
    with pytest.raises(ValueError, match="either indices or one_hot"):
        ours.log_prob(x)
    with pytest.raises(ValueError, match="either indices or one_hot"):
        ours.log_prob(x, indices=indices, one_hot=one_hot)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    """Theirs' straight-through fails on non-float32 logits (einsum of mixed dtypes); ours gives the float32
    one-hot of theirs' codes (drawn from the same probabilities), a gradient in the logits' dtype (the float32
    computation on the same values, float64 for float64), and theirs' aux loss."""
    theirs, ours = _layers(dict(bits=5))
    theirs.train(), ours.train()
    x = (torch.randn(3, 7, 5, generator=gen(6)) * 2).to(dtype)
    g = torch.randn(3, 7, 32, generator=gen(7))
    torch.manual_seed(1)
    with pytest.raises(RuntimeError):
        theirs(x.clone().requires_grad_())
    torch.manual_seed(2)
    _, i_t, a_t = theirs(x, straight_through=False, return_indices=True)
    torch.manual_seed(2)
    xx = x.clone().requires_grad_()
    out, i_o, a_o = ours(xx, return_indices=True)
    assert torch.equal(i_o, i_t) and a_o.dtype == a_t.dtype == dtype
    torch.testing.assert_close(a_o, a_t)
    _exact_one_hot(out.detach(), i_o, 32)
    (out * g).sum().backward()
    x32 = x.float().requires_grad_()
    torch.manual_seed(2)
    (ours(x32)[0] * g).sum().backward()
    assert xx.grad.dtype == dtype
    if dtype == torch.float64:  # computed in float64: the float32 one's rounding apart
        torch.testing.assert_close(xx.grad, x32.grad.double(), rtol=1e-5, atol=1e-6)
    else:  # computed in float32, rounded to the logits' dtype
        assert torch.equal(xx.grad, x32.grad.to(dtype))


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6), (1, 1, 6)])
def test_no_tokens_and_one_token(shape):
    """No tokens: empty one-hot and indices, aux loss 0 (theirs: NaN, the mean of nothing), a gradient of the
    right shape; one token as theirs."""
    theirs, ours = _layers(dict(bits=6))
    theirs.train(), ours.train()
    x = torch.randn(shape, generator=gen(8)).requires_grad_()
    torch.manual_seed(3)
    out, idx, aux = ours(x, return_indices=True)
    assert out.shape == (*shape[:-1], 64) and idx.shape == shape[:-1]
    (out.sum() + aux).backward()
    assert x.grad.shape == shape
    torch.manual_seed(3)
    o_t, i_t, a_t = theirs(x, return_indices=True)
    assert torch.equal(idx, i_t)
    if x.numel():
        torch.testing.assert_close(aux, a_t)
    else:
        assert float(aux.detach()) == 0.0 and torch.isnan(a_t)


def test_bad_inputs_are_clear_errors():
    layer = BinaryMapper(bits=6)
    with pytest.raises(ValueError, match=r"BinaryMapper: expected logits with a last dimension of 6, got shape "
                                         r"\(2, 3, 5\)"):
        layer(torch.randn(2, 3, 5))
    for bits in (0, 63):
        with pytest.raises(ValueError, match=r"bits must be in \[1, 62\]"):
            BinaryMapper(bits=bits)


def test_state_dict_and_codes():
    """Nothing persistent (theirs neither): their state_dict loads strictly, ours loads into theirs; the codes
    table is theirs'."""
    theirs, ours = _layers(dict(bits=7))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.codes, theirs.codes) and ours.codes.shape == (128, 7)
    assert torch.equal(ours.power_two, theirs.power_two)
    assert ours.num_codes == theirs.num_codes == 128 and ours.kl_loss_threshold == theirs.kl_loss_threshold


def test_compiled_training_matches_eager():
    """torch.compile(fullgraph=True) of a training step (sampling, one-hot, straight-through, aux loss): no graph
    break, so no host read; with Inductor's fallback_random the draws are eager's."""
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_training_matches_eager(lambda: BinaryMapper(bits=6, kl_loss_threshold=0.2),
                                               [torch.randn(2, 9, 6, generator=gen(s)) * 2 for s in range(3)])
