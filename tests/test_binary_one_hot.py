"""vqkernels.binary_one_hot (BinaryMapper's one-hot, Fleuret 2025) and vqkernels::binary_one_hot_backward: the
one-hot is exact, and its gradient is that of the joint code probabilities, against float64 autograd through the
explicit G [N, 2**bits].

The tests run the op as dispatched (the C++ kernel when the extension is built) and the pure-PyTorch reference
called directly; the C++ backward's ISA paths (one body, compiled per ISA without fused multiply-adds) must agree
bit for bit.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, LAYOUTS, as_input, assert_bitwise_equal, forced_cpu_isa, gen, hyp_settings, opcheck,
                        reference, run_without_extension, vqkernels)

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FORWARD_IMPLS = {"op": torch.ops.vqkernels.binary_one_hot, "reference": reference.binary_one_hot}
BACKWARD_IMPLS = {"op": torch.ops.vqkernels.binary_one_hot_backward, "reference": reference.binary_one_hot_backward}


@pytest.fixture(params=list(FORWARD_IMPLS))
def forward_impl(request):
    return FORWARD_IMPLS[request.param]


@pytest.fixture(params=list(BACKWARD_IMPLS))
def backward_impl(request):
    return BACKWARD_IMPLS[request.param]


def sample(n, bits, seed, scale=2.0):
    """float64 logits [n, bits], codes int64 [n], float64 gradient [n, 2**bits]."""
    g = gen(seed)
    logits = torch.randn(n, bits, generator=g, dtype=torch.float64) * scale
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    return logits, codes, torch.randn(n, 1 << bits, generator=g, dtype=torch.float64)


def truth(logits, grad):
    """float64 gradient of sum(grad * G) by autograd through G[n, c] = prod_b (c_b ? sigmoid(l_b) : sigmoid(-l_b))."""
    lg = logits.detach().double().requires_grad_()
    n_bits = lg.shape[1]
    on = ((torch.arange(1 << n_bits).unsqueeze(-1) >> torch.arange(n_bits)) & 1).bool()
    joint = torch.where(on, lg.sigmoid().unsqueeze(1), (-lg).sigmoid().unsqueeze(1)).prod(-1)
    (joint * grad.double()).sum().backward()
    return lg.grad


def assert_near_truth(got, logits, grad):
    want = truth(logits, grad)
    rtol = max(RTOL[got.dtype], RTOL[torch.float64 if torch.float64 in (logits.dtype, grad.dtype) else torch.float32])
    atol = rtol * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n_bits", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_is_the_exact_one_hot(forward_impl, n_bits, dtype):
    logits, codes, _ = sample(37, n_bits, seed=n_bits)
    out = forward_impl(logits.to(dtype), codes)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, torch.nn.functional.one_hot(codes, 1 << n_bits).float())


@pytest.mark.parametrize("n_bits", [1, 2, 3, 5, 6, 7, 8, 9, 12])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_is_the_joint_probability_gradient(n_bits, dtype):
    """Through autograd of the public op: the float64 truth within the logits dtype's tolerance (the kernels work
    in float32, float64 for float64), in the logits' dtype; the codes get no gradient."""
    logits64, codes, grad64 = sample(41, n_bits, seed=100 + n_bits)
    logits = logits64.to(dtype).requires_grad_()
    out = vqkernels.binary_one_hot(logits, codes)
    (out * grad64.float()).sum().backward()
    assert logits.grad.dtype == dtype
    assert_near_truth(logits.grad, logits.detach(), grad64.float())


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("transposed", "strided"), ("offset", "transposed"),
                                     ("strided", "offset")])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                    (torch.float16, torch.float32), (torch.bfloat16, torch.float64)], ids=str)
def test_backward_in_other_dtypes_and_layouts(backward_impl, dtypes, layouts):
    logits64, _, grad64 = sample(30, 7, seed=3)
    logits, grad = (as_input(t, dt, layout) for t, dt, layout in zip((logits64, grad64), dtypes, layouts))
    got = backward_impl(grad, logits)
    assert got.dtype == logits.dtype and got.shape == logits.shape and got.is_contiguous()
    assert_near_truth(got, logits, grad)


def test_a_stride_zero_gradient(backward_impl):
    """The gradient of one_hot.mean(): one value broadcast (stride 0), as autograd hands it on. sum_c G = 1
    whatever p, so a constant gradient gives none; a broadcast row gives the truth."""
    logits, _, grad = sample(20, 6, seed=4)
    got = backward_impl(torch.full((), 0.25, dtype=torch.float64).expand(20, 64), logits)
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-15)
    row = grad[:1].expand(20, 64)
    assert_near_truth(backward_impl(row, logits), logits, row.contiguous())


def test_gradient_by_finite_differences():
    """The straight-through gradient is the derivative of sum(weight * G(logits)): central differences of the
    explicit float64 G, with no autograd."""
    logits, codes, weight = sample(6, 4, seed=5)
    on = ((torch.arange(16).unsqueeze(-1) >> torch.arange(4)) & 1).bool()

    def objective(lg):
        return float((torch.where(on, lg.sigmoid().unsqueeze(1), (-lg).sigmoid().unsqueeze(1)).prod(-1)
                      * weight).sum())
    step, numeric = 1e-6, torch.empty_like(logits)
    for i in range(logits.shape[0]):
        for b in range(logits.shape[1]):
            up, down = logits.clone(), logits.clone()
            up[i, b] += step
            down[i, b] -= step
            numeric[i, b] = (objective(up) - objective(down)) / (2 * step)
    lg = logits.clone().requires_grad_()
    (vqkernels.binary_one_hot(lg, codes) * weight).sum().backward()
    torch.testing.assert_close(lg.grad, numeric, rtol=1e-7, atol=1e-8)


@hyp_settings(30)
@given(n=st.integers(0, 50), n_bits=st.integers(1, 10), dtype=st.sampled_from(DTYPES),
       layouts=st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2), seed=st.integers(0, 2 ** 31 - 1))
def test_random_shapes(forward_impl, backward_impl, n, n_bits, dtype, layouts, seed):
    logits64, codes, grad64 = sample(n, n_bits, seed)
    logits, grad = as_input(logits64, dtype, layouts[0]), as_input(grad64, torch.float32, layouts[1])
    assert torch.equal(forward_impl(logits, codes), torch.nn.functional.one_hot(codes, 1 << n_bits).float())
    assert_near_truth(backward_impl(grad, logits), logits, grad)


ISAS = ["avx512", "avx2", "portable"] if vqkernels.compiled() else []


@pytest.mark.skipif(not ISAS, reason="the C++ kernels' ISA paths (the extension is not built)")
@pytest.mark.parametrize("n_bits", [1, 3, 5, 6, 7, 9, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_isas_agree_bitwise(n_bits, dtype):
    """Every ISA path gives the portable path's bits: the vector loops over the low codes (bits >= 6) and the
    scalar ones (bits < 6)."""
    logits64, _, grad64 = sample(45, n_bits, seed=7 * n_bits)
    logits64[:15] *= 40  # past the exp's range (|l| > 87) too
    logits, grad = logits64.to(dtype), grad64.float()
    results = {}
    for isa in ISAS:
        with forced_cpu_isa(isa):
            results[isa] = torch.ops.vqkernels.binary_one_hot_backward(grad, logits)
    for isa, got in results.items():
        assert_bitwise_equal(got, results["portable"], f"{isa} against portable")
    assert_near_truth(results["portable"], logits, grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nan_and_infinite_logits(backward_impl, dtype):
    """A NaN logit makes its row's gradient NaN and leaves the others alone; an infinite logit is a certain bit
    (p = 0 or 1) with a finite gradient."""
    logits, _, grad = sample(5, 4, seed=8)
    logits[1, 2] = float("nan")
    logits[3, 0], logits[3, 3] = float("inf"), -float("inf")
    logits[4] = torch.tensor([90.0, -90.0, 86.9, -86.9])  # about where float32's exp(-|l|) leaves its range
    logits, grad = logits.to(dtype), grad.to(dtype)
    got = backward_impl(grad, logits)
    assert bool(torch.isnan(got[1]).all())
    rest = [0, 2, 3, 4]
    assert bool(torch.isfinite(got[rest]).all())
    assert_near_truth(got[rest], logits[rest], grad[rest])


def test_empty(forward_impl, backward_impl):
    logits = torch.empty(0, 5)
    assert forward_impl(logits, torch.empty(0, dtype=torch.int64)).shape == (0, 32)
    assert backward_impl(torch.empty(0, 32), logits).shape == (0, 5)


def opcheck_samples():
    logits, codes, _ = sample(9, 5, seed=11)
    lg = logits.float()
    return [
        pytest.param((lg, codes), id="f32"),
        pytest.param((lg.clone().requires_grad_(), codes), id="f32-grad"),
        pytest.param((logits.clone().requires_grad_(), codes), id="f64-grad"),
        pytest.param((lg.half().requires_grad_(), codes), id="f16-grad"),
        pytest.param((lg.t().contiguous().t(), codes[:]), id="strided"),
        pytest.param((lg[:0], codes[:0]), id="empty"),
    ]


@pytest.mark.parametrize("args", opcheck_samples())
def test_opcheck(args):
    opcheck("binary_one_hot", args)


@pytest.mark.parametrize("args", opcheck_samples())
def test_backward_opcheck(args):
    logits = args[0].detach()
    opcheck("binary_one_hot_backward", (torch.randn(logits.shape[0], 32, generator=gen(12)), logits))


L = torch.randn(4, 3)
CODES = torch.tensor([0, 7, 2, 5])

# id: (logits, indices, pattern the message must match)
BAD = {
    "logits-1d": (torch.randn(3), CODES[:1], r"logits must be 2-D \[N, bits\]"),
    "logits-3d": (torch.randn(2, 4, 3), CODES, r"logits must be 2-D \[N, bits\]"),
    "no-bits": (torch.randn(4, 0), CODES, r"bits \(logits' last dimension\) must be in \[1, 30\], got 0"),
    "too-many-bits": (torch.randn(4, 31), CODES, r"bits \(logits' last dimension\) must be in \[1, 30\], got 31"),
    "logits-int": (L.long(), CODES, r"logits must be float32, float16, bfloat16 or float64"),
    "indices-int32": (L, CODES.int(), r"indices must be int64, got "),
    "indices-length": (L, CODES[:3], r"indices must be 1-D of length N=4, got shape \(3,\)"),
    "indices-other-device": (L, CODES.to("meta"), r"indices is on meta but logits is on cpu"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(forward_impl, case):
    logits, indices, pattern = BAD[case]
    with pytest.raises(ValueError, match=r"vqkernels\.binary_one_hot: " + pattern):
        forward_impl(logits, indices)


@pytest.mark.parametrize("code", [8, -1])
def test_indices_outside_the_codes(forward_impl, code):
    indices = CODES.clone()
    indices[2] = code
    with pytest.raises(ValueError, match=rf"vqkernels\.binary_one_hot: indices must be in \[0, 2\*\*bits = 8\), "
                                         rf"got {code} at row 2"):
        forward_impl(L, indices)


@pytest.mark.parametrize("case", ["grad-shape", "grad-int", "grad-other-device", "no-bits"])
def test_backward_bad_inputs(backward_impl, case):
    grad, logits = torch.randn(4, 8), L
    pattern = {"grad-shape": r"grad_one_hot must have shape \[N=4, 2\*\*bits=8\], got \(4, 7\)",
               "grad-int": r"grad_one_hot must be float32, float16, bfloat16 or float64",
               "grad-other-device": r"grad_one_hot is on meta but logits is on cpu",
               "no-bits": r"bits \(logits' last dimension\) must be in \[1, 30\], got 0"}[case]
    if case == "grad-shape":
        grad = torch.randn(4, 7)
    elif case == "grad-int":
        grad = grad.long()
    elif case == "grad-other-device":
        grad = grad.to("meta")
    else:
        logits = torch.randn(4, 0)
    with pytest.raises(ValueError, match=r"vqkernels\.binary_one_hot_backward: " + pattern):
        backward_impl(grad, logits)


def test_runs_on_the_reference_without_the_extension():
    run_without_extension("""
import torch, vqkernels
assert vqkernels.backend("binary_one_hot", "cpu").startswith("reference")
logits = torch.randn(6, 5, requires_grad=True)
out = vqkernels.binary_one_hot(logits, torch.tensor([0, 31, 4, 4, 9, 1]))
(out * torch.randn(6, 32)).sum().backward()
assert out.sum() == 6 and logits.grad is not None and bool(torch.isfinite(logits.grad).all())
print("ok")
""")
