"""vqkernels.nearest_code_topk against float64 ground truth."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, METRICS, TIE_POSITIONS, assert_deterministic, assert_separated, build_case, check_topk,
                        clustered, compute_dtype, duplicates_xfail, hyp_settings, opcheck, reference, search_cases,
                        search_opcheck_samples, separated, separated_cases, tie_problem, vqkernels)

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
