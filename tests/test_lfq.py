"""vqkernels.lfq_quantize, vqkernels.lfq_entropy and vqkernels::lfq_entropy_backward.

lfq_entropy is judged against a brute-force float64 computation through the full N x 2**d
probability matrix (small d), which it must never form itself (memory test at d = 16). As in
test_fsq.py, both the op as served and the pure-PyTorch reference called directly are tested.

The GPU kernels' tests of lfq_entropy (CUDA, Triton) come last, run by the `backend` fixture
(tests/conftest.py).
"""

import math
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import LFQ_PROB_EPS as PROB_EPS
from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_TOL, LAYOUTS, assert_bitwise_equal, assert_deterministic,
                        assert_float64_is_the_reference, assert_kernel_rejects, assert_rejects_cpu_tensors, bits,
                        close_to_f64, compute_dtype, f64, fail_rows, gen, hyp_settings, kernel_opcheck, on_backends,
                        opcheck, peak_memory_kib, per_backend, reference, seeded_randn, unit_roundoff, vqkernels,
                        with_layout)

ERRORS = (ValueError, RuntimeError)
QUANTIZE = {"op": vqkernels.lfq_quantize, "reference": reference.lfq_quantize}
ENTROPY = {"op": vqkernels.lfq_entropy, "reference": reference.lfq_entropy}
ENTROPY_BACKWARD = {"op": torch.ops.vqkernels.lfq_entropy_backward, "reference": reference.lfq_entropy_backward}


def lfq_input(n, d, seed, scale=1.0, dtype=torch.float32, layout="contiguous"):
    x = torch.randn(n, d, generator=gen(seed), dtype=torch.float64) * scale
    return with_layout(x.to(dtype), layout)


# ---------------------------------------------------------------------------------------
# lfq_quantize


def check_quantize(x, scale, codes, indices, commit):
    """codes = +-scale (rounded to float32, then x's dtype) by x > 0, NaN where x is NaN; index
    bits with the first column on top, -1 for NaN rows; commit = mean((x - codes)^2) in float64
    within 2 (N d + 3) u (N d non-negative terms, a few roundings each)."""
    n, d = x.shape
    assert codes.dtype == x.dtype and codes.shape == (n, d)
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert commit.dtype == compute_dtype(x) and commit.shape == ()
    xd = x.double()
    nan = torch.isnan(xd)
    s = torch.tensor(scale, dtype=compute_dtype(x))
    want = torch.where(xd > 0, s, -s).to(x.dtype).masked_fill(nan, float("nan"))
    fail_rows((bits(codes) != bits(want)).any(1), "codes", codes=codes, want=want)
    weights = [2 ** (d - 1 - j) for j in range(d)]
    want_idx = torch.tensor([sum(w for w, v in zip(weights, row) if v > 0) for row in xd.tolist()], dtype=torch.int64)
    want_idx = want_idx.masked_fill(nan.any(1), -1)
    fail_rows(indices != want_idx, "indices", index=indices, want=want_idx)
    if n == 0:
        assert commit == 0
        return
    truth = (xd - want.double()).square().mean()
    if bool(nan.any()):
        assert torch.isnan(commit)
    else:
        rtol = 2 * (n * d + 3) * unit_roundoff(compute_dtype(x))
        torch.testing.assert_close(commit.double(), truth, rtol=rtol, atol=1e-300)


@st.composite
def quantize_cases(draw):
    return dict(n=draw(st.sampled_from([0, 1, 7, draw(st.integers(0, 300))])), d=draw(st.integers(1, 63)),
                seed=draw(st.integers(0, 2 ** 31 - 1)), scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),
                codebook_scale=draw(st.sampled_from([1.0, 0.5, 2.0, 1 / 3, 1e-3, 1e4])),
                dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)))


@pytest.mark.parametrize("impl", QUANTIZE)
@hyp_settings(60)
@given(case=quantize_cases())
def test_quantize_matches_truth(impl, case):
    x = lfq_input(case["n"], case["d"], case["seed"], case["scale"], case["dtype"], case["layout"])
    saved = bits(x).clone()
    out = QUANTIZE[impl](x, case["codebook_scale"])
    assert torch.equal(bits(x), saved), "x was modified"
    check_quantize(x, case["codebook_scale"], *out)


@pytest.mark.parametrize("impl", QUANTIZE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_special_values(impl, dtype):
    """0 and -0.0 are not positive (-scale); +-inf are +-scale; a NaN makes its code NaN and the row -1;
    63 positive columns give 2**63 - 1."""
    x = torch.tensor([[0.0, -0.0, float("inf"), -float("inf")], [1.0, float("nan"), -1.0, 2.0]]).to(dtype)
    out = QUANTIZE[impl](x, 0.5)
    check_quantize(x, 0.5, *out)
    assert out[0][0].tolist() == [-0.5, -0.5, 0.5, -0.5] and out[1].tolist() == [2, -1]
    top = QUANTIZE[impl](torch.ones(2, 63, dtype=dtype), 1.0)[1]
    assert top.tolist() == [2 ** 63 - 1] * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_gradients(dtype):
    """codes: straight-through, x's gradient is codes' unchanged; commit_loss: 2 (x - codes) / (N d)."""
    x = lfq_input(40, 6, seed=1, dtype=dtype).requires_grad_()
    codes, _, commit = vqkernels.lfq_quantize(x, 0.75)
    g = torch.randn(codes.shape, generator=gen(2)).to(dtype)
    (codes * g).sum().backward()
    assert torch.equal(bits(x.grad), bits(g)), "straight-through: x's gradient is codes', unchanged"
    x.grad = None
    codes, _, commit = vqkernels.lfq_quantize(x, 0.75)
    (0.3 * commit).backward()
    want = 0.3 * 2 * (x.detach().double() - codes.double()) / x.numel()
    rtol = 1e-12 if dtype == torch.float64 else 2.0 ** -(8 if dtype == torch.bfloat16 else 11 if dtype ==
                                                         torch.float16 else 20)
    torch.testing.assert_close(x.grad.double(), want, rtol=rtol, atol=rtol * float(want.abs().max().detach()))


def test_quantize_gradcheck_commit_loss():
    """float64 gradcheck of commit_loss (x away from 0: the signs do not flip under perturbation)."""
    x = lfq_input(7, 5, seed=3)
    x = (x + x.sign() * 0.1).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vqkernels.lfq_quantize(t, 0.6)[2], (x,))


@pytest.mark.parametrize("impl", QUANTIZE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_empty(impl, dtype):
    codes, indices, commit = QUANTIZE[impl](torch.empty(0, 5, dtype=dtype), 1.0)
    assert codes.shape == (0, 5) and codes.dtype == dtype and indices.shape == (0,) and commit == 0


def quantize_opcheck_samples():
    x = torch.randn(9, 5, generator=gen(4))
    return [
        pytest.param(x, 1.0, id="f32"),
        pytest.param(x.clone().requires_grad_(), 0.5, id="f32-grad"),
        pytest.param(x.double().requires_grad_(), 2.0, id="f64-grad"),
        pytest.param(x.bfloat16().requires_grad_(), 1.0, id="bf16-grad"),
        pytest.param(with_layout(x, "strided"), 1.0, id="strided"),
        pytest.param(x[:0], 1.0, id="empty"),
    ]


@pytest.mark.parametrize("x, scale", quantize_opcheck_samples())
def test_quantize_opcheck(x, scale):
    opcheck("lfq_quantize", (x, scale))


# ---------------------------------------------------------------------------------------
# lfq_entropy: brute-force float64 truth


def code_signs(d):
    """[2**d, d] float64: column j of code c is +1 iff bit d - 1 - j of c is set (first column on top)."""
    c = torch.arange(2 ** d)
    return ((c.unsqueeze(1) >> torch.arange(d - 1, -1, -1)) & 1).double() * 2 - 1


def brute_force(x, inv_temperature, weights=None):
    """float64 (per_sample_exact, per_sample_clamped, codebook_entropy, avg_probs) through the N x 2**d
    softmax of 2 * inv_temperature * <x, c> (vector-quantize-pytorch's logits for codebook_scale 1);
    clamped: -sum p log(max(p, 1e-5)) per row, as vector-quantize-pytorch. With row ``weights``, the
    rows of weight 0 are dropped (whatever they hold) and the means are sum_n w_n (.) / sum_n w_n (1 where
    that is 0). Differentiable in x."""
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double()
    x, w = x[w != 0], w[w != 0]
    total = w.sum() if bool(w.sum() != 0) else 1.0
    logp = torch.log_softmax(2 * inv_temperature * x @ code_signs(x.shape[1]).T, 1)
    p = logp.exp()
    exact = -(w @ (p * logp).sum(1)) / total
    clamped = -(w @ (p * p.clamp_min(PROB_EPS).log()).sum(1)) / total
    avg = w @ p / total
    return exact, clamped, -(avg * avg.clamp_min(PROB_EPS).log()).sum(), avg


def entropy_tolerances(x, inv_temperature):
    """Bounds on the compute dtype's error (unit roundoff u), with L = max_n sum_j |4 tau x_nj|:

    * per-sample entropy: each binary entropy is within ~4u relative of the exact one for its
      rounded logit, and rounding the logit moves it by |l^2 p (1 - p)| u <= 0.5 u: 8 d u, plus
      the float64 truth's own error (its log_softmax, below; seen at float64 with L ~ 800);
    * avg_probs: every probability is a product of d sigmoids of rounded logits (relative error
      up to (L + 3d) u) and the GEMM sums N positive terms (N u); the float64 truth's own
      log_softmax is off by up to about L/2 * 2**-53 relative (logits up to L/2 in size):
      (N + 2L + 3d) u relative, plus the underflow of tiny products (absolute 1e-35);
    * codebook entropy: sum_c |d avg_c| (|log max(avg_c, 1e-5)| + 1) <= 13 (N + 2L + 3d) u;
    * gradients (per element, against the largest): 4 (N + 2L + 3d) u max|g| (worst observed
      about a tenth of this), plus the rounding to x's dtype.
    """
    n, d = x.shape
    u = unit_roundoff(compute_dtype(x))
    big = (n + 2 * float((4 * inv_temperature * x.double()).abs().sum(1).max()) + 3 * d) * u if n else 0.0
    return dict(per_sample=8 * d * u + big, avg=big, codebook=13 * big, grad=4 * big)


def check_entropy(x, inv_temperature, outputs, weights=None):
    """outputs against brute_force (with the row weights, if any), within entropy_tolerances of the rows
    that count (those of non-zero weight: their N, their logits)."""
    per_sample, codebook, avg = outputs
    n, d = x.shape
    dt = compute_dtype(x)
    for t in outputs:
        assert t.dtype == dt
    assert per_sample.shape == () and codebook.shape == () and avg.shape == (2 ** d,)
    if n == 0 or (weights is not None and not bool(weights.any())):
        assert per_sample == 0 and codebook == 0 and not bool(avg.any())
        return
    exact, _, cb, want_avg = brute_force(x.double(), inv_temperature, weights)
    tol = entropy_tolerances(x if weights is None else x[weights != 0], inv_temperature)
    u = unit_roundoff(dt)
    assert abs(float(per_sample) - float(exact)) <= tol["per_sample"] + 2 * u * float(exact), (per_sample, exact)
    assert abs(float(codebook) - float(cb)) <= tol["codebook"] + 2 * u * float(cb), (codebook, cb)
    err = (avg.double() - want_avg).abs()
    ok = err <= tol["avg"] * want_avg + 1e-35
    assert bool(ok.all()), f"avg_probs off at {ok.logical_not().nonzero().flatten()[:5].tolist()}"


@st.composite
def entropy_cases(draw):
    return dict(n=draw(st.sampled_from([0, 1, 7, draw(st.integers(0, 200))])), d=draw(st.integers(1, 10)),
                seed=draw(st.integers(0, 2 ** 31 - 1)), scale=draw(st.sampled_from([1e-2, 1.0, 3.0])),
                tau=draw(st.sampled_from([0.05, 1.0, 100.0])), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(LAYOUTS)))


@pytest.mark.parametrize("impl", ENTROPY)
@hyp_settings(50)
@given(case=entropy_cases())
def test_entropy_matches_brute_force(impl, case):
    x = lfq_input(case["n"], case["d"], case["seed"], case["scale"], case["dtype"], case["layout"])
    check_entropy(x, case["tau"], ENTROPY[impl](x, case["tau"]))


@pytest.mark.parametrize("impl", ENTROPY)
@pytest.mark.parametrize("d, n, tau", [(1, 300, 0.7), (2, 300, 0.7), (7, 300, 0.7), (10, 40, 3.0)])
def test_entropy_float64_exact(impl, d, n, tau):
    """float64, where the tolerances are ~1e-13: the per-sample entropy is the exact one and the codebook
    entropy carries the 1e-5 clamp. At d = 10 (1024 codes, 40 rows, tau = 3) many codes have an average
    probability below 1e-5, so dropping the clamp would change the codebook entropy far beyond the tolerance."""
    x = lfq_input(n, d, seed=d, scale=1.0, dtype=torch.float64)
    check_entropy(x, tau, ENTROPY[impl](x, tau))
    if d == 10:
        _, _, cb, avg = brute_force(x, tau)
        unclamped = -(avg * avg.log()).sum()
        assert abs(float(unclamped - cb)) > 1e6 * entropy_tolerances(x, tau)["codebook"], "the clamp must matter here"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subnormal_pattern_probabilities_within_bounds(isa, dtype):
    """At vector-quantize-pytorch's default inverse temperature (100) many pattern probabilities of unit-scale
    inputs fall below the smallest normal number; the kernel zeroes those (an Intel core takes a microcode assist
    for every multiply or FMA on a subnormal). 2**16 codes (the tiles at every width) stay within check_entropy's
    bounds, whose underflow allowance (1e-35) covers them."""
    x = lfq_input(256, 16, seed=31, scale=1.0, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    _, _, _, truth = brute_force(x.double(), 100.0)
    assert bool(((truth > 0) & (truth < tiny)).any()), "the input must make subnormal probabilities"
    check_entropy(x, 100.0, vqkernels.lfq_entropy(x, 100.0))


def test_per_sample_entropy_differs_from_clamped_within_bound():
    """vector-quantize-pytorch's per-sample entropy clamps every code probability at eps = 1e-5 inside the
    log; the factorised one is exact. Per row the difference sum_{p(c) < eps} p(c) log(eps / p(c)) is at
    most m log(K eps / m) for the mass m below eps, hence at most K eps / e (K = 2**d, K eps <= e). Here
    (d = 12, tau = 0.25) the difference is real (far above float64 noise) and within the bound."""
    d = 12
    x = lfq_input(64, d, seed=5, dtype=torch.float64)
    tau = 0.25
    per_sample = vqkernels.lfq_entropy(x, tau)[0]
    exact, clamped, _, _ = brute_force(x, tau)
    bound = 2 ** d * PROB_EPS / math.e
    assert abs(float(per_sample - exact)) <= 1e-12
    diff = float(exact - clamped)
    assert 1e-6 < diff <= bound, (diff, bound)


@pytest.mark.parametrize("impl", ENTROPY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_nan_and_inf(impl, dtype):
    """A NaN anywhere makes all three outputs NaN (one row poisons the batch average, as in the N x 2**d
    computation); an infinite entry is a certain bit: the same as a huge finite one."""
    x = lfq_input(20, 6, seed=6, dtype=dtype)
    x[3, 2] = float("nan")
    for t in ENTROPY[impl](x, 1.0):
        assert bool(torch.isnan(t).all())
    x[3, 2] = float("inf")
    x[7, 0] = -float("inf")
    got = ENTROPY[impl](x, 1.0)
    finite = x.clone()
    finite[3, 2], finite[7, 0] = 1e4, -1e4
    check_entropy(finite, 1.0, got)


# ---------------------------------------------------------------------------------------
# lfq_entropy: gradients

LOSS_WEIGHTS = {"per_sample": (1.0, 0.0, False), "codebook": (0.0, 1.0, False), "avg_probs": (0.0, 0.0, True),
                "all": (0.7, -1.3, True)}


def truth_grad(x, tau, a, b, w, weights=None):
    """d/dx of a * exact per-sample + b * codebook entropy + <w, avg_probs> (w None: 0), float64, with the row
    weights, if any."""
    x = x.double().detach().requires_grad_()
    exact, _, cb, avg = brute_force(x, tau, weights)
    loss = a * exact + b * cb + ((avg * w).sum() if w is not None else 0.0)
    return torch.autograd.grad(loss, x)[0]


def assert_grad_close(got, want, x, tau):
    tol = entropy_tolerances(x, tau)["grad"] * float(want.abs().max())
    if x.dtype == torch.float16:  # rounding to float16, whose subnormals are 2**-24 apart
        tol = tol + want.abs() * 2.0 ** -11 + 2.0 ** -24
    if x.dtype == torch.bfloat16:
        tol = tol + want.abs() * 2.0 ** -8
    fail_rows(~((got.double() - want).abs() <= tol).all(1), "gradient", got=got, want=want)


@pytest.mark.parametrize("which", LOSS_WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d, tau", [(1, 1.0), (6, 0.5), (9, 100.0)])
def test_entropy_autograd_matches_brute_force(d, tau, dtype, which):
    a, b, use_w = LOSS_WEIGHTS[which]
    x = lfq_input(150, d, seed=7, scale=0.3 if tau > 1 else 1.0, dtype=dtype).requires_grad_()
    w = torch.randn(2 ** d, generator=gen(8), dtype=torch.float64) if use_w else None
    per_sample, codebook, avg = vqkernels.lfq_entropy(x, tau)
    loss = a * per_sample + b * codebook + ((avg * w.to(avg.dtype)).sum() if use_w else 0.0)
    loss.backward()
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad, truth_grad(x, tau, a, b, w), x.detach(), tau)


@pytest.mark.parametrize("impl", ENTROPY_BACKWARD)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_op_matches_brute_force(impl, dtype, layout):
    """vqkernels::lfq_entropy_backward called directly with arbitrary incoming gradients (the
    avg_probs input is the forward's, from the same implementation)."""
    d, tau = 8, 2.0
    x = lfq_input(120, d, seed=9, scale=0.5, dtype=dtype, layout=layout)
    avg = ENTROPY[impl](x, tau)[2]
    w = torch.randn(2 ** d, generator=gen(10), dtype=torch.float64)
    ct = compute_dtype(x)
    got = ENTROPY_BACKWARD[impl](torch.tensor(0.4, dtype=ct), torch.tensor(-2.0, dtype=ct), w.to(ct), x, avg, tau)
    assert got.dtype == dtype and got.shape == x.shape
    assert_grad_close(got, truth_grad(x, tau, 0.4, -2.0, w), x, tau)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_entropy_gradcheck(d):
    x = lfq_input(6, d, seed=11, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vqkernels.lfq_entropy(t, 0.3), (x,))


@pytest.mark.parametrize("impl", ENTROPY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_empty(impl, dtype):
    x = torch.empty(0, 5, dtype=dtype)
    check_entropy(x, 1.0, ENTROPY[impl](x, 1.0))
    ct = compute_dtype(x)
    grad = ENTROPY_BACKWARD[impl](torch.tensor(1.0, dtype=ct), torch.tensor(1.0, dtype=ct), torch.zeros(32, dtype=ct),
                                  x, torch.zeros(32, dtype=ct), 1.0)
    assert grad.shape == (0, 5) and grad.dtype == dtype


def test_op_matches_reference():
    x = lfq_input(500, 11, seed=12, scale=0.2)
    for got, want in zip(vqkernels.lfq_entropy(x, 3.0), reference.lfq_entropy(x, 3.0)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d", [12, 7])
def test_deterministic(isa, d):
    """Forward and backward are bitwise the same when repeated and with 1 or 2 threads, on every ISA (fixed row
    blocks and sum blocks; the batch average's product is the kernel's own, summed over the rows in order, where
    MKL on Intel Xeons splits that sum by its thread count). d = 12: 64 x 64 tiles; d = 7: 8 x 16 codes, AVX2's
    tile under AVX-512."""
    x64 = lfq_input(3000, d, seed=13, scale=0.05)

    def run():
        x = x64.clone().requires_grad_()
        per_sample, codebook, avg = vqkernels.lfq_entropy(x, 100.0)
        codes, indices, commit = vqkernels.lfq_quantize(x, 1.0)
        (per_sample - codebook + avg[::7].sum() + commit + codes.sum()).backward()
        return per_sample, codebook, avg, codes, indices, commit, x.grad

    assert_deterministic(run)


def entropy_opcheck_samples():
    x = torch.randn(9, 5, generator=gen(14))
    return [
        pytest.param(x, 1.0, id="f32"),
        pytest.param(x.clone().requires_grad_(), 100.0, id="f32-grad"),
        pytest.param(x.double().requires_grad_(), 0.5, id="f64-grad"),
        pytest.param(x.bfloat16().requires_grad_(), 1.0, id="bf16-grad"),
        pytest.param(x[:, :1].clone().requires_grad_(), 1.0, id="d1-grad"),
        pytest.param(with_layout(x, "transposed").requires_grad_(), 1.0, id="strided-grad"),
        pytest.param(x[:0], 1.0, id="empty"),
    ]


@pytest.mark.parametrize("x, tau", entropy_opcheck_samples())
def test_entropy_opcheck(x, tau):
    opcheck("lfq_entropy", (x, tau))


def entropy_backward_samples():
    x = torch.randn(9, 5, generator=gen(15))
    avg = vqkernels.lfq_entropy(x, 1.0)[2]
    w = torch.randn(32, generator=gen(16))
    one = torch.tensor(1.0)
    return [
        pytest.param((one, -one, w, x, avg, 1.0), id="f32"),
        pytest.param((one.double(), one.double(), w.double(), x.double(), avg.double(), 1.0), id="f64"),
        pytest.param((one, one, w, x.half(), avg, 2.0), id="f16"),
        pytest.param((one, one, w, x[:0], avg, 1.0), id="empty"),
    ]


@pytest.mark.parametrize("args", entropy_backward_samples())
def test_entropy_backward_opcheck(args):
    opcheck("lfq_entropy_backward", args)


# ---------------------------------------------------------------------------------------
# lfq_entropy: row weights (a row of weight 0 counts nowhere, whatever it holds)

WEIGHT_KINDS = ("mask", "positive", "one-row", "none-kept")


def row_weights(kind, n, seed, dtype=torch.float32):
    """[n] weights: a 0/1 mask (about 60% ones), reals in [0, 3) with about 20% exact zeros, one row of weight
    2.5 and the rest 0, or all 0."""
    g = gen(seed)
    if kind == "mask":
        w = (torch.rand(n, generator=g) < 0.6).float()
    elif kind == "positive":
        w = torch.rand(n, generator=g) * 3 * (torch.rand(n, generator=g) < 0.8)
    else:
        w = torch.zeros(n)
        if kind == "one-row" and n:
            w[n // 2] = 2.5
    return w.to(dtype)


def weighted_input(n, d, seed, kind, scale=1.0, dtype=torch.float32, layout="contiguous", w_dtype=torch.float32,
                   poison=True):
    """(x, weights): with ``poison`` the rows of weight 0 hold NaN, +inf or -inf (which must reach nothing)."""
    weights = row_weights(kind, n, seed + 1, w_dtype)
    x = torch.randn(n, d, generator=gen(seed), dtype=torch.float64) * scale
    if poison:
        dropped = (weights == 0).nonzero().flatten()
        for i, value in enumerate((float("nan"), float("inf"), -float("inf"))):
            x[dropped[i::3]] = value
    return with_layout(x.to(dtype), layout), weights


@st.composite
def weighted_cases(draw):
    return dict(draw(entropy_cases()), kind=draw(st.sampled_from(WEIGHT_KINDS)), w_dtype=draw(st.sampled_from(DTYPES)),
                poison=draw(st.booleans()))


@pytest.mark.parametrize("impl", ENTROPY)
@hyp_settings(50)
@given(case=weighted_cases())
def test_weighted_entropy_matches_brute_force(impl, case):
    x, w = weighted_input(case["n"], case["d"], case["seed"], case["kind"], case["scale"], case["dtype"],
                          case["layout"], case["w_dtype"], case["poison"])
    saved = bits(w).clone()
    check_entropy(x, case["tau"], ENTROPY[impl](x, case["tau"], w), w)
    assert torch.equal(bits(w), saved), "weights were modified"


@pytest.mark.parametrize("impl", ENTROPY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_weight_rows_count_nowhere(impl, dtype):
    """With a 0/1 mask (its dropped rows NaN or infinite) the outputs and the backward are those of the kept
    rows alone, within float32 rounding (the GEMM may group the sums differently); the dropped rows' gradient
    is exactly 0."""
    x, w = weighted_input(90, 7, seed=20, kind="mask", scale=0.5, dtype=dtype)
    keep = w != 0
    got, want = ENTROPY[impl](x, 3.0, w), ENTROPY[impl](x[keep], 3.0)
    ct = compute_dtype(x)
    tol = dict(rtol=1e-12, atol=1e-14) if ct == torch.float64 else dict(rtol=2e-6, atol=1e-8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    args = (torch.tensor(0.4, dtype=ct), torch.tensor(-1.5, dtype=ct), torch.randn(128, generator=gen(21)).to(ct))
    grad = ENTROPY_BACKWARD[impl](*args, x, got[2], 3.0, w)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert bool((grad[~keep] == 0).all())
    kept = ENTROPY_BACKWARD[impl](*args, x[keep], want[2], 3.0)
    torch.testing.assert_close(grad[keep].double(), kept.double(), rtol=1e-3 if dtype in (torch.float16, torch.bfloat16)
                               else tol["rtol"] * 10, atol=1e-6 * float(kept.abs().max()))


@pytest.mark.parametrize("impl", ENTROPY)
def test_weights_of_one_and_scaled_weights(impl):
    """Weights of 1 are no weights; multiplying every weight by a constant changes nothing (float64)."""
    x, w = weighted_input(60, 6, seed=22, kind="positive", dtype=torch.float64, w_dtype=torch.float64, poison=False)
    for a, b in zip(ENTROPY[impl](x, 2.0, torch.ones(60, dtype=torch.float64)), ENTROPY[impl](x, 2.0)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for a, b in zip(ENTROPY[impl](x, 2.0, w * 7.5), ENTROPY[impl](x, 2.0, w)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("impl", ENTROPY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_weights_give_zeros(impl, dtype):
    """Every weight 0 (and every row NaN): zeros, finite, and a zero gradient (the total 0 counts as 1)."""
    x = torch.full((12, 5), float("nan"), dtype=dtype)
    w = torch.zeros(12)
    out = ENTROPY[impl](x, 1.0, w)
    check_entropy(x, 1.0, out, w)
    ct = compute_dtype(x)
    grad = ENTROPY_BACKWARD[impl](torch.tensor(1.0, dtype=ct), torch.tensor(-1.0, dtype=ct),
                                  torch.ones(32, dtype=ct), x, out[2], 1.0, w)
    assert grad.dtype == dtype and bool((grad == 0).all())


@pytest.mark.parametrize("which", LOSS_WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d, tau", [(1, 1.0), (6, 0.5), (9, 100.0)])
def test_weighted_autograd_matches_brute_force(d, tau, dtype, which):
    """vqkernels.lfq_entropy with weights (zeros among them, on NaN / infinite rows) through autograd:
    x's gradient is the brute force's, 0 on the dropped rows."""
    a, b, use_w = LOSS_WEIGHTS[which]
    x, weights = weighted_input(150, d, seed=23, kind="positive", scale=0.3 if tau > 1 else 1.0, dtype=dtype)
    x.requires_grad_()
    w = torch.randn(2 ** d, generator=gen(24), dtype=torch.float64) if use_w else None
    per_sample, codebook, avg = vqkernels.lfq_entropy(x, tau, weights)
    loss = a * per_sample + b * codebook + ((avg * w.to(avg.dtype)).sum() if use_w else 0.0)
    loss.backward()
    assert x.grad.dtype == dtype
    keep = weights != 0
    assert bool((x.grad[~keep] == 0).all())
    assert_grad_close(x.grad, truth_grad(x, tau, a, b, w, weights), x.detach()[keep], tau)


@pytest.mark.parametrize("impl", ENTROPY_BACKWARD)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weighted_backward_op_matches_brute_force(impl, dtype, layout):
    d, tau = 8, 2.0
    x, weights = weighted_input(120, d, seed=25, kind="positive", scale=0.5, dtype=dtype, layout=layout)
    avg = ENTROPY[impl](x, tau, weights)[2]
    w = torch.randn(2 ** d, generator=gen(26), dtype=torch.float64)
    ct = compute_dtype(x)
    got = ENTROPY_BACKWARD[impl](torch.tensor(0.4, dtype=ct), torch.tensor(-2.0, dtype=ct), w.to(ct), x, avg, tau,
                                 weights)
    assert got.dtype == dtype and got.shape == x.shape
    assert_grad_close(got, truth_grad(x, tau, 0.4, -2.0, w, weights), x[weights != 0], tau)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_weighted_entropy_gradcheck(d):
    """float64 gradcheck with fractional weights and a row of weight 0 (its numerical gradient is 0 too)."""
    x = lfq_input(6, d, seed=27, dtype=torch.float64).requires_grad_()
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: vqkernels.lfq_entropy(t, 0.3, weights), (x,))


def test_weighted_deterministic(isa):
    """Bitwise the same when repeated and with 1 or 2 threads, with weights too."""
    x64, weights = weighted_input(3000, 12, seed=28, kind="positive", scale=0.05)

    def run():
        x = x64.clone().requires_grad_()
        per_sample, codebook, avg = vqkernels.lfq_entropy(x, 100.0, weights)
        (per_sample - codebook + avg[::7].sum()).backward()
        return per_sample, codebook, avg, x.grad

    assert_deterministic(run)


def weighted_opcheck_samples():
    x = torch.randn(9, 5, generator=gen(29))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 0.0, 1.0, 3.0, 1.0])
    return [
        pytest.param(x, 1.0, w, id="f32"),
        pytest.param(x.clone().requires_grad_(), 100.0, w, id="f32-grad"),
        pytest.param(x.double().requires_grad_(), 0.5, w.double(), id="f64-grad"),
        pytest.param(x.bfloat16().requires_grad_(), 1.0, w.half(), id="bf16-grad-f16-weights"),
        pytest.param(with_layout(x, "transposed").requires_grad_(), 1.0, torch.stack([w, w], 1)[:, 0],
                     id="strided-grad"),
        pytest.param(x.clone().requires_grad_(), 1.0, torch.zeros(9), id="zero-weights-grad"),
        pytest.param(x[:0], 1.0, w[:0], id="empty"),
    ]


@pytest.mark.parametrize("x, tau, weights", weighted_opcheck_samples())
def test_weighted_entropy_opcheck(x, tau, weights):
    opcheck("lfq_entropy", (x, tau, weights))


def test_weighted_entropy_backward_opcheck():
    x, w = weighted_input(9, 5, seed=30, kind="positive", poison=False)
    avg = vqkernels.lfq_entropy(x, 1.0, w)[2]
    one = torch.tensor(1.0)
    opcheck("lfq_entropy_backward", (one, -one, torch.randn(32, generator=gen(31)), x, avg, 1.0, w))
    opcheck("lfq_entropy_backward", (one.double(), one.double(), torch.randn(32, generator=gen(31)).double(),
                                     x.double(), avg.double(), 1.0, w.half()))

# ---------------------------------------------------------------------------------------
# bad inputs

X = torch.randn(4, 3)
BAD_X = {
    "x-1d": (torch.randn(3), r"\bx must be 2-D"),
    "x-3d": (torch.randn(2, 4, 3), r"\bx must be 2-D"),
    "x-int": (X.long(), r"\bx must be float32, float16, bfloat16 or float64"),
    "x-complex": (X.to(torch.complex64), r"\bx must be float"),
    "d-0": (X[:, :0], r"\bx must have d in \[1, \d+\] columns \(bits\), got shape \(4, 0\)"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", ["lfq_quantize", "lfq_entropy"])
@pytest.mark.parametrize("case", BAD_X)
def test_rejects_x(case, op, device):
    x, pattern = BAD_X[case]
    with pytest.raises(ERRORS, match=pattern):
        getattr(vqkernels, op)(x.to(device), 1.0)
    with pytest.raises(ERRORS, match=pattern):
        getattr(reference, op)(x, 1.0)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("impls, value, name", [(QUANTIZE, float("inf"), "codebook_scale"),
                                                (QUANTIZE, float("nan"), "codebook_scale"),
                                                (ENTROPY, float("-inf"), "inv_temperature"),
                                                (ENTROPY, float("nan"), "inv_temperature")])
def test_rejects_non_finite_scalars(impls, value, name, device):
    for impl in impls.values():
        with pytest.raises(ERRORS, match=rf"{name} must be finite, got {value}"):
            impl(X.to(device), value)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rejects_too_many_bits(device):
    with pytest.raises(ERRORS, match=r"\bx must have d in \[1, 63\] columns"):
        vqkernels.lfq_quantize(torch.randn(2, 64, device=device))
    with pytest.raises(ERRORS, match=r"\bx must have d in \[1, 30\] columns"):
        vqkernels.lfq_entropy(torch.randn(2, 31, device=device))


def backward_args(**changes):
    ct = torch.float32
    args = dict(grad_per_sample_entropy=torch.tensor(1.0), grad_codebook_entropy=torch.tensor(1.0),
                grad_avg_probs=torch.zeros(8, dtype=ct), x=X, avg_probs=torch.zeros(8, dtype=ct), inv_temperature=1.0)
    args.update(changes)
    return args


BAD_BACKWARD = {
    "grad-per-sample-shape": (dict(grad_per_sample_entropy=torch.ones(2)),
                              r"grad_per_sample_entropy must be a scalar, got shape \(2,\)"),
    "grad-codebook-int": (dict(grad_codebook_entropy=torch.tensor(1)), r"grad_codebook_entropy must be float"),
    "grad-avg-shape": (dict(grad_avg_probs=torch.zeros(16)),
                       r"grad_avg_probs must have shape \[2\*\*d=8\], got \(16,\)"),
    "avg-shape": (dict(avg_probs=torch.zeros(8, 1)), r"avg_probs must have shape \[2\*\*d=8\], got \(8, 1\)"),
    "avg-device": (dict(avg_probs=torch.zeros(8, device="meta")), r"avg_probs is on meta but x is on cpu"),
    "tau-nan": (dict(inv_temperature=float("nan")), r"inv_temperature must be finite"),
    "x-1d": (dict(x=torch.randn(3)), r"\bx must be 2-D"),
}


@pytest.mark.parametrize("impl", ENTROPY_BACKWARD)
@pytest.mark.parametrize("case", BAD_BACKWARD)
def test_backward_rejects(case, impl):
    changes, pattern = BAD_BACKWARD[case]
    with pytest.raises(ERRORS, match=pattern):
        ENTROPY_BACKWARD[impl](**backward_args(**changes))


def test_backward_accepts_the_base_arguments():
    assert ENTROPY_BACKWARD["op"](**backward_args()).shape == X.shape


BAD_WEIGHTS = {
    "2-d": (torch.ones(4, 1), r"weights must have shape \[N=4\], got \(4, 1\)"),
    "length": (torch.ones(3), r"weights must have shape \[N=4\], got \(3,\)"),
    "bool": (torch.ones(4, dtype=torch.bool), r"weights must be float32, float16, bfloat16 or float64"),
    "int": (torch.ones(4, dtype=torch.int64), r"weights must be float32, float16, bfloat16 or float64"),
    "device": (torch.ones(4, device="meta"), r"weights is on meta but x is on cpu"),
}


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_rejects_bad_weights(case):
    """lfq_entropy and its backward (the op, its fake kernel on meta tensors, the reference) name the bad weights."""
    weights, pattern = BAD_WEIGHTS[case]
    for impl in ENTROPY.values():
        with pytest.raises(ERRORS, match=pattern):
            impl(X, 1.0, weights)
    for impl in ENTROPY_BACKWARD.values():
        with pytest.raises(ERRORS, match=pattern):
            impl(**backward_args(weights=weights))
    if case != "device":
        with pytest.raises(ERRORS, match=pattern):
            vqkernels.lfq_entropy(X.to("meta"), 1.0, weights.to("meta"))


# ---------------------------------------------------------------------------------------
# memory: d = 16, N = 4096; the N x 2**d float32 matrix would be 1 GiB

MEMORY_SCRIPT = r"""
import vqkernels
from vqkernels import reference

def op_step(x):
    x = x.clone().requires_grad_()
    per_sample, codebook, avg = vqkernels.lfq_entropy(x, 100.0)
    (per_sample - codebook).backward()
    assert x.grad.shape == x.shape

def reference_step(x):
    per_sample, codebook, avg = reference.lfq_entropy(x, 100.0)
    one = torch.tensor(1.0)
    assert reference.lfq_entropy_backward(one, -one, torch.zeros_like(avg), x, avg, 100.0).shape == x.shape

def brute_force_step(x):  # the N x 2**d probabilities, to show the measurement sees them
    c = torch.arange(2 ** x.shape[1])
    signs = ((c.unsqueeze(1) >> torch.arange(x.shape[1] - 1, -1, -1)) & 1).float() * 2 - 1
    p = torch.softmax(200.0 * x @ signs.T, 1)
    assert p.shape == (x.shape[0], 2 ** x.shape[1])

g = torch.Generator().manual_seed(0)
x16 = torch.randn(4096, 16, generator=g)
x10 = x16[:, :10]
print(measure(op_step, (x16[:64],), (x16,)), measure(reference_step, (x16[:64],), (x16,)),
      measure(brute_force_step, (x10[:64],), (x10,)))
"""


def test_peak_memory_d16():
    """lfq_entropy forward + backward at d = 16, N = 4096 (float32): the N x 2**d probabilities would be
    1 GiB; the C++ op and the reference must each stay within 64 MiB beyond the inputs (they hold
    O(N 2**(d/2) + 2**d): a few N x 256 factors). Measured as in test_nearest_code: the peak resident
    size (VmHWM, reset through /proc/self/clear_refs) in a fresh process, with glibc giving every
    block of 128 KiB or more its own mapping, unmapped on free. The same measurement of the brute-force
    N x 2**10 softmax must see at least its 16 MiB, so the method is not blind."""
    op_kib, reference_kib, brute_kib = peak_memory_kib(MEMORY_SCRIPT)
    assert brute_kib >= 4096 * 2 ** 10 * 4 // 1024, f"the measurement missed the 16 MiB matrix ({brute_kib} KiB)"
    assert op_kib <= 64 * 1024, f"lfq_entropy (op) used {op_kib / 1024:.1f} MiB"
    assert reference_kib <= 64 * 1024, f"lfq_entropy (reference) used {reference_kib / 1024:.1f} MiB"



# ---------------------------------------------------------------------------------------
# lfq_entropy's GPU kernels (CUDA, Triton; the `backend` fixture): the Triton interpreter's shapes tiny. The
# Triton tests judge against brute_force, the CUDA tests against the reference on float64 copies.

entropy_backward = torch.ops.vqkernels.lfq_entropy_backward


def lfq_weights(n, seed, device="cpu"):
    """[n] float32 row weights in [0, 3), about a third of them exactly 0."""
    g = gen(seed)
    return (torch.rand(n, generator=g) * 3 * (torch.rand(n, generator=g) < 0.67)).to(device)


def check_brute_force(x, inv_t, out, grads, grad, weights=None):
    """Forward outputs within 2e-5 relative of brute_force (float32); the backward's (the incoming gradients
    ``grads``) within 1e-5 of the largest (float32; 1e-2 for half types)."""
    xc = x.cpu().double()
    wc = None if weights is None else weights.cpu()
    exact, _, cb, avg = brute_force(xc, inv_t, wc)
    for got, want in zip(out, (exact, cb, avg)):
        torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=2e-5, atol=1e-7)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    want = truth_grad(xc, inv_t, float(grads[0]), float(grads[1]), grads[2].cpu().double(), wc)
    keep = torch.ones(x.shape[0], dtype=torch.bool) if wc is None else wc != 0
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.cpu()[keep].double(), want[keep], rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 2), (33, 5), (20, 9)], ids=lambda s: "x".join(map(str, s)))
@on_backends("triton")
def test_kernel_vs_brute_force(backend, shape, dtype):
    n, d = shape
    dev = backend.device
    x = seeded_randn(n, d, seed=n * d, dtype=dtype, device=dev, scale=0.05)
    out = vqkernels.lfq_entropy(x, 10.0)
    assert all(t.dtype == torch.float32 for t in out) and out[2].shape == (2 ** d,)
    grads = seeded_randn((), seed=60, device=dev), seeded_randn((), seed=61, device=dev), seeded_randn(2 ** d, seed=62,
                                                                                                          device=dev)
    check_brute_force(x, 10.0, out, grads, entropy_backward(*grads, x, out[2], 10.0))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 2), (33, 5), (20, 9)], ids=lambda s: "x".join(map(str, s)))
@on_backends("triton")
def test_kernel_weighted_vs_brute_force(backend, shape, dtype):
    """Row weights: the weighted truth over the rows of non-zero weight; those of weight 0 hold NaN and
    infinities and get a zero gradient."""
    n, d = shape
    dev = backend.device
    w = lfq_weights(n, seed=n + d, device=dev)
    w[0] = 0.0
    x = seeded_randn(n, d, seed=n * d + 1, dtype=dtype, device=dev, scale=0.05)
    x[w == 0] = float("nan")
    x[0, 0] = float("inf")
    out = vqkernels.lfq_entropy(x, 10.0, w)
    grads = seeded_randn((), seed=63, device=dev), seeded_randn((), seed=64, device=dev), seeded_randn(2 ** d, seed=65,
                                                                                                          device=dev)
    grad = entropy_backward(*grads, x, out[2], 10.0, w)
    assert bool((grad[w == 0] == 0).all())
    check_brute_force(x, 10.0, out, grads, grad, w)


def lfq_x(n, d, seed, dtype=torch.float32, scale=0.3):
    return (torch.randn(n, d, generator=gen(seed)) * scale).to(dtype)


def check_lfq(x, inv_t, device):
    """The op on device against the reference on float64 copies."""
    ps, cbe, avg = vqkernels.lfq_entropy(x.to(device), inv_t)
    rps, rcbe, ravg = reference.lfq_entropy(f64(x), inv_t)
    assert ps.dtype == cbe.dtype == avg.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert ps.shape == () and cbe.shape == () and avg.shape == (2 ** x.shape[1],)
    close_to_f64(avg, ravg, rtol=1e-4, atol=1e-7)
    close_to_f64(ps, rps, rtol=1e-4, atol=1e-6)
    close_to_f64(cbe, rcbe, rtol=1e-4, atol=1e-6)
    return ps, cbe, avg


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("inv_t", [1.0, 10.0])
@per_backend("n, d", {"cuda": [(0, 4), (1, 1), (7, 2), (7, 5), (300, 12), (2000, 17)]})
def test_kernel_matches_reference(backend, n, d, inv_t, dtype):
    check_lfq(lfq_x(n, d, seed=n + d, dtype=dtype), inv_t, backend.device)


@on_backends("cuda")
def test_kernel_strided_and_special_values(backend):
    x = lfq_x(50, 6, seed=24)
    x[3, 1] = float("inf")
    x[4, 2] = -float("inf")
    check_lfq(x.t().contiguous().t(), 2.0, backend.device)
    x[9, 0] = float("nan")  # a NaN row: every code's average and both entropies NaN, as the reference
    ps, cbe, avg = check_lfq(x, 2.0, backend.device)
    assert torch.isnan(avg).all() and torch.isnan(ps) and torch.isnan(cbe)


def lfq_backward_args(n, d, seed, dtype=torch.float32, inv_t=3.0):
    g = gen(seed)
    x = lfq_x(n, d, seed, dtype)
    _, _, avg = reference.lfq_entropy(f64(x), inv_t)
    return (torch.randn((), generator=g), torch.randn((), generator=g), torch.randn(2 ** d, generator=g) * 0.1, x,
            avg.float(), inv_t)


def on(device, args):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)


def check_lfq_backward(args, device):
    grad = entropy_backward(*on(device, args))
    rgrad = reference.lfq_entropy_backward(*(f64(t) if isinstance(t, torch.Tensor) else t for t in args))
    assert grad.dtype == args[3].dtype and grad.shape == args[3].shape and grad.is_contiguous()
    scale = max(rgrad.abs().max().item(), 1e-6) if rgrad.numel() else 1.0
    close_to_f64(grad, rgrad, rtol=max(KERNEL_TOL[grad.dtype]["rtol"], 1e-3),
                 atol=max(KERNEL_TOL[grad.dtype]["atol"], 1e-4) * scale)
    return grad


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("n, d", {"cuda": [(0, 3), (1, 1), (7, 2), (7, 5), (300, 12), (1000, 16)]})
def test_kernel_backward_matches_reference(backend, n, d, dtype):
    check_lfq_backward(lfq_backward_args(n, d, seed=n * d + 1, dtype=dtype), backend.device)


@on_backends("cuda")
def test_kernel_backward_infinite_logits(backend):
    args = list(lfq_backward_args(20, 6, seed=25))
    args[3][2, 3] = float("inf")  # sigmoid saturates: the per-sample term adds 0, no NaN
    grad = check_lfq_backward(tuple(args), backend.device)
    assert not torch.isnan(grad).any()


def weighted_lfq_args(n, d, seed, dtype=torch.float32, inv_t=3.0):
    """Backward arguments with row weights (lfq_backward_args + weights); the rows of weight 0 hold NaN."""
    args = list(lfq_backward_args(n, d, seed, dtype, inv_t))
    w = lfq_weights(n, seed + 1000)
    args[3][w == 0] = float("nan")
    args[4] = reference.lfq_entropy(f64(args[3]), inv_t, w)[2].float()
    return tuple(args) + (w,)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("n, d", {"cuda": [(1, 1), (7, 2), (7, 5), (300, 12), (2000, 17)]})
def test_kernel_weighted_matches_reference(backend, n, d, dtype):
    """Row weights: the reference's weighted outputs and gradient; the rows of weight 0 (NaN here) count
    nowhere and get a zero gradient."""
    args = weighted_lfq_args(n, d, seed=n * d + 3, dtype=dtype)
    x, w = args[3], args[6]
    ps, cbe, avg = vqkernels.lfq_entropy(x.to(backend.device), 3.0, w.to(backend.device))
    rps, rcbe, ravg = reference.lfq_entropy(f64(x), 3.0, w)
    assert ps.dtype == cbe.dtype == avg.dtype == torch.float32
    close_to_f64(avg, ravg, rtol=1e-4, atol=1e-7)
    close_to_f64(ps, rps, rtol=1e-4, atol=1e-6)
    close_to_f64(cbe, rcbe, rtol=1e-4, atol=1e-6)
    grad = check_lfq_backward(args, backend.device)
    assert bool((grad.cpu()[w == 0] == 0).all())


@per_backend("make, inv_t, mask_seed", {"cpu, triton": [(lambda: seeded_randn(40, 6, seed=66, scale=0.2), 3.0, 67)],
                                        "cuda": [(lambda: lfq_x(500, 9, seed=32), 2.0, 33)]})
def test_kernel_weights_mask_and_none_kept(backend, make, inv_t, mask_seed):
    """A 0/1 mask gives the kept rows' results (float32 rounding apart); all-zero weights give zeros and a zero
    gradient."""
    x = make().to(backend.device)
    n, d = x.shape
    w = (torch.rand(n, generator=gen(mask_seed)) < 0.5).float().to(backend.device)
    keep = w != 0
    for a, b in zip(vqkernels.lfq_entropy(x, inv_t, w), vqkernels.lfq_entropy(x[keep], inv_t)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    zero = torch.zeros(n, device=backend.device)
    none = vqkernels.lfq_entropy(x, inv_t, zero)
    assert [t.tolist() for t in none] == [0.0, 0.0, [0.0] * 2 ** d]
    grads = (seeded_randn((), seed=0, device=backend.device), seeded_randn((), seed=1, device=backend.device),
             seeded_randn(2 ** d, seed=2, device=backend.device))
    assert bool((entropy_backward(*grads, x, none[2], inv_t, zero) == 0).all())


@per_backend("make", {
    "triton": [lambda: (seeded_randn(40, 6, seed=66, scale=0.2, dtype=torch.float64), 2.0,
                        (torch.rand(40, generator=gen(67)) < 0.5).float()),
               lambda: (seeded_randn(6, 3, seed=68, dtype=torch.float64), 2.0, None)],
    "cuda": [lambda: (lfq_x(40, 6, seed=27, dtype=torch.float64), 2.0, None),
             lambda: (lfq_x(40, 6, seed=34, dtype=torch.float64), 2.0, lfq_weights(40, seed=35).double())]})
def test_kernel_float64_is_the_reference(backend, make):
    x, inv_t, w = on(backend.device, make())
    args = (x, inv_t) if w is None else (x, inv_t, w)
    assert_float64_is_the_reference(vqkernels.lfq_entropy(*args), reference.lfq_entropy(*args),
                                    reference.lfq_entropy(*on("cpu", args)), rtol=1e-4, atol=1e-6)


@on_backends("cuda")
def test_kernel_backward_float64_is_the_reference(backend):
    args = on(backend.device, lfq_backward_args(40, 6, seed=27, dtype=torch.float64))
    assert_float64_is_the_reference((entropy_backward(*args),), (reference.lfq_entropy_backward(*args),),
                                    (reference.lfq_entropy_backward(*on("cpu", args)),), **KERNEL_TOL[torch.float64])


@on_backends("triton")
def test_kernel_split_reduction(backend, monkeypatch):
    """The split-K GEMM (slices of K summed in slice order; slices of 64 rows here, so that a small N splits):
    still the truth, and bitwise repeatable."""
    from vqkernels.triton import lfq
    monkeypatch.setattr(lfq, "SPLIT_MIN_K", 64)
    x = seeded_randn(300, 3, seed=75, scale=0.1, device=backend.device)
    got = vqkernels.lfq_entropy(x, 4.0)
    exact, _, cb, avg = brute_force(x.cpu().double(), 4.0)
    for a, want in zip(got, (exact, cb, avg)):
        torch.testing.assert_close(a.cpu().double(), want, rtol=2e-5, atol=1e-7)
    for a, b in zip(got, vqkernels.lfq_entropy(x, 4.0)):
        assert_bitwise_equal(a, b)


@on_backends("triton")
def test_kernel_matches_reference_and_saturated_bits(backend):
    dev = backend.device
    x = seeded_randn(25, 7, seed=63, scale=0.3, device=dev)
    x[3, 2] = float("inf")
    x[4, :] = 50.0  # every bit certain: entropy 0, no NaN
    got = vqkernels.lfq_entropy(x, 100.0)
    for a, b in zip(got, reference.lfq_entropy(x.cpu(), 100.0)):
        assert bool(a.isfinite().all())
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-7)
    args = (seeded_randn((), seed=64, device=dev), seeded_randn((), seed=65, device=dev),
            seeded_randn(128, seed=66, device=dev), x, got[2], 100.0)
    g = entropy_backward(*args)
    r = reference.lfq_entropy_backward(*on("cpu", args))
    assert bool(g.isfinite().all())
    torch.testing.assert_close(g.cpu(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


@on_backends("triton")
def test_kernel_nan_and_empty(backend):
    dev = backend.device
    grads = (seeded_randn((), seed=0, device=dev), seeded_randn((), seed=1, device=dev),
             seeded_randn(16, seed=2, device=dev))
    x = seeded_randn(6, 4, seed=67, device=dev)
    x[2, 1] = float("nan")
    out = vqkernels.lfq_entropy(x, 1.0)
    assert all(bool(t.isnan().all()) for t in out)
    assert bool(entropy_backward(*grads, x, out[2], 1.0).isnan().all())
    empty = vqkernels.lfq_entropy(x[:0], 1.0)
    assert [t.tolist() for t in empty] == [0.0, 0.0, [0.0] * 16]
    assert entropy_backward(*grads, x[:0], empty[2], 1.0).shape == (0, 4)


@on_backends("triton")
def test_kernel_strided_and_repeatable(backend):
    dev = backend.device
    x = with_layout(seeded_randn(19, 6, seed=69, scale=0.1, device=dev), "strided")
    a = vqkernels.lfq_entropy(x, 5.0)
    b = vqkernels.lfq_entropy(x.contiguous(), 5.0)
    for u, v in zip(a, b):
        assert torch.equal(bits(u), bits(v))
    grads = (seeded_randn((), seed=0, device=dev), seeded_randn((), seed=1, device=dev),
             seeded_randn(64, seed=2, device=dev))
    assert torch.equal(bits(entropy_backward(*grads, x, a[2], 5.0)),
                       bits(entropy_backward(*grads, x.contiguous(), a[2], 5.0)))


@per_backend("weighted", {"cuda": [False, True]})
def test_kernel_deterministic_bitwise(backend, weighted):
    args = on(backend.device, weighted_lfq_args(5000, 14, seed=36) if weighted else lfq_backward_args(5000, 14,
                                                                                                      seed=26))
    if not weighted:
        x = lfq_x(5000, 14, seed=26).to(backend.device)
        for a, b in zip(vqkernels.lfq_entropy(x, 5.0), vqkernels.lfq_entropy(x, 5.0)):
            assert_bitwise_equal(a, b)
    else:
        x, w = args[3], args[6]
        for a, b in zip(vqkernels.lfq_entropy(x, 3.0, w), vqkernels.lfq_entropy(x, 3.0, w)):
            assert_bitwise_equal(a, b)
    assert_bitwise_equal(entropy_backward(*args), entropy_backward(*args))


@on_backends("cuda")
def test_cuda_autocast(backend):
    """The CUDA kernel under autocast: float32 outputs, the reference's values."""
    x = lfq_x(64, 10, seed=28).to(backend.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = backend.ops.lfq_entropy(x, 4.0)
    for a, b in zip(out, reference.lfq_entropy(f64(x), 4.0)):
        assert a.dtype == torch.float32
        close_to_f64(a, b, rtol=1e-4, atol=1e-6)


@on_backends("cuda")
def test_cuda_weighted_no_host_sync(backend):
    """Forward and backward with weights never synchronise with the host (the weights' total stays on the
    device)."""
    args = on(backend.device, weighted_lfq_args(300, 10, seed=37))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.ops.lfq_entropy(args[3], 3.0, args[6])
        backend.ops.lfq_entropy_backward(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@per_backend("make", {
    "triton": [lambda: (seeded_randn(9, 5, seed=70, scale=0.1), 10.0),
               lambda: (seeded_randn(9, 5, seed=70, scale=0.1).bfloat16(), 3.0),
               lambda: (seeded_randn(9, 5, seed=70, scale=0.1), 10.0, lfq_weights(9, seed=76))],
    "cuda": [lambda: (lfq_x(30, 7, seed=30, dtype=torch.bfloat16), 3.0),
             lambda: (lambda a: (a[3].nan_to_num(0.5).bfloat16(), 3.0, a[6].half()))(
                 weighted_lfq_args(30, 7, seed=38))]})
def test_kernel_opcheck(backend, make):
    kernel_opcheck(backend, "lfq_entropy", on(backend.device, make()))


def _triton_backward_sample(weighted):
    x = seeded_randn(9, 5, seed=70, scale=0.1)
    w = lfq_weights(9, seed=76) if weighted else None
    avg = reference.lfq_entropy(x, 10.0, w)[2]
    args = (seeded_randn((), seed=71), seeded_randn((), seed=72), seeded_randn(32, seed=73), x, avg, 10.0)
    return args + ((w.half(),) if weighted else ())


@per_backend("make", {"triton": [partial(_triton_backward_sample, False), partial(_triton_backward_sample, True)],
                      "cuda": [partial(lfq_backward_args, 30, 7, seed=31), partial(weighted_lfq_args, 30, 7, seed=38)]})
def test_kernel_backward_opcheck(backend, make):
    kernel_opcheck(backend, "lfq_entropy_backward", on(backend.device, make()))


def _bad_x(device):
    return seeded_randn(4, 5, seed=74, device=device)


KERNEL_BAD = {
    "triton": [(lambda x: ("lfq_entropy", (x[0], 1.0)), "x must be 2-D"),
               (lambda x: ("lfq_entropy", (seeded_randn(2, 31, seed=0, device=x.device), 1.0)), r"d in \[1, 30\]"),
               (lambda x: ("lfq_entropy", (x[:, :0], 1.0)), r"d in \[1, 30\]"),
               (lambda x: ("lfq_entropy", (x, float("inf"))), "inv_temperature must be finite"),
               (lambda x: ("lfq_entropy_backward", (x[0, 0], x[0, 1], seeded_randn(32, seed=2, device=x.device), x,
                                                    seeded_randn(16, seed=3, device=x.device), 1.0)),
                r"avg_probs must have shape \[2\*\*d"),
               (lambda x: ("lfq_entropy", (x, 1.0, seeded_randn(3, seed=0, device=x.device))),
                r"weights must have shape \[N=4\], got \(3,\)"),
               (lambda x: ("lfq_entropy_backward", (x[0, 0], x[0, 1], seeded_randn(32, seed=2, device=x.device), x,
                                                    seeded_randn(32, seed=3, device=x.device), 1.0,
                                                    seeded_randn(3, seed=0, device=x.device))),
                r"weights must have shape \[N=4\], got \(3,\)"),
               (lambda x: ("lfq_entropy", (x, 1.0, seeded_randn(4, seed=0, device=x.device).long())),
                r"weights must be float32, float16, bfloat16 or float64"),
               (lambda x: ("lfq_entropy_backward", (x[0, 0], x[0, 1], seeded_randn(32, seed=2, device=x.device), x,
                                                    seeded_randn(32, seed=3, device=x.device), 1.0,
                                                    seeded_randn(4, seed=0, device=x.device).long())),
                r"weights must be float32, float16, bfloat16 or float64")],
    "cuda": [(lambda x: ("lfq_entropy", (torch.zeros(2, 31, device=x.device), 1.0)),
              r"x must have d in \[1, 30\] columns"),
             (lambda x: ("lfq_entropy", (torch.zeros(2, 3, device=x.device), float("inf"))),
              "inv_temperature must be finite"),
             (lambda x: ("lfq_entropy", (torch.zeros(2, 3, device=x.device, dtype=torch.int32), 1.0)),
              "x must be float32, float16, bfloat16 or float64"),
             (lambda x: ("lfq_entropy_backward", (lambda a: a[:2] + (a[2][:4],) + a[3:])(
                 on(x.device, lfq_backward_args(5, 3, seed=29)))), r"grad_avg_probs must have shape \[2\*\*d=8\]"),
             (lambda x: ("lfq_entropy", (torch.zeros(4, 3, device=x.device), 1.0, torch.ones(4))),
              r"weights is on cpu but x is on cuda"),
             (lambda x: ("lfq_entropy", (torch.zeros(4, 3, device=x.device), 1.0, torch.ones(5, device=x.device))),
              r"weights must have shape \[N=4\], got \(5,\)"),
             (lambda x: ("lfq_entropy", (torch.zeros(4, 3, device=x.device), 1.0,
                                         torch.ones(4, device=x.device, dtype=torch.bool))),
              r"weights must be float32, float16, bfloat16 or float64")],
}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    assert_kernel_rejects(backend, *make(_bad_x(backend.device)), match)


@on_backends("triton", gpu=True)
def test_kernel_large(backend):
    dev = backend.device
    x = seeded_randn(16384, 18, seed=88, device=dev, scale=0.05)
    args = tuple(seeded_randn(shape, seed=seed, device=dev) for shape, seed in (((), 89), ((), 90), ((2 ** 18,), 91)))
    w = lfq_weights(16384, seed=94, device=dev)
    for weights in ((), (w,)):
        got = vqkernels.lfq_entropy(x, 10.0, *weights)
        want = reference.lfq_entropy(x.double(), 10.0, *weights)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-9)
        g = entropy_backward(*args, x, got[2], 10.0, *weights)
        r = reference.lfq_entropy_backward(*(a.double() for a in args), x.double(), want[2], 10.0, *weights)
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3 * r.abs().max().item())


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "lfq_entropy", seeded_randn(4, 5, seed=92), 1.0)
