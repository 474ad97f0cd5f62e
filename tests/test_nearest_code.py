"""vqkernels.nearest_code against float64 ground truth.

The GPU kernels' tests (CUDA, Triton) come last, run by the `backend` fixture (tests/conftest.py).
"""


import pytest
import torch
from hypothesis import given

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_SEARCH_SAMPLES, METRICS, TIE_POSITIONS, assert_deterministic,
                        assert_float64_is_the_reference, assert_kernel_rejects, assert_rejects_cpu_tensors,
                        assert_separated, bits, build_case, check_nearest, check_nearest_f32, clustered, compute_dtype,
                        distance_tolerance, duplicates_xfail, fail_rows, gen, hyp_settings, integer_problem,
                        kernel_opcheck, nan_search_problem, on_backends, opcheck, peak_memory_kib, per_backend,
                        randn_problem, reference, search_cases, search_opcheck_samples, separated, separated_cases,
                        tie_problem, true_distances, vqkernels, with_layout)

nearest_code = vqkernels.nearest_code


@hyp_settings(150)
@given(case=search_cases())
def test_matches_float64_truth(isa, case):
    """Any shape, metric, dtype mix, layout and duplicate rows: nearest within tolerance,
    distance of the chosen code within tolerance, copies of a code lose to the first one."""
    x, codebook, _ = build_case(case)
    saved = bits(x).clone(), bits(codebook).clone()
    indices, distances = nearest_code(x, codebook, case["metric"])
    assert torch.equal(bits(x), saved[0]) and torch.equal(bits(codebook), saved[1]), "inputs were modified"
    check_nearest(x, codebook, case["metric"], indices, distances)
    # the float64 reference, the documented ground truth, meets the same rules
    x64, cb64 = x.double(), codebook.double()
    check_nearest(x64, cb64, case["metric"], *reference.nearest_code(x64, cb64, case["metric"]), duplicates=False)


@hyp_settings(80)
@given(case=separated_cases())
def test_well_separated_index_is_exact(isa, case):
    x, codebook, targets = build_case(case, separated_codes=True)
    indices, distances = nearest_code(x, codebook, case["metric"])
    assert_separated(x, codebook, case["metric"], targets, indices)
    check_nearest(x, codebook, case["metric"], indices, distances)


@pytest.mark.parametrize("positions", TIE_POSITIONS, ids=str)
@pytest.mark.parametrize("d", [4, 7, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_go_to_lowest_index(isa, metric, dtype, d, positions):
    x, codebook = tie_problem(positions, d, 70)
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = nearest_code(x, codebook, metric)
    assert indices.tolist() == [positions[0]] * 4
    check_nearest(x, codebook, metric, indices, distances)


@duplicates_xfail("nearest_code")
@pytest.mark.parametrize("k, src, copies", [(6, 5, [0]), (17, 16, [3, 0]), (100, 70, [3, 40, 99])], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_lowest_index_wins(isa, metric, dtype, k, src, copies):
    x, codebook, _ = clustered(40, k, 16, seed=3, noise=None)
    codebook = codebook / codebook.norm(dim=1, keepdim=True)  # unit codes: every metric picks the code x is on
    codebook[copies] = codebook[src].clone()
    x[:20] = codebook[src] + 1e-3 * x[:20]
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = nearest_code(x, codebook, metric)
    assert indices[:20].tolist() == [min(copies + [src])] * 20
    check_nearest(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("metric", METRICS)
def test_broadcast_views(isa, metric):
    """Stride-0 inputs: an expanded codebook is K copies of one code (index 0 everywhere)."""
    x, codebook, _ = clustered(50, 8, 6, seed=4)
    same = codebook[5].float().expand(300, 6)
    assert same.stride() == (0, 1)
    indices, distances = nearest_code(x.float(), same, metric)
    assert indices.tolist() == [0] * 50
    check_nearest(x.float(), same, metric, indices, distances)
    row = x[2].float().expand(7, 6)
    indices, distances = nearest_code(row, codebook.float(), metric)
    check_nearest(row, codebook.float(), metric, indices, distances)
    assert len(set(indices.tolist())) == 1


@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cb_dtype", DTYPES, ids=str)
def test_output_dtypes(isa, x_dtype, cb_dtype):
    x, codebook, _ = clustered(33, 21, 7, seed=5)
    x, codebook = x.to(x_dtype), codebook.to(cb_dtype)
    indices, distances = nearest_code(x, codebook)
    assert distances.dtype == (torch.float64 if torch.float64 in (x_dtype, cb_dtype) else torch.float32)
    check_nearest(x, codebook, "l2", indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_rows_get_minus_one_and_nan(isa, metric, dtype):
    x, codebook, _ = clustered(45, 37, 9, seed=6)
    x[0, 0] = float("nan")
    x[7, 8] = float("nan")
    x[20] = float("nan")
    x[44, 4] = float("nan")
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = nearest_code(x, codebook, metric)
    nan_rows = [0, 7, 20, 44]
    assert indices[nan_rows].tolist() == [-1] * 4
    assert bool(torch.isnan(distances[nan_rows]).all())
    check_nearest(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_codebook_rows_never_chosen(isa, metric, dtype):
    """Rows of x sit on codes that hold one NaN: they must go to another code."""
    x, codebook, _ = clustered(40, 50, 5, seed=7)
    bad = [0, 17, 31, 49]
    x[: len(bad)] = codebook[bad]
    for j, b in enumerate(bad):
        codebook[b, j] = float("nan")
    x, codebook = x.to(dtype), codebook.to(dtype)
    indices, distances = nearest_code(x, codebook, metric)
    assert not any(i in bad for i in indices.tolist())
    check_nearest(x, codebook, metric, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_only_one_usable_code(isa, metric, dtype):
    x, codebook, _ = clustered(30, 40, 3, seed=8)
    codebook[torch.arange(40) != 22, 1] = float("nan")
    indices, distances = nearest_code(x.to(dtype), codebook.to(dtype), metric)
    assert indices.tolist() == [22] * 30
    check_nearest(x.to(dtype), codebook.to(dtype), metric, indices, distances)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_all_nan_codebook(isa, metric, dtype):
    x, codebook, _ = clustered(20, 18, 4, seed=9)
    codebook[:, 2] = float("nan")
    indices, distances = nearest_code(x.to(dtype), codebook.to(dtype), metric)
    assert indices.tolist() == [-1] * 20
    assert bool(torch.isnan(distances).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_empty_x(isa, metric, dtype):
    codebook = torch.randn(10, 6).to(dtype)
    indices, distances = nearest_code(torch.empty(0, 6, dtype=dtype), codebook, metric)
    assert indices.shape == (0,) and indices.dtype == torch.int64
    assert distances.shape == (0,) and distances.dtype == compute_dtype(codebook)


def test_default_metric_is_l2(isa):
    # with noise unrelated to the codes, l2 and ip/cosine disagree on most rows
    x, codebook, _ = clustered(200, 64, 8, seed=10, noise=None)
    codebook = codebook * torch.linspace(0.2, 3.0, 64, dtype=torch.float64).unsqueeze(1)
    x, codebook = x.float(), codebook.float()
    default = nearest_code(x, codebook)
    assert torch.equal(default[0], nearest_code(x, codebook, "l2")[0])
    assert not torch.equal(default[0], nearest_code(x, codebook, "ip")[0])
    assert torch.equal(torch.ops.vqkernels.nearest_code(x, codebook)[0], default[0])


@pytest.mark.parametrize("metric", METRICS)
def test_distances_gradcheck(metric):
    """Distances are differentiable in x and the codebook (well-separated: argmin is stable)."""
    x, codebook, _ = separated(7, 6, 4, seed=11)
    x.requires_grad_()
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: nearest_code(a, c, metric)[1], (x, codebook))


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic(isa, metric):
    x, codebook, _ = clustered(5000, 300, 37, seed=12, noise=1.0)
    x, codebook = x.float(), codebook.float()
    assert_deterministic(lambda: nearest_code(x, codebook, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("x, codebook", search_opcheck_samples())
def test_opcheck(x, codebook, metric):
    opcheck("nearest_code", (x, codebook, metric))


@pytest.mark.slow
def test_n_times_k_above_2_31(isa):
    """N * K > 2**31: flat offsets n * K + k overflow int32 for the last ~5% of the rows.

    Codes are the 182 x 182 integer grid [-91, 90]^2 (exact in float32; a 1-D codebook of
    this size is beyond float32's reach with an expanded-form distance, see
    distance_tolerance); each row of x is its target code plus at most 0.25 per
    coordinate, so the target is the only code within 0.125 (others: >= 0.5625).
    """
    side, n = 182, 68000
    k = side * side
    assert n * k > 2 ** 31 + 2 ** 26
    j = torch.arange(k)
    codebook = (torch.stack([j // side, j % side], 1) - side // 2).float()
    g = torch.Generator().manual_seed(13)
    targets = torch.randint(0, k, (n,), generator=g)
    targets[-side:] = torch.arange(k - side, k)  # the last rows aim at the last codes
    x = codebook[targets] + (torch.rand(n, 2, generator=g) - 0.5) * 0.5
    indices, distances = nearest_code(x, codebook)
    fail_rows(indices != targets, "wrong index", index=indices, target=targets)
    exact = (x.double() - codebook.double()[targets]).square().sum(1)
    tol = distance_tolerance(x, codebook, "l2")
    fail_rows(~((distances.double() - exact).abs() <= tol), "wrong distance", distance=distances, exact=exact)


MEMORY_SCRIPT = r"""
import vqkernels


def step(x, codebook):
    indices, distances = vqkernels.nearest_code(x, codebook)
    assert indices.shape == (x.shape[0],) and bool((indices >= 0).all())


g = torch.Generator().manual_seed(0)
x = torch.randn(65536, 64, generator=g)
codebook = torch.randn(16384, 64, generator=g)
print(measure(step, (x[:8], codebook[:8]), (x, codebook)))
"""


@pytest.mark.slow
def test_peak_memory_stays_small():
    """N=65536, D=64, K=16384 float32: the N x K distance matrix would be 4 GiB; the op may
    use at most 64 MiB beyond its inputs (outputs included). The reference kernel stays
    near 52 MiB with its 4M-element chunks, so this runs for either backend.
    Measured by vq_helpers.peak_memory_kib (peak resident size of a fresh process).
    """
    (extra_kib,) = peak_memory_kib(MEMORY_SCRIPT)
    extra_mib = extra_kib / 1024
    assert extra_mib <= 64, f"nearest_code used {extra_mib:.1f} MiB beyond its inputs"


# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture): float32 tolerance, the Triton interpreter's shapes tiny

# (N, K, D): one and several tiles of rows and codes, D not a multiple of the block, N = 0
TINY_SHAPES = [(1, 1, 1), (1, 80, 40), (100, 33, 7), (37, 80, 17), (64, 64, 32), (0, 5, 3)]
CUDA_SHAPES = [(1, 1, 1), (1, 5, 1), (7, 1, 3), (1, 80, 40), (100, 33, 7), (37, 130, 17), (300, 129, 16),
               (129, 257, 200), (64, 64, 32), (0, 5, 3)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("shape", {"triton": TINY_SHAPES, "cuda": CUDA_SHAPES})
def test_kernel_vs_float64_truth(backend, shape, dtype, metric):
    x, c = randn_problem(*shape, dtype, seed=sum(shape), device=backend.device)
    check_nearest_f32(x, c, metric, *nearest_code(x, c, metric))


# the rows judged (all, or the first 500 and last 300: keeps the CPU truth fast)
ROWS = {"all": [slice(None)], "head-tail": [slice(0, 500), slice(-300, None)]}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("shape, seed, rows", {"triton": [((4099, 37, 1031), 11, "all"), ((3001, 1000, 8), 11, "all")],
                                   "cuda": [((4099, 1000, 37), 1, "head-tail"), ((2000, 300, 1031), 1, "head-tail"),
                                            ((3001, 16384, 8), 1, "head-tail")]}, gpu=True)
def test_kernel_large_vs_float64_truth(backend, shape, seed, rows, dtype, metric):
    x, c = randn_problem(*shape, dtype, seed=seed, device=backend.device)
    idx, dist = nearest_code(x, c, metric)
    for r in ROWS[rows]:
        check_nearest_f32(x[r], c, metric, idx[r], dist[r])


@pytest.mark.parametrize("metric", METRICS)
@per_backend("k", {"cpu, triton": [50], "cuda": [150]})
def test_kernel_mixed_dtypes_and_layouts(backend, k, metric):
    x, c = randn_problem(45, k, 19, torch.float32, seed=3, device=backend.device)
    idx, dist = nearest_code(with_layout(x.half(), "strided"), with_layout(c.bfloat16(), "transposed"), metric)
    check_nearest_f32(x.half(), c.bfloat16(), metric, idx, dist)
    idx, dist = nearest_code(with_layout(x, "offset"), c.half(), metric)
    check_nearest_f32(x, c.half(), metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
@on_backends("triton", "cuda")
def test_kernel_float64_is_the_reference(backend, metric):
    """float64 goes to the reference (the kernels compute in float32): its values on the same tensors, within
    1e-12 of the reference's on CPU copies."""
    x, c = randn_problem(20, 30, 6, torch.float64, seed=4, device=backend.device)
    got = nearest_code(x, c, metric)
    assert got[1].dtype == torch.float64
    assert_float64_is_the_reference(got, reference.nearest_code(x, c, metric),
                                    reference.nearest_code(x.cpu(), c.cpu(), metric))


@on_backends("triton")
def test_triton_matches_the_cpu_kernel(backend):
    """Where the float64 gap to the second nearest code is clear: exactly the C++ kernel's indices."""
    x, c = randn_problem(90, 70, 24, torch.float32, seed=5, device=backend.device)
    for metric in METRICS:
        idx, dist = nearest_code(x, c, metric)
        ridx, rdist = torch.ops.vqkernels_cpu.nearest_code(x.cpu(), c.cpu(), metric)
        t = true_distances(x.cpu(), c.cpu(), metric).sort(1).values
        separated = (t[:, 1] - t[:, 0]) > 1e-3
        assert separated.float().mean() > 0.9
        assert torch.equal(idx.cpu()[separated], ridx[separated])
        torch.testing.assert_close(dist.cpu(), rdist, rtol=1e-4, atol=1e-4)


# tied codes (vq_helpers.tie_problem) in the panels and lanes of K = 70, and of K = 300 across the CUDA tiles
CUDA_TIES = list(TIE_POSITIONS) + [[200, 129, 257], [127, 128, 255, 256]]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@per_backend("positions, k", {"cpu, triton": [(p, 70) for p in TIE_POSITIONS], "cuda": [(p, 300) for p in CUDA_TIES]})
def test_kernel_ties_lowest_index(backend, positions, k, dtype, metric):
    x, c = tie_problem(positions, 9, k)
    idx, _ = nearest_code(x.to(dtype).to(backend.device), c.to(dtype).to(backend.device), metric)
    assert idx.tolist() == [min(positions)] * 4


@pytest.mark.parametrize("metric", METRICS)
@per_backend("k, copies, dtype", {"cpu, triton": [(70, [40, 64, 65], torch.float32)],
                                  "cuda": [(400, [40, 130, 200, 390], dtype) for dtype in KERNEL_DTYPES]})
def test_kernel_duplicate_codes_lowest_index(backend, k, copies, dtype, metric):
    x, c = randn_problem(30, k, 11, torch.float32, seed=6)
    c[3] *= 10.0  # the largest code, so also the inner-product winner
    c[copies] = c[3].clone()  # code 3 duplicated in later tiles
    x[:10] = c[3] * 1.5
    idx, _ = nearest_code(x.to(dtype).to(backend.device), c.to(dtype).to(backend.device), metric)
    assert idx[:10].tolist() == [3] * 10


@pytest.mark.parametrize("metric", METRICS)
@per_backend("k, dtype, as_reference", {"cpu, triton": [(50, torch.float32, True)],
                                        "cuda": [(150, dtype, False) for dtype in KERNEL_DTYPES]})
def test_kernel_nan_rows_and_codes(backend, k, dtype, metric, as_reference):
    """NaN rows: -1 and NaN; NaN codes never chosen (one would be nearest to row 3); the other rows as the
    problem without them (and, where as_reference, the reference's indices)."""
    x, c, keep, good = nan_search_problem(k, dtype, backend.device)
    idx, dist = (t.cpu() for t in nearest_code(x, c, metric))
    assert idx[~keep].tolist() == [-1, -1, -1] and bool(dist[~keep].isnan().all())
    sub_idx, sub_dist = nearest_code(x[keep.to(backend.device)], c[good.to(backend.device)], metric)
    assert torch.equal(idx[keep], good.nonzero().squeeze(1)[sub_idx.cpu()])
    assert torch.equal(dist[keep], sub_dist.cpu())
    if as_reference:
        assert torch.equal(idx, reference.nearest_code(x.cpu(), c.cpu(), metric)[0])


@pytest.mark.parametrize("metric", ("l2", "ip"))
@on_backends()
def test_kernel_nan_exactly_as_the_reference(backend, metric):
    """Exact data with NaN rows and codes: every index and distance as the reference's on float64 copies."""
    x, c = integer_problem(60, 140, 10, torch.float32, seed=8, device=backend.device)
    x[[2, 30], [1, 9]] = float("nan")
    c[[0, 77, 139], [3, 0, 9]] = float("nan")
    idx, dist = nearest_code(x, c, metric)
    ridx, rdist = reference.nearest_code(x.cpu().double(), c.cpu().double(), metric)
    assert torch.equal(idx.cpu(), ridx)
    torch.testing.assert_close(dist.cpu().double(), rdist, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("metric", METRICS)
@on_backends("cpu", "reference", "triton", "cuda")
def test_kernel_all_codes_nan(backend, metric):
    x, c = randn_problem(5, 4, 3, torch.float32, seed=10, device=backend.device)
    c[:, 1] = float("nan")
    idx, dist = nearest_code(x, c, metric)
    assert idx.tolist() == [-1] * 5 and bool(dist.isnan().all())


@pytest.mark.parametrize("metric", METRICS)
@per_backend("sample", {"triton": ["f32", "f16-bf16", "bf16", "strided", "empty"], "cuda": list(KERNEL_SEARCH_SAMPLES)})
def test_kernel_opcheck(backend, sample, metric):
    kernel_opcheck(backend, "nearest_code", (*KERNEL_SEARCH_SAMPLES[sample](backend.device), metric))


KERNEL_BAD = {  # what the backend's own op says of bad inputs
    "triton": [(lambda x, c: (x[0], c, "l2"), "x must be 2-D"), (lambda x, c: (x, c[0], "l2"), "codebook must be 2-D"),
               (lambda x, c: (x.int(), c, "l2"), "x must be float32"), (lambda x, c: (x, c[:, :3], "l2"), "has D=5"),
               (lambda x, c: (x, c[:0], "l2"), "codebook is empty"),
               (lambda x, c: (x, c, "hamming"), "unknown metric")],
    "cuda": [(lambda x, c: (x[0], c, "l2"), "x must be 2-D"), (lambda x, c: (x, c[:, :3], "l2"), "x has D=5"),
             (lambda x, c: (x, c[:0], "l2"), "codebook is empty"),
             (lambda x, c: (x.int(), c, "l2"), "x must be float32")],
}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    x, c = randn_problem(4, 6, 5, torch.float32, seed=10, device=backend.device)
    assert_kernel_rejects(backend, "nearest_code", make(x, c), match)


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "nearest_code", *randn_problem(4, 6, 5, torch.float32, seed=14))


@on_backends("triton", gpu=True)
def test_triton_big_codebook_agrees_with_the_cpu_kernel(backend):
    """(65536, 32, 16384) float32: the indices of a 4096-row subset agree with the C++ kernel's, except at
    float32 near-ties."""
    x, c = randn_problem(65536, 16384, 32, torch.float32, seed=12, device=backend.device)
    idx, dist = nearest_code(x, c)
    rows = torch.randperm(65536, generator=gen(13))[:4096].to(backend.device)
    xs, cs = x[rows].cpu(), c.cpu()
    ridx, rdist = torch.ops.vqkernels_cpu.nearest_code(xs, cs, "l2")
    got = idx[rows].cpu()
    differ = got != ridx
    assert differ.float().mean() < 1e-3
    t = true_distances(xs[differ], cs, "l2")
    gap = (t.gather(1, got[differ].unsqueeze(1)) - t.gather(1, ridx[differ].unsqueeze(1))).abs()
    assert bool((gap <= 1e-3).all()), gap.max()
    torch.testing.assert_close(dist[rows].cpu(), rdist, rtol=1e-4, atol=1e-3)


@on_backends("triton", gpu=True)
def test_triton_torch_compile_fullgraph(backend):
    x, c = randn_problem(300, 200, 24, torch.bfloat16, seed=15, device=backend.device)
    compiled = torch.compile(lambda a, b: nearest_code(a, b, "cosine"), fullgraph=True)
    idx, dist = compiled(x, c)
    eidx, edist = nearest_code(x, c, "cosine")
    assert torch.equal(idx, eidx) and torch.equal(dist, edist)
