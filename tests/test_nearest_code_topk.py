"""vqkernels.nearest_code_topk against float64 ground truth.

The GPU kernels' tests (CUDA, Triton) come last, run by the `backend` fixture (tests/conftest.py).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_SEARCH_SAMPLES, METRICS, TIE_POSITIONS, assert_deterministic,
                        assert_float64_is_the_reference, assert_kernel_rejects, assert_rejects_cpu_tensors,
                        assert_separated, build_case, check_topk, check_topk_f32, clustered, compute_dtype,
                        duplicates_xfail, hyp_settings, integer_problem, kernel_opcheck, nan_search_problem,
                        near_codes_problem, on_backends, opcheck, per_backend, randn_problem, reference, search_cases,
                        search_opcheck_samples, separated, separated_cases, tie_problem, true_distances, vqkernels,
                        with_layout)

topk = vqkernels.nearest_code_topk


@hyp_settings(120)
@given(case=search_cases(), k_frac=st.floats(0.0, 1.0), small_k=st.integers(1, 8))
def test_matches_float64_truth(isa, case, k_frac, small_k):
    """Any shape, metric, dtype mix, layout and duplicate rows; k from 1 to K (at most 64)."""
    x, codebook, _ = build_case(case)
    k = min(case["k"], small_k if k_frac < 0.5 else max(1, round(k_frac * min(case["k"], 64))))
    indices, distances = topk(x, codebook, k, case["metric"])
    check_topk(x, codebook, case["metric"], k, indices, distances)
    x64, cb64 = x.double(), codebook.double()
    check_topk(x64, cb64, case["metric"], k, *reference.nearest_code_topk(x64, cb64, k, case["metric"]),
               duplicates=False)


@hyp_settings(60)
@given(case=separated_cases(), k=st.integers(1, 5))
def test_well_separated_first_is_exact(isa, case, k):
    x, codebook, targets = build_case(case, separated_codes=True)
    k = min(k, case["k"])
    indices, distances = topk(x, codebook, k, case["metric"])
    assert_separated(x, codebook, case["metric"], targets, indices[:, 0])
    check_topk(x, codebook, case["metric"], k, indices, distances)


@pytest.mark.parametrize("positions", TIE_POSITIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_lower_index_first(isa, metric, dtype, positions):
    x, codebook = tie_problem(positions, 33, 70)
    x, codebook = x.to(dtype), codebook.to(dtype)
    k = len(positions) + 2
    indices, distances = topk(x, codebook, k, metric)
    assert indices[:, : len(positions)].tolist() == [sorted(positions)] * 4
    check_topk(x, codebook, metric, k, indices, distances)


@duplicates_xfail("nearest_code_topk")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_lower_index_first(isa, metric, dtype):
    """Copies of a code come out in index order; with k = 2 only the first two copies fit."""
    x, codebook, _ = clustered(30, 50, 16, seed=21, noise=None)
    codebook = codebook / codebook.norm(dim=1, keepdim=True)
    codebook[[49, 2, 31]] = codebook[17].clone()
    x = (codebook[17] + 1e-3 * x).to(dtype)
    codebook = codebook.to(dtype)
    indices, distances = topk(x, codebook, 2, metric)
    assert indices.tolist() == [[2, 17]] * 30
    indices, distances = topk(x, codebook, 6, metric)
    assert indices[:, :4].tolist() == [[2, 17, 31, 49]] * 30
    check_topk(x, codebook, metric, 6, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_fewer_usable_codes_than_k(isa, metric, dtype):
    x, codebook, _ = clustered(25, 20, 6, seed=22)
    codebook[torch.tensor([0, 3, 4, 7, 8, 9, 10, 11, 15, 16, 18, 19]), torch.arange(12) % 6] = float("nan")
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = topk(x, codebook, 12, metric)  # 8 usable codes
    assert bool((indices[:, 8:] == -1).all()) and bool((distances[:, 8:] == float("inf")).all())
    assert sorted(indices[0, :8].tolist()) == [1, 2, 5, 6, 12, 13, 14, 17]
    check_topk(x, codebook, metric, 12, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_rows(isa, metric, dtype):
    x, codebook, _ = clustered(20, 30, 5, seed=23)
    x[3, 1] = float("nan")
    x[19] = float("nan")
    codebook[5, 0] = float("nan")
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = topk(x, codebook, 30, metric)
    assert indices[[3, 19]].eq(-1).all() and torch.isnan(distances[[3, 19]]).all()
    # the other rows: the 29 usable codes, then the NaN code's slot is missing
    assert bool((indices[0, -1] == -1) & (distances[0, -1] == float("inf")))
    check_topk(x, codebook, metric, 30, indices, distances)


@pytest.mark.parametrize("metric", METRICS)
def test_all_nan_codebook(isa, metric):
    x, codebook, _ = clustered(6, 5, 3, seed=24)
    codebook[:, 0] = float("nan")
    indices, distances = topk(x.float(), codebook.float(), 3, metric)
    assert indices.tolist() == [[-1] * 3] * 6
    assert bool((distances == float("inf")).all())


@pytest.mark.parametrize("metric", METRICS)
def test_k_equals_K_is_a_full_ranking(isa, metric):
    x, codebook, _ = clustered(40, 37, 8, seed=25, noise=1.0)
    x, codebook = x.float(), codebook.float()
    indices, distances = topk(x, codebook, 37, metric)
    assert indices.sort(1).values.tolist() == [list(range(37))] * 40
    check_topk(x, codebook, metric, 37, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_empty_x(isa, metric, dtype):
    codebook = torch.randn(10, 6).to(dtype)
    indices, distances = topk(torch.empty(0, 6, dtype=dtype), codebook, 4, metric)
    assert indices.shape == (0, 4) and indices.dtype == torch.int64
    assert distances.shape == (0, 4) and distances.dtype == compute_dtype(codebook)


@pytest.mark.parametrize("metric", METRICS)
def test_distances_gradcheck(metric):
    x, codebook, _ = separated(5, 6, 4, seed=26)
    x.requires_grad_()
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: topk(a, c, 3, metric)[1], (x, codebook))


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic(isa, metric):
    x, codebook, _ = clustered(3000, 200, 19, seed=27, noise=1.0)
    x, codebook = x.float(), codebook.float()
    assert_deterministic(lambda: topk(x, codebook, 7, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("x, codebook", search_opcheck_samples())
def test_opcheck(x, codebook, metric):
    opcheck("nearest_code_topk", (x, codebook, 3, metric))


# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture): the Triton interpreter's shapes tiny. The Triton tests
# judge against distance_tolerance (check_topk) on rows near codes, the CUDA tests against a float32
# tolerance (check_topk_f32) on normal values.

# per backend: (data, (N, K, D), k, dtype): one and several tiles of rows and codes, D not a multiple of the block
KERNEL_CASES = {
    "triton": [(near_codes_problem, shape, k, dtype)
               for shape, k, dtype in [((1, 1, 1), 1, torch.float32), ((37, 80, 17), 5, torch.float32),
                                       ((20, 45, 9), 16, torch.bfloat16), ((6, 32, 4), 32, torch.float16),
                                       ((0, 5, 3), 2, torch.float32)]],
    "cuda": [(randn_problem, shape, k, dtype) for shape, k in [((1, 1, 1), 1), ((1, 5, 1), 5), ((7, 40, 3), 32),
                                                                ((100, 33, 7), 5), ((37, 130, 17), 20),
                                                                ((129, 257, 200), 32), ((70, 300, 16), 1),
                                                                ((20, 50, 9), 40), ((0, 5, 3), 2)]
             for dtype in KERNEL_DTYPES],
}


def check_kernel_topk(backend, x, c, metric, k, idx, dist):
    if backend.name != "cuda":
        check_topk(x.cpu(), c.cpu(), metric, k, idx.cpu(), dist.cpu(), duplicates=True)
    else:
        check_topk_f32(x, c, metric, k, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
@per_backend("problem, shape, k, dtype", KERNEL_CASES)
def test_kernel_vs_float64_truth(backend, problem, shape, k, dtype, metric):
    x, c = problem(*shape, dtype, seed=sum(shape) + k, device=backend.device)
    check_kernel_topk(backend, x, c, metric, k, *topk(x, c, k, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("problem, shape, k", {"triton": [(near_codes_problem, (3001, 1000, 64), 8),
                                              (near_codes_problem, (1025, 4099, 37), 32),
                                              (near_codes_problem, (513, 37, 300), 1)]}, gpu=True)
def test_kernel_large_vs_float64_truth(backend, problem, shape, k, dtype, metric):
    x, c = problem(*shape, dtype, seed=28, device=backend.device)
    idx, dist = topk(x, c, k, metric)
    check_kernel_topk(backend, x, c, metric, k, idx, dist)
    first, _ = vqkernels.nearest_code(x, c, metric)
    assert (idx[:, 0] == first).float().mean() > 0.999  # near-ties may order differently


@pytest.mark.parametrize("metric", METRICS)
@on_backends("triton")
def test_kernel_matches_reference_where_separated(backend, metric):
    """Indices exactly the reference's where the float64 gaps between neighbours are clear."""
    x, c = near_codes_problem(40, 50, 12, torch.float32, seed=21, device=backend.device)
    idx, dist = topk(x, c, 6, metric)
    ridx, rdist = reference.nearest_code_topk(x, c, 6, metric)
    s = true_distances(x.cpu(), c.cpu(), metric).sort(1).values[:, :7]
    clear = ((s[:, 1:] - s[:, :-1]) > 1e-4).all(1).to(backend.device)
    assert clear.float().mean() > 0.7
    assert torch.equal(idx[clear], ridx[clear])
    torch.testing.assert_close(dist, rdist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ("l2", "ip"))
@per_backend("shape", {"cpu, triton": [(40, 70, 9)], "cuda": [(500, 300, 24)]})
def test_kernel_exact_data_matches_reference(backend, shape, metric):
    """Integer data (exact scores, many ties): the topk kernel, the nearest kernel and the reference's stable
    sort on float64 copies agree index for index."""
    x, c = integer_problem(*shape, torch.float32, seed=2, device=backend.device)
    idx, _ = vqkernels.nearest_code(x, c, metric)
    tidx, tdist = topk(x, c, 8, metric)
    ridx, rdist = reference.nearest_code_topk(x.cpu().double(), c.cpu().double(), 8, metric)
    assert torch.equal(tidx.cpu(), ridx) and torch.equal(tdist.cpu().double(), rdist)
    assert torch.equal(tidx[:, 0], idx)


# per backend: data, (N, K, D), seed, then (x dtype, x layout), (codebook dtype, codebook layout), k per call
MIXED_CASES = {
    "cpu, triton": [(near_codes_problem, (21, 40, 11), 22, (torch.float16, "strided"), (torch.bfloat16, "transposed"),
                     7),
                    (near_codes_problem, (21, 40, 11), 22, (torch.float32, "offset"), (torch.float16, "contiguous"),
                     3)],
    "cuda": [(randn_problem, (45, 150, 19), 3, (torch.bfloat16, "offset"), (torch.bfloat16, "transposed"), 6)],
}


@pytest.mark.parametrize("metric", METRICS)
@per_backend("problem, shape, seed, x_as, c_as, k", MIXED_CASES)
def test_kernel_mixed_dtypes_and_layouts(backend, problem, shape, seed, x_as, c_as, k, metric):
    x, c = problem(*shape, torch.float32, seed=seed, device=backend.device)
    x, c = with_layout(x.to(x_as[0]), x_as[1]), with_layout(c.to(c_as[0]), c_as[1])
    check_kernel_topk(backend, x, c, metric, k, *topk(x, c, k, metric))


@pytest.mark.parametrize("metric", METRICS)
@per_backend("shape, k, seed", {"triton": [((9, 40, 6), 5, 23)], "cuda": [((20, 30, 6), 4, 4)]})
def test_kernel_float64_is_the_reference(backend, shape, k, seed, metric):
    x, c = randn_problem(*shape, torch.float64, seed=seed, device=backend.device)
    assert_float64_is_the_reference(topk(x, c, k, metric), reference.nearest_code_topk(x, c, k, metric),
                                    reference.nearest_code_topk(x.cpu(), c.cpu(), k, metric))


@pytest.mark.parametrize("metric", METRICS)
@on_backends("triton", "cuda")
def test_kernel_k_above_32_is_the_reference(backend, metric):
    """The kernels keep at most 32 codes per row: a larger k is served by the reference, exactly."""
    x, c = near_codes_problem(9, 40, 6, torch.float32, seed=23, device=backend.device)
    idx, dist = topk(x, c, 33, metric)
    ridx, rdist = reference.nearest_code_topk(x, c, 33, metric)
    assert torch.equal(idx, ridx) and torch.equal(dist, rdist)
    assert dist.dtype == torch.float32 and idx.shape == (9, 33)


# tied codes (vq_helpers.tie_problem) in K = 70 (one more slot after them: another code, farther), and in
# K = 300 across the CUDA tiles
TIE_CASES = {"cpu, triton": [(p, dt, 70, 1) for p, dt in zip(TIE_POSITIONS[::2], KERNEL_DTYPES)],
             "cuda": [(p, dt, 300, 0) for p in list(TIE_POSITIONS) + [[200, 129, 257], [127, 128, 255, 256]]
                      for dt in KERNEL_DTYPES]}


@pytest.mark.parametrize("metric", METRICS)
@per_backend("positions, dtype, k_codes, extra", TIE_CASES)
def test_kernel_ties_lowest_index_first(backend, positions, dtype, k_codes, extra, metric):
    """The tied codes come first, in increasing index order, at exactly the same distance."""
    x, c = tie_problem(positions, 9, k_codes)
    n_tied = len(positions)
    idx, dist = topk(x.to(dtype).to(backend.device), c.to(dtype).to(backend.device), n_tied + extra, metric)
    assert idx[:, :n_tied].tolist() == [sorted(positions)] * 4
    assert bool((dist[:, :n_tied] == dist[:, :1]).all())
    if extra:  # the next slot is another code, farther
        assert not bool(torch.isin(idx[:, n_tied:].cpu(), torch.tensor(positions)).any())
        assert bool((dist[:, n_tied:] > dist[:, :1]).all())


@pytest.mark.parametrize("metric", METRICS)
@per_backend("problem, n, k_codes, copies, seed, rows, dtype, check", {
    "cpu, triton": [(near_codes_problem, 12, 70, [40, 64, 65], 24, 6, torch.float32, True)],
    "cuda": [(randn_problem, 30, 400, [40, 130, 200, 390], 6, 10, dtype, False) for dtype in KERNEL_DTYPES]})
def test_kernel_duplicate_codes_in_later_tiles(backend, problem, n, k_codes, copies, seed, rows, dtype, check, metric):
    """Copies of code 3 in later tiles come right after it, in index order."""
    x, c = problem(n, k_codes, 11, torch.float32, seed=seed)
    c[3] *= 10.0  # the largest code, so also the inner-product winner
    c[copies] = c[3].clone()
    x[:rows] = c[3] * 1.5
    x, c = x.to(dtype).to(backend.device), c.to(dtype).to(backend.device)
    k = len(copies) + 1
    idx, dist = topk(x, c, k, metric)
    assert idx[:rows].tolist() == [[3] + copies] * rows
    if check:
        check_kernel_topk(backend, x, c, metric, k, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
@per_backend("k_codes, dtype", {"cpu, triton": [(50, torch.float32)],
                                "cuda": [(150, dtype) for dtype in KERNEL_DTYPES]})
def test_kernel_nan_rows_and_codes(backend, k_codes, dtype, metric):
    """NaN rows: -1 and NaN in every slot; NaN codes never listed (one would be nearest to row 3); the other
    rows as the problem without them."""
    x, c, keep, good = nan_search_problem(k_codes, dtype, backend.device)
    tidx, tdist = (t.cpu() for t in topk(x, c, 4, metric))
    assert bool((tidx[~keep] == -1).all()) and bool(tdist[~keep].isnan().all())
    sub_tidx, _ = topk(x[keep.to(backend.device)], c[good.to(backend.device)], 4, metric)
    assert torch.equal(tidx[keep], good.nonzero().squeeze(1)[sub_tidx.cpu()])


@pytest.mark.parametrize("metric", METRICS)
@on_backends("cpu", "triton")
def test_kernel_nan_rows_and_codes_as_the_reference(backend, metric):
    """NaN rows: -1 / NaN everywhere; NaN codes never listed before a usable one; with fewer usable codes
    than k the last slots are -1 / +inf; all as the reference."""
    x, c = near_codes_problem(15, 8, 5, torch.float32, seed=25, device=backend.device)
    x[[0, 9], [4, 0]] = float("nan")
    c[[1, 5, 6], [0, 2, 4]] = float("nan")
    idx, dist = topk(x, c, 7, metric)
    check_topk(x.cpu(), c.cpu(), metric, 7, idx.cpu(), dist.cpu(), duplicates=True)
    assert idx[[0, 9]].eq(-1).all() and dist[[0, 9]].isnan().all()
    assert idx[1:9, 5:].eq(-1).all() and dist[1:9, 5:].eq(float("inf")).all()
    ridx, rdist = reference.nearest_code_topk(x, c, 7, metric)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(dist, rdist, rtol=1e-4, atol=1e-4, equal_nan=True)
    c[:, 1] = float("nan")  # no usable code at all
    idx, dist = topk(x, c, 3, metric)
    assert idx.eq(-1).all() and (dist[1:9].eq(float("inf")).all()) and dist[[0, 9]].isnan().all()


@pytest.mark.parametrize("metric", ("l2", "ip"))
@on_backends()
def test_kernel_nan_exactly_as_the_reference(backend, metric):
    """Exact data with NaN rows and codes: every index and distance as the reference's on float64 copies."""
    x, c = integer_problem(60, 140, 10, torch.float32, seed=8, device=backend.device)
    x[[2, 30], [1, 9]] = float("nan")
    c[[0, 77, 139], [3, 0, 9]] = float("nan")
    tidx, tdist = topk(x, c, 7, metric)
    ridx, rdist = reference.nearest_code_topk(x.cpu().double(), c.cpu().double(), 7, metric)
    assert torch.equal(tidx.cpu(), ridx)
    torch.testing.assert_close(tdist.cpu().double(), rdist, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("metric", METRICS)
@on_backends()
def test_kernel_fewer_usable_codes_than_k(backend, metric):
    x, c = randn_problem(9, 6, 5, torch.float32, seed=9, device=backend.device)
    c[[0, 2, 3, 5], 1] = float("nan")
    idx, dist = topk(x, c, 4, metric)
    assert bool((idx[:, 2:] == -1).all()) and bool((dist[:, 2:] == float("inf")).all())
    assert bool(torch.isfinite(dist[:, :2]).all())
    assert sorted(set(idx[:, :2].flatten().tolist())) == [1, 4]
    ridx, _ = reference.nearest_code_topk(x.cpu().double(), c.cpu().double(), 4, metric)
    assert torch.equal(idx.cpu()[:, 2:], ridx[:, 2:])


@per_backend("sample, k, metric", {
    "triton": [("f32", 3, "l2"), ("f16-bf16", 2, "cosine"), ("strided", 1, "ip"), ("empty", 3, "l2"), ("f64", 4, "ip")],
    "cuda": [(sample, 3, metric) for sample in KERNEL_SEARCH_SAMPLES for metric in METRICS]})
def test_kernel_opcheck(backend, sample, k, metric):
    kernel_opcheck(backend, "nearest_code_topk", (*KERNEL_SEARCH_SAMPLES[sample](backend.device), k, metric))


KERNEL_BAD = {
    "triton": [(lambda x, c: (x, c, 0, "l2"), r"k must be in \[1, K=6\], got k=0"),
               (lambda x, c: (x, c, 7, "l2"), r"k must be in \[1, K=6\], got k=7"),
               (lambda x, c: (x[0], c, 2, "l2"), "x must be 2-D"), (lambda x, c: (x, c[:, :3], 2, "l2"), "has D=5"),
               (lambda x, c: (x.int(), c, 2, "l2"), "x must be float32"),
               (lambda x, c: (x, c, 2, "hamming"), "unknown metric")],
    "cuda": [(lambda x, c: (x, c, 7, "l2"), r"k must be in \[1, K=6\]"),
             (lambda x, c: (x, c, 2, "hamming"), "unknown metric")],
}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    x, c = randn_problem(4, 6, 5, torch.float32, seed=27, device=backend.device)
    assert_kernel_rejects(backend, "nearest_code_topk", make(x, c), match)


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "nearest_code_topk", *randn_problem(4, 6, 5, torch.float32, seed=64), 2)
