"""vqkernels.triton: residual_quantize, multiscale_quantize_step, lfq_entropy and their backwards.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is first imported), so the shapes are tiny; the tests marked `cuda` add real sizes on a GPU. The truths are float64 computations
written here, independent of vqkernels.reference; the reference is compared where the spec asks
for its exact arithmetic (quantized sums, area pooling, deterministic scatter-adds).
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import TRITON_DEV as DEV
from vq_helpers import LFQ_PROB_EPS as PROB_EPS
from vq_helpers import assert_bitwise_equal, bits, gen, hyp_settings, opcheck, reference, require_triton, with_layout

vqt = require_triton()
from vqkernels.triton import multiscale as triton_multiscale  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def randn(*shape, seed, dtype=torch.float32, device=DEV, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def nan_equal(a, b):
    """Equal values (NaN == NaN), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@contextlib.contextmanager
def deterministic(flag):
    """torch.use_deterministic_algorithms(flag) inside, the previous setting restored afterwards."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def level_cb(codebooks, level):
    return codebooks[level] if codebooks.dim() == 3 else codebooks


OPS = ("residual_quantize", "residual_quantize_backward", "multiscale_quantize_step",
       "multiscale_quantize_step_backward", "lfq_entropy", "lfq_entropy_backward")


@pytest.mark.parametrize("name", OPS)
def test_schema_matches_vqkernels(name):
    """The vqkernels_triton op takes exactly the vqkernels op's arguments (names, types, defaults)
    and returns as many tensors: a boxed call can be forwarded unchanged."""
    mine = getattr(torch.ops.vqkernels_triton, name).default._schema
    spec = getattr(torch.ops.vqkernels, name).default._schema
    assert [(a.name, str(a.type), a.default_value) for a in mine.arguments] == \
        [(a.name, str(a.type), a.default_value) for a in spec.arguments]
    assert len(mine.returns) == len(spec.returns)
    assert callable(getattr(vqt, name)) and name in vqt.__all__


# ---------------------------------------------------------------------------------------
# residual_quantize


def residual_truth(x, codebooks, indices):
    """Walks the kernel's code path: checks every level's index is the nearest code of the float32
    residual (float64 distances, tolerance of float32 rounding) and returns the float32 running sum
    quantized and the float64 losses, both computed here."""
    n, d = x.shape
    r = x.float()
    quant = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    losses = []
    for level in range(indices.shape[1]):
        cb, r64 = level_cb(codebooks, level).double(), r.double()
        dist = ((r64 * r64).sum(1, keepdim=True) - 2.0 * r64 @ cb.t() + (cb * cb).sum(1)).clamp_min(0.0)
        idx = indices[:, level]
        ok = idx >= 0
        chosen = dist[ok].gather(1, idx[ok].unsqueeze(1)).squeeze(1)
        tol = 1e-5 * (1.0 + (r.double()[ok] ** 2).sum(1) + (cb ** 2).sum(1).max())
        assert bool((chosen - dist[ok].min(1).values <= tol).all()), f"level {level}: not the nearest code"
        q = torch.where(ok.unsqueeze(1), level_cb(codebooks, level).float()[idx.clamp_min(0)], float("nan"))
        losses.append(((r.double() - q.double()) ** 2).sum() / max(n * d, 1))
        r = r - q
        quant = quant + q
    return quant, torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)


RESIDUAL_SHAPES = [(1, 1, 1, 1), (37, 11, 20, 3), (6, 20, 40, 2), (0, 5, 4, 2)]


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_vs_float64_truth(shape, dtype, shared):
    n, d, k, levels = shape
    x = randn(n, d, seed=n + d, dtype=dtype)
    cbs = randn(k, d, seed=k, dtype=dtype) if shared else randn(levels, k, d, seed=k, dtype=dtype, scale=0.5)
    quantized, indices, commit, codebook = vqt.residual_quantize(x, cbs, levels if shared else -1)
    assert quantized.dtype == dtype and indices.shape == (n, levels) and indices.dtype == torch.int64
    assert commit.dtype == codebook.dtype == torch.float32 and commit.shape == (levels,)
    assert bool(((indices >= 0) & (indices < k)).all())
    quant, losses = residual_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(dtype), "quantized")
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)
    assert_bitwise_equal(commit, codebook, "codebook_losses")
    assert commit.data_ptr() != codebook.data_ptr()


def test_residual_matches_reference_with_nans():
    """NaN rows -> index -1 and NaN from there; NaN codes never chosen; the rest bit for bit
    the reference (well-separated data: no float32 near-ties)."""
    x = randn(40, 13, seed=1)
    cbs = randn(3, 25, 13, seed=2)
    x[[0, 17], [5, 0]] = float("nan")
    cbs[0, 4, 1] = float("nan")
    cbs[1, :, 2] = float("nan")  # level 1 has no usable code: -1 for every row from there
    out = vqt.residual_quantize(x, cbs)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu())
    assert (out[1][:, 1:] == -1).all() and bool(out[0].isnan().all()) and bool(out[2][1:].isnan().all())
    cbs[1, :, 2] = 0.5
    out = vqt.residual_quantize(x, cbs)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu())
    assert out[1][[0, 17]].eq(-1).all() and not (out[1][:, 0] == 4).any()
    assert torch.equal(out[1].cpu(), ref[1]) and nan_equal(out[0].cpu(), ref[0])
    assert bool(out[2].isnan().all())  # NaN rows make every level's loss NaN
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 17]] = False
    out = vqt.residual_quantize(x[keep], cbs)
    ref = reference.residual_quantize(x[keep].cpu(), cbs.cpu())
    assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[0].cpu(), ref[0])
    torch.testing.assert_close(out[2].cpu(), ref[2], rtol=1e-6, atol=0.0)


@hyp_settings(5)
@given(n=st.integers(0, 20), d=st.integers(1, 9), k=st.integers(1, 12), levels=st.integers(1, 3),
       shared=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 31 - 1))
def test_residual_random_shapes(n, d, k, levels, shared, dtype, seed):
    x = randn(n, d, seed=seed, dtype=dtype)
    cbs = randn(k, d, seed=seed + 1, dtype=dtype) if shared else randn(levels, k, d, seed=seed + 1, dtype=dtype)
    quantized, indices, commit, _ = vqt.residual_quantize(x, cbs, levels if shared else -1)
    quant, losses = residual_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(dtype), "quantized")
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)


def test_residual_mixed_dtypes_layouts():
    x = randn(21, 9, seed=3)
    cbs = randn(2, 17, 9, seed=4)
    xs = with_layout(x.half(), "strided")
    cb_t = cbs.bfloat16().transpose(1, 2).contiguous().transpose(1, 2)
    out = vqt.residual_quantize(xs, cb_t)
    ref = reference.residual_quantize(xs.cpu(), cb_t.cpu())
    assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[0].cpu(), ref[0])


@pytest.mark.parametrize("case", ["beam", "float64", "D=0"])
def test_residual_delegates_to_reference(case):
    d = 0 if case == "D=0" else 6
    x = randn(12, d, seed=5, dtype=torch.float64 if case == "float64" else torch.float32)
    cbs = randn(3, 8, d, seed=6, dtype=x.dtype)
    beam = 3 if case == "beam" else 1
    out = vqt.residual_quantize(x, cbs, -1, beam)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu(), -1, beam)
    for a, b in zip(out, ref):
        assert_bitwise_equal(a.cpu(), b)
    assert out[2].data_ptr() != out[3].data_ptr()


def residual_backward_truth(gq, gc, gb, x, cbs, indices):
    """float64 gradients, written from the spec: grad_x = gq + sum_l gc_l 2/(ND) r_{l+1}, codebook
    row i_l of level l gets -gb_l 2/(ND) r_{l+1} (float32 residuals, as the forward)."""
    n, d = x.shape
    scale = 2.0 / max(n * d, 1)
    gx = gq.double()
    gcb = torch.zeros(cbs.shape, dtype=torch.float64, device=x.device)
    r = x.float()
    for level in range(indices.shape[1]):
        idx = indices[:, level]
        q = torch.where((idx >= 0).unsqueeze(1), level_cb(cbs, level).float()[idx.clamp_min(0)], float("nan"))
        r = r - q
        gx = gx + gc[level].double() * scale * r.double()
        for row in range(n):
            if idx[row] >= 0:
                level_cb(gcb, level)[idx[row]] -= gb[level].double() * scale * r[row].double()
    return gx, gcb


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_backward_vs_truth_and_reference(dtype, shared):
    n, d, k, levels = 23, 10, 6, 3
    x = randn(n, d, seed=7, dtype=dtype)
    cbs = randn(k, d, seed=8, dtype=dtype) if shared else randn(levels, k, d, seed=8, dtype=dtype)
    indices = torch.randint(0, k, (n, levels), generator=gen(9)).to(DEV)
    indices[::4, -1] = -1  # no usable code at the last level: NaN grad_x rows, nothing to the codebook
    gq = randn(n, d, seed=10, dtype=dtype)
    gc, gb = randn(levels, seed=11), randn(levels, seed=12)
    gx_truth, gcb_truth = residual_backward_truth(gq, gc, gb, x, cbs, indices)
    for det in (False, True):
        with deterministic(det):
            gx, gcb = vqt.residual_quantize_backward(gq, gc, gb, x, cbs, indices)
        assert gx.dtype == dtype and gcb.dtype == dtype and gcb.shape == cbs.shape
        tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
        finite = ~gx_truth.isnan()
        torch.testing.assert_close(gx.double()[finite], gx_truth[finite], **tol)
        assert bool(gx.isnan()[~finite].all())
        torch.testing.assert_close(gcb.double(), gcb_truth, **tol)
    # The deterministic path: bit for bit the reference's sequential index_add_.
    with deterministic(True):
        got = vqt.residual_quantize_backward(gq, gc, gb, x, cbs, indices)
    ref = reference.residual_quantize_backward(gq.cpu(), gc.cpu(), gb.cpu(), x.cpu(), cbs.cpu(), indices.cpu())
    for a, b in zip(got, ref):
        assert nan_equal(a.cpu(), b)


def test_residual_backward_float64_and_empty():
    x = randn(8, 4, seed=13, dtype=torch.float64)
    cbs = randn(2, 5, 4, seed=14, dtype=torch.float64)
    idx = torch.randint(0, 5, (8, 2), generator=gen(15)).to(DEV)
    args = (randn(8, 4, seed=16, dtype=torch.float64), randn(2, seed=17), randn(2, seed=18), x, cbs, idx)
    for a, b in zip(vqt.residual_quantize_backward(*args),
                    reference.residual_quantize_backward(*(t.cpu() for t in args))):
        assert_bitwise_equal(a.cpu(), b)
    x0 = randn(0, 4, seed=19)
    gx, gcb = vqt.residual_quantize_backward(x0, randn(2, seed=17), randn(2, seed=18), x0, cbs.float(),
                                             idx[:0])
    assert gx.shape == (0, 4) and torch.equal(gcb, torch.zeros_like(gcb))


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_backwards_out_of_range_indices_count_as_minus_one(det):
    """Not range-checked (no GPU sync), but memory-safe: an index >= K or < -1 acts as -1."""
    x, cbs = randn(10, 4, seed=36), randn(2, 5, 4, seed=37)
    idx = torch.randint(0, 5, (10, 2), generator=gen(38)).to(DEV)
    bad, minus = idx.clone(), idx.clone()
    bad[[1, 6], 1], bad[3, 1] = 5, -7
    minus[[1, 6, 3], 1] = -1
    grads = (randn(10, 4, seed=39), randn(2, seed=40), randn(2, seed=41))
    with deterministic(det):
        for a, b in zip(vqt.residual_quantize_backward(*grads, x, cbs, bad),
                        vqt.residual_quantize_backward(*grads, x, cbs, minus)):
            assert_bitwise_equal(a, b)
        grad_h = randn(2, 4, 1, 5, seed=42)
        assert_bitwise_equal(vqt.multiscale_quantize_step_backward(grad_h, cbs[0], bad.view(2, 1, 10)[:, :, :5]),
                             vqt.multiscale_quantize_step_backward(grad_h, cbs[0], minus.view(2, 1, 10)[:, :, :5]))


def test_residual_deterministic_bitwise():
    n, d, k = 60, 12, 3  # few codes: long per-code segments, many atomic collisions
    x = randn(n, d, seed=20)
    cbs = randn(k, d, seed=21)
    with deterministic(True):
        fwd = [vqt.residual_quantize(x, cbs, 3) for _ in range(2)]
        bwd = [vqt.residual_quantize_backward(x, randn(3, seed=22), randn(3, seed=23), x, cbs, fwd[0][1])
               for _ in range(2)]
    for a, b in zip(fwd[0] + bwd[0], fwd[1] + bwd[1]):
        assert_bitwise_equal(a, b)


def residual_opcheck_samples():
    x = randn(9, 5, seed=24, device="cpu")
    cbs = randn(2, 6, 5, seed=25, device="cpu")
    return [pytest.param(x, cbs, -1, 1, id="f32"), pytest.param(x.half(), cbs[0].bfloat16(), 2, 1, id="shared-f16"),
            pytest.param(x, cbs, 2, 2, id="beam"), pytest.param(x[:0], cbs, -1, 1, id="empty")]


@pytest.mark.parametrize("x, cbs, levels, beam", residual_opcheck_samples())
def test_residual_opcheck(x, cbs, levels, beam):
    opcheck(torch.ops.vqkernels_triton.residual_quantize.default, (x.to(DEV), cbs.to(DEV), levels, beam))


def test_residual_backward_opcheck():
    x, cbs = randn(9, 5, seed=26), randn(2, 6, 5, seed=27)
    idx = torch.randint(0, 6, (9, 2), generator=gen(28)).to(DEV)  # no -1: NaN outputs never compare equal
    with deterministic(True):
        opcheck(torch.ops.vqkernels_triton.residual_quantize_backward.default,
                      (randn(9, 5, seed=29), randn(2, seed=30), randn(2, seed=31), x, cbs, idx))


RESIDUAL_BAD = [
    (lambda x, c: (x[0], c, -1, 1), "x must be 2-D"),
    (lambda x, c: (x, c[0, 0], -1, 1), "codebooks must be"),
    (lambda x, c: (x.int(), c, -1, 1), "x must be float32"),
    (lambda x, c: (x, c[:, :, :3], -1, 1), "has D=5"),
    (lambda x, c: (x, c, 3, 1), "num_levels=3 does not match"),
    (lambda x, c: (x, c[0], 0, 1), "needs num_levels >= 1"),
    (lambda x, c: (x, c, -1, 7), "beam_size must be in"),
]


@pytest.mark.parametrize("make, match", RESIDUAL_BAD)
def test_residual_bad_inputs(make, match):
    x, cbs = randn(4, 5, seed=32), randn(2, 6, 5, seed=33)
    with pytest.raises(ValueError, match=f"vqkernels.triton.residual_quantize: .*{match}"):
        vqt.residual_quantize(*make(x, cbs))


def test_residual_backward_bad_inputs():
    x, cbs = randn(4, 5, seed=34), randn(2, 6, 5, seed=35)
    idx = torch.zeros(4, 3, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="vqkernels.triton.residual_quantize_backward: indices has L=3"):
        vqt.residual_quantize_backward(x, randn(3, seed=0), randn(3, seed=0), x, cbs, idx)


# ---------------------------------------------------------------------------------------
# multiscale_quantize_step

# (B, C, H, W, (ph, pw)): divisible, non-divisible, upsampling, 1 x 1 (PyTorch's mean), identity
MS_SHAPES = [(2, 6, 16, 16, (4, 4)), (2, 5, 7, 5, (3, 2)), (1, 3, 13, 11, (4, 3)), (2, 4, 3, 4, (5, 7)),
             (2, 6, 5, 9, (1, 1)), (1, 7, 6, 6, (6, 6))]


def area_truth(f, ph, pw):
    """float64 adaptive average pooling written from its windows: [B, C, ph, pw]."""
    b, c, hh, ww = f.shape
    out = torch.empty(b, c, ph, pw, dtype=torch.float64, device=f.device)
    for y in range(ph):
        for x in range(pw):
            h0, h1 = (y * hh) // ph, -((-(y + 1) * hh) // ph)
            w0, w1 = (x * ww) // pw, -((-(x + 1) * ww) // pw)
            out[:, :, y, x] = f.double()[:, :, h0:h1, w0:w1].mean((2, 3))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MS_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4][0]}x{s[4][1]}")
def test_multiscale_area_bitwise_and_search(shape, dtype):
    b, c, hh, ww, (ph, pw) = shape
    f = randn(b, c, hh, ww, seed=hh * ww, dtype=dtype)
    cb = randn(11, c, seed=c, dtype=dtype)
    rest = triton_multiscale._area_downsample(f, ph, pw)
    want = F.interpolate(f, size=(ph, pw), mode="area")
    assert_bitwise_equal(rest, want.permute(0, 2, 3, 1).reshape(-1, c), "area downsampling")
    truth = area_truth(f, ph, pw)
    torch.testing.assert_close(rest.double(), truth.permute(0, 2, 3, 1).reshape(-1, c),
                               rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    indices, h = vqt.multiscale_quantize_step(f, cb, (ph, pw))
    assert indices.shape == (b, ph, pw) and h.shape == (b, c, ph, pw) and h.dtype == dtype and h.is_contiguous()
    # nearest code of every cell (of the rounded pooled values), and h its code, NCHW
    cells = rest.double()
    dist = ((cells.unsqueeze(1) - cb.double().unsqueeze(0)) ** 2).sum(-1)
    chosen = dist.gather(1, indices.reshape(-1, 1)).squeeze(1)
    assert bool((chosen - dist.min(1).values <= 1e-5 * (1 + dist.min(1).values)).all())
    assert torch.equal(h, cb[indices].permute(0, 3, 1, 2))
    ri, rh = reference.multiscale_quantize_step(f.cpu(), cb.cpu(), [ph, pw])
    assert torch.equal(indices.cpu(), ri) and torch.equal(h.cpu(), rh)


@hyp_settings(10)
@given(b=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 13), w=st.integers(1, 13), ph=st.integers(1, 14),
       pw=st.integers(1, 14), dtype=st.sampled_from(DTYPES), channels_last=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_multiscale_area_random_sizes(b, c, h, w, ph, pw, dtype, channels_last, seed):
    """Any (H, W) -> (ph, pw), down or up, divisible or not: bit for bit F.interpolate(mode='area')."""
    f = randn(b, c, h, w, seed=seed, dtype=dtype)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
    want = F.interpolate(f.contiguous(), size=(ph, pw), mode="area").permute(0, 2, 3, 1).reshape(-1, c)
    assert_bitwise_equal(triton_multiscale._area_downsample(f, ph, pw), want, f"{(h, w)} -> {(ph, pw)}")


def test_multiscale_layouts_mixed_dtypes_and_metrics():
    f = randn(2, 5, 9, 7, seed=40).contiguous(memory_format=torch.channels_last)
    cb = randn(13, 5, seed=41)
    cases = ((f, cb.half(), "cosine"), (f.half(), cb, "ip"), (f[:, :, 1:, ::2], cb.t().contiguous().t(), "l2"))
    for ff, cc, metric in cases:
        got = vqt.multiscale_quantize_step(ff, cc, 3, metric)
        ref = reference.multiscale_quantize_step(ff.cpu(), cc.cpu(), [3, 3], metric)
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])


def test_multiscale_nans_and_edges():
    f = randn(2, 4, 6, 6, seed=42)
    cb = randn(9, 4, seed=43)
    f[0, 1, 0, 0] = float("nan")  # poisons cell (0, 0, 0) of the 3 x 3 output
    i0 = vqt.multiscale_quantize_step(f, cb, 3)[0]
    cb[i0[1, 1, 1], 2] = float("nan")  # a code that was chosen: never chosen any more
    indices, h = vqt.multiscale_quantize_step(f, cb, 3)
    assert indices[0, 0, 0] == -1 and bool(h[0, :, 0, 0].isnan().all())
    assert indices[1, 1, 1] != i0[1, 1, 1] and not bool(h[1].isnan().any())
    ri, rh = reference.multiscale_quantize_step(f.cpu(), cb.cpu(), [3, 3])
    assert torch.equal(indices.cpu(), ri) and nan_equal(h.cpu(), rh)
    got = vqt.multiscale_quantize_step(f[:0], cb, (2, 3))  # B = 0
    assert got[0].shape == (0, 2, 3) and got[1].shape == (0, 4, 2, 3)
    # C = 0: every code at distance 0, the first wins (as the CPU kernel; the reference's
    # reshape(-1, 0) fails there)
    got = vqt.multiscale_quantize_step(f[:, :0], cb[:, :0], (2, 3))
    assert torch.equal(got[0].cpu(), torch.zeros(2, 2, 3, dtype=torch.int64)) and got[1].shape == (2, 0, 2, 3)
    f64 = f.double()
    got = vqt.multiscale_quantize_step(f64, cb.double(), 2)
    ref = reference.multiscale_quantize_step(f64.cpu(), cb.double().cpu(), [2, 2])
    assert torch.equal(got[0].cpu(), ref[0]) and nan_equal(got[1].cpu(), ref[1])


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_multiscale_backward(dtype):
    b, c, ph, pw, k = 2, 5, 3, 4, 4
    grad_h = randn(b, c, ph, pw, seed=44, dtype=dtype)
    cb = randn(k, c, seed=45, dtype=dtype)
    indices = torch.randint(-1, k, (b, ph, pw), generator=gen(46)).to(DEV)
    truth = torch.zeros(k, c, dtype=torch.float64, device=DEV)
    for bb in range(b):
        for y in range(ph):
            for x in range(pw):
                if indices[bb, y, x] >= 0:
                    truth[indices[bb, y, x]] += grad_h[bb, :, y, x].double()
    for det in (False, True):
        with deterministic(det):
            got = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
        assert got.dtype == dtype and got.shape == (k, c)
        torch.testing.assert_close(got.double(), truth, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6,
                                   atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)
    with deterministic(True):
        got = vqt.multiscale_quantize_step_backward(with_layout_4d(grad_h), cb, indices)
    assert_bitwise_equal(got.cpu(), reference.multiscale_quantize_step_backward(grad_h.cpu(), cb.cpu(), indices.cpu()))


def with_layout_4d(t):
    """The same values as t [B, C, H, W] in channels-last memory with a storage offset."""
    big = torch.full((t.shape[0] + 1,) + t.shape[1:], float("nan"), dtype=t.dtype, device=t.device)
    view = big.contiguous(memory_format=torch.channels_last)[1:]
    view.copy_(t)
    return view


def test_multiscale_deterministic_bitwise():
    grad_h = randn(4, 6, 8, 8, seed=47)
    cb = randn(3, 6, seed=48)
    indices = torch.randint(-1, 3, (4, 8, 8), generator=gen(49)).to(DEV)
    with deterministic(True):
        a = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
        b = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
    assert_bitwise_equal(a, b)


def test_multiscale_opcheck():
    f, cb = randn(2, 3, 5, 4, seed=50), randn(6, 3, seed=51)
    opcheck(torch.ops.vqkernels_triton.multiscale_quantize_step.default, (f, cb, [2, 3], "l2"))
    opcheck(torch.ops.vqkernels_triton.multiscale_quantize_step.default, (f.half(), cb, [1, 1], "cosine"))
    idx = torch.randint(-1, 6, (2, 2, 3), generator=gen(52)).to(DEV)  # -1 adds nothing (no NaN here)
    with deterministic(True):
        opcheck(torch.ops.vqkernels_triton.multiscale_quantize_step_backward.default,
                      (randn(2, 3, 2, 3, seed=53), cb, idx))


MS_BAD = [
    (lambda f, c: (f[0], c, 2, "l2"), "f_rest must be 4-D"),
    (lambda f, c: (f, c[:, :2], 2, "l2"), "has C=3"),
    (lambda f, c: (f, c[:0], 2, "l2"), "codebook is empty"),
    (lambda f, c: (f, c, (0, 2), "l2"), "pn must be"),
    (lambda f, c: (f, c, 2, "hamming"), "unknown metric"),
]


@pytest.mark.parametrize("make, match", MS_BAD)
def test_multiscale_bad_inputs(make, match):
    f, cb = randn(1, 3, 4, 4, seed=54), randn(5, 3, seed=55)
    with pytest.raises(ValueError, match=f"vqkernels.triton.multiscale_quantize_step: .*{match}"):
        vqt.multiscale_quantize_step(*make(f, cb))
    idx = torch.zeros(1, 2, 3, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="vqkernels.triton.multiscale_quantize_step_backward: indices must have"):
        vqt.multiscale_quantize_step_backward(randn(1, 3, 2, 2, seed=0), cb, idx)


# ---------------------------------------------------------------------------------------
# lfq_entropy



def lfq_truth(x, inv_temperature, weights=None):
    """float64 (per_sample, codebook, avg_probs) from the full N x 2**d code distribution: the
    softmax of 2 inv_temperature <x, c> over the codes c in {-1, +1}**d, index bits top first. With
    row weights: only the rows of non-zero weight, averaged with their weights (sum_n w_n (.) / sum_n w_n)."""
    n, d = x.shape
    w = torch.ones(n, dtype=torch.float64, device=x.device) if weights is None else weights.double()
    x, w = x[w != 0], w[w != 0]
    codes = torch.tensor([[1.0 if (a >> (d - 1 - j)) & 1 else -1.0 for j in range(d)] for a in range(2 ** d)],
                         dtype=torch.float64, device=x.device)
    probs = torch.softmax(2.0 * inv_temperature * x.double() @ codes.t(), 1)
    per_sample = -(w @ (probs * probs.log().nan_to_num(neginf=0.0)).sum(1)) / w.sum()
    avg = w @ probs / w.sum()
    return per_sample, -(avg * avg.clamp_min(PROB_EPS).log()).sum(), avg


LFQ_SHAPES = [(1, 1), (7, 2), (33, 5), (20, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LFQ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lfq_entropy_vs_float64_truth(shape, dtype):
    n, d = shape
    x = randn(n, d, seed=n * d, dtype=dtype, scale=0.05)
    inv_t = 10.0
    per_sample, codebook, avg = vqt.lfq_entropy(x, inv_t)
    assert per_sample.dtype == codebook.dtype == avg.dtype == torch.float32 and avg.shape == (2 ** d,)
    xd = x.double().requires_grad_()
    truth = lfq_truth(xd, inv_t)
    for got, want in zip((per_sample, codebook, avg), truth):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-7)
    gps, gce, gap = randn((), seed=60), randn((), seed=61), randn(2 ** d, seed=62)
    grad = vqt.lfq_entropy_backward(gps, gce, gap, x, avg, inv_t)
    assert grad.dtype == dtype and grad.shape == x.shape
    loss = truth[0] * gps.double() + truth[1] * gce.double() + (truth[2] * gap.double()).sum()
    (want,) = torch.autograd.grad(loss, xd)
    scale = want.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), want, rtol=tol, atol=tol * scale)


def lfq_weights(n, seed, device=DEV):
    """[n] float32 weights in [0, 3) with about a third exact zeros."""
    w = torch.rand(n, generator=gen(seed)) * 3 * (torch.rand(n, generator=gen(seed + 1)) < 0.67)
    return w.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LFQ_SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_lfq_entropy_weighted_vs_float64_truth(shape, dtype):
    """Row weights: the weighted truth over the rows of non-zero weight; those of weight 0 hold NaN and
    infinities and get a zero gradient."""
    n, d = shape
    w = lfq_weights(n, seed=n + d)
    w[0] = 0.0
    x = randn(n, d, seed=n * d + 1, dtype=dtype, scale=0.05)
    x[w == 0] = float("nan")
    x[0, 0] = float("inf")
    inv_t = 10.0
    out = vqt.lfq_entropy(x, inv_t, w)
    keep = w != 0
    xd = x.double().requires_grad_()
    truth = lfq_truth(xd, inv_t, w)
    for got, want in zip(out, truth):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-7)
    gps, gce, gap = randn((), seed=63), randn((), seed=64), randn(2 ** d, seed=65)
    grad = vqt.lfq_entropy_backward(gps, gce, gap, x, out[2], inv_t, w)
    assert grad.dtype == dtype and grad.shape == x.shape and bool((grad[~keep] == 0).all())
    loss = truth[0] * gps.double() + truth[1] * gce.double() + (truth[2] * gap.double()).sum()
    (want,) = torch.autograd.grad(loss, xd)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad[keep].double(), want[keep], rtol=tol, atol=tol * want.abs().max().item())


def test_lfq_entropy_weights_mask_and_none_kept():
    """A 0/1 mask gives the kept rows' results (float32 rounding apart); all-zero weights give zeros
    and a zero gradient; float64 inputs go to the reference, weights included."""
    x = randn(40, 6, seed=66, scale=0.2)
    mask = torch.rand(40, generator=gen(67)) < 0.5
    w = mask.float().to(DEV)
    keep = w != 0
    got, want = vqt.lfq_entropy(x, 3.0, w), vqt.lfq_entropy(x[keep], 3.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    zero = torch.zeros(40, device=DEV)
    none = vqt.lfq_entropy(x, 3.0, zero)
    assert [t.tolist() for t in none] == [0.0, -0.0, [0.0] * 64]
    grad = vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(64, seed=2), x, none[2], 3.0, zero)
    assert bool((grad == 0).all())
    x64 = x.double()
    for a, b in zip(vqt.lfq_entropy(x64, 2.0, w), reference.lfq_entropy(x64.cpu(), 2.0, w.cpu())):
        assert_bitwise_equal(a.cpu(), b)


def test_lfq_entropy_split_reduction(monkeypatch):
    """The split-K GEMM (slices of K summed in slice order; slices of 64 rows here, so that a
    small N splits): still the truth, and bitwise repeatable."""
    from vqkernels.triton import lfq
    monkeypatch.setattr(lfq, "SPLIT_MIN_K", 64)
    x = randn(300, 3, seed=75, scale=0.1)
    got = vqt.lfq_entropy(x, 4.0)
    for a, want in zip(got, lfq_truth(x, 4.0)):
        torch.testing.assert_close(a.double(), want, rtol=2e-5, atol=1e-7)
    for a, b in zip(got, vqt.lfq_entropy(x, 4.0)):
        assert_bitwise_equal(a, b)


def test_lfq_entropy_matches_reference_and_saturated_bits():
    x = randn(25, 7, seed=63, scale=0.3)
    x[3, 2] = float("inf")
    x[4, :] = 50.0  # every bit certain: entropy 0, no NaN
    got = vqt.lfq_entropy(x, 100.0)
    ref = reference.lfq_entropy(x.cpu(), 100.0)
    for a, b in zip(got, ref):
        assert bool(a.isfinite().all())
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-7)
    args = (randn((), seed=64), randn((), seed=65), randn(128, seed=66), x, got[2], 100.0)
    g = vqt.lfq_entropy_backward(*args)
    r = reference.lfq_entropy_backward(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    assert bool(g.isfinite().all())
    torch.testing.assert_close(g.cpu(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_lfq_entropy_nan_empty_float64():
    x = randn(6, 4, seed=67)
    x[2, 1] = float("nan")
    out = vqt.lfq_entropy(x, 1.0)
    assert all(bool(t.isnan().all()) for t in out)
    grad = vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(16, seed=2), x, out[2], 1.0)
    assert bool(grad.isnan().all())
    empty = vqt.lfq_entropy(x[:0], 1.0)
    assert [t.tolist() for t in empty] == [0.0, 0.0, [0.0] * 16]
    assert vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(16, seed=2), x[:0], empty[2],
                                    1.0).shape == (0, 4)
    x64 = randn(6, 3, seed=68, dtype=torch.float64)
    for a, b in zip(vqt.lfq_entropy(x64, 2.0), reference.lfq_entropy(x64.cpu(), 2.0)):
        assert_bitwise_equal(a.cpu(), b)


def test_lfq_entropy_strided_and_repeatable():
    x = with_layout(randn(19, 6, seed=69, scale=0.1), "strided")
    a = vqt.lfq_entropy(x, 5.0)
    b = vqt.lfq_entropy(x.contiguous(), 5.0)
    for u, v in zip(a, b):
        assert torch.equal(bits(u), bits(v))
    ga = vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(64, seed=2), x, a[2], 5.0)
    gb = vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(64, seed=2), x.contiguous(), a[2], 5.0)
    assert torch.equal(bits(ga), bits(gb))


def test_lfq_opcheck():
    x = randn(9, 5, seed=70, scale=0.1)
    opcheck(torch.ops.vqkernels_triton.lfq_entropy.default, (x, 10.0))
    opcheck(torch.ops.vqkernels_triton.lfq_entropy.default, (x.bfloat16(), 3.0))
    avg = vqt.lfq_entropy(x, 10.0)[2]
    opcheck(torch.ops.vqkernels_triton.lfq_entropy_backward.default,
                  (randn((), seed=71), randn((), seed=72), randn(32, seed=73), x, avg, 10.0))
    w = lfq_weights(9, seed=76)
    opcheck(torch.ops.vqkernels_triton.lfq_entropy.default, (x, 10.0, w))
    avg = vqt.lfq_entropy(x, 10.0, w)[2]
    opcheck(torch.ops.vqkernels_triton.lfq_entropy_backward.default,
                  (randn((), seed=71), randn((), seed=72), randn(32, seed=73), x, avg, 10.0, w.half()))


def test_lfq_bad_inputs():
    x = randn(4, 5, seed=74)
    for args, match in (((x[0], 1.0), "x must be 2-D"), ((randn(2, 31, seed=0), 1.0), r"d in \[1, 30\]"),
                        ((x[:, :0], 1.0), r"d in \[1, 30\]"), ((x, float("inf")), "inv_temperature must be finite")):
        with pytest.raises(ValueError, match=f"vqkernels.triton.lfq_entropy: .*{match}"):
            vqt.lfq_entropy(*args)
    with pytest.raises(ValueError, match=r"vqkernels.triton.lfq_entropy_backward: avg_probs must have shape \[2\*\*d"):
        vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(32, seed=2), x, randn(16, seed=3), 1.0)
    for w, match in ((randn(3, seed=0), r"weights must have shape \[N=4\], got \(3,\)"),
                     (randn(4, seed=0).long(), r"weights must be float32, float16, bfloat16 or float64")):
        with pytest.raises(ValueError, match=f"vqkernels.triton.lfq_entropy: {match}"):
            vqt.lfq_entropy(x, 1.0, w)
        with pytest.raises(ValueError, match=f"vqkernels.triton.lfq_entropy_backward: {match}"):
            vqt.lfq_entropy_backward(randn((), seed=0), randn((), seed=1), randn(32, seed=2), x, randn(32, seed=3),
                                     1.0, w)


# ---------------------------------------------------------------------------------------
# compiled for a GPU (no GPU needed), and GPU runs with real sizes

AOT_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton
m = sys.modules
common, rq = m["vqkernels.triton.scatter"], m["vqkernels.triton.residual_quantize"]
ms, lf = m["vqkernels.triton.multiscale"], m["vqkernels.triton.lfq"]
I, F = "i32", "fp32"
KERNELS = [
    (common._scatter_atomic_kernel, ["*fp32", "*i64", "*bf16"] + [I] * 10, dict(BLOCK_N=32, BLOCK_D=64), True),
    (common._scatter_sorted_kernel, ["*fp32", "*i64", "*i64", "*fp16"] + [I] * 8, dict(BLOCK_D=64), True),
    (rq._residual_step_kernel, ["*fp32"] * 3 + ["*i64", "*fp64"] + [I] * 3, dict(BLOCK_N=32, BLOCK_D=64), False),
    (rq._residual_grad_kernel, ["*fp32"] * 4 + ["*i64"] + ["*fp32"] * 2 + [I] * 4, dict(BLOCK_N=32, BLOCK_D=64), False),
    (ms._area_kernel, ["*bf16", "*bf16"] + [I] * 12, dict(BLOCK_R=32, BLOCK_C=64), True),
    (ms._gather_nchw_kernel, ["*fp16", "*i64", "*fp16"] + [I] * 5, dict(BLOCK_R=32, BLOCK_C=64), True),
    (lf._code_probs_kernel, ["*fp16", "*fp32", "*fp32"] + [I] * 5 + [F],
     dict(BLOCK_N=32, BLOCK_A=64, HAS_W=False, SCALE=False), True),
    (lf._code_probs_kernel, ["*fp16", "*fp32", "*fp32"] + [I] * 5 + [F],
     dict(BLOCK_N=32, BLOCK_A=64, HAS_W=True, SCALE=True), True),
    (lf._entropy_rows_kernel, ["*bf16", "*fp32", "*fp32"] + [I] * 4 + [F], dict(BLOCK_N=32, BLOCK_D=32, HAS_W=False),
     True),
    (lf._entropy_rows_kernel, ["*bf16", "*fp32", "*fp32"] + [I] * 4 + [F], dict(BLOCK_N=32, BLOCK_D=32, HAS_W=True),
     True),
    (lf._matmul_kernel, ["*fp32"] * 3 + [I] * 11, dict(BLOCK_M=64, BLOCK_NC=64, BLOCK_K=32), True),
    (lf._logit_grad_kernel, ["*fp32"] * 6 + [I] * 6 + [F], dict(BLOCK_N=32, BLOCK_A=64, KB=16, HAS_W=False), True),
    (lf._logit_grad_kernel, ["*fp32"] * 6 + [I] * 6 + [F], dict(BLOCK_N=32, BLOCK_A=64, KB=16, HAS_W=True), True),
]
for fn, types, const, fusion in KERNELS:
    names = [a for a in fn.arg_names if a not in const]
    assert len(names) == len(types), (fn.__name__, names)
    sig = dict(zip(names, types), **{a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, num_stages=2, enable_fp_fusion=fusion)).asm["ptx"]
    assert "mma" not in ptx, fn.__name__  # float32 GEMMs in IEEE float32, never on TF32 tensor cores
    if not fusion:
        assert "fma.rn.f32" not in ptx, fn.__name__  # rounded as the reference: no fused multiply-add
"""


def test_compiles_for_sm90():
    """Every kernel compiles (not interpreted) for an H100/H200 without a GPU: catches errors the
    interpreter lets through; no TF32 tensor-core instruction, no FMA where the reference rounds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_residual_large(dtype):
    n, d, k, levels = 8192, 96, 1024, 4
    x = randn(n, d, seed=80, dtype=dtype, device="cuda")
    cbs = randn(levels, k, d, seed=81, dtype=dtype, device="cuda", scale=0.5)
    quantized, indices, commit, _ = vqt.residual_quantize(x, cbs)
    quant, losses = residual_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(dtype))
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu())
    assert (indices.cpu() != ref[1]).float().mean() < 1e-3  # float32 near-ties only
    gq, gc, gb = randn(n, d, seed=82, device="cuda"), randn(levels, seed=83, device="cuda"), randn(levels, seed=84,
                                                                                                    device="cuda")
    fast = vqt.residual_quantize_backward(gq, gc, gb, x, cbs, indices)
    with deterministic(True):
        det = [vqt.residual_quantize_backward(gq, gc, gb, x, cbs, indices) for _ in range(2)]
    ref = reference.residual_quantize_backward(gq.cpu(), gc.cpu(), gb.cpu(), x.cpu(), cbs.cpu(), indices.cpu())
    for a, b, r in zip(det[0], det[1], ref):
        assert_bitwise_equal(a, b)
        assert_bitwise_equal(a.cpu(), r)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a.cpu().float(), r.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-6)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_multiscale_var_scales(dtype):
    """VAR's scales on a 16 x 16 map, 4096 codes: pooling bit for bit F.interpolate (the CPU's for
    every scale but 1 x 1, which is PyTorch's own CUDA mean), indices and h as the reference's."""
    f = randn(8, 32, 16, 16, seed=85, dtype=dtype, device="cuda")
    cb = randn(4096, 32, seed=86, dtype=dtype, device="cuda")
    for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16):
        rest = triton_multiscale._area_downsample(f, p, p)
        want = F.interpolate(f if p == 1 else f.cpu(), size=(p, p), mode="area")
        assert_bitwise_equal(rest.cpu(), want.permute(0, 2, 3, 1).reshape(-1, 32).cpu(), f"pn={p}")
        indices, h = vqt.multiscale_quantize_step(f, cb, p)
        ri, rh = reference.multiscale_quantize_step(f, cb, [p, p])
        assert (indices != ri).float().mean() < 1e-2
        same = indices == ri
        assert torch.equal(h.permute(0, 2, 3, 1)[same], rh.permute(0, 2, 3, 1)[same])
        grad_h = randn(8, 32, p, p, seed=87, dtype=dtype, device="cuda")
        with deterministic(True):
            a = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
            b = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
        assert_bitwise_equal(a, b)
        want = reference.multiscale_quantize_step_backward(grad_h.cpu(), cb.cpu(), indices.cpu())
        assert_bitwise_equal(a.cpu(), want)
        fast = vqt.multiscale_quantize_step_backward(grad_h, cb, indices)
        torch.testing.assert_close(fast.float(), a.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
def test_cuda_lfq_entropy_large():
    x = randn(16384, 18, seed=88, device="cuda", scale=0.05)
    got = vqt.lfq_entropy(x, 10.0)
    want = reference.lfq_entropy(x.double(), 10.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-9)
    args = tuple(randn(shape, seed=seed, device="cuda") for shape, seed in (((), 89), ((), 90), ((2 ** 18,), 91)))
    g = vqt.lfq_entropy_backward(*args, x, got[2], 10.0)
    r = reference.lfq_entropy_backward(*(a.double() for a in args), x.double(), want[2], 10.0)
    torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3 * r.abs().max().item())
    w = lfq_weights(16384, seed=94)
    got = vqt.lfq_entropy(x, 10.0, w)
    want = reference.lfq_entropy(x.double(), 10.0, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-9)
    g = vqt.lfq_entropy_backward(*args, x, got[2], 10.0, w)
    r = reference.lfq_entropy_backward(*(a.double() for a in args), x.double(), want[2], 10.0, w)
    torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3 * r.abs().max().item())


@pytest.mark.cuda
@needs_cuda
def test_cuda_cpu_tensors_rejected():
    x, cbs = randn(4, 5, seed=92, device="cpu"), randn(2, 6, 5, seed=93, device="cpu")
    with pytest.raises(ValueError, match="vqkernels.triton.residual_quantize: inputs are on cpu"):
        vqt.residual_quantize(x, cbs)
    with pytest.raises(ValueError, match="vqkernels.triton.lfq_entropy: inputs are on cpu"):
        vqt.lfq_entropy(x, 1.0)
    with pytest.raises(ValueError, match="vqkernels.triton.multiscale_quantize_step: inputs are on cpu"):
        vqt.multiscale_quantize_step(x.view(1, 5, 2, 2), cbs[0], 1)
