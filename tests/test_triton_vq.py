"""vqkernels.triton: nearest_code_topk, vq_quantize (+ backward) and ema_update_ kernels.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported); shapes stay tiny. Tests marked
`cuda` add real sizes on a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

from vq_helpers import TRITON_DEV as DEV
from vq_helpers import (TIE_POSITIONS, assert_bitwise_equal, bits, check_nearest, check_topk, clustered, opcheck,
                        gen, reference, require_triton, tie_problem, with_layout)

vqt = require_triton()
from test_ema_update import assert_state_close, ema_state, sonnet_update  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("l2", "ip", "cosine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem(n, k, d, dtype, seed=0, device=DEV):
    """(x [n, d], codebook [k, d]) in dtype: rows of x near codes (noise 0.3), so the k nearest
    codes are spread out and not all ties."""
    x, c, _ = clustered(n, k, d, seed, noise=0.3)
    return x.to(dtype).to(device), c.to(dtype).to(device)


# --- nearest_code_topk ---

# (N, K, D, k) and a dtype: one and several tiles of rows and codes, D not a multiple of the block
TOPK_CASES = [((1, 1, 1, 1), torch.float32), ((37, 80, 17, 5), torch.float32), ((20, 45, 9, 16), torch.bfloat16),
              ((6, 32, 4, 32), torch.float16), ((0, 5, 3, 2), torch.float32)]


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
@pytest.mark.parametrize("positions, dtype", list(zip(TIE_POSITIONS[::2], DTYPES)), ids=str)
def test_topk_ties_lowest_index_first(positions, dtype, metric):
    """The tied codes come first, in increasing index order; the next slot is another code."""
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
    idx, dist = vqt.nearest_code_topk(x, c, 4, metric)
    assert idx[:6].tolist() == [[3, 40, 64, 65]] * 6
    check_topk(x.cpu(), c.cpu(), metric, 4, idx.cpu(), dist.cpu(), duplicates=True)


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
        opcheck(getattr(torch.ops.vqkernels_triton, "nearest_code_topk").default, args)


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


# --- vq_quantize and vq_quantize_backward ---

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def stored(t, dtype):
    """float32 values t as a kernel's store into dtype leaves them: rounded to nearest even, except
    that the interpreter truncates float32 -> bfloat16 (drops the low 16 bits)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.float().to(dtype)


def check_vq(x, c, metric, outputs):
    """Indices nearest (float64 truth), quantized the raw chosen rows in x's dtype (NaN for -1),
    both losses mean((x - q)^2) within the float32 accumulation error."""
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


# (N, K, D), x dtype, codebook dtype: one and several tiles, D beyond one block, mixed dtypes
VQ_CASES = [((1, 1, 1), torch.float32, torch.float32), ((37, 50, 13), torch.float32, torch.float32),
            ((37, 50, 13), torch.float16, torch.float16), ((37, 50, 13), torch.bfloat16, torch.bfloat16),
            ((33, 40, 70), torch.bfloat16, torch.float32), ((20, 9, 5), torch.float16, torch.bfloat16),
            ((0, 5, 3), torch.float32, torch.float32), ((5, 4, 0), torch.float32, torch.float32)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape, x_dtype, c_dtype", VQ_CASES, ids=str)
def test_vq_quantize_vs_float64_truth(shape, x_dtype, c_dtype, metric):
    n, k, d = shape
    x, c = problem(n, k, d, torch.float64, seed=sum(shape) + 30)
    x, c = x.to(x_dtype), c.to(c_dtype)
    check_vq(x, c, metric, vqt.vq_quantize(x, c, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_vq_quantize_layouts_and_reference(metric):
    x, c = problem(30, 45, 11, torch.float32, seed=31)
    xs, cs = with_layout(x, "strided"), with_layout(c, "transposed")
    out = vqt.vq_quantize(xs, cs, metric)
    check_vq(xs, cs, metric, out)
    ref = reference.vq_quantize(x, c, metric)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=0)
    x64 = x.double()
    out = vqt.vq_quantize(x64, c, metric)  # float64: the reference's values
    for got, want in zip(out, reference.vq_quantize(x64, c, metric)):
        assert_bitwise_equal(got, want, "float64")


@pytest.mark.parametrize("metric", METRICS)
def test_vq_quantize_nan_rows_and_codes(metric):
    x, c = problem(20, 30, 6, torch.float32, seed=32)
    x[[2, 11], [0, 5]] = float("nan")
    c[7] = x[4]
    c[7, 1] = float("nan")  # would be nearest to row 4
    out = vqt.vq_quantize(x, c, metric)
    check_vq(x, c, metric, out)
    assert out[1][[2, 11]].eq(-1).all() and out[0][[2, 11]].isnan().all() and out[2].isnan()
    assert not out[1].eq(7).any()
    assert torch.equal(out[1], reference.vq_quantize(x, c, metric)[1])
    c[:, 0] = float("nan")
    out = vqt.vq_quantize(x, c, metric)
    assert out[1].eq(-1).all() and out[0].isnan().all()


@pytest.mark.parametrize("metric", METRICS)
def test_vq_quantize_ties_lowest_index(metric):
    x, c = tie_problem([18, 47, 69], 9, 70)
    out = vqt.vq_quantize(x.float().to(DEV), c.float().to(DEV), metric)
    assert out[1].tolist() == [18] * 4


def vq_backward_truth(gq, gc, gcb, x, c, indices):
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


GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backward_inputs(n, k, d, x_dtype, c_dtype, seed):
    x, c = problem(n, k, d, torch.float64, seed=seed)
    g = gen(seed + 1)
    gq = torch.randn(n, d, generator=g).to(x_dtype).to(DEV)
    indices = torch.randint(-1, k, (n,), generator=g).to(DEV)
    return gq, x.to(x_dtype), c.to(c_dtype), indices


@pytest.mark.parametrize("shape, x_dtype, c_dtype, deterministic",
                         [(*case, False) for case in VQ_CASES] + [(*case, True) for case in VQ_CASES[1::2]], ids=str)
def test_vq_quantize_backward_vs_float64_truth(shape, x_dtype, c_dtype, deterministic):
    n, k, d = shape
    gq, x, c, indices = backward_inputs(n, k, d, x_dtype, c_dtype, seed=sum(shape) + 33)
    gc, gcb = torch.tensor(0.7, device=DEV), torch.tensor(-1.3, device=DEV)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gx, gcbk = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    finally:
        torch.use_deterministic_algorithms(old)
    assert gx.dtype == x_dtype and gx.shape == x.shape and gx.is_contiguous()
    assert gcbk.dtype == c_dtype and gcbk.shape == c.shape
    want_x, want_c = vq_backward_truth(gq, gc, gcb, x, c, indices)
    invalid = (indices < 0).cpu()
    assert gx.cpu()[invalid].isnan().all(), "a row without a code has a NaN grad_x (q is NaN)"
    for got, want, dt in ((gx.cpu()[~invalid], want_x[~invalid], x_dtype), (gcbk.cpu(), want_c, c_dtype)):
        rtol, top = GRAD_RTOL[dt], want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(1.0, top))


def test_vq_quantize_backward_modes_agree_and_repeat():
    """Deterministic mode: bitwise the same run to run; the atomic path agrees within rounding;
    both match the reference. An index outside [-1, K) counts as -1."""
    gq, x, c, indices = backward_inputs(150, 6, 19, torch.float32, torch.float32, seed=34)
    gc, gcb = torch.tensor(0.7, device=DEV), torch.tensor(-1.3, device=DEV)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
        again = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
        torch.use_deterministic_algorithms(False)
        fast = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b, "deterministic repeat")
    ref = reference.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    for got in (first, fast):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    bad = indices.clone()
    bad[:3] = torch.tensor([6, -2, 2 ** 40])
    gx, gcbk = vqt.vq_quantize_backward(gq, gc, gcb, x, c, bad)
    as_unassigned = bad.masked_fill((bad < -1) | (bad >= 6), -1)
    want = reference.vq_quantize_backward(gq, gc, gcb, x, c, as_unassigned)
    torch.testing.assert_close(gx, want[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gcbk, want[1], rtol=1e-5, atol=1e-6)


def test_vq_quantize_backward_float64_is_the_reference():
    gq, x, c, indices = backward_inputs(20, 7, 5, torch.float64, torch.float32, seed=35)
    gc, gcb = torch.tensor(0.7, device=DEV), torch.tensor(-1.3, device=DEV)
    got = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    for a, b in zip(got, reference.vq_quantize_backward(gq, gc, gcb, x, c, indices)):
        assert_bitwise_equal(a, b, "float64")


def test_vq_opcheck():
    x, c = problem(9, 6, 5, torch.float32, seed=36)
    for args in ((x, c, "l2"), (x.half(), c.bfloat16(), "cosine"), (with_layout(x, "strided"), c, "ip"),
                 (x[:0], c, "l2"), (x.double(), c, "l2")):
        opcheck(getattr(torch.ops.vqkernels_triton, "vq_quantize").default, args)
    gq, xb, cb, indices = backward_inputs(9, 6, 5, torch.float32, torch.float32, seed=37)
    indices = indices.clamp_min(0)  # the AOT-dispatch check compares outputs without equal_nan
    gc, gcb = torch.tensor(0.5, device=DEV), torch.tensor(2.0, device=DEV)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            for args in ((gq, gc, gcb, xb, cb, indices), (gq.bfloat16(), gc, gcb, xb.half(), with_layout(cb, "strided"),
                                                          indices), (gq[:0], gc, gcb, xb[:0], cb, indices[:0])):
                opcheck(getattr(torch.ops.vqkernels_triton, "vq_quantize_backward").default, args)
    finally:
        torch.use_deterministic_algorithms(old)


VQ_BAD = [
    (lambda x, c: (x[0], c, "l2"), "x must be 2-D"),
    (lambda x, c: (x, c[:, :3], "l2"), "has D=5"),
    (lambda x, c: (x, c[:0], "l2"), "codebook is empty"),
    (lambda x, c: (x, c.int(), "l2"), "codebook must be float32"),
    (lambda x, c: (x, c, "hamming"), "unknown metric"),
]


@pytest.mark.parametrize("make, match", VQ_BAD)
def test_vq_quantize_bad_inputs(make, match):
    x, c = problem(4, 6, 5, torch.float32, seed=38)
    with pytest.raises(ValueError, match=f"vqkernels.triton.vq_quantize: .*{match}"):
        vqt.vq_quantize(*make(x, c))


def _one(v=1.0):
    return torch.tensor(v, device=DEV)


VQ_BACKWARD_BAD = [
    (lambda gq, x, c, i: (gq[:, :4], _one(), _one(), x, c, i), r"grad_quantized must have x's shape \(4, 5\)"),
    (lambda gq, x, c, i: (gq, _one().expand(2), _one(), x, c, i), "the loss gradients must be scalars"),
    (lambda gq, x, c, i: (gq, _one(), _one(), x, c, i.int()), "indices must be int64"),
    (lambda gq, x, c, i: (gq, _one(), _one(), x, c, i[:3]), "indices must be 1-D of length N=4"),
    (lambda gq, x, c, i: (gq, _one(), _one(), x, c[:, :2], i), "has D=5"),
]


@pytest.mark.parametrize("make, match", VQ_BACKWARD_BAD)
def test_vq_quantize_backward_bad_inputs(make, match):
    gq, x, c, indices = backward_inputs(4, 6, 5, torch.float32, torch.float32, seed=39)
    with pytest.raises(ValueError, match=f"vqkernels.triton.vq_quantize_backward: .*{match}"):
        vqt.vq_quantize_backward(*make(gq, x, c, indices))


# --- ema_update_ ---


def on_dev(state):
    return [t.to(DEV) for t in state]


def run_ema(state, decay, eps, deterministic):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        assert vqt.ema_update_(*state, decay, eps) is None
    finally:
        torch.use_deterministic_algorithms(old)


# (x dtype, codebook dtype, decay, eps), float32 statistics
EMA_CASES = [(torch.float32, torch.float32, 0.0, 1e-5), (torch.float32, torch.float32, 0.99, 1e-5),
             (torch.float32, torch.float32, 1.0, 1e-3), (torch.float32, torch.float32, 0.5, 0.0),
             (torch.float16, torch.float32, 0.9, 1e-5), (torch.bfloat16, torch.bfloat16, 0.9, 1e-5),
             (torch.float64, torch.float16, 0.9, 1e-5), (torch.float32, torch.float64, 0.9, 1e-5)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("x_dtype, cb_dtype, decay, eps", EMA_CASES, ids=str)
def test_ema_matches_sonnet_formula(x_dtype, cb_dtype, decay, eps, deterministic):
    state = on_dev(ema_state(90, 40, 9, seed=40, cb_dtype=cb_dtype, x_dtype=x_dtype))
    want = sonnet_update(*(t.cpu() for t in state), decay, eps)
    before = state[3].clone(), state[4].clone()
    run_ema(state, decay, eps, deterministic)
    assert_state_close([t.cpu() for t in state[:3]], want, (cb_dtype, torch.float32, torch.float32))
    assert torch.equal(state[3], before[0]) and torch.equal(state[4], before[1]), "x and indices are inputs only"


def test_ema_float64_statistics_are_the_reference():
    state = on_dev(ema_state(60, 12, 5, seed=41, buf_dtype=torch.float64, cb_dtype=torch.bfloat16))
    ref = [t.clone() for t in state]
    vqt.ema_update_(*state, 0.9, 1e-5)
    reference.ema_update_(*ref, 0.9, 1e-5)
    for got, want in zip(state[:3], ref[:3]):
        assert_bitwise_equal(got, want, "float64 statistics")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ema_strided_views_update_in_place(deterministic):
    codebook, cluster_size, embed_sum, x, indices = on_dev(ema_state(70, 24, 6, seed=42))
    want = sonnet_update(*(t.cpu() for t in (codebook, cluster_size, embed_sum, x, indices)), 0.95, 1e-5)
    big_cb = torch.full((24, 12), 7.0, device=DEV)
    cb_view = big_cb[:, ::2]
    cb_view.copy_(codebook)
    big_cs = torch.full((72,), 7.0, device=DEV)
    cs_view = big_cs[::3]
    cs_view.copy_(cluster_size)
    idx_view = torch.stack([indices, torch.zeros_like(indices)], 1)[:, 0]  # stride 2
    state = [cb_view, cs_view, with_layout(embed_sum, "transposed"), with_layout(x, "offset"), idx_view]
    run_ema(state, 0.95, 1e-5, deterministic)
    assert_state_close([t.cpu() for t in state[:3]], want, (torch.float32,) * 3)
    assert bool((big_cb[:, 1::2] == 7.0).all()) and bool((big_cs.view(24, 3)[:, 1:] == 7.0).all())


@pytest.mark.parametrize("n", [0, 7])
def test_ema_no_assigned_rows_only_decays(n):
    state = on_dev(ema_state(n, 10, 4, seed=43, unassigned=1.0))
    want = sonnet_update(*(t.cpu() for t in state), 0.8, 1e-5)
    run_ema(state, 0.8, 1e-5, False)
    assert_state_close([t.cpu() for t in state[:3]], want, (torch.float32,) * 3)


@pytest.mark.parametrize("bad", [24, 2 ** 40, -2])
def test_ema_out_of_range_indices_raise(bad):
    state = on_dev(ema_state(50, 24, 5, seed=44))
    state[4][17] = bad
    saved = [t.clone() for t in state[:3]]
    with pytest.raises(ValueError, match=r"vqkernels.triton.ema_update_: indices must be in \[-1, K=24\)"):
        vqt.ema_update_(*state, 0.9, 1e-5)
    for t, s in zip(state[:3], saved):
        assert torch.equal(t, s), "a failed update must leave the codebook and statistics unchanged"


def test_ema_deterministic_repeats_bitwise_and_agrees_with_atomics():
    state = on_dev(ema_state(400, 16, 20, seed=45))

    def run(deterministic):
        out = [t.clone() for t in state]
        run_ema(out, 0.99, 1e-5, deterministic)
        return out[:3]

    first, again, fast = run(True), run(True), run(False)
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b, "deterministic repeat")
    for a, b in zip(first, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ema_opcheck():
    cb, cs, es, x, idx = ema_state(30, 8, 5, seed=50)
    strided = (with_layout(cb, "strided"), cs, with_layout(es, "transposed"), with_layout(x, "offset"), idx)
    samples = {False: [ema_state(30, 8, 5, seed=46), strided, ema_state(0, 8, 5, seed=49),
                       ema_state(30, 8, 5, seed=47, buf_dtype=torch.float64, cb_dtype=torch.bfloat16)],
               True: [ema_state(30, 8, 5, seed=48, cb_dtype=torch.bfloat16, x_dtype=torch.float16)]}
    old = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic, states in samples.items():
            torch.use_deterministic_algorithms(deterministic)
            for state in states:
                opcheck(getattr(torch.ops.vqkernels_triton, "ema_update_").default, (*on_dev(state), 0.9, 1e-5))
    finally:
        torch.use_deterministic_algorithms(old)


EMA_BAD = [
    (lambda s: (s[0], s[1].half(), s[2], s[3], s[4], 0.9, 1e-5), "cluster_size and embed_sum must both be float32"),
    (lambda s: (s[0], s[1][:3], s[2], s[3], s[4], 0.9, 1e-5), r"cluster_size must have shape \[K=8\]"),
    (lambda s: (s[0], s[1], s[2], s[3][:, :2], s[4], 0.9, 1e-5), r"x must be 2-D \[N, D=5\]"),
    (lambda s: (s[0], s[1], s[2], s[3], s[4].int(), 0.9, 1e-5), "indices must be int64"),
    (lambda s: (s[0], s[1], s[2], s[3], s[4], 1.5, 1e-5), r"decay must be in \[0, 1\]"),
    (lambda s: (s[0], s[1], s[2], s[3], s[4], 0.9, -1.0), "eps must be >= 0"),
]


@pytest.mark.parametrize("make, match", EMA_BAD)
def test_ema_bad_inputs(make, match):
    state = on_dev(ema_state(6, 8, 5, seed=51))
    with pytest.raises(ValueError, match=f"vqkernels.triton.ema_update_: {match}"):
        vqt.ema_update_(*make(state))


# --- GPU (compiled, no interpreter): real sizes ---


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_vq_quantize_large(dtype, metric):
    x, c = problem(8191, 1000, 67, dtype, seed=60, device="cuda")
    out = vqt.vq_quantize(x, c, metric)
    check_vq(x, c, metric, out)
    for a, b in zip(out, vqt.vq_quantize(x, c, metric)):
        assert_bitwise_equal(a, b, "repeated call")
    first, _ = vqt.nearest_code(x, c, metric)
    assert (out[1] == first).float().mean() > 0.999  # autotuning may pick other tiles: near-ties may differ


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_vq_quantize_backward_large(dtype, deterministic):
    gq, x, c, indices = backward_inputs(20000, 512, 67, dtype, dtype, seed=61)
    gc, gcb = torch.tensor(0.7, device="cuda"), torch.tensor(-1.3, device="cuda")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gx, gcbk = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
        again = vqt.vq_quantize_backward(gq, gc, gcb, x, c, indices)
    finally:
        torch.use_deterministic_algorithms(old)
    want_x, want_c = vq_backward_truth(gq, gc, gcb, x, c, indices)
    valid = (indices >= 0).cpu()
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(gx.cpu()[valid].double(), want_x[valid], rtol=rtol, atol=rtol)
    torch.testing.assert_close(gcbk.cpu().double(), want_c, rtol=rtol, atol=rtol * want_c.abs().max().item())
    if deterministic:
        assert_bitwise_equal(gcbk, again[1], "deterministic grad_codebook")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cuda_ema_update_large(deterministic):
    state = on_dev(ema_state(20000, 512, 64, seed=62, x_dtype=torch.bfloat16))
    want = sonnet_update(*(t.cpu() for t in state), 0.99, 1e-5)
    runs = []
    for _ in range(2):
        out = [t.clone() for t in state]
        run_ema(out, 0.99, 1e-5, deterministic)
        runs.append(out[:3])
    assert_state_close([t.cpu() for t in runs[0]], want, (torch.float32,) * 3)
    if deterministic:
        for a, b in zip(*runs):
            assert_bitwise_equal(a, b, "deterministic repeat")


@pytest.mark.cuda
@needs_cuda
def test_cuda_torch_compile_fullgraph():
    x, c = problem(300, 200, 24, torch.bfloat16, seed=63, device="cuda")

    def step(a, b):
        return vqt.nearest_code_topk(a, b, 4, "cosine"), vqt.vq_quantize(a, b)

    (idx, dist), vq = torch.compile(step, fullgraph=True)(x, c)
    (eidx, edist), evq = step(x, c)
    assert torch.equal(idx, eidx) and torch.equal(dist, edist)
    for a, b in zip(vq, evq):
        assert_bitwise_equal(a, b, "compiled vq_quantize")


@pytest.mark.cuda
@needs_cuda
def test_cuda_cpu_tensors_rejected():
    x, c = problem(4, 6, 5, torch.float32, seed=64, device="cpu")
    for name, call in (("nearest_code_topk", lambda: vqt.nearest_code_topk(x, c, 2)),
                       ("vq_quantize", lambda: vqt.vq_quantize(x, c))):
        with pytest.raises(ValueError, match=f"vqkernels.triton.{name}: inputs are on cpu; the Triton kernel needs CUDA"):
            call()


# --- every kernel compiles for sm_90 (not interpreted), without a GPU ---

AOT_COMPILE = '''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton  # noqa: F401
mods = {m: sys.modules["vqkernels.triton." + m] for m in ("nearest_code_topk", "vq_quantize", "scatter", "ema_update")}


def ptx_of(kernel, types, const, num_warps=4):
    """PTX of kernel for sm_90: pointer/float argument types from types, other arguments i32."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    sig.update({a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    options = dict(num_warps=num_warps, num_stages=2)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def search(dt, **more):
    return dict(x_ptr="*" + dt, c_ptr="*" + dt, add_ptr="*fp32", scale_ptr="*fp32", idx_ptr="*i64", **more)


for dt, metric in (("fp32", 0), ("bf16", 2)):
    const = dict(METRIC=metric, IEEE=dt == "fp32", UPCAST=False, EPS=1e-12, KP=16, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32)
    ptx = ptx_of(mods["nearest_code_topk"]._topk_kernel, search(dt, dist_ptr="*fp32"), const)
    assert ("wgmma" in ptx) == (dt == "bf16"), dt
const = dict(METRIC=1, IEEE=True, UPCAST=False, EPS=1e-12, BLOCK_N=128, BLOCK_K=128, BLOCK_D=32)
ptx = ptx_of(mods["vq_quantize"]._vq_quantize_kernel, search("fp32", q_ptr="*fp16", err_ptr="*fp32"), const, 8)
assert "mma" not in ptx
for atomic in (False, True):
    types = dict(gq_ptr="*bf16", x_ptr="*fp16", c_ptr="*fp32", idx_ptr="*i64", coef_ptr="*fp32", gx_ptr="*fp16",
                 gc_ptr="*fp32")
    ptx = ptx_of(mods["vq_quantize"]._vq_backward_kernel, types, dict(ATOMIC=atomic, BLOCK_N=32, BLOCK_D=64))
    assert ("atom" in ptx) == atomic
types = dict(src_ptr="*fp16", order_ptr="*i64", starts_ptr="*i64", sub_ptr="*fp32", coef_ptr="*fp32", out_ptr="*fp32")
ptx = ptx_of(mods["scatter"]._segment_sum_kernel, types, dict(HAS_SUB=True, HAS_COEF=True, BLOCK_R=16, BLOCK_D=64))
assert "atom" not in ptx
e = mods["ema_update"]
types = dict(x_ptr="*bf16", idx_ptr="*i64", counts_ptr="*i32", sums_ptr="*fp32")
assert "atom" in ptx_of(e._ema_accumulate_kernel, types, dict(BLOCK_N=32, BLOCK_D=64))
types = dict(cs_ptr="*fp32", counts_ptr="*i64", total_ptr="*fp32", decay="fp32", one_minus_decay="fp32")
ptx_of(e._ema_stats_kernel, types, dict(BLOCK=1024))
types = dict(cb_ptr="*bf16", cs_ptr="*fp32", es_ptr="*fp32", sums_ptr="*fp32", total_ptr="*fp32", decay="fp32",
             one_minus_decay="fp32", eps="fp32", k_eps="fp32")
ptx_of(e._ema_finalize_kernel, types, dict(BLOCK_K=32, BLOCK_D=64))
'''


def test_kernels_compile_for_sm90():
    """The kernels compile for an H100/H200 without a GPU (catches errors the interpreter lets
    through): fp32 searches never on tensor cores (TF32), bf16 on wgmma; float atomics only in
    the fast scatter paths."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
