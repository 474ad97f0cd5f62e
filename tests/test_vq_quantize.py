"""vqkernels.vq_quantize (forward, losses, autograd) and vqkernels::vq_quantize_backward."""

import pytest
import torch
from hypothesis import given

from vq_helpers import (DTYPES, LOSS_THREADS_BUG, METRICS, as_input, assert_deterministic,
                        assert_separated, bits, build_case, check_nearest, clustered, compute_dtype, fail_rows, gen,
                        hyp_settings, opcheck, reference_xfail, search_cases, search_opcheck_samples, separated,
                        separated_cases, unit_roundoff, vqkernels)

vq_quantize = vqkernels.vq_quantize


def expected_loss(x, codebook, indices):
    """mean((x - codebook[indices])^2) in float64."""
    return (x.double() - codebook.double()[indices]).square().mean()


def loss_rtol(x, codebook):
    # N*D non-negative terms, each (x - q)^2 with about 3 roundings, summed in the compute
    # dtype: relative error at most (N*D + 3) * u whatever the summation order.
    return 2.0 * (x.numel() + 3) * unit_roundoff(compute_dtype(x, codebook))


def check_quantize(x, codebook, metric, outputs):
    quantized, indices, commit_loss, codebook_loss = outputs
    check_nearest(x, codebook, metric, indices, None, op="vq_quantize")
    assert quantized.dtype == x.dtype and quantized.shape == x.shape
    assert bits(quantized).equal(bits(codebook[indices].to(x.dtype))), "quantized must be the raw codebook rows"
    for loss in (commit_loss, codebook_loss):
        assert loss.shape == () and loss.dtype == compute_dtype(x, codebook)
    if x.shape[0]:
        want = expected_loss(x, codebook, indices)
        rtol = loss_rtol(x, codebook)
        for loss in (commit_loss, codebook_loss):
            torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=1e-300)


@hyp_settings(100)
@given(case=search_cases())
def test_forward_matches_float64_truth(isa, case):
    """Nearest code as nearest_code's rules, quantized = raw chosen rows in x's dtype (also
    for cosine), both losses = mean((x - q)^2)."""
    x, codebook, _ = build_case(case)
    saved = bits(x).clone(), bits(codebook).clone()
    outputs = vq_quantize(x, codebook, case["metric"])
    assert torch.equal(bits(x), saved[0]) and torch.equal(bits(codebook), saved[1]), "inputs were modified"
    check_quantize(x, codebook, case["metric"], outputs)


@hyp_settings(50)
@given(case=separated_cases())
def test_well_separated_index_is_exact(isa, case):
    x, codebook, targets = build_case(case, separated_codes=True)
    outputs = vq_quantize(x, codebook, case["metric"])
    assert_separated(x, codebook, case["metric"], targets, outputs[1])
    check_quantize(x, codebook, case["metric"], outputs)


@pytest.mark.parametrize("metric", METRICS)
def test_indices_agree_with_nearest_code(isa, metric):
    x, codebook, _ = clustered(500, 300, 24, seed=31, noise=0.1)
    x, codebook = x.float(), codebook.float()
    assert torch.equal(vq_quantize(x, codebook, metric)[1], vqkernels.nearest_code(x, codebook, metric)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_rows(isa, metric, dtype):
    x, codebook, _ = clustered(12, 9, 5, seed=32)
    x[4, 2] = float("nan")
    x, codebook = x.to(dtype), codebook.to(dtype)
    quantized, indices, _, _ = vq_quantize(x, codebook, metric)
    assert indices[4] == -1 and bool(torch.isnan(quantized[4]).all())
    keep = torch.arange(12) != 4
    check_nearest(x[keep], codebook, metric, indices[keep], None, op="vq_quantize")
    assert bits(quantized[keep]).equal(bits(codebook[indices[keep]].to(dtype)))


@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.float64], ids=str)
def test_empty_x(isa, x_dtype, cb_dtype):
    x = torch.empty(0, 5, dtype=x_dtype)
    codebook = torch.randn(7, 5, dtype=cb_dtype)
    quantized, indices, commit_loss, codebook_loss = vq_quantize(x, codebook)
    assert quantized.shape == (0, 5) and quantized.dtype == x_dtype
    assert indices.shape == (0,) and indices.dtype == torch.int64
    for loss in (commit_loss, codebook_loss):
        assert loss.shape == () and loss.dtype == compute_dtype(x, codebook)
    grad_x, grad_codebook = torch.ops.vqkernels.vq_quantize_backward(
        torch.empty(0, 5, dtype=x_dtype), torch.tensor(1.0), torch.tensor(1.0), x, codebook, indices)
    assert grad_x.shape == (0, 5) and grad_x.dtype == x_dtype
    assert grad_codebook.dtype == cb_dtype and torch.equal(grad_codebook, torch.zeros(7, 5, dtype=cb_dtype))


# ---------------------------------------------------------------------------------------
# autograd: each output's gradient on its own, then all together

# (weight of sum(quantized * G), weight of commit_loss, weight of codebook_loss)
LOSS_WEIGHTS = {"quantized": (1.0, 0.0, 0.0), "commit": (0.0, 0.7, 0.0), "codebook": (0.0, 0.0, 0.3),
                "all": (1.0, 0.7, -1.3)}
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)]
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def is_zero_grad(grad):
    return grad is None or not bool(grad.any())


@pytest.mark.parametrize("which", LOSS_WEIGHTS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_gradients_match_formulas(isa, metric, dtypes, which):
    """quantized: straight-through, its gradient reaches x unchanged and the codebook not at all;
    commit_loss: 2 (x - q) / (N D) to x only; codebook_loss: -2 (x - q) / (N D) scattered
    onto the chosen codebook rows only (all other rows exactly zero)."""
    wq, wc, wb = LOSS_WEIGHTS[which]
    x64, cb64, _ = clustered(20, 64, 6, seed=33, noise=0.3)
    x = as_input(x64, dtypes[0], requires_grad=True)
    codebook = as_input(cb64, dtypes[1], requires_grad=True)
    quantized, indices, commit_loss, codebook_loss = vq_quantize(x, codebook, metric)
    g = torch.randn(quantized.shape, generator=gen(34)).to(quantized.dtype)
    (wq * (quantized * g).sum() + wc * commit_loss + wb * codebook_loss).backward()

    diff = x.detach().double() - codebook.detach().double()[indices]
    scale = 2.0 / x.numel()
    want_x = wq * g.double() + wc * scale * diff
    want_cb = torch.zeros(codebook.shape, dtype=torch.float64).index_add_(0, indices, -wb * scale * diff)
    if wq == 0 and wc == 0:
        assert is_zero_grad(x.grad), "only codebook_loss: x must get no gradient"
    else:
        assert x.grad.dtype == x.dtype
        rtol = GRAD_RTOL[x.dtype]
        torch.testing.assert_close(x.grad.double(), want_x, rtol=rtol, atol=rtol * float(want_x.abs().max()))
        if wc == 0:
            assert bits(x.grad).equal(bits(g)), "straight-through: x's gradient is quantized's, unchanged"
    if wb == 0:
        assert is_zero_grad(codebook.grad), "quantized and commit_loss must send nothing to the codebook"
    else:
        assert codebook.grad.dtype == codebook.dtype
        rtol = GRAD_RTOL[codebook.dtype]
        torch.testing.assert_close(codebook.grad.double(), want_cb, rtol=rtol,
                                   atol=rtol * float(want_cb.abs().max()))
        unchosen = torch.ones(codebook.shape[0], dtype=torch.bool)
        unchosen[indices] = False
        assert bool(unchosen.any()) and not bool(codebook.grad[unchosen].any()), "gradient left the chosen rows"


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_commit_loss(metric):
    """float64 gradcheck of commit_loss in x (well-separated: the argmin is stable)."""
    x, codebook, _ = separated(6, 5, 4, seed=35)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: vq_quantize(a, codebook, metric)[2], (x,))


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_codebook_loss(metric):
    """float64 gradcheck of codebook_loss in the codebook (two codes unused: zero rows)."""
    x, codebook, _ = separated(6, 8, 4, seed=36)
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda c: vq_quantize(x, c, metric)[3], (codebook,))


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
def test_backward_op(isa, dtypes):
    """vqkernels::vq_quantize_backward called directly, with arbitrary incoming gradients."""
    x64, cb64, targets = clustered(50, 30, 7, seed=37)
    x, codebook = x64.to(dtypes[0]), cb64.to(dtypes[1])
    g = torch.randn(50, 7, generator=gen(38)).to(x.dtype)
    grad_x, grad_codebook = torch.ops.vqkernels.vq_quantize_backward(
        g, torch.tensor(0.25), torch.tensor(-3.0), x, codebook, targets)
    diff = x.double() - codebook.double()[targets]
    want_x = g.double() + 0.25 * (2.0 / x.numel()) * diff
    want_cb = torch.zeros(30, 7, dtype=torch.float64).index_add_(0, targets, 3.0 * (2.0 / x.numel()) * diff)
    assert grad_x.dtype == x.dtype and grad_codebook.dtype == codebook.dtype
    for got, want, dt in ((grad_x, want_x, x.dtype), (grad_codebook, want_cb, codebook.dtype)):
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[dt], atol=GRAD_RTOL[dt] * float(want.abs().max()))


@reference_xfail("vq_quantize", LOSS_THREADS_BUG)
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic(isa, metric):
    x64, cb64, _ = clustered(4000, 256, 29, seed=39, noise=1.0)

    def run():
        x = x64.float().requires_grad_()
        codebook = cb64.float().requires_grad_()
        quantized, indices, commit_loss, codebook_loss = vq_quantize(x, codebook, metric)
        (quantized.sum() + commit_loss + codebook_loss).backward()
        return quantized, indices, commit_loss, codebook_loss, x.grad, codebook.grad

    assert_deterministic(run)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("x, codebook", search_opcheck_samples())
def test_opcheck(x, codebook, metric):
    opcheck("vq_quantize", (x, codebook, metric))


def backward_opcheck_samples():
    g = gen(40)
    x = torch.randn(9, 5, generator=g)
    codebook = torch.randn(6, 5, generator=g)
    indices = torch.randint(0, 6, (9,), generator=g)
    grad = torch.randn(9, 5, generator=g)
    one, half = torch.tensor(1.0), torch.tensor(0.5)
    return [
        pytest.param((grad, one, half, x, codebook, indices), id="f32"),
        pytest.param((grad.double(), one.double(), half.double(), x.double(), codebook.double(), indices), id="f64"),
        pytest.param((grad.bfloat16(), one, half, x.bfloat16(), codebook, indices), id="bf16-f32"),
        pytest.param((grad.t().contiguous().t(), one, half, x, codebook.t().contiguous().t(), indices), id="strided"),
        pytest.param((grad[:0], one, half, x[:0], codebook, indices[:0]), id="empty"),
    ]


@pytest.mark.parametrize("args", backward_opcheck_samples())
def test_backward_opcheck(args):
    opcheck("vq_quantize_backward", args)


def test_nan_row_does_not_reach_the_codebook_gradient(isa):
    """A NaN row has index -1: codebook_loss must scatter nothing for it (no row -1 or 0)."""
    x64, cb64, _ = clustered(10, 6, 3, seed=41)
    x64[0, 1] = float("nan")
    codebook = cb64.float().requires_grad_()
    _, indices, _, codebook_loss = vq_quantize(x64.float(), codebook)
    assert indices[0] == -1
    codebook_loss.backward()
    chosen = torch.zeros(6, dtype=torch.bool)
    chosen[indices[1:]] = True
    fail_rows(torch.isnan(codebook.grad).any(1), "NaN reached the codebook gradient", grad=codebook.grad)
    assert not bool(codebook.grad[~chosen].any())
