"""vqkernels.triton.nearest_code: the Triton kernel of the fused nearest-code search.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported). With CUDA (the GPU machine) the same
small checks run compiled on the GPU, and the tests marked `cuda` add large shapes.
"""

import os
import subprocess
import sys

import pytest
import torch

from vq_helpers import TRITON_DEV as DEV
from vq_helpers import TIE_POSITIONS, gen, opcheck, require_triton, tie_problem, vqkernels, with_layout

vqt = require_triton()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12  # as torch.nn.functional.normalize
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def truth(x, codebook, metric):
    """float64 [N, K] distances in the direct form, independent of vqkernels.reference."""
    x, c = x.double(), codebook.double()
    if metric == "l2":
        return ((x.unsqueeze(1) - c.unsqueeze(0)) ** 2).sum(-1)
    if metric == "ip":
        return -(x @ c.t())
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(EPS)
    cn = c / c.norm(dim=1, keepdim=True).clamp_min(EPS)
    return 1.0 - xn @ cn.t()


def tolerance(x, codebook, metric):
    """Per-row float32-accumulation tolerance of a distance, float64 [N]."""
    x, c = x.double(), codebook.double()
    if metric == "cosine":
        return torch.full((x.shape[0],), 1e-5 * x.shape[1] ** 0.5, dtype=torch.float64, device=x.device)
    xn2, cn2 = (x * x).sum(1), (c * c).sum(1).max()
    return 2e-6 * x.shape[1] ** 0.5 * (1.0 + xn2 + cn2)


def check_search(x, codebook, metric, indices, distances):
    """Indices valid and nearest within tolerance; distances those of the chosen codes."""
    n = x.shape[0]
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert distances.shape == (n,) and distances.dtype == torch.float32
    if n == 0:
        return
    assert bool(((indices >= 0) & (indices < codebook.shape[0])).all()), indices
    t = truth(x, codebook, metric)
    tol = tolerance(x, codebook, metric)
    chosen = t.gather(1, indices.unsqueeze(1)).squeeze(1)
    gap = chosen - t.min(1).values
    assert bool((gap <= tol).all()), f"not nearest: gap {gap.max().item()} > tol"
    err = (distances.double() - chosen).abs()
    assert bool((err <= tol).all()), f"distance error {err.max().item()}"


def problem(n, k, d, dtype, seed=0, device=DEV):
    g = gen(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    return x.to(device), c.to(device)


def subprocess_env(interpret):
    """This process's environment for a child Python that imports this checkout's vqkernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or interpret}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def test_import_vqkernels_does_not_import_triton():
    code = "import sys, vqkernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(True))


SHAPES = [(1, 1, 1), (1, 80, 40), (100, 33, 7), (37, 80, 17), (64, 64, 32), (0, 5, 3)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_vs_float64_truth(shape, dtype, metric):
    x, c = problem(*shape, dtype, seed=sum(shape))
    idx, dist = vqt.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
def test_mixed_dtypes_and_layouts(metric):
    x, c = problem(45, 50, 19, torch.float32, seed=3)
    idx, dist = vqt.nearest_code(with_layout(x.half(), "strided"), with_layout(c.bfloat16(), "transposed"), metric)
    check_search(x.half(), c.bfloat16(), metric, idx, dist)
    idx, dist = vqt.nearest_code(with_layout(x, "offset"), c.half(), metric)
    check_search(x, c.half(), metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
def test_float64_matches_reference(metric):
    x, c = problem(20, 30, 6, torch.float64, seed=4)
    idx, dist = vqt.nearest_code(x, c, metric)
    ridx, rdist = vqkernels.reference.nearest_code(x, c, metric)
    assert dist.dtype == torch.float64
    assert torch.equal(idx, ridx) and torch.equal(dist, rdist)


def test_matches_vqkernels_indices():
    """Well-separated data: exactly the indices of vqkernels.nearest_code, distances close."""
    x, c = problem(90, 70, 24, torch.float32, seed=5)
    for metric in METRICS:
        idx, dist = vqt.nearest_code(x, c, metric)
        ridx, rdist = vqkernels.nearest_code(x.cpu(), c.cpu(), metric)
        t = truth(x, c, metric).sort(1).values
        separated = (t[:, 1] - t[:, 0]).cpu() > 1e-3
        assert separated.float().mean() > 0.9
        assert torch.equal(idx.cpu()[separated], ridx[separated])
        torch.testing.assert_close(dist.cpu(), rdist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", TIE_POSITIONS, ids=str)
def test_ties_lowest_index(positions, dtype, metric):
    x, c = tie_problem(positions, 9, 70)
    idx, _ = vqt.nearest_code(x.to(dtype).to(DEV), c.to(dtype).to(DEV), metric)
    assert idx.tolist() == [min(positions)] * 4


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_rows_lowest_index(metric):
    x, c = problem(30, 70, 11, torch.float32, seed=6)
    c[3] *= 10.0  # the largest code, so also the inner-product winner
    c[65] = c[64] = c[40] = c[3]  # code 3 duplicated in later tiles
    x[:10] = c[3] * 1.5
    idx, _ = vqt.nearest_code(x, c, metric)
    assert idx[:10].tolist() == [3] * 10


@pytest.mark.parametrize("metric", METRICS)
def test_nan_rows_and_codes(metric):
    x, c = problem(40, 50, 13, torch.float32, seed=7)
    x[[0, 17, 39], [5, 0, 12]] = float("nan")
    c[45] = x[3]
    c[45, 2] = float("nan")  # would be nearest to row 3 but holds a NaN
    c[1, 0] = float("nan")
    idx, dist = vqt.nearest_code(x, c, metric)
    nan_rows = torch.tensor([0, 17, 39])
    assert idx[nan_rows].tolist() == [-1, -1, -1] and bool(dist[nan_rows].isnan().all())
    keep = torch.ones(40, dtype=torch.bool)
    keep[nan_rows] = False
    good = torch.ones(50, dtype=torch.bool)
    good[[45, 1]] = False
    sub_idx, _ = vqt.nearest_code(x[keep], c[good], metric)
    assert torch.equal(idx[keep], good.nonzero().squeeze(1).to(DEV)[sub_idx])
    ridx, _ = vqkernels.reference.nearest_code(x.cpu(), c.cpu(), metric)
    assert torch.equal(idx.cpu(), ridx)


def test_all_codes_nan():
    x, c = problem(5, 4, 3, torch.float32, seed=8)
    c[:, 1] = float("nan")
    idx, dist = vqt.nearest_code(x, c)
    assert idx.tolist() == [-1] * 5 and bool(dist.isnan().all())


def opcheck_samples():
    x, c = problem(9, 6, 5, torch.float32, seed=9)
    return [
        pytest.param(x, c, id="f32"),
        pytest.param(x.half(), c.bfloat16(), id="f16-bf16"),
        pytest.param(x.bfloat16(), c.bfloat16(), id="bf16"),
        pytest.param(with_layout(x, "strided"), with_layout(c, "transposed"), id="strided"),
        pytest.param(x[:0], c, id="empty"),
    ]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("x, codebook", opcheck_samples())
def test_opcheck(x, codebook, metric):
    opcheck(torch.ops.vqkernels_triton.nearest_code.default, (x, codebook, metric))


BAD = [
    (lambda x, c: (x[0], c, "l2"), "x must be 2-D"),
    (lambda x, c: (x, c[0], "l2"), "codebook must be 2-D"),
    (lambda x, c: (x.int(), c, "l2"), "x must be float32"),
    (lambda x, c: (x, c[:, :3], "l2"), "has D=5"),
    (lambda x, c: (x, c[:0], "l2"), "codebook is empty"),
    (lambda x, c: (x, c, "hamming"), "unknown metric"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_bad_inputs(make, match):
    x, c = problem(4, 6, 5, torch.float32, seed=10)
    with pytest.raises(ValueError, match=f"vqkernels.triton.nearest_code: .*{match}"):
        vqt.nearest_code(*make(x, c))


# --- GPU (compiled, no interpreter) ---


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4099, 37, 1031), (3001, 1000, 8)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_large_vs_float64_truth(shape, dtype, metric):
    x, c = problem(*shape, dtype, seed=11, device="cuda")
    idx, dist = vqt.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)


@pytest.mark.cuda
@needs_cuda
def test_cuda_big_codebook_agrees_with_cpu_kernel():
    """(65536, 32, 16384) float32: the indices of a 4096-row subset agree with
    vqkernels.nearest_code on the CPU, except at float32 near-ties."""
    x, c = problem(65536, 16384, 32, torch.float32, seed=12, device="cuda")
    idx, dist = vqt.nearest_code(x, c)
    rows = torch.randperm(65536, generator=gen(13))[:4096]
    xs, cs = x[rows.cuda()].cpu(), c.cpu()
    ridx, rdist = vqkernels.nearest_code(xs, cs)
    got = idx[rows.cuda()].cpu()
    differ = got != ridx
    assert differ.float().mean() < 1e-3
    t = truth(xs[differ], cs, "l2")
    gap = (t.gather(1, got[differ].unsqueeze(1)) - t.gather(1, ridx[differ].unsqueeze(1))).abs()
    assert bool((gap <= 1e-3).all()), gap.max()
    torch.testing.assert_close(dist[rows.cuda()].cpu(), rdist, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_cuda_cpu_tensors_rejected():
    x, c = problem(4, 6, 5, torch.float32, seed=14, device="cpu")
    with pytest.raises(ValueError, match="vqkernels.triton.nearest_code: inputs are on cpu; the Triton kernel needs CUDA"):
        vqt.nearest_code(x, c)


@pytest.mark.cuda
@needs_cuda
def test_cuda_torch_compile_fullgraph():
    x, c = problem(300, 200, 24, torch.bfloat16, seed=15, device="cuda")
    compiled = torch.compile(lambda a, b: vqt.nearest_code(a, b, "cosine"), fullgraph=True)
    idx, dist = compiled(x, c)
    eidx, edist = vqt.nearest_code(x, c, "cosine")
    assert torch.equal(idx, eidx) and torch.equal(dist, edist)


AOT_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton
fn = sys.modules["vqkernels.triton.nearest_code"]._nearest_code_kernel.fn
ints = ("N", "K", "D", "sxn", "sxd", "scn", "scd")
for dtype, metric in (("fp32", 0), ("bf16", 2)):
    sig = dict(x_ptr="*" + dtype, c_ptr="*" + dtype, add_ptr="*fp32", scale_ptr="*fp32", idx_ptr="*i64",
               dist_ptr="*fp32", **{a: "i32" for a in ints})
    const = dict(METRIC=metric, IEEE=dtype == "fp32", UPCAST=False, EPS=1e-12, BLOCK_N=128, BLOCK_K=128, BLOCK_D=32)
    sig.update({a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"]
    assert ("wgmma" in ptx) == (dtype == "bf16"), dtype  # bf16 on tensor cores; fp32 IEEE never on TF32 ones
"""


def test_compiles_for_sm90():
    """The kernel compiles (not interpreted) for an H100/H200 without a GPU: catches errors the
    interpreter lets through; bf16 uses wgmma, fp32 no tensor-core (TF32) instruction at all."""
    r = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=subprocess_env(False), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
