"""vqkernels.triton: nearest_code_topk, vq_quantize (+ backward) and ema_update_ kernels.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set here before triton is first imported); shapes stay tiny. Tests marked `cuda` add real
sizes on a GPU. A run that imported triton earlier without the interpreter (a whole-suite CPU
run) re-runs this file in a fresh process (test_in_fresh_process) and skips the rest here.
"""

import os
import subprocess
import sys

import pytest
import torch

TRITON_PRELOADED = "triton" in sys.modules
if not torch.cuda.is_available() and not TRITON_PRELOADED:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit runs; the interpreter is slow
INTERPRETER_UNUSABLE = not torch.cuda.is_available() and (
    TRITON_PRELOADED and os.environ.get("TRITON_INTERPRET") != "1")

pytest.importorskip("triton")

from vq_helpers import (TIE_POSITIONS, assert_bitwise_equal, check_nearest, check_topk, clustered, gen,  # noqa: E402
                        reference, tie_problem, with_layout)

import vqkernels.triton as vqt  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _interpreter_or_gpu(request):
    if INTERPRETER_UNUSABLE and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; test_in_fresh_process runs this file")


@pytest.mark.skipif(not INTERPRETER_UNUSABLE, reason="this file's tests run in this process")
def test_in_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "-W", "ignore::RuntimeWarning"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout, r.stdout[-2000:]


def problem(n, k, d, dtype, seed=0, device=DEV):
    """(x [n, d], codebook [k, d]) in dtype: rows of x near codes (noise 0.3), so the k nearest
    codes are spread out and not all ties."""
    x, c, _ = clustered(n, k, d, seed, noise=0.3)
    return x.to(dtype).to(device), c.to(dtype).to(device)


def triton_opcheck(name, args):
    result = torch.library.opcheck(getattr(torch.ops.vqkernels_triton, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# --- nearest_code_topk ---

# (N, K, D, k) and a dtype: one and several tiles of rows and codes, D not a multiple of the block
TOPK_CASES = [((1, 1, 1, 1), torch.float32), ((37, 80, 17, 5), torch.float32), ((37, 80, 17, 5), torch.float16),
              ((37, 80, 17, 5), torch.bfloat16), ((20, 45, 9, 16), torch.bfloat16), ((6, 32, 4, 32), torch.float16),
              ((0, 5, 3, 2), torch.float32)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape, dtype", TOPK_CASES, ids=str)
def test_topk_vs_float64_truth(shape, dtype, metric):
    n, k_codes, d, k = shape
    x, c = problem(n, k_codes, d, dtype, seed=sum(shape))
    idx, dist = vqt.nearest_code_topk(x, c, k, metric)
    check_topk(x.cpu(), c.cpu(), metric, k, idx.cpu(), dist.cpu(), duplicates=True)


@pytest.mark.parametrize("metric", METRICS)
def test_topk_matches_reference(metric):
    """Indices exactly the reference's where the float64 gaps between neighbours are clear."""
    x, c = problem(40, 50, 12, torch.float32, seed=21)
    idx, dist = vqt.nearest_code_topk(x, c, 6, metric)
    ridx, rdist = reference.nearest_code_topk(x, c, 6, metric)
    xd, cd = x.double().cpu(), c.double().cpu()
    t = {"l2": torch.cdist(xd, cd) ** 2, "ip": -(xd @ cd.T),
         "cosine": 1 - (xd / xd.norm(dim=1, keepdim=True)) @ (cd / cd.norm(dim=1, keepdim=True)).T}[metric]
    s = t.sort(1).values[:, :7]
    clear = ((s[:, 1:] - s[:, :-1]) > 1e-4).all(1).to(DEV)
    assert clear.float().mean() > 0.7
    assert torch.equal(idx[clear], ridx[clear])
    torch.testing.assert_close(dist, rdist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_topk_mixed_dtypes_and_layouts(metric):
    x, c = problem(21, 40, 11, torch.float32, seed=22)
    xh, cb = with_layout(x.half(), "strided"), with_layout(c.bfloat16(), "transposed")
    idx, dist = vqt.nearest_code_topk(xh, cb, 7, metric)
    check_topk(xh.cpu(), cb.cpu(), metric, 7, idx.cpu(), dist.cpu(), duplicates=True)
    xo = with_layout(x, "offset")
    idx, dist = vqt.nearest_code_topk(xo, c.half(), 3, metric)
    check_topk(xo.cpu(), c.half().cpu(), metric, 3, idx.cpu(), dist.cpu(), duplicates=True)


@pytest.mark.parametrize("metric", METRICS)
def test_topk_float64_and_large_k_use_the_reference(metric):
    x, c = problem(9, 40, 6, torch.float64, seed=23)
    for args in ((x, c, 5), (x.float(), c.float(), 33)):
        idx, dist = vqt.nearest_code_topk(*args, metric)
        ridx, rdist = reference.nearest_code_topk(*args, metric)
        assert torch.equal(idx, ridx) and torch.equal(dist, rdist)
    assert dist.dtype == torch.float32 and idx.shape == (9, 33)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", range(len(TIE_POSITIONS)))
def test_topk_ties_lowest_index_first(case, metric):
    """The tied codes come first, in increasing index order; the next slot is another code."""
    positions, dtype = TIE_POSITIONS[case], DTYPES[case % len(DTYPES)]
    x, c = tie_problem(positions, 9, 70)
    k = len(positions) + 1
    idx, dist = vqt.nearest_code_topk(x.to(dtype).to(DEV), c.to(dtype).to(DEV), k, metric)
    assert idx[:, :-1].tolist() == [sorted(positions)] * 4
    assert not bool(torch.isin(idx[:, -1].cpu(), torch.tensor(positions)).any())
    assert bool((dist[:, :-1] == dist[:, :1]).all()) and bool((dist[:, -1] > dist[:, 0]).all())


@pytest.mark.parametrize("metric", METRICS)
def test_topk_duplicate_codes_in_later_tiles(metric):
    x, c = problem(12, 70, 11, torch.float32, seed=24)
    c[3] *= 10.0  # the largest code, so also the inner-product winner
    c[65] = c[64] = c[40] = c[3]
    x[:6] = c[3] * 1.5
    idx, _ = vqt.nearest_code_topk(x, c, 4, metric)
    assert idx[:6].tolist() == [[3, 40, 64, 65]] * 6
    check_topk(x.cpu(), c.cpu(), metric, 4, idx.cpu(), _.cpu(), duplicates=True)


@pytest.mark.parametrize("metric", METRICS)
def test_topk_nan_rows_and_codes(metric):
    """NaN rows: -1 / NaN everywhere; NaN codes never listed before a usable one; with fewer
    usable codes than k the last slots are -1 / +inf; all as the reference."""
    x, c = problem(15, 8, 5, torch.float32, seed=25)
    x[[0, 9], [4, 0]] = float("nan")
    c[[1, 5, 6], [0, 2, 4]] = float("nan")
    idx, dist = vqt.nearest_code_topk(x, c, 7, metric)
    check_topk(x.cpu(), c.cpu(), metric, 7, idx.cpu(), dist.cpu(), duplicates=True)
    assert idx[[0, 9]].eq(-1).all() and dist[[0, 9]].isnan().all()
    assert idx[1:9, 5:].eq(-1).all() and dist[1:9, 5:].eq(float("inf")).all()
    ridx, rdist = reference.nearest_code_topk(x, c, 7, metric)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(dist, rdist, rtol=1e-4, atol=1e-4, equal_nan=True)
    c[:, 1] = float("nan")  # no usable code at all
    idx, dist = vqt.nearest_code_topk(x, c, 3, metric)
    assert idx.eq(-1).all() and (dist[1:9].eq(float("inf")).all()) and dist[[0, 9]].isnan().all()


def test_topk_opcheck():
    x, c = problem(9, 6, 5, torch.float32, seed=26)
    for args in ((x, c, 3, "l2"), (x.half(), c.bfloat16(), 2, "cosine"),
                 (with_layout(x, "strided"), with_layout(c, "transposed"), 1, "ip"), (x[:0], c, 3, "l2"),
                 (x.double(), c, 4, "ip")):
        triton_opcheck("nearest_code_topk", args)


TOPK_BAD = [
    (lambda x, c: (x, c, 0, "l2"), r"k must be in \[1, K=6\], got k=0"),
    (lambda x, c: (x, c, 7, "l2"), r"k must be in \[1, K=6\], got k=7"),
    (lambda x, c: (x[0], c, 2, "l2"), "x must be 2-D"),
    (lambda x, c: (x, c[:, :3], 2, "l2"), "has D=5"),
    (lambda x, c: (x.int(), c, 2, "l2"), "x must be float32"),
    (lambda x, c: (x, c, 2, "hamming"), "unknown metric"),
]


@pytest.mark.parametrize("make, match", TOPK_BAD)
def test_topk_bad_inputs(make, match):
    x, c = problem(4, 6, 5, torch.float32, seed=27)
    with pytest.raises(ValueError, match=f"vqkernels.triton.nearest_code_topk: .*{match}"):
        vqt.nearest_code_topk(*make(x, c))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3001, 1000, 64, 8), (1025, 4099, 37, 32), (513, 37, 300, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_topk_large_vs_float64_truth(shape, dtype, metric):
    n, k_codes, d, k = shape
    x, c = problem(n, k_codes, d, dtype, seed=28, device="cuda")
    idx, dist = vqt.nearest_code_topk(x, c, k, metric)
    check_topk(x.cpu(), c.cpu(), metric, k, idx.cpu(), dist.cpu(), duplicates=True)
    first, _ = vqt.nearest_code(x, c, metric)
    assert (idx[:, 0] == first).float().mean() > 0.999  # near-ties may order differently
