"""vqkernels.vq_quantize (forward, losses, autograd) and vqkernels::vq_quantize_backward.

The GPU kernels' tests (CUDA, Triton) come last, run by the `backend` fixture (tests/conftest.py).
"""

import pytest
import torch
from hypothesis import given

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_SEARCH_SAMPLES, LOSS_THREADS_BUG, METRICS, TIE_POSITIONS,
                        as_input, assert_bitwise_equal, assert_deterministic, assert_float64_is_the_reference,
                        assert_kernel_rejects, assert_rejects_cpu_tensors, assert_separated, bits, build_case,
                        check_nearest, check_nearest_f32, clustered, compute_dtype, deterministic, fail_rows, gen,
                        hyp_settings, kernel_opcheck, nan_search_problem, near_codes_problem, on_backends, opcheck,
                        per_backend, randn_problem, reference, reference_xfail, search_cases, search_opcheck_samples,
                        separated, separated_cases, tie_problem, unit_roundoff, vqkernels, with_layout)

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


# outputs left out of the objective (not weighted by 0: absent), whose gradients reach the backward as None
UNUSED_CASES = {"commit": ("commit",), "codebook": ("codebook",), "losses": ("commit", "codebook"),
                "quantized": ("quantized",), "quantized+codebook": ("quantized", "codebook")}


@pytest.mark.parametrize("used", UNUSED_CASES)
@on_backends("cpu", "reference", "triton", "cuda")
def test_outputs_left_out_of_the_objective(backend, used, monkeypatch):
    """The backward gets None for the outputs the objective does not use (nothing is materialised for them): it
    reads a stride-0 zero for quantized's gradient (the rotation trick reads the codes detached) and zero scalars
    for the losses'; the gradients are the formulas' of the outputs used."""
    backward_op, seen = torch.ops.vqkernels.vq_quantize_backward, []

    def spy(grad_quantized, *args):
        seen.append(grad_quantized.stride())
        return backward_op(grad_quantized, *args)
    monkeypatch.setattr(torch.ops.vqkernels, "vq_quantize_backward", spy)
    x64, cb64, _ = clustered(20, 64, 6, seed=35, noise=0.3)
    x = x64.float().to(backend.device).requires_grad_()
    codebook = cb64.float().to(backend.device).requires_grad_()
    quantized, indices, commit_loss, codebook_loss = vq_quantize(x, codebook, "l2")
    g = torch.randn(quantized.shape, generator=gen(36)).to(backend.device)
    terms = {"quantized": (quantized * g).sum(), "commit": 0.7 * commit_loss, "codebook": -1.3 * codebook_loss}
    sum(terms[name] for name in UNUSED_CASES[used]).backward()
    assert seen == [x.stride() if "quantized" in UNUSED_CASES[used] else (0, 0)]
    wq, wc, wb = (w if name in UNUSED_CASES[used] else 0.0
                  for name, w in (("quantized", 1.0), ("commit", 0.7), ("codebook", -1.3)))
    diff = x64 - cb64[indices.cpu()]
    scale = 2.0 / x.numel()
    want_x = wq * g.double().cpu() + wc * scale * diff
    want_cb = torch.zeros(cb64.shape, dtype=torch.float64).index_add_(0, indices.cpu(), -wb * scale * diff)
    for got, want in ((x.grad, want_x), (codebook.grad, want_cb)):
        if not bool(want.any()):
            assert is_zero_grad(got)
        else:
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


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


# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture): the Triton interpreter's shapes tiny. The Triton tests
# judge against float64 truth written here (check_vq) on rows near codes, the CUDA tests against the
# reference and a float32 tolerance (check_vq_f32) on normal values.

INTERPRETED = vqkernels._backend.triton_interpreted()


def stored(t, dtype):
    """float32 values t as a Triton kernel's store into dtype leaves them: rounded to nearest even, except that
    the interpreter truncates float32 -> bfloat16 (drops the low 16 bits)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.float().to(dtype)


def check_vq(x, c, metric, outputs):
    """Indices nearest (float64 truth), quantized the raw chosen rows in x's dtype (NaN for -1), both losses
    mean((x - q)^2) within the float32 accumulation error."""
    quantized, indices, commit, codebook_loss = (t.cpu() for t in outputs)
    x, c = x.cpu(), c.cpu()
    if x.shape[1]:
        check_nearest(x, c, metric, indices, None, duplicates=True)
    else:  # D = 0: every code at distance 0, the first wins
        assert indices.eq(0).all()
    assert quantized.dtype == x.dtype and quantized.shape == x.shape and quantized.is_contiguous()
    want = c.float()[indices.clamp_min(0)].masked_fill((indices < 0).unsqueeze(1), float("nan"))
    assert_bitwise_equal(quantized, stored(want, x.dtype), "quantized")
    assert commit.shape == () and commit.dtype == torch.float32 and torch.equal(bits(commit), bits(codebook_loss))
    if x.numel():
        exact = (x.double() - want.double()).square().mean()
        torch.testing.assert_close(commit.double(), exact, rtol=4 * (x.shape[1] + 3) * 2.0 ** -24, atol=1e-30,
                                   equal_nan=True)
    else:
        assert commit.item() == 0.0


def check_vq_f32(x, c, metric, outputs):
    """Indices those of nearest_code (nearest within the float32 tolerance), quantized the reference's lookup,
    both losses mean((x - q)^2) of those codes (float64), most indices the reference's on float64 copies."""
    q, idx, commit, cbl = outputs
    assert q.dtype == x.dtype and q.shape == x.shape and q.is_contiguous()
    assert commit.dtype == cbl.dtype == torch.float32 and commit.shape == cbl.shape == ()
    nidx, ndist = vqkernels.nearest_code(x, c, metric)
    check_nearest_f32(x, c, metric, idx, ndist)
    assert torch.equal(idx, nidx)
    # The lookup and the loss of the kernel's own indices, by the reference in float64.
    assert torch.equal(q.cpu(), reference.lookup(c.cpu(), idx.cpu(), torch.float32).to(x.dtype))
    want = (x.cpu().double() - reference.lookup(c.cpu().double(), idx.cpu())).pow(2).mean()
    torch.testing.assert_close(commit.cpu().double(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(commit, cbl)
    ridx = reference.vq_quantize(x.cpu().double(), c.cpu().double(), metric)[1]
    assert (idx.cpu() == ridx).float().mean() > 0.9  # near-ties may differ between float32 and float64


# (N, K, D), x dtype, codebook dtype: one and several tiles, D beyond one block, mixed dtypes, N = 0, D = 0
TRITON_VQ_CASES = [((1, 1, 1), torch.float32, torch.float32), ((37, 50, 13), torch.float32, torch.float32),
                   ((37, 50, 13), torch.float16, torch.float16), ((37, 50, 13), torch.bfloat16, torch.bfloat16),
                   ((33, 40, 70), torch.bfloat16, torch.float32), ((20, 9, 5), torch.float16, torch.bfloat16),
                   ((0, 5, 3), torch.float32, torch.float32), ((5, 4, 0), torch.float32, torch.float32)]
CUDA_VQ_CASES = [(shape, x_dtype, c_dtype) for shape in [(1, 1, 1), (7, 1, 3), (300, 130, 17), (129, 257, 200),
                                                         (3000, 64, 8)]
                 for x_dtype, c_dtype in [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.float16)]]


@pytest.mark.parametrize("metric", METRICS)
@per_backend("problem, check, seed, shape, x_dtype, c_dtype", {
    "triton": [(near_codes_problem, check_vq, sum(shape) + 30, shape, xdt, cdt) for shape, xdt, cdt in TRITON_VQ_CASES],
    "cuda": [(randn_problem, check_vq_f32, sum(shape), shape, xdt, cdt) for shape, xdt, cdt in CUDA_VQ_CASES]})
def test_kernel_vs_float64_truth(backend, problem, check, seed, shape, x_dtype, c_dtype, metric):
    x, c = problem(*shape, torch.float64, seed=seed, device=backend.device)
    x, c = x.to(x_dtype), c.to(c_dtype)
    check(x, c, metric, vq_quantize(x, c, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@on_backends("triton", gpu=True)
def test_kernel_large(backend, dtype, metric):
    x, c = near_codes_problem(8191, 1000, 67, dtype, seed=60, device=backend.device)
    out = vq_quantize(x, c, metric)
    check_vq(x, c, metric, out)
    for a, b in zip(out, vq_quantize(x, c, metric)):
        assert_bitwise_equal(a, b, "repeated call")
    first, _ = vqkernels.nearest_code(x, c, metric)
    assert (out[1] == first).float().mean() > 0.999  # autotuning may pick other tiles: near-ties may differ


@on_backends("cpu", "reference", "triton", "cuda")
def test_kernel_empty(backend):
    x, c = randn_problem(0, 5, 3, torch.float32, device=backend.device)
    q, idx, commit, cbl = vq_quantize(x, c, "l2")
    assert q.shape == (0, 3) and idx.shape == (0,) and commit.item() == 0.0 and cbl.item() == 0.0
    x = torch.empty(4, 0, device=backend.device)
    q, idx, commit, _ = vq_quantize(x, torch.empty(3, 0, device=backend.device), "l2")
    assert idx.tolist() == [0] * 4 and commit.item() == 0.0


@pytest.mark.parametrize("metric", METRICS)
@on_backends("triton")
def test_kernel_layouts_and_reference(backend, metric):
    x, c = near_codes_problem(30, 45, 11, torch.float32, seed=31, device=backend.device)
    xs, cs = with_layout(x, "strided"), with_layout(c, "transposed")
    out = vq_quantize(xs, cs, metric)
    check_vq(xs, cs, metric, out)
    ref = reference.vq_quantize(x, c, metric)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("metric", METRICS)
@per_backend("problem, shape, seed", {"triton": [(near_codes_problem, (30, 45, 11), 31)],
                                      "cuda": [(randn_problem, (20, 30, 6), 4)]})
def test_kernel_float64_is_the_reference(backend, problem, shape, seed, metric):
    """x float64 (the codebook float32): the reference's values."""
    x, c = problem(*shape, torch.float32, seed=seed, device=backend.device)
    x = x.double()
    assert_float64_is_the_reference(vq_quantize(x, c, metric), reference.vq_quantize(x, c, metric),
                                    reference.vq_quantize(x.cpu(), c.cpu(), metric))


@pytest.mark.parametrize("metric", METRICS)
@per_backend("k_codes, dtype", {"cpu, triton": [(50, torch.float32)],
                                "cuda": [(150, dtype) for dtype in KERNEL_DTYPES]})
def test_kernel_nan_rows_and_codes(backend, k_codes, dtype, metric):
    """NaN rows: index -1, a NaN row of quantized and NaN losses; NaN codes never chosen (one would be nearest
    to row 3): the indices of nearest_code."""
    x, c, keep, _ = nan_search_problem(k_codes, dtype, backend.device)
    q, qidx, commit, cbl = vq_quantize(x, c, metric)
    assert torch.equal(qidx, vqkernels.nearest_code(x, c, metric)[0])
    q = q.cpu()
    assert bool(q[~keep].isnan().all()) and not bool(q[keep].isnan().any())
    assert bool(commit.isnan()) and bool(cbl.isnan())


@pytest.mark.parametrize("metric", METRICS)
@on_backends("triton")
def test_kernel_nan_rows_and_codes_as_the_reference(backend, metric):
    x, c = near_codes_problem(20, 30, 6, torch.float32, seed=32, device=backend.device)
    x[[2, 11], [0, 5]] = float("nan")
    c[7] = x[4]
    c[7, 1] = float("nan")  # would be nearest to row 4
    out = vq_quantize(x, c, metric)
    check_vq(x, c, metric, out)
    assert out[1][[2, 11]].eq(-1).all() and out[0][[2, 11]].isnan().all() and out[2].isnan()
    assert not out[1].eq(7).any()
    assert torch.equal(out[1], reference.vq_quantize(x, c, metric)[1])
    c[:, 0] = float("nan")
    out = vq_quantize(x, c, metric)
    assert out[1].eq(-1).all() and out[0].isnan().all()


# tied codes (vq_helpers.tie_problem): in K = 70, and in K = 300 across the CUDA tiles
@pytest.mark.parametrize("metric", METRICS)
@per_backend("positions, dtype, k_codes", {
    "cpu, triton": [([18, 47, 69], torch.float32, 70)],
    "cuda": [(p, dtype, 300) for p in list(TIE_POSITIONS) + [[200, 129, 257], [127, 128, 255, 256]]
             for dtype in KERNEL_DTYPES]})
def test_kernel_ties_lowest_index(backend, positions, dtype, k_codes, metric):
    x, c = tie_problem(positions, 9, k_codes)
    out = vq_quantize(x.to(dtype).to(backend.device), c.to(dtype).to(backend.device), metric)
    assert out[1].tolist() == [min(positions)] * 4


def backward_truth(gq, gc, gcb, x, c, indices):
    """float64 (grad_x, grad_codebook), written out with a one-hot matrix."""
    x64, c64 = x.double().cpu(), c.double().cpu()
    idx = indices.cpu()
    q = c64[idx.clamp_min(0)].masked_fill((idx < 0).unsqueeze(1), float("nan"))
    scale = 2.0 / max(x.numel(), 1)
    diff = x64 - q
    gx = gq.double().cpu() + float(gc) * scale * diff
    onehot = (idx.unsqueeze(1) == torch.arange(c.shape[0]).unsqueeze(0)).double()  # rows with -1 match no code
    gcbk = -float(gcb) * scale * (onehot.T @ diff.nan_to_num(0.0))
    return gx, gcbk


def near_codes_backward_inputs(n, k, d, x_dtype, c_dtype, seed, device):
    """(grad_quantized, grad_commit 0.7, grad_codebook -1.3, x, codebook, indices in [-1, K)): rows near codes."""
    x, c = near_codes_problem(n, k, d, torch.float64, seed=seed, device=device)
    g = gen(seed + 1)
    gq = torch.randn(n, d, generator=g).to(x_dtype).to(device)
    indices = torch.randint(-1, k, (n,), generator=g).to(device)
    gc, gcb = torch.tensor(0.7, device=device), torch.tensor(-1.3, device=device)
    return gq, gc, gcb, x.to(x_dtype), c.to(c_dtype), indices


def randn_backward_inputs(n, k, d, x_dtype, c_dtype, seed, device):
    """As near_codes_backward_inputs, normal values (indices drawn before the gradient)."""
    x, c = randn_problem(n, k, d, torch.float32, seed=seed, device=device)
    g = gen(seed + 1)
    idx = torch.randint(-1, k, (n,), generator=g).to(device)
    grad_q = torch.randn(n, d, generator=g).to(device)
    return grad_q.to(x_dtype), torch.tensor(0.7, device=device), torch.tensor(-1.3, device=device), x.to(x_dtype), \
        c.to(c_dtype), idx


def check_backward_truth(args, gx, gcb):
    """Against backward_truth: rows without a code NaN, the rest within GRAD_RTOL of the larger of 1 and the
    largest value."""
    want_x, want_c = backward_truth(*args)
    invalid = (args[5] < 0).cpu()
    assert gx.cpu()[invalid].isnan().all(), "a row without a code has a NaN grad_x (q is NaN)"
    for got, want, dt in ((gx.cpu()[~invalid], want_x[~invalid], args[3].dtype), (gcb.cpu(), want_c, args[4].dtype)):
        rtol, top = GRAD_RTOL[dt], want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(1.0, top))


def check_backward_reference(args, gx, gcb):
    """Against the reference on float64 copies: 1e-5 relative for float32 (else 1e-2), NaN rows NaN."""
    grad_q, gc, gb, x, c, idx = (t.cpu() for t in args)
    want_gx, want_gcb = reference.vq_quantize_backward(grad_q.double(), gc.double(), gb.double(), x.double(),
                                                       c.double(), idx)
    rtol = 1e-5 if x.dtype == torch.float32 else 1e-2
    nan_rows = idx < 0
    assert bool(gx.cpu()[nan_rows].isnan().all())
    torch.testing.assert_close(gx.cpu().double()[~nan_rows], want_gx[~nan_rows], rtol=rtol, atol=rtol * 0.1)
    crtol = 1e-5 if c.dtype == torch.float32 else 1e-2
    scale = 2.0 / max(x.numel(), 1)
    torch.testing.assert_close(gcb.cpu().double(), want_gcb, rtol=crtol, atol=crtol * scale * 10)


CUDA_BACKWARD_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16),
                        (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@per_backend("inputs, check, seed, shape, x_dtype, c_dtype, det", {
    "triton": [(near_codes_backward_inputs, check_backward_truth, sum(shape) + 33, shape, xdt, cdt, det)
               for det, cases in ((False, TRITON_VQ_CASES), (True, TRITON_VQ_CASES[1::2]))
               for shape, xdt, cdt in cases],
    "cuda": [(randn_backward_inputs, check_backward_reference, sum(shape), shape, xdt, cdt, det)
             for shape in [(1, 1, 1), (7, 3, 3), (300, 130, 17), (2000, 20, 200)]
             for xdt, cdt in CUDA_BACKWARD_DTYPES for det in (False, True)]})
def test_kernel_backward_vs_float64_truth(backend, inputs, check, seed, shape, x_dtype, c_dtype, det):
    """vq_quantize_backward in the atomic and the deterministic mode, with indices -1 among them."""
    args = inputs(*shape, x_dtype, c_dtype, seed=seed, device=backend.device)
    with deterministic(det):
        gx, gcb = torch.ops.vqkernels.vq_quantize_backward(*args)
    assert gx.dtype == x_dtype and gx.shape == args[3].shape and gx.is_contiguous()
    assert gcb.dtype == c_dtype and gcb.shape == args[4].shape
    check(args, gx, gcb)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@on_backends("triton", gpu=True)
def test_kernel_backward_large(backend, dtype, det):
    args = near_codes_backward_inputs(20000, 512, 67, dtype, dtype, seed=61, device=backend.device)
    with deterministic(det):
        gx, gcbk = torch.ops.vqkernels.vq_quantize_backward(*args)
        again = torch.ops.vqkernels.vq_quantize_backward(*args)
    want_x, want_c = backward_truth(*args)
    valid = (args[5] >= 0).cpu()
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(gx.cpu()[valid].double(), want_x[valid], rtol=rtol, atol=rtol)
    torch.testing.assert_close(gcbk.cpu().double(), want_c, rtol=rtol, atol=rtol * want_c.abs().max().item())
    if det:
        assert_bitwise_equal(gcbk, again[1], "deterministic grad_codebook")


@on_backends("triton", "cuda")
def test_kernel_backward_float64_is_the_reference(backend):
    args = near_codes_backward_inputs(20, 7, 5, torch.float64, torch.float32, seed=35, device=backend.device)
    assert_float64_is_the_reference(torch.ops.vqkernels.vq_quantize_backward(*args),
                                    reference.vq_quantize_backward(*args),
                                    reference.vq_quantize_backward(*(t.cpu() for t in args)))


@on_backends("cuda")
def test_kernel_backward_grad_dtype_differs(backend):
    grad_q, gc, gb, x, c, idx = randn_backward_inputs(50, 10, 9, torch.float16, torch.float16, seed=3,
                                                      device=backend.device)
    args = (grad_q.double(), gc.double(), gb.half(), x, c, idx)
    gx, gcb = torch.ops.vqkernels.vq_quantize_backward(*args)
    want_gx, want_gcb = reference.vq_quantize_backward(*(t.cpu().double() if t.is_floating_point() else t.cpu()
                                                         for t in args))
    keep = idx.cpu() >= 0
    torch.testing.assert_close(gx.cpu().double()[keep], want_gx[keep], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(gcb.cpu().double(), want_gcb, rtol=1e-2, atol=1e-4)


@per_backend("n, k, d, seed", {"cpu, triton": [(150, 6, 19, 12)], "cuda": [(20000, 7, 33, 12)]})
def test_kernel_deterministic_mode_bitwise_run_to_run(backend, n, k, d, seed):
    """Many rows per code: the deterministic codebook gradient and the forward repeat bitwise; the float-atomics
    path gives the same values up to rounding (grad_x bitwise)."""
    args = randn_backward_inputs(n, k, d, torch.float32, torch.float32, seed=seed, device=backend.device)
    x, c = args[3], args[4]
    with deterministic(True):
        runs = [torch.ops.vqkernels.vq_quantize_backward(*args) for _ in range(3)]
        fwd = [vq_quantize(x, c, "l2") for _ in range(3)]
    # grad_x has NaN rows (index -1): compared bit for bit, where NaN equals NaN
    for gx, gcb in runs[1:]:
        assert_bitwise_equal(gx, runs[0][0], "grad_x")
        assert_bitwise_equal(gcb, runs[0][1], "grad_codebook")
    for out in fwd[1:]:
        for a, b in zip(out, fwd[0]):
            assert_bitwise_equal(a, b, "vq_quantize")
    with deterministic(False):
        atomic = torch.ops.vqkernels.vq_quantize_backward(*args)
    torch.testing.assert_close(atomic[1], runs[0][1], rtol=1e-4, atol=1e-6)
    assert_bitwise_equal(atomic[0], runs[0][0], "grad_x of the atomic path")


@on_backends("triton")
def test_kernel_backward_modes_match_the_reference(backend):
    """Both modes match the reference; an index outside [-1, K) counts as -1."""
    gq, gc, gcb, x, c, indices = near_codes_backward_inputs(150, 6, 19, torch.float32, torch.float32, seed=34,
                                                            device=backend.device)
    backward = torch.ops.vqkernels.vq_quantize_backward
    with deterministic(True):
        first = backward(gq, gc, gcb, x, c, indices)
    with deterministic(False):
        fast = backward(gq, gc, gcb, x, c, indices)
    ref = reference.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    for got in (first, fast):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    bad = indices.clone()
    bad[:3] = torch.tensor([6, -2, 2 ** 40])
    gx, gcbk = backward(gq, gc, gcb, x, c, bad)
    as_unassigned = bad.masked_fill((bad < -1) | (bad >= 6), -1)
    want = reference.vq_quantize_backward(gq, gc, gcb, x, c, as_unassigned)
    torch.testing.assert_close(gx, want[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gcbk, want[1], rtol=1e-5, atol=1e-6)


@per_backend("sample, metric", {
    "triton": [("f32", "l2"), ("f16-bf16", "cosine"), ("strided", "ip"), ("empty", "l2"), ("f64", "l2")],
    "cuda": [(sample, metric) for sample in KERNEL_SEARCH_SAMPLES for metric in METRICS]})
def test_kernel_opcheck(backend, sample, metric):
    kernel_opcheck(backend, "vq_quantize", (*KERNEL_SEARCH_SAMPLES[sample](backend.device), metric))


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@per_backend("sample", {"triton": ["f32", "f16-bf16", "empty"], "cuda": list(KERNEL_SEARCH_SAMPLES)})
def test_kernel_backward_opcheck(backend, sample, det):
    x, codebook = KERNEL_SEARCH_SAMPLES[sample](backend.device)
    n = x.shape[0]
    # no index -1: its NaN row fails opcheck's eager-vs-traced comparison (NaN != NaN there);
    # test_kernel_backward_vs_float64_truth covers -1
    idx = torch.arange(n, device=backend.device) % codebook.shape[0]
    grad_q = torch.randn(tuple(x.shape), generator=gen(14)).to(x.dtype).to(backend.device)
    args = (grad_q, torch.tensor(0.5, device=backend.device), torch.tensor(2.0, device=backend.device), x, codebook,
            idx)
    with deterministic(det):
        kernel_opcheck(backend, "vq_quantize_backward", args)


def _one(device, v=1.0):
    return torch.tensor(v, device=device)


KERNEL_BAD = {
    "triton": [(lambda x, c: ("vq_quantize", (x[0], c, "l2")), "x must be 2-D"),
               (lambda x, c: ("vq_quantize", (x, c[:, :3], "l2")), "has D=5"),
               (lambda x, c: ("vq_quantize", (x, c[:0], "l2")), "codebook is empty"),
               (lambda x, c: ("vq_quantize", (x, c.int(), "l2")), "codebook must be float32"),
               (lambda x, c: ("vq_quantize", (x, c, "hamming")), "unknown metric"),
               (lambda x, c: ("vq_quantize_backward", (x[:, :4], _one(x.device), _one(x.device), x, c,
                                                       torch.zeros(4, dtype=torch.long, device=x.device))),
                r"grad_quantized must have x's shape \(4, 5\)"),
               (lambda x, c: ("vq_quantize_backward", (x, _one(x.device).expand(2), _one(x.device), x, c,
                                                       torch.zeros(4, dtype=torch.long, device=x.device))),
                "the loss gradients must be scalars"),
               (lambda x, c: ("vq_quantize_backward", (x, _one(x.device), _one(x.device), x, c,
                                                       torch.zeros(4, dtype=torch.int32, device=x.device))),
                "indices must be int64"),
               (lambda x, c: ("vq_quantize_backward", (x, _one(x.device), _one(x.device), x, c,
                                                       torch.zeros(3, dtype=torch.long, device=x.device))),
                "indices must be 1-D of length N=4"),
               (lambda x, c: ("vq_quantize_backward", (x, _one(x.device), _one(x.device), x, c[:, :2],
                                                       torch.zeros(4, dtype=torch.long, device=x.device))), "has D=5")],
    "cuda": [(lambda x, c: ("vq_quantize", (x, c[0], "l2")), "codebook must be 2-D"),
             (lambda x, c: ("vq_quantize_backward", (x[:3], _one(x.device), _one(x.device), x, c,
                                                     torch.zeros(4, dtype=torch.long, device=x.device))),
              "grad_quantized must have x's shape"),
             (lambda x, c: ("vq_quantize_backward", (x, _one(x.device), _one(x.device), x, c,
                                                     torch.zeros(4, dtype=torch.int32, device=x.device))),
              "indices must be int64")],
}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    assert_kernel_rejects(backend, *make(*randn_problem(4, 6, 5, torch.float32, seed=38, device=backend.device)),
                          match)


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "vq_quantize", *randn_problem(4, 6, 5, torch.float32, seed=64))


@on_backends("triton", gpu=True)
def test_triton_torch_compile_fullgraph(backend):
    """nearest_code_topk and vq_quantize in one compiled graph: the eager results."""
    x, c = near_codes_problem(300, 200, 24, torch.bfloat16, seed=63, device=backend.device)

    def step(a, b):
        return vqkernels.nearest_code_topk(a, b, 4, "cosine"), vq_quantize(a, b)

    (idx, dist), vq = torch.compile(step, fullgraph=True)(x, c)
    (eidx, edist), evq = step(x, c)
    assert torch.equal(idx, eidx) and torch.equal(dist, edist)
    for a, b in zip(vq, evq):
        assert_bitwise_equal(a, b, "compiled vq_quantize")
