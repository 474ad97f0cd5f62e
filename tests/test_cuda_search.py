"""The CUDA C++ kernels of the search family (torch.ops.vqkernels_cuda: nearest_code,
nearest_code_topk, vq_quantize, vq_quantize_backward), called directly on CUDA tensors and
compared with vqkernels.reference on CPU float64 copies. Skipped without a CUDA device (or
without the extension's CUDA sources).
"""

import pytest
import torch

from vq_helpers import (TIE_POSITIONS, assert_bitwise_equal, gen, opcheck, reference, tie_problem, vqkernels,
                        with_layout)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not vqkernels.cuda_compiled(), reason="extension built without its CUDA sources")]

DEV = "cuda"
METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12  # as torch.nn.functional.normalize


def ops():
    return torch.ops.vqkernels_cuda


def problem(n, k, d, dtype, seed=0):
    g = gen(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    return x.to(DEV), c.to(DEV)


def integer_problem(n, k, d, dtype, seed=0):
    """Entries in {-3..3}: every l2 / ip distance is exact in float32, in any summation order."""
    g = gen(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    c = torch.randint(-3, 4, (k, d), generator=g).to(dtype)
    return x.to(DEV), c.to(DEV)


def f64(t):
    return t.detach().double().cpu()


def ref_matrix(x, codebook, metric):
    """float64 [N, K] distances by vqkernels.reference on CPU float64 copies (finite inputs)."""
    k = codebook.shape[0]
    idx, dist = reference.nearest_code_topk(f64(x), f64(codebook), k, metric)
    return torch.empty_like(dist).scatter_(1, idx, dist)


def tolerance(x, codebook, metric):
    """Per-row tolerance of a float32-accumulated distance, float64 [N, 1]."""
    x, c = f64(x), f64(codebook)
    if metric == "cosine":
        return torch.full((x.shape[0], 1), 1e-5 * max(x.shape[1], 1) ** 0.5, dtype=torch.float64)
    xn2, cn2 = (x * x).sum(1, keepdim=True), (c * c).sum(1).max()
    return 2e-6 * max(x.shape[1], 1) ** 0.5 * (1.0 + xn2 + cn2)


def check_nearest(x, codebook, metric, idx, dist):
    """Valid indices of a nearest code (within tolerance), distances those of the chosen codes."""
    n = x.shape[0]
    assert idx.shape == (n,) and idx.dtype == torch.int64 and idx.device.type == "cuda"
    assert dist.shape == (n,) and dist.dtype == torch.float32 and dist.device.type == "cuda"
    if n == 0:
        return
    idx = idx.cpu()
    assert bool(((idx >= 0) & (idx < codebook.shape[0])).all()), idx
    m, tol = ref_matrix(x, codebook, metric), tolerance(x, codebook, metric).squeeze(1)
    chosen = m.gather(1, idx.unsqueeze(1)).squeeze(1)
    gap = chosen - m.min(1).values
    assert bool((gap <= tol).all()), f"not nearest: gap {gap.max().item()}"
    err = (f64(dist) - chosen).abs()
    assert bool((err <= tol).all()), f"distance error {err.max().item()}"


def check_topk(x, codebook, k, metric, idx, dist):
    """k distinct codes, each within tolerance of the k nearest, distances sorted and accurate."""
    n = x.shape[0]
    assert idx.shape == (n, k) and idx.dtype == torch.int64
    assert dist.shape == (n, k) and dist.dtype == torch.float32
    if n == 0:
        return
    idx, dist = idx.cpu(), f64(dist)
    assert bool(((idx >= 0) & (idx < codebook.shape[0])).all()), idx
    assert all(len(set(row)) == k for row in idx.tolist()), "repeated code in a row"
    m, tol = ref_matrix(x, codebook, metric), tolerance(x, codebook, metric)
    chosen = m.gather(1, idx)
    kth = m.sort(1).values[:, k - 1:k]
    assert bool((chosen <= kth + tol).all()), "a chosen code is not among the k nearest"
    assert bool(((dist - chosen).abs() <= tol).all()), f"distance error {(dist - chosen).abs().max().item()}"
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "distances not sorted"


SHAPES = [(1, 1, 1), (1, 5, 1), (7, 1, 3), (1, 80, 40), (100, 33, 7), (37, 130, 17), (300, 129, 16),
          (129, 257, 200), (64, 64, 32), (0, 5, 3)]


def shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_nearest_code_vs_reference(shape, dtype, metric):
    x, c = problem(*shape, dtype, seed=sum(shape))
    idx, dist = ops().nearest_code(x, c, metric)
    check_nearest(x, c, metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4099, 1000, 37), (2000, 300, 1031), (3001, 16384, 8)], ids=shape_id)
def test_nearest_code_large(shape, dtype, metric):
    x, c = problem(*shape, dtype, seed=1)
    idx, dist = ops().nearest_code(x, c, metric)
    check_nearest(x[:500], c, metric, idx[:500], dist[:500])  # a subset keeps the CPU truth fast
    check_nearest(x[-300:], c, metric, idx[-300:], dist[-300:])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, k", [((1, 1, 1), 1), ((1, 5, 1), 5), ((7, 40, 3), 32), ((100, 33, 7), 5),
                                      ((37, 130, 17), 20), ((129, 257, 200), 32), ((70, 300, 16), 1),
                                      ((20, 50, 9), 40), ((0, 5, 3), 2)], ids=str)
def test_topk_vs_reference(shape, k, dtype, metric):
    x, c = problem(*shape, dtype, seed=sum(shape) + k)
    idx, dist = ops().nearest_code_topk(x, c, k, metric)
    check_topk(x, c, k, metric, idx, dist)


@pytest.mark.parametrize("metric", ("l2", "ip"))
def test_topk_exact_data_matches_reference(metric):
    """Integer data (exact scores, many ties): the topk kernel, the nearest kernel and the
    reference's stable sort on float64 copies agree index for index."""
    x, c = integer_problem(500, 300, 24, torch.float32, seed=2)
    idx, _ = ops().nearest_code(x, c, metric)
    tidx, tdist = ops().nearest_code_topk(x, c, 8, metric)
    ridx, rdist = reference.nearest_code_topk(f64(x), f64(c), 8, metric)
    assert torch.equal(tidx.cpu(), ridx) and torch.equal(f64(tdist), rdist)
    assert torch.equal(tidx[:, 0], idx)


@pytest.mark.parametrize("metric", METRICS)
def test_mixed_dtypes_and_layouts(metric):
    x, c = problem(45, 150, 19, torch.float32, seed=3)
    xs, cs = with_layout(x.half(), "strided"), with_layout(c.bfloat16(), "transposed")
    idx, dist = ops().nearest_code(xs, cs, metric)
    check_nearest(x.half(), c.bfloat16(), metric, idx, dist)
    idx, dist = ops().nearest_code(with_layout(x, "offset"), c.half(), metric)
    check_nearest(x, c.half(), metric, idx, dist)
    idx, dist = ops().nearest_code_topk(with_layout(x.bfloat16(), "offset"), cs, 6, metric)
    check_topk(x.bfloat16(), c.bfloat16(), 6, metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
def test_float64_served_by_reference(metric):
    x, c = problem(20, 30, 6, torch.float64, seed=4)
    cases = [(ops().nearest_code(x, c, metric), reference.nearest_code(x.cpu(), c.cpu(), metric)),
             (ops().nearest_code_topk(x, c, 4, metric), reference.nearest_code_topk(x.cpu(), c.cpu(), 4, metric)),
             (ops().vq_quantize(x, c.float(), metric), reference.vq_quantize(x.cpu(), c.float().cpu(), metric))]
    for got, want in cases:
        assert all(g.dtype == w.dtype for g, w in zip(got, want))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)


TIES = list(TIE_POSITIONS) + [[200, 129, 257], [127, 128, 255, 256]]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", TIES, ids=str)
def test_ties_lowest_index(positions, dtype, metric):
    x, c = tie_problem(positions, 9, 300)
    x, c = x.to(dtype).to(DEV), c.to(dtype).to(DEV)
    idx, _ = ops().nearest_code(x, c, metric)
    assert idx.tolist() == [min(positions)] * 4
    tidx, tdist = ops().nearest_code_topk(x, c, len(positions), metric)
    assert tidx.tolist() == [sorted(positions)] * 4
    assert bool((tdist == tdist[:, :1]).all())  # exactly tied
    qidx = ops().vq_quantize(x, c, metric)[1]
    assert qidx.tolist() == [min(positions)] * 4


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicate_codes_lowest_index(dtype, metric):
    x, c = problem(30, 400, 11, torch.float32, seed=6)
    c[3] *= 10.0  # the largest code, so also the inner-product winner
    c[390] = c[200] = c[130] = c[40] = c[3]  # code 3 duplicated, in later tiles too
    x[:10] = c[3] * 1.5
    x, c = x.to(dtype), c.to(dtype)
    idx, _ = ops().nearest_code(x, c, metric)
    assert idx[:10].tolist() == [3] * 10
    tidx, _ = ops().nearest_code_topk(x, c, 5, metric)
    assert tidx[:10].tolist() == [[3, 40, 130, 200, 390]] * 10


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows_and_codes(dtype, metric):
    x, c = problem(40, 150, 13, torch.float32, seed=7)
    x[[0, 17, 39], [5, 0, 12]] = float("nan")
    c[145] = x[3]
    c[145, 2] = float("nan")  # would be nearest to row 3 but holds a NaN
    c[1, 0] = float("nan")
    x, c = x.to(dtype), c.to(dtype)
    nan_rows = torch.tensor([0, 17, 39])
    keep = torch.ones(40, dtype=torch.bool)
    keep[nan_rows] = False
    good = torch.ones(150, dtype=torch.bool)
    good[[145, 1]] = False
    good_codes = good.nonzero().squeeze(1)

    idx, dist = ops().nearest_code(x, c, metric)
    idx, dist = idx.cpu(), dist.cpu()
    assert idx[nan_rows].tolist() == [-1, -1, -1] and bool(dist[nan_rows].isnan().all())
    sub_idx, sub_dist = ops().nearest_code(x[keep], c[good], metric)
    assert torch.equal(idx[keep], good_codes[sub_idx.cpu()])
    assert torch.equal(dist[keep], sub_dist.cpu())

    tidx, tdist = ops().nearest_code_topk(x, c, 4, metric)
    tidx, tdist = tidx.cpu(), tdist.cpu()
    assert bool((tidx[nan_rows] == -1).all()) and bool(tdist[nan_rows].isnan().all())
    sub_tidx, _ = ops().nearest_code_topk(x[keep], c[good], 4, metric)
    assert torch.equal(tidx[keep], good_codes[sub_tidx.cpu()])

    q, qidx, commit, cbl = ops().vq_quantize(x, c, metric)
    assert torch.equal(qidx.cpu(), idx)
    assert bool(q[nan_rows.to(DEV)].isnan().all()) and not bool(q[keep.to(DEV)].isnan().any())
    assert bool(commit.isnan()) and bool(cbl.isnan())


@pytest.mark.parametrize("metric", ("l2", "ip"))
def test_nan_exactly_as_reference(metric):
    """Exact data with NaN rows and codes: every index as the reference's on float64 copies."""
    x, c = integer_problem(60, 140, 10, torch.float32, seed=8)
    x[[2, 30], [1, 9]] = float("nan")
    c[[0, 77, 139], [3, 0, 9]] = float("nan")
    idx, dist = ops().nearest_code(x, c, metric)
    ridx, rdist = reference.nearest_code(f64(x), f64(c), metric)
    assert torch.equal(idx.cpu(), ridx)
    torch.testing.assert_close(f64(dist), rdist, rtol=0, atol=0, equal_nan=True)
    tidx, tdist = ops().nearest_code_topk(x, c, 7, metric)
    ridx, rdist = reference.nearest_code_topk(f64(x), f64(c), 7, metric)
    assert torch.equal(tidx.cpu(), ridx)
    torch.testing.assert_close(f64(tdist), rdist, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("metric", METRICS)
def test_fewer_usable_codes_than_k(metric):
    x, c = problem(9, 6, 5, torch.float32, seed=9)
    c[[0, 2, 3, 5], 1] = float("nan")
    idx, dist = ops().nearest_code_topk(x, c, 4, metric)
    assert bool((idx[:, 2:] == -1).all()) and bool((dist[:, 2:] == float("inf")).all())
    assert bool(torch.isfinite(dist[:, :2]).all())
    assert sorted(set(idx[:, :2].flatten().tolist())) == [1, 4]
    ridx, _ = reference.nearest_code_topk(f64(x), f64(c), 4, metric)
    assert torch.equal(idx.cpu()[:, 2:], ridx[:, 2:])


def test_all_codes_nan():
    x, c = problem(5, 4, 3, torch.float32, seed=10)
    c[:, 1] = float("nan")
    for metric in METRICS:
        idx, dist = ops().nearest_code(x, c, metric)
        assert idx.tolist() == [-1] * 5 and bool(dist.isnan().all())


# --- vq_quantize and its backward ---


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("xdt, cdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                      (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                      (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 1, 3), (300, 130, 17), (129, 257, 200), (3000, 64, 8)],
                         ids=shape_id)
def test_vq_quantize_vs_reference(shape, xdt, cdt, metric):
    n, k, d = shape
    x, c = problem(n, k, d, torch.float32, seed=n + k + d)
    x, c = x.to(xdt), c.to(cdt)
    q, idx, commit, cbl = ops().vq_quantize(x, c, metric)
    assert q.dtype == xdt and q.shape == x.shape and q.is_contiguous()
    assert commit.dtype == cbl.dtype == torch.float32 and commit.shape == cbl.shape == ()
    check_nearest(x, c, metric, idx, ops().nearest_code(x, c, metric)[1])
    assert torch.equal(idx, ops().nearest_code(x, c, metric)[0])
    # The lookup and the loss of the kernel's own indices, by the reference in float64.
    assert torch.equal(q.cpu(), reference.lookup(c.cpu(), idx.cpu(), torch.float32).to(xdt))
    want = (f64(x) - reference.lookup(f64(c), idx.cpu())).pow(2).mean()
    torch.testing.assert_close(f64(commit), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(commit, cbl)
    ridx = reference.vq_quantize(f64(x), f64(c), metric)[1]
    same = idx.cpu() == ridx
    assert same.float().mean() > 0.9  # near-ties may differ between float32 and float64


def test_vq_quantize_empty():
    x, c = problem(0, 5, 3, torch.float32)
    q, idx, commit, cbl = ops().vq_quantize(x, c, "l2")
    assert q.shape == (0, 3) and idx.shape == (0,) and commit.item() == 0.0 and cbl.item() == 0.0
    x = torch.empty(4, 0, device=DEV)
    q, idx, commit, _ = ops().vq_quantize(x, torch.empty(3, 0, device=DEV), "l2")
    assert idx.tolist() == [0] * 4 and commit.item() == 0.0


def backward_problem(n, k, d, xdt, cdt, seed=0):
    x, c = problem(n, k, d, torch.float32, seed=seed)
    g = gen(seed + 1)
    idx = torch.randint(-1, k, (n,), generator=g).to(DEV)
    grad_q = torch.randn(n, d, generator=g).to(DEV)
    gc = torch.tensor(0.7, device=DEV)
    gb = torch.tensor(-1.3, device=DEV)
    return grad_q.to(xdt), gc, gb, x.to(xdt), c.to(cdt), idx


def ref_backward(args):
    grad_q, gc, gb, x, c, idx = args
    gx, gcb = reference.vq_quantize_backward(f64(grad_q), f64(gc), f64(gb), f64(x), f64(c), idx.cpu())
    return gx, gcb


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("xdt, cdt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                      (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 3), (300, 130, 17), (2000, 20, 200)], ids=shape_id)
def test_vq_quantize_backward_vs_reference(shape, xdt, cdt, deterministic):
    args = backward_problem(*shape, xdt, cdt, seed=sum(shape))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gx, gcb = ops().vq_quantize_backward(*args)
    finally:
        torch.use_deterministic_algorithms(before)
    want_gx, want_gcb = ref_backward(args)
    assert gx.dtype == xdt and gx.shape == args[3].shape and gx.is_contiguous()
    assert gcb.dtype == cdt and gcb.shape == args[4].shape
    rtol = 1e-5 if xdt == torch.float32 else 1e-2
    nan_rows = args[5].cpu() < 0
    assert bool(gx.cpu()[nan_rows].isnan().all())
    torch.testing.assert_close(f64(gx)[~nan_rows], want_gx[~nan_rows], rtol=rtol, atol=rtol * 0.1)
    crtol = 1e-5 if cdt == torch.float32 else 1e-2
    scale = 2.0 / max(args[3].numel(), 1)
    torch.testing.assert_close(f64(gcb), want_gcb, rtol=crtol, atol=crtol * scale * 10)


def test_vq_quantize_backward_grad_dtype_differs():
    grad_q, gc, gb, x, c, idx = backward_problem(50, 10, 9, torch.float16, torch.float16, seed=3)
    args = (grad_q.double(), gc.double(), gb.half(), x, c, idx)
    gx, gcb = ops().vq_quantize_backward(*args)
    want_gx, want_gcb = ref_backward(args)
    keep = idx.cpu() >= 0
    torch.testing.assert_close(f64(gx)[keep], want_gx[keep], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(f64(gcb), want_gcb, rtol=1e-2, atol=1e-4)


def test_deterministic_mode_bitwise_run_to_run():
    """Many rows per code: the deterministic codebook gradient and the losses repeat bitwise."""
    args = backward_problem(20000, 7, 33, torch.float32, torch.float32, seed=12)
    x, c = args[3], args[4]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [ops().vq_quantize_backward(*args) for _ in range(3)]
        fwd = [ops().vq_quantize(x, c, "l2") for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    # grad_x has NaN rows (index -1): compared bit for bit, where NaN equals NaN
    for gx, gcb in runs[1:]:
        assert_bitwise_equal(gx, runs[0][0], "grad_x")
        assert_bitwise_equal(gcb, runs[0][1], "grad_codebook")
    for out in fwd[1:]:
        for a, b in zip(out, fwd[0]):
            assert_bitwise_equal(a, b, "vq_quantize")
    atomic = ops().vq_quantize_backward(*args)  # the float-atomics path: same values up to rounding
    torch.testing.assert_close(atomic[1], runs[0][1], rtol=1e-4, atol=1e-6)
    assert_bitwise_equal(atomic[0], runs[0][0], "grad_x of the atomic path")


# --- opcheck and input checks ---


def opcheck_samples():
    """Builders of (x, codebook) on the GPU (called inside the tests: collection needs no GPU)."""
    def make(xdt, cdt, layout="contiguous", n=9):
        def build():
            x, c = problem(9, 6, 5, torch.float32, seed=13)
            code_layout = "transposed" if layout == "strided" else "contiguous"
            return with_layout(x[:n].to(xdt), layout), with_layout(c.to(cdt), code_layout)
        return build
    return [
        pytest.param(make(torch.float32, torch.float32), id="f32"),
        pytest.param(make(torch.float16, torch.bfloat16), id="f16-bf16"),
        pytest.param(make(torch.bfloat16, torch.bfloat16), id="bf16"),
        pytest.param(make(torch.float16, torch.float16), id="f16"),
        pytest.param(make(torch.float64, torch.float64), id="f64"),
        pytest.param(make(torch.float32, torch.float32, "strided"), id="strided"),
        pytest.param(make(torch.float32, torch.float32, n=0), id="empty"),
    ]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("sample", opcheck_samples())
def test_opcheck_search(sample, metric):
    x, codebook = sample()
    opcheck(getattr(ops(), "nearest_code").default, (x, codebook, metric))
    opcheck(getattr(ops(), "nearest_code_topk").default, (x, codebook, 3, metric))
    opcheck(getattr(ops(), "vq_quantize").default, (x, codebook, metric))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("sample", opcheck_samples())
def test_opcheck_backward(sample, deterministic):
    x, codebook = sample()
    n = x.shape[0]
    # no index -1: its NaN row fails opcheck's eager-vs-traced comparison (NaN != NaN there);
    # test_vq_quantize_backward_vs_reference covers -1
    idx = torch.arange(n, device=DEV) % codebook.shape[0]
    grad_q = torch.randn(tuple(x.shape), generator=gen(14)).to(x.dtype).to(DEV)
    args = (grad_q, torch.tensor(0.5, device=DEV), torch.tensor(2.0, device=DEV), x, codebook, idx)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        opcheck(getattr(ops(), "vq_quantize_backward").default, args)
    finally:
        torch.use_deterministic_algorithms(before)


BAD = [
    (lambda x, c: ("nearest_code", (x[0], c, "l2")), "nearest_code: x must be 2-D"),
    (lambda x, c: ("nearest_code", (x, c[:, :3], "l2")), "nearest_code: x has D=5"),
    (lambda x, c: ("nearest_code", (x, c[:0], "l2")), "nearest_code: codebook is empty"),
    (lambda x, c: ("nearest_code", (x.int(), c, "l2")), "nearest_code: x must be float32"),
    (lambda x, c: ("nearest_code_topk", (x, c, 7, "l2")), r"nearest_code_topk: k must be in \[1, K=6\]"),
    (lambda x, c: ("nearest_code_topk", (x, c, 2, "hamming")), "nearest_code_topk: unknown metric"),
    (lambda x, c: ("vq_quantize", (x, c[0], "l2")), "vq_quantize: codebook must be 2-D"),
    (lambda x, c: ("vq_quantize_backward", (x[:3], torch.ones((), device=DEV), torch.ones((), device=DEV), x, c,
                                            torch.zeros(4, dtype=torch.long, device=DEV))),
     "vq_quantize_backward: grad_quantized must have x's shape"),
    (lambda x, c: ("vq_quantize_backward", (x, torch.ones((), device=DEV), torch.ones((), device=DEV), x, c,
                                            torch.zeros(4, dtype=torch.int32, device=DEV))),
     "vq_quantize_backward: indices must be int64"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_bad_inputs(make, match):
    x, c = problem(4, 6, 5, torch.float32, seed=15)
    name, args = make(x, c)
    with pytest.raises(ValueError, match=f"vqkernels.{match}"):
        getattr(ops(), name)(*args)
