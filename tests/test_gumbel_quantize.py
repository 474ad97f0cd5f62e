"""vqkernels.gumbel_quantize (Gumbel-softmax quantization with taming-transformers' KL term)
and vqkernels::gumbel_quantize_backward.

The kernels' ISA-specific code is their row primitives (csrc/cpu/softmax_rows.h): AVX2 rows
under the avx2 and avx512 ISAs, scalar rows under portable. So instead of the `isa`
fixture, the `impl` fixture runs the C++ kernels with the AVX2 and the portable rows, and
the pure-PyTorch reference called directly.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, LAYOUTS, as_input, assert_deterministic, bits, compute_dtype, fail_rows, forced_cpu_isa,
                        gen, hyp_settings, opcheck, reference, run_without_extension, unit_roundoff, vqkernels)

KL_EPS = 1e-10  # taming-transformers: sum_k q_k log(q_k K + 1e-10)
TAUS = (0.3, 1.0, 2.5)
# unit roundoff of each output dtype (the results are rounded to it once)
OUT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                torch.bfloat16: 2.0 ** -8}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

FORWARD_IMPLS = {"op": torch.ops.vqkernels.gumbel_quantize, "reference": reference.gumbel_quantize}
BACKWARD_IMPLS = {"op": torch.ops.vqkernels.gumbel_quantize_backward,
                  "reference": reference.gumbel_quantize_backward}


IMPL_PARAMS = (["avx2", "portable"] if vqkernels.compiled() else []) + ["reference"]


@pytest.fixture(params=IMPL_PARAMS)
def impl(request):
    """'reference', or the C++ kernels with the CPU ISA forced to the parameter (restored after)."""
    if request.param == "reference":
        yield "reference"
        return
    with forced_cpu_isa(request.param):
        yield request.param


@pytest.fixture
def forward_impl(impl):
    return FORWARD_IMPLS["reference" if impl == "reference" else "op"]


@pytest.fixture
def backward_impl(impl):
    return BACKWARD_IMPLS["reference" if impl == "reference" else "op"]


def gumbel_noise(n, k, seed):
    """float64 Gumbel(0, 1) noise [n, k] as F.gumbel_softmax draws it: -log(Exp(1))."""
    return -torch.empty(n, k, dtype=torch.float64).exponential_(generator=gen(seed)).log()


def problem(n, k, d, seed, scale=2.0):
    """float64 (logits [n, k], codebook [k, d], gumbels [n, k])."""
    g = gen(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64)
    return logits, codebook, gumbel_noise(n, k, seed + 1)


def softmax64(t):
    t = t.double()
    e = torch.exp(t - t.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def truth(logits, codebook, gumbels, tau):
    """float64 truth from the dtype-rounded inputs, written out independently of the
    reference: scores s = logits + gumbels, y = softmax(s / tau), and taming's
    kl = mean_n sum_k q log(q K + 1e-10) with q = softmax(logits)."""
    s = logits.double() + gumbels.double()
    y = softmax64(s / tau)
    q = softmax64(logits)
    kl = (q * torch.log(q * logits.shape[1] + KL_EPS)).sum(1).mean()
    return s, y, kl


def check_forward(logits, codebook, gumbels, tau, hard, outputs):
    """Judge (quantized, indices, kl) against the float64 truth; rows without NaNs.

    * indices: a maximum of s = logits + gumbels within the rounding of the one addition in
      the compute dtype (4 u (|logits| + |gumbels|) per row);
    * hard: quantized is exactly codebook[indices] in the output dtype;
    * soft: quantized = y @ codebook within u * (K + 8 + 4 * range(s) / tau) * max|c|
      (exp's argument carries an error of u |s - max s| / tau, each y_k a few more u, and
      the K-term sum K u since sum y = 1), plus one rounding to the output dtype;
    * kl: within 16 u (30 + range(logits)) (1 + log2(N K)): each term's log is at most
      max(log K, 23) in size, q's relative error a few u (1 + range(logits)), and the
      reference sums all N K terms in the compute dtype (pairwise).
    """
    quantized, indices, kl = outputs
    n, k = logits.shape
    d = codebook.shape[1]
    out_dtype = torch.promote_types(logits.dtype, codebook.dtype)
    cdt = compute_dtype(logits, codebook, gumbels)
    u = unit_roundoff(cdt)
    assert quantized.shape == (n, d) and quantized.dtype == out_dtype, (quantized.shape, quantized.dtype)
    assert indices.shape == (n,) and indices.dtype == torch.int64, (indices.shape, indices.dtype)
    assert kl.shape == () and kl.dtype == cdt, (kl.shape, kl.dtype)
    if n == 0:
        assert float(kl) == 0.0
        return
    s, y, kl_true = truth(logits, codebook, gumbels, tau)
    fail_rows((indices < 0) | (indices >= k), "index out of range", index=indices)
    chosen = s.gather(1, indices.clamp(0, k - 1).unsqueeze(1)).squeeze(1)
    best = s.max(1).values
    tol_s = 4 * u * (logits.double().abs() + gumbels.double().abs()).max(1).values
    fail_rows(chosen < best - tol_s, "index is not a maximum of logits + gumbels", index=indices,
              chosen=chosen, best=best)
    if hard:
        assert bits(quantized).equal(bits(codebook[indices].to(out_dtype))), "hard: quantized must be codebook rows"
    else:
        want = y @ codebook.double()
        spread = (s.max(1).values - s.min(1).values) / tau
        # the output's rounding: relative, and absolute below the smallest normal (float16's subnormals start
        # at 6.1e-5, where a value like -5.17e-5 rounds by up to 3e-8)
        tol = (u * (k + 8 + 4 * spread) * codebook.double().abs().max()).unsqueeze(1) \
            + OUT_ROUNDOFF[out_dtype] * (want.abs() + torch.finfo(out_dtype).tiny)
        got = quantized.double()
        fail_rows((~((got - want).abs() <= tol)).any(1), "soft: quantized is not y @ codebook", got=got, want=want)
    lrange = float((logits.double().max(1).values - logits.double().min(1).values).max())
    tol_kl = 16 * u * (30 + lrange) * (1 + math.log2(n * k))
    assert abs(float(kl) - float(kl_true)) <= tol_kl, (float(kl), float(kl_true), tol_kl)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64_truth(forward_impl, dtype, tau, hard):
    logits, codebook, gumbels = problem(67, 45, 7, seed=1)
    args = [t.to(dtype) for t in (logits, codebook, gumbels)]
    saved = [bits(t).clone() for t in args]
    outputs = forward_impl(*args, tau, hard)
    assert all(torch.equal(bits(t), b) for t, b in zip(args, saved)), "inputs were modified"
    check_forward(*args, tau, hard, outputs)


@st.composite
def gumbel_cases(draw):
    return dict(n=draw(st.integers(0, 150)), k=draw(st.integers(1, 300)), d=draw(st.integers(1, 33)),
                dtypes=[draw(st.sampled_from(DTYPES)) for _ in range(3)],
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
                tau=draw(st.sampled_from([0.1, 0.5, 1.0, 3.0])), hard=draw(st.booleans()),
                scale=draw(st.sampled_from([0.1, 2.0, 10.0])), seed=draw(st.integers(0, 2 ** 31 - 1)))


@hyp_settings(40)
@given(case=gumbel_cases())
def test_forward_random_shapes(forward_impl, case):
    """Random shapes, dtypes (mixed per tensor) and memory layouts (NaN padding around views)."""
    tensors = problem(case["n"], case["k"], case["d"], case["seed"], case["scale"])
    args = [as_input(t, dt, layout) for t, dt, layout in zip(tensors, case["dtypes"], case["layouts"])]
    check_forward(*args, case["tau"], case["hard"], forward_impl(*args, case["tau"], case["hard"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index(forward_impl, dtype):
    """Exact ties of logits + gumbels (zero noise): the first maximum is chosen."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, -1.0, 0.0],
                           [0.0, -2.0, 0.0, 0.0]], dtype=dtype)
    codebook = torch.arange(8.0).reshape(4, 2)
    for hard in (False, True):
        _, indices, _ = forward_impl(logits, codebook, torch.zeros_like(logits), 1.0, hard)
        assert indices.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("hard", [False, True])
def test_edge_shapes(forward_impl, hard):
    """N = 0 (kl 0), N = 1, K = 1 (y = q = 1: quantized is the only code, kl = log(1 + 1e-10)), D = 0."""
    logits, codebook, gumbels = problem(1, 9, 4, seed=2)
    check_forward(logits, codebook, gumbels, 0.7, hard, forward_impl(logits, codebook, gumbels, 0.7, hard))
    empty = forward_impl(logits[:0], codebook, gumbels[:0], 0.7, hard)
    check_forward(logits[:0], codebook, gumbels[:0], 0.7, hard, empty)
    logits, codebook, gumbels = problem(5, 1, 3, seed=3)
    quantized, indices, kl = forward_impl(logits, codebook, gumbels, 0.7, hard)
    assert indices.tolist() == [0] * 5 and float(kl) == pytest.approx(math.log1p(KL_EPS), rel=1e-6)
    torch.testing.assert_close(quantized, codebook.expand(5, 3), rtol=1e-15, atol=0)
    quantized, _, _ = forward_impl(*problem(5, 4, 0, seed=4), 0.7, hard)
    assert quantized.shape == (5, 0)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows(forward_impl, dtype, hard):
    """A NaN in logits or gumbels: index -1 and a NaN quantized row; a NaN in logits also
    makes kl NaN (a NaN in gumbels does not). Other rows are untouched."""
    logits, codebook, gumbels = problem(12, 6, 3, seed=5)
    logits, codebook, gumbels = logits.to(dtype), codebook.to(dtype), gumbels.to(dtype)
    noisy = gumbels.clone()
    noisy[7, 2] = float("nan")
    quantized, indices, kl = forward_impl(logits, codebook, noisy, 0.5, hard)
    assert indices[7] == -1 and bool(torch.isnan(quantized[7]).all()) and bool(torch.isfinite(kl))
    keep = torch.arange(12) != 7
    kl_of_the_rest = forward_impl(logits[keep], codebook, noisy[keep], 0.5, hard)[2]
    check_forward(logits[keep], codebook, noisy[keep], 0.5, hard, (quantized[keep], indices[keep], kl_of_the_rest))
    bad = logits.clone()
    bad[3, 0] = float("nan")
    quantized, indices, kl = forward_impl(bad, codebook, gumbels, 0.5, hard)
    assert indices[3] == -1 and bool(torch.isnan(quantized[3]).all()) and bool(torch.isnan(kl))
    assert bool((indices[torch.arange(12) != 3] >= 0).all())


@pytest.mark.parametrize("hard", [False, True])
def test_infinite_logits(forward_impl, hard):
    """-inf logits mask codes out: probability exactly 0, never chosen, no KL contribution
    (0 log 1e-10 = 0). A +inf logit makes the row's softmaxes NaN, as torch's: kl is NaN."""
    logits, codebook, gumbels = (t.float() for t in problem(20, 13, 4, seed=30))
    masked = torch.tensor([0, 5, 8, 9, 12])  # the tail of K = 13 too (8 lanes + 5)
    logits[:, masked] = float("-inf")
    quantized, indices, kl = forward_impl(logits, codebook, gumbels, 0.5, hard)
    assert not bool(torch.isin(indices, masked).any())
    keep = torch.ones(13, dtype=torch.bool)
    keep[masked] = False
    sub = forward_impl(logits[:, keep], codebook[keep], gumbels[:, keep], 0.5, hard)
    assert torch.equal(keep.nonzero().squeeze(1)[sub[1]], indices)
    torch.testing.assert_close(quantized, sub[0], rtol=1e-6, atol=1e-6)
    _, _, kl_true = truth(logits, codebook, gumbels, 0.5)
    assert abs(float(kl) - float(kl_true)) <= 1e-5, (float(kl), float(kl_true))
    logits[3, 2] = float("inf")
    quantized, indices, kl = forward_impl(logits, codebook, gumbels, 0.5, hard)
    assert bool(torch.isnan(kl)) and int(indices[3]) == 2


# ---------------------------------------------------------------------------------------
# autograd


def f_gumbel_softmax_noise(logits, seed):
    """The noise F.gumbel_softmax(logits) draws after torch.manual_seed(seed), drawn here the same way."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()


def plain_forward(logits, codebook, tau, hard, seed):
    """taming-transformers' computation in plain PyTorch: F.gumbel_softmax after
    torch.manual_seed(seed), the product with the codebook and the KL term; also the index."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        y = F.gumbel_softmax(logits, tau=tau, hard=hard, dim=1)
    q = F.softmax(logits, dim=1)
    kl = torch.sum(q * torch.log(q * logits.shape[1] + KL_EPS), dim=1).mean()
    return y @ codebook, y.argmax(1), kl


def test_noise_is_f_gumbel_softmax_noise():
    """The premise of the comparisons below: with tau = 1, softmax(logits + noise) is
    exactly what F.gumbel_softmax returns for the same seed."""
    logits = problem(9, 5, 1, seed=6)[0]
    with torch.random.fork_rng():
        torch.manual_seed(123)
        want = F.gumbel_softmax(logits, tau=1.0, dim=1)
    assert torch.equal(torch.softmax(logits + f_gumbel_softmax_noise(logits, 123), 1), want)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("tau", TAUS)
def test_matches_f_gumbel_softmax_float64(tau, hard):
    """float64: values and gradients (incoming gradients G on quantized, 3 on kl) equal
    autograd through F.gumbel_softmax with the same noise."""
    logits64, codebook64, _ = problem(40, 23, 6, seed=7)
    g = torch.randn(40, 6, generator=gen(8), dtype=torch.float64)
    logits, codebook = logits64.clone().requires_grad_(), codebook64.clone().requires_grad_()
    quantized, indices, kl = vqkernels.gumbel_quantize(logits, codebook, f_gumbel_softmax_noise(logits64, 9), tau,
                                                       hard)
    ((quantized * g).sum() + 3.0 * kl).backward()
    plain_logits, plain_codebook = logits64.clone().requires_grad_(), codebook64.clone().requires_grad_()
    want_q, want_idx, want_kl = plain_forward(plain_logits, plain_codebook, tau, hard, 9)
    ((want_q * g).sum() + 3.0 * want_kl).backward()
    assert torch.equal(indices, want_idx)
    for name, got, want in (("quantized", quantized, want_q), ("kl", kl, want_kl),
                            ("logits.grad", logits.grad, plain_logits.grad),
                            ("codebook.grad", codebook.grad, plain_codebook.grad)):
        want = want.detach()
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


DTYPE_TRIPLES = [(torch.float32,) * 3, (torch.float16, torch.float32, torch.float16),
                 (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float32, torch.float64, torch.float32)]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtypes", DTYPE_TRIPLES, ids=str)
def test_gradients_in_low_precision(dtypes, hard):
    """Gradients in the inputs' dtypes against float64 autograd of the plain formulation on
    the same (rounded) inputs; the straight-through codebook gradient reaches the chosen
    rows only."""
    logits64, codebook64, gumbels64 = problem(50, 37, 5, seed=10)
    logits = logits64.to(dtypes[0]).requires_grad_()
    codebook = codebook64.to(dtypes[1]).requires_grad_()
    gumbels = gumbels64.to(dtypes[2])
    quantized, indices, kl = vqkernels.gumbel_quantize(logits, codebook, gumbels, 0.8, hard)
    g = torch.randn(quantized.shape, generator=gen(11)).to(quantized.dtype)
    ((quantized * g).sum() + 2.0 * kl).backward()
    assert logits.grad.dtype == logits.dtype and codebook.grad.dtype == codebook.dtype
    l64, c64 = logits.detach().double().requires_grad_(), codebook.detach().double().requires_grad_()
    y = torch.softmax((l64 + gumbels.double()) / 0.8, 1)
    assert torch.equal(indices, y.argmax(1)), "data too close to a tie for this test"
    if hard:
        y = torch.zeros_like(y).scatter_(1, indices.unsqueeze(1), 1.0) - y.detach() + y
    q = torch.softmax(l64, 1)
    want_kl = (q * torch.log(q * 37 + KL_EPS)).sum(1).mean()
    ((y @ c64 * g.double()).sum() + 2.0 * want_kl).backward()
    for name, got, want in (("logits.grad", logits.grad, l64.grad), ("codebook.grad", codebook.grad, c64.grad)):
        rtol = GRAD_RTOL[got.dtype]
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    if hard:
        unchosen = torch.ones(37, dtype=torch.bool)
        unchosen[indices] = False
        assert bool(unchosen.any()) and not bool(codebook.grad[unchosen].any()), "hard: gradient left the chosen rows"


def test_gradcheck_soft():
    logits, codebook, gumbels = problem(5, 6, 3, seed=12)
    logits.requires_grad_()
    codebook.requires_grad_()

    def fn(lg, cb):
        quantized, _, kl = vqkernels.gumbel_quantize(lg, cb, gumbels, 0.7, False)
        return quantized, kl

    assert torch.autograd.gradcheck(fn, (logits, codebook))


def test_gradcheck_hard():
    """hard: kl in the logits and quantized in the codebook are true derivatives (quantized
    in the logits is the straight-through estimate, not one: checked against F.gumbel_softmax above)."""
    logits, codebook, gumbels = problem(5, 6, 3, seed=13)
    logits.requires_grad_()
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda lg: vqkernels.gumbel_quantize(lg, codebook, gumbels, 0.7, True)[2],
                                    (logits,))
    assert torch.autograd.gradcheck(lambda cb: vqkernels.gumbel_quantize(logits, cb, gumbels, 0.7, True)[0],
                                    (codebook,))


def backward_truth(grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau, hard):
    """float64 gradients, written out: dL/dy = G C^T; logits: y's softmax Jacobian / tau
    plus grad_kl / N times q's Jacobian applied to f = log(qK + eps) + qK / (qK + eps);
    codebook: y^T G (soft) or G's rows summed by index (hard, -1 rows skipped)."""
    n, k = logits.shape
    g, c = grad_quantized.double(), codebook.double()
    s = logits.double() + gumbels.double()
    y = softmax64(s / tau)
    dy = g @ c.T
    grad_logits = y * (dy - (y * dy).sum(1, keepdim=True)) / tau
    q = softmax64(logits)
    f = torch.log(q * k + KL_EPS) + q * k / (q * k + KL_EPS)
    grad_logits = grad_logits + float(grad_kl) / max(n, 1) * q * (f - (q * f).sum(1, keepdim=True))
    if hard:
        onehot = (indices.unsqueeze(1) == torch.arange(k).unsqueeze(0)).double()
        grad_codebook = onehot.T @ g
    else:
        grad_codebook = y.T @ g
    return grad_logits, grad_codebook


BACKWARD_DTYPES = [(torch.float64,) * 3, (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float16)]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtypes", BACKWARD_DTYPES, ids=str)
def test_backward_op(backward_impl, dtypes, hard):
    """The backward op called directly, arbitrary incoming gradients, indices with -1 rows;
    several row blocks and code chunks (N = 300, K = 150)."""
    logits64, codebook64, gumbels64 = problem(300, 150, 6, seed=14)
    logits, codebook, gumbels = logits64.to(dtypes[0]), codebook64.to(dtypes[1]), gumbels64.to(dtypes[2])
    out_dtype = torch.promote_types(logits.dtype, codebook.dtype)
    g = torch.randn(300, 6, generator=gen(15)).to(out_dtype)
    indices = (logits.double() + gumbels.double()).argmax(1)
    indices[::7] = -1
    grad_kl = torch.tensor(-1.5)
    grad_logits, grad_codebook = backward_impl(g, grad_kl, logits, codebook, gumbels, indices, 0.6, hard)
    assert grad_logits.dtype == logits.dtype and grad_logits.shape == logits.shape
    assert grad_codebook.dtype == codebook.dtype and grad_codebook.shape == codebook.shape
    want_logits, want_codebook = backward_truth(g, grad_kl, logits, codebook, gumbels, indices, 0.6, hard)
    for name, got, want in (("grad_logits", grad_logits, want_logits), ("grad_codebook", grad_codebook, want_codebook)):
        rtol = max(GRAD_RTOL[got.dtype], GRAD_RTOL[compute_dtype(logits, codebook, gumbels)])
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@hyp_settings(25)
@given(case=gumbel_cases())
def test_backward_op_random_shapes(backward_impl, case):
    """The backward op on random shapes (row tails of the 8-lane rows, code chunks, row tiles),
    dtypes and layouts, against the float64 truth; the tolerance grows with scale / tau, as
    the exponentials' arguments carry an error of u |s| / tau."""
    logits64, codebook64, gumbels64 = problem(case["n"], case["k"], case["d"], case["seed"], case["scale"])
    logits, codebook, gumbels = (as_input(t, dt, layout)
                                 for t, dt, layout in zip((logits64, codebook64, gumbels64), case["dtypes"],
                                                          case["layouts"]))
    g = torch.randn(case["n"], case["d"], generator=gen(case["seed"] + 2), dtype=torch.float64)
    g = as_input(g, torch.promote_types(logits.dtype, codebook.dtype), case["layouts"][0])
    indices = (logits.double() + gumbels.double()).argmax(1)
    grad_kl = torch.tensor(0.7)
    got = backward_impl(g, grad_kl, logits, codebook, gumbels, indices, case["tau"], case["hard"])
    want = backward_truth(g, grad_kl, logits, codebook, gumbels, indices, case["tau"], case["hard"])
    cdt = compute_dtype(logits, codebook, gumbels)
    for name, a, b in zip(("grad_logits", "grad_codebook"), got, want):
        rtol = max(GRAD_RTOL[a.dtype], GRAD_RTOL[cdt]) * (1 + case["scale"] / case["tau"])
        atol = rtol * float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_zero_kl_gradient_adds_no_nan(backward_impl):
    """kl unused (a zero grad_kl): the KL term adds nothing, not even a NaN logits row's NaN
    to the other rows, and the hard codebook gradient skips the row's index -1."""
    logits, codebook, gumbels = problem(6, 5, 3, seed=16)
    logits[2, 1] = float("nan")
    indices = (logits + gumbels).argmax(1).masked_fill(torch.isnan(logits).any(1), -1)
    g = torch.randn(6, 3, generator=gen(17), dtype=torch.float64)
    grad_logits, grad_codebook = backward_impl(g, torch.tensor(0.0), logits, codebook, gumbels, indices, 1.0, True)
    keep = torch.arange(6) != 2
    assert bool(torch.isfinite(grad_logits[keep]).all()) and bool(torch.isfinite(grad_codebook).all())
    want_logits, want_codebook = backward_truth(g[keep], torch.tensor(0.0), logits[keep], codebook, gumbels[keep],
                                                indices[keep], 1.0, True)
    torch.testing.assert_close(grad_logits[keep], want_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_codebook, want_codebook, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hard", [False, True])
def test_autograd_saves_no_n_by_k_tensor_but_the_inputs(hard):
    """The backward recomputes the softmaxes: what autograd saves is the inputs themselves
    and the indices, nothing else of N x K size."""
    logits, codebook, gumbels = (t.float() for t in problem(64, 50, 3, seed=31))
    logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantized, _, kl = vqkernels.gumbel_quantize(logits, codebook, gumbels, 0.5, hard)
    assert saved, "expected the op to save its inputs"
    inputs = {logits.data_ptr(), gumbels.data_ptr(), codebook.data_ptr()}
    for t in saved:
        assert t.numel() <= 64 or t.data_ptr() in inputs, f"saved a new tensor of shape {tuple(t.shape)}"


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n, k", [(700, 300), (1100, 10), (400, 4096)])
def test_deterministic(n, k, hard):
    """Bitwise equal when repeated and with 1 or 2 threads: several row blocks and code
    chunks (K = 300), several row tiles in a single code chunk (K = 10), and sums over 4096
    codes in the soft lookup (MKL split such sums by its thread count on a Xeon, even inside
    a parallel task, before the products were the kernel's own)."""
    logits64, codebook64, gumbels64 = problem(n, k, 9, seed=18)

    def run():
        logits, codebook = logits64.float().requires_grad_(), codebook64.float().requires_grad_()
        quantized, indices, kl = vqkernels.gumbel_quantize(logits, codebook, gumbels64.float(), 0.5, hard)
        (quantized.square().sum() + kl).backward()
        return quantized, indices, kl, logits.grad, codebook.grad

    assert_deterministic(run)


# ---------------------------------------------------------------------------------------
# opcheck and bad inputs


def forward_opcheck_samples():
    logits, codebook, gumbels = (t.float() for t in problem(9, 6, 4, seed=19))
    return [
        pytest.param((logits, codebook, gumbels, 0.5, False), id="f32-soft"),
        pytest.param((logits, codebook, gumbels, 0.5, True), id="f32-hard"),
        pytest.param((logits.clone().requires_grad_(), codebook.clone().requires_grad_(), gumbels, 1.5, False),
                     id="f32-grad-soft"),
        pytest.param((logits.clone().requires_grad_(), codebook.clone().requires_grad_(), gumbels, 1.5, True),
                     id="f32-grad-hard"),
        pytest.param((logits.double().requires_grad_(), codebook.double(), gumbels.double(), 1.0, False),
                     id="f64-grad-logits"),
        pytest.param((logits.half(), codebook.bfloat16().requires_grad_(), gumbels, 1.0, True), id="f16-bf16"),
        pytest.param((logits.t().contiguous().t(), codebook.t().contiguous().t(), gumbels[:, :].t().contiguous().t(),
                      0.7, False), id="strided"),
        pytest.param((logits[:0], codebook, gumbels[:0], 1.0, False), id="empty"),
    ]


@pytest.mark.parametrize("args", forward_opcheck_samples())
def test_opcheck(args):
    opcheck("gumbel_quantize", args)


def backward_opcheck_samples():
    logits, codebook, gumbels = (t.float() for t in problem(9, 6, 4, seed=20))
    g = torch.randn(9, 4, generator=gen(21))
    indices = (logits + gumbels).argmax(1)
    kl = torch.tensor(0.5)
    return [
        pytest.param((g, kl, logits, codebook, gumbels, indices, 0.5, False), id="f32-soft"),
        pytest.param((g, kl, logits, codebook, gumbels, indices, 0.5, True), id="f32-hard"),
        pytest.param((g.double(), kl.double(), logits.double(), codebook.double(), gumbels.double(), indices, 2.0,
                      False), id="f64"),
        pytest.param((g, kl, logits.bfloat16(), codebook, gumbels.half(), indices, 1.0, True), id="bf16-f16"),
        pytest.param((g[:0], kl, logits[:0], codebook, gumbels[:0], indices[:0], 1.0, False), id="empty"),
    ]


@pytest.mark.parametrize("args", backward_opcheck_samples())
def test_backward_opcheck(args):
    opcheck("gumbel_quantize_backward", args)


L = torch.randn(4, 5)
C = torch.randn(5, 3)
G = torch.randn(4, 5)

# id: (logits, codebook, gumbels, tau, pattern the message must match)
BAD_FORWARD = {
    "logits-1d": (torch.randn(5), C, torch.randn(5), 1.0, r"logits must be 2-D \[N, K\]"),
    "codebook-3d": (L, torch.randn(1, 5, 3), G, 1.0, r"codebook must be 2-D \[K, D\]"),
    "gumbels-shape": (L, C, torch.randn(4, 6), 1.0, r"gumbels must have logits' shape \(4, 5\), got \(4, 6\)"),
    "logits-int": (L.long(), C, G, 1.0, r"logits must be float32, float16, bfloat16 or float64"),
    "codebook-complex": (L, C.to(torch.complex64), G, 1.0, r"codebook must be float"),
    "gumbels-int": (L, C, G.int(), 1.0, r"gumbels must be float"),
    "codebook-other-device": (L, C.to("meta"), G, 1.0, r"logits is on cpu but codebook is on meta"),
    "gumbels-other-device": (L, C, G.to("meta"), 1.0, r"logits is on cpu but gumbels is on meta"),
    "mismatched-K": (L, torch.randn(6, 3), G, 1.0, r"logits has K=5 .*but codebook has K=6"),
    "empty-codebook": (L[:, :0], torch.randn(0, 3), G[:, :0], 1.0, r"codebook is empty"),
    "tau-zero": (L, C, G, 0.0, r"tau must be positive and finite, got 0"),
    "tau-negative": (L, C, G, -1.0, r"tau must be positive and finite, got -1"),
    "tau-nan": (L, C, G, float("nan"), r"tau must be positive and finite, got nan"),
    "tau-inf": (L, C, G, float("inf"), r"tau must be positive and finite, got inf"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_inputs(forward_impl, case):
    logits, codebook, gumbels, tau, pattern = BAD_FORWARD[case]
    with pytest.raises(ValueError, match=r"vqkernels\.gumbel_quantize: " + pattern):
        forward_impl(logits, codebook, gumbels, tau, False)


def test_bad_inputs_under_meta():
    """The fake kernel checks the same (torch.compile sees the error at trace time)."""
    with pytest.raises(ValueError, match=r"logits has K=5 .*but codebook has K=6"):
        vqkernels.gumbel_quantize(L.to("meta"), torch.randn(6, 3, device="meta"), G.to("meta"))


GQ = torch.randn(4, 3)
IDX = torch.tensor([0, 1, 4, -1])

# id: (grad_quantized, grad_kl, indices, pattern)
BAD_BACKWARD = {
    "grad-shape": (torch.randn(4, 2), torch.tensor(1.0), IDX, r"grad_quantized must have shape \[N=4, D=3\]"),
    "grad-int": (GQ.int(), torch.tensor(1.0), IDX, r"grad_quantized must be float"),
    "grad_kl-shape": (GQ, torch.ones(2), IDX, r"grad_kl must hold one value"),
    "indices-int32": (GQ, torch.tensor(1.0), IDX.int(), r"indices must be int64"),
    "indices-length": (GQ, torch.tensor(1.0), IDX[:3], r"indices must be 1-D of length N=4"),
}


@pytest.mark.parametrize("case", BAD_BACKWARD)
def test_backward_bad_inputs(backward_impl, case):
    grad, grad_kl, indices, pattern = BAD_BACKWARD[case]
    with pytest.raises(ValueError, match=r"vqkernels\.gumbel_quantize_backward: " + pattern):
        backward_impl(grad, grad_kl, L, C, G, indices, 1.0, True)


def test_runs_on_the_reference_without_the_extension():
    """Where the extension cannot load, the op, its backward and the module run on the reference."""
    run_without_extension("""
import torch, vqkernels
from vqkernels.nn.gumbel import GumbelQuantize
assert vqkernels.backend("gumbel_quantize", "cpu").startswith("reference")
logits = torch.randn(6, 5, requires_grad=True)
codebook = torch.randn(5, 3, requires_grad=True)
for hard in (False, True):
    q, i, kl = vqkernels.gumbel_quantize(logits, codebook, torch.zeros(6, 5), 0.5, hard)
    (q.sum() + kl).backward()
module = GumbelQuantize(4, 3, 5)
z_q, diff, (_, _, ind) = module(torch.randn(2, 4, 3, 3))
(z_q.sum() + diff).backward()
assert logits.grad is not None and module.embed.weight.grad is not None and ind.shape == (2, 3, 3)
print("ok")
""")
