"""vqkernels.multiscale_quantize_step (one scale of VAR's multi-scale residual quantizer) and
vqkernels.nn.MultiScaleVQ (VAR's VectorQuantizer2), against float64 truth and VAR's own loop.

The GPU kernels' tests (CUDA, Triton) come before the module's, run by the `backend` fixture
(tests/conftest.py).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_TOL, METRICS, assert_bitwise_equal, assert_deterministic,
                        assert_float64_is_the_reference, assert_kernel_rejects, assert_rejects_cpu_tensors, bits,
                        check_nearest, close_to_f64, deterministic, f64, fail_rows, gen, hyp_settings, kernel_opcheck,
                        nan_equal, num_threads, on_backends, opcheck, per_backend, reference, seeded_randn, vqkernels)
from vqkernels.bench.plain import plain_var_quantize
from vqkernels.nn.multiscale import MultiScaleVQ, Phi, upsample_bicubic

step = vqkernels.multiscale_quantize_step
ERRORS = (ValueError, RuntimeError)


def area_truth(f, ph, pw):
    """Adaptive average pooling in float64 from its definition: output cell (y, x) averages rows
    [floor(y H / ph), ceil((y + 1) H / ph)) and columns [floor(x W / pw), ceil((x + 1) W / pw))."""
    f = f.double()
    H, W = f.shape[2], f.shape[3]
    out = torch.empty(f.shape[0], f.shape[1], ph, pw, dtype=torch.float64)
    for y in range(ph):
        for x in range(pw):
            h0, h1 = (y * H) // ph, -((-(y + 1) * H) // ph)
            w0, w1 = (x * W) // pw, -((-(x + 1) * W) // pw)
            out[:, :, y, x] = f[:, :, h0:h1, w0:w1].mean((2, 3))
    return out


def rows_of(t):
    """[B, C, h, w] -> the channels-last rows [B * h * w, C]."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def with_layout4(t, layout):
    """The same values as a [B, C, H, W] tensor with another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H and W strides swapped
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    big = t.new_zeros(t.shape[0], t.shape[1] + 1, t.shape[2] + 2, t.shape[3] * 2)  # strided: a slice
    view = big[:, 1:, 1:-1, ::2]
    view.copy_(t)
    return view


def check_step(f_rest, codebook, pn, metric, indices, h):
    """indices: the nearest code (float64 truth, nearest_code's rules) of every cell of the area-
    downsampled f_rest; h: exactly those codebook rows, NCHW, in the codebook's dtype (NaN for -1)."""
    b, c = f_rest.shape[0], f_rest.shape[1]
    ph, pw = pn
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (b, ph, pw)
    assert h.dtype == codebook.dtype and tuple(h.shape) == (b, c, ph, pw) and h.is_contiguous()
    if b == 0:
        return
    # The rows the op searches are F.interpolate's (test_area_bitwise_equals_interpolate shows it).
    rows = rows_of(F.interpolate(f_rest.contiguous(), size=(ph, pw), mode="area"))
    check_nearest(rows, codebook, metric, indices.reshape(-1), None, op="multiscale_quantize_step")
    idx = indices.reshape(-1)
    want = codebook[idx.clamp_min(0)].masked_fill((idx < 0).unsqueeze(1), float("nan"))
    assert bits(rows_of(h)).equal(bits(want)), "h must hold the chosen codebook rows"


@st.composite
def step_cases(draw):
    return dict(b=draw(st.integers(0, 3)), c=draw(st.integers(1, 12)), h=draw(st.integers(1, 17)),
                w=draw(st.integers(1, 17)), ph=draw(st.integers(1, 18)), pw=draw(st.integers(1, 18)),
                k=draw(st.integers(1, 80)), metric=draw(st.sampled_from(METRICS)),
                f_dtype=draw(st.sampled_from(DTYPES)), cb_dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "strided"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@hyp_settings(80)
@given(case=step_cases())
def test_matches_float64_truth(isa, case):
    g = gen(case["seed"])
    f = torch.randn(case["b"], case["c"], case["h"], case["w"], generator=g, dtype=torch.float64)
    codebook = (torch.randn(case["k"], case["c"], generator=g, dtype=torch.float64) * 0.7).to(case["cb_dtype"])
    f_rest = with_layout4(f.to(case["f_dtype"]), case["layout"])
    pn = (case["ph"], case["pw"])
    saved = bits(f_rest).clone(), bits(codebook).clone()
    indices, h = step(f_rest, codebook, pn, case["metric"])
    assert bits(f_rest).equal(saved[0]) and bits(codebook).equal(saved[1]), "inputs were modified"
    check_step(f_rest, codebook, pn, case["metric"], indices, h)
    # The layout does not change anything.
    again = step(f_rest.contiguous(), codebook, pn, case["metric"])
    assert torch.equal(again[0], indices) and bits(again[1]).equal(bits(h))
    # The pure-PyTorch reference (the fallback kernel) follows the same rules.
    check_step(f_rest, codebook, pn, case["metric"], *reference.multiscale_quantize_step(f_rest, codebook, pn,
                                                                                         case["metric"]))


# (H, W) -> (ph, pw): divisible, VAR's non-divisible ones (16 -> 13, 10, 6), a 1 x 1 mean,
# the identity (VAR's last scale), non-square and an output larger than the input
AREA_SIZES = [((16, 16), (8, 8)), ((16, 16), (13, 13)), ((16, 16), (10, 10)), ((16, 16), (6, 6)),
              ((16, 16), (1, 1)), ((16, 16), (16, 16)), ((9, 11), (4, 3)), ((5, 7), (8, 9))]


@pytest.mark.parametrize("sizes", AREA_SIZES, ids=str)
def test_area_is_adaptive_average_pooling(sizes):
    """F.interpolate(mode='area') (which the op reproduces bit for bit, below) is the window
    average of the definition, in float64 to a few ulps, non-divisible sizes included."""
    (H, W), (ph, pw) = sizes
    f = torch.randn(2, 3, H, W, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(F.interpolate(f, size=(ph, pw), mode="area"), area_truth(f, ph, pw),
                               rtol=1e-14, atol=1e-15)


def probe_area(f_rest, cell, value, ge):
    """Whether the op's area average of channel 0 at `cell` is >= `value` (ge) or <= it, exactly.

    f_rest [1, 2, H, W] holds the data in channel 0 and ones in channel 1, NaN outside the cell's
    window (every other cell then has index -1). With metric 'ip' the codes (s, -s v) and (-s, s v)
    score -s (a - v) and s (a - v) for the average a: the sign of a - v, exact in any arithmetic,
    and a tie goes to code 0. So code 0 wins iff a >= v (s = 1) or a <= v (s = -1).
    """
    s = 1.0 if ge else -1.0
    dt = torch.float64 if f_rest.dtype == torch.float64 else torch.float32
    v = float(value)
    codebook = torch.tensor([[s, -s * v], [-s, s * v]], dtype=dt)
    indices, _ = step(f_rest, codebook, (cell[2], cell[3]), "ip")
    return int(indices[0, cell[0], cell[1]]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", AREA_SIZES, ids=str)
def test_area_bitwise_equals_interpolate(sizes, dtype):
    """Every cell's average equals F.interpolate's bit for bit (probed by exact sign tests)."""
    (H, W), (ph, pw) = sizes
    data = torch.randn(1, 1, H, W, generator=gen(2), dtype=torch.float64).to(dtype)
    want = F.interpolate(data, size=(ph, pw), mode="area")[0, 0]
    wrong = []
    with num_threads(1):  # hundreds of tiny calls: no thread wake-ups on a busy machine
        for y, x in ((y, x) for y in range(ph) for x in range(pw)):
            h0, h1 = (y * H) // ph, -((-(y + 1) * H) // ph)
            w0, w1 = (x * W) // pw, -((-(x + 1) * W) // pw)
            f_rest = torch.full((1, 2, H, W), float("nan"), dtype=dtype)
            f_rest[:, 0, h0:h1, w0:w1] = data[:, 0, h0:h1, w0:w1]
            f_rest[:, 1, h0:h1, w0:w1] = 1.0
            v = want[y, x]
            cell = (y, x, ph, pw)
            if not (probe_area(f_rest, cell, v, ge=True) and probe_area(f_rest, cell, v, ge=False)):
                wrong.append((y, x))
    assert not wrong, f"cells whose average differs from F.interpolate's: {wrong[:8]} of {ph * pw}"


def test_probe_detects_one_ulp():
    """The probe above is sharp: an average one ulp off is caught either way."""
    data = torch.randn(1, 1, 16, 16, generator=gen(3))
    f_rest = torch.cat([data, torch.ones_like(data)], 1)
    v = float(F.interpolate(data, size=(13, 13), mode="area")[0, 0, 5, 7])
    up, down = np.nextafter(np.float32(v), np.float32(np.inf)), np.nextafter(np.float32(v), np.float32(-np.inf))
    assert probe_area(f_rest, (5, 7, 13, 13), v, True) and probe_area(f_rest, (5, 7, 13, 13), v, False)
    assert not probe_area(f_rest, (5, 7, 13, 13), up, True) and probe_area(f_rest, (5, 7, 13, 13), up, False)
    assert probe_area(f_rest, (5, 7, 13, 13), down, True) and not probe_area(f_rest, (5, 7, 13, 13), down, False)


def test_last_scale_is_the_identity(isa):
    """pn == (H, W), VAR's last scale: every pixel is its own cell, searched as it is."""
    f_rest = torch.randn(2, 6, 7, 5, generator=gen(4))
    codebook = torch.randn(40, 6, generator=gen(5))
    indices, _ = step(f_rest, codebook, (7, 5))
    assert torch.equal(indices.reshape(-1), vqkernels.nearest_code(rows_of(f_rest), codebook)[0])


@pytest.mark.parametrize("metric", METRICS)
def test_nan_cells(isa, metric):
    """A NaN in f_rest makes every cell whose window holds it index -1 with a NaN code; the
    other cells are untouched. A codebook row with a NaN is never chosen."""
    f_rest = torch.randn(2, 4, 16, 16, generator=gen(6))
    f_rest[1, 2, 5, 9] = float("nan")
    codebook = torch.randn(30, 4, generator=gen(7))
    codebook[3, 1] = float("nan")
    indices, h = step(f_rest, codebook, 13, metric)
    window_has_nan = torch.isnan(F.interpolate(f_rest, size=(13, 13), mode="area")).any(1)
    assert 0 < int(window_has_nan.sum()) < 13 * 13
    assert bool((indices[window_has_nan] == -1).all()) and bool((indices[~window_has_nan] >= 0).all())
    assert bool(torch.isnan(h.permute(0, 2, 3, 1)[window_has_nan]).all())
    assert not bool((indices == 3).any())
    check_step(f_rest, codebook, (13, 13), metric, indices, h)


@pytest.mark.parametrize("f_dtype", DTYPES, ids=str)
def test_empty(isa, f_dtype):
    codebook = torch.randn(7, 5)
    indices, h = step(torch.empty(0, 5, 4, 4, dtype=f_dtype), codebook, 3)
    assert indices.shape == (0, 3, 3) and h.shape == (0, 5, 3, 3) and h.dtype == codebook.dtype
    indices, h = step(torch.empty(2, 0, 4, 4, dtype=f_dtype), torch.empty(7, 0), (2, 3))
    assert torch.equal(indices, torch.zeros(2, 2, 3, dtype=torch.int64)) and h.shape == (2, 0, 2, 3)


def test_pn_as_int_or_pair():
    f_rest = torch.randn(2, 3, 8, 8, generator=gen(8))
    codebook = torch.randn(9, 3, generator=gen(9))
    a, b = step(f_rest, codebook, 5), step(f_rest, codebook, (5, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert step(f_rest, codebook, (2, 5))[0].shape == (2, 2, 5)


# ---------------------------------------------------------------------------------------
# autograd: the codebook gradient of h; no gradient for f_rest


GRAD_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
               (torch.float32, torch.float16), (torch.float64, torch.bfloat16)]
GRAD_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtypes", GRAD_DTYPES, ids=str)
def test_codebook_gradient(isa, dtypes):
    """grad_codebook[k] = the sum of grad_h over the cells with index k; other rows exactly 0."""
    f_rest = torch.randn(3, 5, 10, 10, generator=gen(10)).to(dtypes[0]).requires_grad_()
    codebook = torch.randn(40, 5, generator=gen(11)).to(dtypes[1]).requires_grad_()
    indices, h = step(f_rest, codebook, (6, 4))
    g = torch.randn(h.shape, generator=gen(12)).to(h.dtype)
    (h * g).sum().backward()
    assert f_rest.grad is None, "f_rest gets no gradient"
    want = torch.zeros(40, 5, dtype=torch.float64).index_add_(0, indices.reshape(-1), rows_of(g.double()))
    assert codebook.grad.dtype == codebook.dtype
    rtol = GRAD_RTOL[codebook.dtype]
    torch.testing.assert_close(codebook.grad.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))
    unused = torch.ones(40, dtype=torch.bool)
    unused[indices.reshape(-1)] = False
    assert bool(unused.any()) and not bool(codebook.grad[unused].any())


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_backward_op_skips_index_minus_one(isa, impl):
    grad_h = torch.randn(2, 3, 2, 2, generator=gen(13))
    codebook = torch.randn(4, 3)
    indices = torch.tensor([[[0, -1], [2, 0]], [[-1, 3], [3, 3]]])
    call = (torch.ops.vqkernels.multiscale_quantize_step_backward if impl == "op"
            else reference.multiscale_quantize_step_backward)
    got = call(grad_h, codebook, indices)
    rows, idx = rows_of(grad_h), indices.reshape(-1)
    want = torch.stack([rows[idx == k].sum(0) for k in range(4)])
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], torch.zeros(3)), "code 1 has no cell"


def test_gradcheck():
    """float64 gradcheck in the codebook (and f_rest: zero, the indices being piecewise constant);
    the data keeps every cell's nearest code ahead by a clear margin, checked first."""
    f_rest = torch.randn(2, 4, 9, 7, generator=gen(14), dtype=torch.float64)
    codebook = torch.randn(12, 4, generator=gen(15), dtype=torch.float64)
    dist = torch.cdist(rows_of(area_truth(f_rest, 3, 2)), codebook).square().sort(1).values
    assert bool((dist[:, 1] - dist[:, 0] > 1e-3).all()), "generator: a cell is too close to a tie"
    f_rest.requires_grad_()
    codebook.requires_grad_()
    assert torch.autograd.gradcheck(lambda f, c: step(f, c, (3, 2))[1], (f_rest, codebook))


# (B, C, pn): VAR's sizes, whose backward runs on one thread, and one past 2**20 cells x
# channels, where it is a parallel scatter by code
DETERMINISM_SHAPES = [(8, 16, 13), (72, 64, 16)]


@pytest.mark.parametrize("shape", DETERMINISM_SHAPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic(isa, metric, shape):
    b, c, pn = shape
    f64 = torch.randn(b, c, 16, 16, generator=gen(16), dtype=torch.float64)
    cb64 = torch.randn(300, c, generator=gen(17), dtype=torch.float64)
    g = torch.randn(b, c, pn, pn, generator=gen(18))

    def run():
        codebook = cb64.float().requires_grad_()
        indices, h = step(f64.float(), codebook, pn, metric)
        (h * g).sum().backward()
        return indices, h, codebook.grad

    indices, _, grad = run()
    want = torch.zeros(300, c, dtype=torch.float64).index_add_(0, indices.reshape(-1), rows_of(g.double()))
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert_deterministic(run)


def step_opcheck_samples():
    g = gen(18)
    f = torch.randn(3, 5, 9, 7, generator=g)
    cb = torch.randn(6, 5, generator=g)
    return [
        pytest.param((f, cb, [4, 3], "l2"), id="f32"),
        pytest.param((f, cb.clone().requires_grad_(), [4, 3], "cosine"), id="f32-grad"),
        pytest.param((f.double(), cb.double().requires_grad_(), [1, 1], "l2"), id="f64-grad-1x1"),
        pytest.param((f.half(), cb.bfloat16(), [9, 7], "ip"), id="f16-bf16-identity"),
        pytest.param((with_layout4(f, "channels_last"), cb.t().contiguous().t(), [5, 5], "l2"), id="strided"),
        pytest.param((f[:0], cb, [2, 2], "l2"), id="empty"),
    ]


@pytest.mark.parametrize("args", step_opcheck_samples())
def test_opcheck(args):
    opcheck("multiscale_quantize_step", args)


def backward_opcheck_samples():
    g = gen(19)
    grad = torch.randn(3, 5, 4, 2, generator=g)
    cb = torch.randn(6, 5, generator=g)
    idx = torch.randint(-1, 6, (3, 4, 2), generator=g)
    return [
        pytest.param((grad, cb, idx), id="f32"),
        pytest.param((grad.double(), cb.double(), idx), id="f64"),
        pytest.param((grad.bfloat16(), cb.half(), idx), id="bf16-f16"),
        pytest.param((grad.transpose(2, 3).contiguous().transpose(2, 3), cb, idx), id="strided"),
        pytest.param((grad[:0], cb, idx[:0]), id="empty"),
    ]


@pytest.mark.parametrize("args", backward_opcheck_samples())
def test_backward_opcheck(args):
    opcheck("multiscale_quantize_step_backward", args)


# id: (f_rest, codebook, pn, metric, pattern the message must match)
F4 = torch.randn(2, 3, 8, 8)
CB = torch.randn(5, 3)
BAD_STEP = {
    "f_rest-3d": (torch.randn(3, 8, 8), CB, 2, "l2", r"f_rest must be 4-D \[B, C, H, W\]"),
    "codebook-1d": (F4, torch.randn(3), 2, "l2", r"codebook must be 2-D \[K, C\]"),
    "f_rest-int": (F4.long(), CB, 2, "l2", r"f_rest must be float32, float16, bfloat16 or float64"),
    "codebook-complex": (F4, CB.to(torch.complex64), 2, "l2", r"codebook must be float"),
    "mismatched-C": (F4, torch.randn(5, 4), 2, "l2", r"f_rest has C=3 .*codebook has C=4"),
    "codebook-other-device": (F4, CB.to("meta"), 2, "l2", r"f_rest is on cpu but codebook is on meta"),
    "empty-codebook": (F4, torch.randn(0, 3), 2, "l2", r"codebook is empty"),
    "H-zero": (torch.randn(2, 3, 0, 8), CB, 2, "l2", r"f_rest must have H >= 1 and W >= 1"),
    "pn-zero": (F4, CB, 0, "l2", r"pn must be a size >= 1 or a pair of them, got \[0, 0\]"),
    "pn-pair-zero": (F4, CB, (3, 0), "l2", r"pn must be a size >= 1 or a pair of them, got \[3, 0\]"),
    "unknown-metric": (F4, CB, 2, "L2", r"unknown metric 'L2'"),
}


@pytest.mark.parametrize("case", BAD_STEP)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_step_rejects(impl, case):
    """The same message from the compiled kernel (through the dispatcher) and the reference."""
    f_rest, codebook, pn, metric, pattern = BAD_STEP[case]
    pn = (pn, pn) if isinstance(pn, int) else pn
    call = torch.ops.vqkernels.multiscale_quantize_step if impl == "op" else reference.multiscale_quantize_step
    with pytest.raises(ERRORS, match=pattern):
        call(f_rest, codebook, pn, metric)


GRAD_H = torch.randn(2, 3, 4, 5)
IDX = torch.zeros(2, 4, 5, dtype=torch.int64)
BAD_BACKWARD = {
    "grad_h-3d": (torch.randn(3, 4, 5), CB, IDX, r"grad_h must be 4-D"),
    "grad_h-int": (GRAD_H.int(), CB, IDX, r"grad_h must be float"),
    "mismatched-C": (GRAD_H, torch.randn(5, 2), IDX, r"grad_h has C=3 .*codebook has C=2"),
    "indices-int32": (GRAD_H, CB, IDX.int(), r"indices must be int64"),
    "indices-shape": (GRAD_H, CB, IDX[:, :3], r"indices must have shape \[B, ph, pw\] = \(2, 4, 5\)"),
    "indices-other-device": (GRAD_H, CB, IDX.to("meta"), r"indices is on meta but codebook is on cpu"),
}


@pytest.mark.parametrize("case", BAD_BACKWARD)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_backward_rejects(impl, case):
    grad_h, codebook, indices, pattern = BAD_BACKWARD[case]
    call = (torch.ops.vqkernels.multiscale_quantize_step_backward if impl == "op"
            else reference.multiscale_quantize_step_backward)
    with pytest.raises(ERRORS, match=pattern):
        call(grad_h, codebook, indices)


# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture): the Triton interpreter's shapes tiny. The Triton tests
# check the area pooling bit for bit and the search against float64 truth, the CUDA tests against the
# reference on float64 copies (check_ms).

# (B, C, H, W, (ph, pw)): divisible, non-divisible, upsampling, 1 x 1 (PyTorch's mean), identity
TRITON_SHAPES = [(2, 6, 16, 16, (4, 4)), (2, 5, 7, 5, (3, 2)), (1, 3, 13, 11, (4, 3)), (2, 4, 3, 4, (5, 7)),
                 (2, 6, 5, 9, (1, 1)), (1, 7, 6, 6, (6, 6))]


def triton_area(f, ph, pw):
    """The Triton kernel's area downsampling of f [B, C, H, W] to (ph, pw): rows [B * ph * pw, C]."""
    from vqkernels.triton import multiscale
    return multiscale._area_downsample(f, ph, pw)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4][0]}x{s[4][1]}")
@on_backends("triton")
def test_kernel_area_bitwise_and_search(backend, shape, dtype):
    b, c, hh, ww, (ph, pw) = shape
    f = seeded_randn(b, c, hh, ww, seed=hh * ww, dtype=dtype, device=backend.device)
    cb = seeded_randn(11, c, seed=c, dtype=dtype, device=backend.device)
    rest = triton_area(f, ph, pw)
    assert_bitwise_equal(rest, rows_of(F.interpolate(f, size=(ph, pw), mode="area")), "area downsampling")
    torch.testing.assert_close(rest.double().cpu(), rows_of(area_truth(f.cpu(), ph, pw)),
                               rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    indices, h = step(f, cb, (ph, pw))
    assert indices.shape == (b, ph, pw) and h.shape == (b, c, ph, pw) and h.dtype == dtype and h.is_contiguous()
    # nearest code of every cell (of the rounded pooled values), and h its code, NCHW
    cells = rest.double()
    dist = ((cells.unsqueeze(1) - cb.double().unsqueeze(0)) ** 2).sum(-1)
    chosen = dist.gather(1, indices.reshape(-1, 1)).squeeze(1)
    assert bool((chosen - dist.min(1).values <= 1e-5 * (1 + dist.min(1).values)).all())
    assert torch.equal(h, cb[indices].permute(0, 3, 1, 2))
    ri, rh = reference.multiscale_quantize_step(f.cpu(), cb.cpu(), [ph, pw])
    assert torch.equal(indices.cpu(), ri) and torch.equal(h.cpu(), rh)


@on_backends("triton")
@hyp_settings(10)
@given(b=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 13), w=st.integers(1, 13), ph=st.integers(1, 14),
       pw=st.integers(1, 14), dtype=st.sampled_from(KERNEL_DTYPES), channels_last=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_area_random_sizes(backend, b, c, h, w, ph, pw, dtype, channels_last, seed):
    """Any (H, W) -> (ph, pw), down or up, divisible or not: bit for bit F.interpolate(mode='area')."""
    f = seeded_randn(b, c, h, w, seed=seed, dtype=dtype, device=backend.device)
    if channels_last:
        f = f.contiguous(memory_format=torch.channels_last)
    want = rows_of(F.interpolate(f.contiguous(), size=(ph, pw), mode="area"))
    assert_bitwise_equal(triton_area(f, ph, pw), want, f"{(h, w)} -> {(ph, pw)}")


@on_backends("triton")
def test_kernel_layouts_mixed_dtypes_and_metrics(backend):
    f = seeded_randn(2, 5, 9, 7, seed=40, device=backend.device).contiguous(memory_format=torch.channels_last)
    cb = seeded_randn(13, 5, seed=41, device=backend.device)
    cases = ((f, cb.half(), "cosine"), (f.half(), cb, "ip"), (f[:, :, 1:, ::2], cb.t().contiguous().t(), "l2"))
    for ff, cc, metric in cases:
        got = step(ff, cc, 3, metric)
        ref = reference.multiscale_quantize_step(ff.cpu(), cc.cpu(), [3, 3], metric)
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])


@on_backends("triton")
def test_kernel_nans_and_edges(backend):
    dev = backend.device
    f = seeded_randn(2, 4, 6, 6, seed=42, device=dev)
    cb = seeded_randn(9, 4, seed=43, device=dev)
    f[0, 1, 0, 0] = float("nan")  # poisons cell (0, 0, 0) of the 3 x 3 output
    i0 = step(f, cb, 3)[0]
    cb[i0[1, 1, 1], 2] = float("nan")  # a code that was chosen: never chosen any more
    indices, h = step(f, cb, 3)
    assert indices[0, 0, 0] == -1 and bool(h[0, :, 0, 0].isnan().all())
    assert indices[1, 1, 1] != i0[1, 1, 1] and not bool(h[1].isnan().any())
    ri, rh = reference.multiscale_quantize_step(f.cpu(), cb.cpu(), [3, 3])
    assert torch.equal(indices.cpu(), ri) and nan_equal(h.cpu(), rh)
    got = step(f[:0], cb, (2, 3))  # B = 0
    assert got[0].shape == (0, 2, 3) and got[1].shape == (0, 4, 2, 3)
    # C = 0: every code at distance 0, the first wins (as the CPU kernel; the reference's reshape(-1, 0) fails
    # there)
    got = step(f[:, :0], cb[:, :0], (2, 3))
    assert torch.equal(got[0].cpu(), torch.zeros(2, 2, 3, dtype=torch.int64)) and got[1].shape == (2, 0, 2, 3)


def ms_data(b, c, h, w, k, seed, f_dtype=torch.float32, cb_dtype=torch.float32):
    g = gen(seed)
    return torch.randn(b, c, h, w, generator=g).to(f_dtype), torch.randn(k, c, generator=g).to(cb_dtype)


def check_ms(f_rest, codebook, pn, metric, device):
    """The op on device against the reference on float64 copies: indices -1 where the reference's are, else a
    nearest code of the float64 area-pooled cell up to the rounding of the pooling in f_rest's dtype; h the
    chosen codes (NCHW, NaN for -1); float32 indices mostly the reference's."""
    idx, h = step(f_rest.to(device), codebook.to(device), list(pn), metric)
    ridx, rh = reference.multiscale_quantize_step(f64(f_rest), f64(codebook), list(pn), metric)
    b, c = f_rest.shape[:2]
    assert idx.dtype == torch.int64 and idx.shape == (b, *pn)
    assert h.dtype == codebook.dtype and h.shape == (b, c, *pn) and h.is_contiguous()
    idx, h = idx.cpu(), h.cpu()
    expected_h = reference.lookup(codebook, idx.reshape(-1)).view(b, *pn, c).permute(0, 3, 1, 2)
    assert torch.equal(h.nan_to_num(7.0), expected_h.nan_to_num(7.0))
    assert torch.equal(idx < 0, ridx < 0)
    pooled = F.interpolate(f64(f_rest), size=tuple(pn), mode="area").permute(0, 2, 3, 1).reshape(-1, c)
    cb = f64(codebook)
    if metric == "cosine":
        pooled, cb = F.normalize(pooled, dim=1), F.normalize(cb, dim=1)
    valid = ridx.reshape(-1) >= 0
    dist = torch.cdist(pooled[valid], cb).square() if metric != "ip" else -(pooled[valid] @ cb.t())
    chosen = dist.gather(1, idx.reshape(-1)[valid].unsqueeze(1)).squeeze(1)
    best = dist.min(1).values
    # The kernel pools in f_rest's dtype (as the reference does on such inputs), the float64 truth does not:
    # distances may differ by ~3 u (|p|^2 + |c|^2), u the unit roundoff of that dtype.
    rel = {torch.float32: 1e-4, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-10}[f_rest.dtype]
    slack = rel * (pooled[valid].square().sum(1) + cb.square().sum(1).max())
    assert (chosen <= best + slack).all()
    if f_rest.dtype == torch.float32 and idx.numel():
        agree = (idx == ridx).float().mean().item()
        assert agree > 0.95, f"only {agree:.3f} of the indices agree with the reference"


@pytest.mark.parametrize("f_dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES, ids=str)
@per_backend("shape, pn", {"cuda": [((2, 4, 7, 5), (3, 2)), ((1, 3, 4, 4), (1, 1)), ((2, 5, 3, 3), (5, 4)),
                                    ((4, 32, 16, 16), (16, 16)), ((3, 16, 16, 16), (6, 6))]})
def test_kernel_matches_reference(backend, f_dtype, cb_dtype, shape, pn):
    check_ms(*ms_data(*shape, k=37, seed=sum(shape), f_dtype=f_dtype, cb_dtype=cb_dtype), pn, "l2", backend.device)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@on_backends("cuda")
def test_kernel_metrics(backend, metric):
    check_ms(*ms_data(2, 8, 9, 9, k=20, seed=32), (4, 4), metric, backend.device)


@on_backends("cuda")
def test_kernel_empty_nan_and_layouts(backend):
    dev = backend.device
    check_ms(*ms_data(0, 4, 5, 5, k=6, seed=33), (2, 2), "l2", dev)
    idx, h = step(torch.zeros(2, 0, 3, 3, device=dev), torch.zeros(4, 0, device=dev), [2, 2], "l2")
    assert torch.equal(idx.cpu(), torch.zeros(2, 2, 2, dtype=torch.int64)) and h.shape == (2, 0, 2, 2)
    f_rest, cb = ms_data(2, 6, 8, 8, k=10, seed=34)
    f_rest[1, 2, 5, 6] = float("nan")  # poisons the pooled cells whose windows cover it
    check_ms(f_rest, cb, (4, 4), "l2", dev)
    check_ms(f_rest.contiguous(memory_format=torch.channels_last), cb.t().contiguous().t(), (3, 3), "l2", dev)


def with_nans(f, cb):
    f[0, 1, 0, 0] = float("nan")  # a NaN cell
    cb[3, 2] = float("nan")  # a code never chosen
    return f, cb


@per_backend("make, pn", {
    "triton": [(lambda: with_nans(seeded_randn(2, 4, 6, 6, seed=42, dtype=torch.float64),
                                  seeded_randn(9, 4, seed=43, dtype=torch.float64)), (2, 2))],
    "cuda": [(lambda: ms_data(2, 4, 6, 6, k=9, seed=35, f_dtype=torch.float64, cb_dtype=torch.float64), (3, 3))]})
def test_kernel_float64_is_the_reference(backend, make, pn):
    f, cb = (t.to(backend.device) for t in make())
    assert_float64_is_the_reference(step(f, cb, pn), reference.multiscale_quantize_step(f, cb, list(pn)),
                                    reference.multiscale_quantize_step(f.cpu(), cb.cpu(), list(pn)),
                                    **KERNEL_TOL[torch.float64])


def channels_last_offset(t):
    """The same values as t [B, C, H, W] in channels-last memory with a storage offset."""
    big = torch.full((t.shape[0] + 1,) + t.shape[1:], float("nan"), dtype=t.dtype, device=t.device)
    view = big.contiguous(memory_format=torch.channels_last)[1:]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", KERNEL_DTYPES + (torch.float64,), ids=str)
@on_backends("triton")
def test_kernel_backward(backend, dtype):
    """Against the sum written out here (both modes; float64 is the reference's); deterministic from a
    channels-last view: bit for bit the reference."""
    b, c, ph, pw, k = 2, 5, 3, 4, 4
    dev = backend.device
    grad_h = seeded_randn(b, c, ph, pw, seed=44, dtype=dtype, device=dev)
    cb = seeded_randn(k, c, seed=45, dtype=dtype, device=dev)
    indices = torch.randint(-1, k, (b, ph, pw), generator=gen(46)).to(dev)
    truth = torch.zeros(k, c, dtype=torch.float64, device=dev)
    for bb in range(b):
        for y in range(ph):
            for x in range(pw):
                if indices[bb, y, x] >= 0:
                    truth[indices[bb, y, x]] += grad_h[bb, :, y, x].double()
    backward = torch.ops.vqkernels.multiscale_quantize_step_backward
    half = dtype in (torch.float16, torch.bfloat16)
    for det in (False, True):
        with deterministic(det):
            got = backward(grad_h, cb, indices)
        assert got.dtype == dtype and got.shape == (k, c)
        torch.testing.assert_close(got.double(), truth, rtol=1e-2 if half else 1e-6, atol=1e-2 if half else 1e-6)
    with deterministic(True):
        got = backward(channels_last_offset(grad_h), cb, indices)
    assert_bitwise_equal(got.cpu(), reference.multiscale_quantize_step_backward(grad_h.cpu(), cb.cpu(), indices.cpu()))


def ms_backward_args(b, c, ph, pw, k, seed, g_dtype=torch.float32, cb_dtype=torch.float32):
    g = gen(seed)
    grad_h = torch.randn(b, c, ph, pw, generator=g).to(g_dtype)
    codebook = torch.randn(k, c, generator=g).to(cb_dtype)
    indices = torch.randint(-1, k, (b, ph, pw), generator=g)
    return grad_h, codebook, indices


def check_ms_backward(args, device):
    grad = torch.ops.vqkernels.multiscale_quantize_step_backward(*(t.to(device) for t in args))
    rgrad = reference.multiscale_quantize_step_backward(*(f64(t) for t in args))
    assert grad.dtype == args[1].dtype and grad.shape == args[1].shape
    close_to_f64(grad, rgrad, atol=KERNEL_TOL[grad.dtype]["atol"] + 1e-5)
    return grad


@pytest.mark.parametrize("g_dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES, ids=str)
@per_backend("b, c, ph, pw, k", {"cuda": [(0, 3, 2, 2, 4), (1, 1, 1, 1, 1), (2, 5, 3, 4, 7), (8, 64, 16, 16, 300)]})
def test_kernel_backward_matches_reference(backend, g_dtype, cb_dtype, b, c, ph, pw, k):
    check_ms_backward(ms_backward_args(b, c, ph, pw, k, seed=b + c + k, g_dtype=g_dtype, cb_dtype=cb_dtype),
                      backend.device)


@on_backends("cuda")
def test_kernel_backward_layouts_and_float64(backend):
    grad_h, cb, idx = ms_backward_args(3, 6, 5, 4, 9, seed=37)
    check_ms_backward((grad_h.contiguous(memory_format=torch.channels_last), cb, idx), backend.device)
    check_ms_backward((grad_h[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3), cb, idx), backend.device)
    check_ms_backward(ms_backward_args(3, 6, 5, 4, 9, seed=38, g_dtype=torch.float64, cb_dtype=torch.float64),
                      backend.device)


@per_backend("shape, seed, as_reference", {"cpu, triton": [((4, 6, 8, 8, 3), 47, False)],
                                           "cuda": [((16, 32, 16, 16, 8), 39, True)]})  # few codes: long segments
def test_kernel_backward_deterministic_bitwise(backend, shape, seed, as_reference):
    args = [t.to(backend.device) for t in ms_backward_args(*shape, seed=seed)]
    backward = torch.ops.vqkernels.multiscale_quantize_step_backward
    with deterministic(True):
        first = backward(*args)
        again = backward(*args)
    assert_bitwise_equal(first, again)
    if as_reference:
        close_to_f64(first, reference.multiscale_quantize_step_backward(*(f64(t) for t in args)), atol=1e-4)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@on_backends("triton")
def test_kernel_backward_out_of_range_indices_count_as_minus_one(backend, det):
    """Not range-checked by the Triton kernel (no GPU sync), but memory-safe: an index >= K or < -1 acts as -1."""
    dev = backend.device
    cb = seeded_randn(2, 5, 4, seed=37, device=dev)[0]
    idx = torch.randint(0, 5, (10, 2), generator=gen(38)).to(dev)
    bad, minus = idx.clone(), idx.clone()
    bad[[1, 6], 1], bad[3, 1] = 5, -7
    minus[[1, 6, 3], 1] = -1
    grad_h = seeded_randn(2, 4, 1, 5, seed=42, device=dev)
    backward = torch.ops.vqkernels.multiscale_quantize_step_backward
    with deterministic(det):
        assert_bitwise_equal(backward(grad_h, cb, bad.view(2, 1, 10)[:, :, :5]),
                             backward(grad_h, cb, minus.view(2, 1, 10)[:, :, :5]))


@per_backend("make", {
    "triton": [lambda: (seeded_randn(2, 3, 5, 4, seed=50), seeded_randn(6, 3, seed=51), [2, 3], "l2"),
               lambda: (seeded_randn(2, 3, 5, 4, seed=50).half(), seeded_randn(6, 3, seed=51), [1, 1], "cosine")],
    "cuda": [lambda: (*ms_data(2, 4, 7, 5, k=9, seed=40, f_dtype=torch.float16), [3, 2], "l2")]})
def test_kernel_opcheck(backend, make):
    args = make()
    kernel_opcheck(backend, "multiscale_quantize_step", (args[0].to(backend.device), args[1].to(backend.device),
                                                        *args[2:]))


@per_backend("make", {
    # -1 adds nothing (no NaN here)
    "triton": [lambda: (seeded_randn(2, 3, 2, 3, seed=53), seeded_randn(6, 3, seed=51),
                        torch.randint(-1, 6, (2, 2, 3), generator=gen(52)))],
    "cuda": [lambda: ms_backward_args(2, 4, 3, 2, 9, seed=41)]})
def test_kernel_backward_opcheck(backend, make):
    with deterministic(backend.name == "triton"):
        kernel_opcheck(backend, "multiscale_quantize_step_backward", tuple(t.to(backend.device) for t in make()))


KERNEL_BAD = {
    "triton": [(lambda f, c: ("multiscale_quantize_step", (f[0], c, [2, 2], "l2")), "f_rest must be 4-D"),
               (lambda f, c: ("multiscale_quantize_step", (f, c[:, :2], [2, 2], "l2")), "has C=3"),
               (lambda f, c: ("multiscale_quantize_step", (f, c[:0], [2, 2], "l2")), "codebook is empty"),
               (lambda f, c: ("multiscale_quantize_step", (f, c, [0, 2], "l2")), "pn must be"),
               (lambda f, c: ("multiscale_quantize_step", (f, c, [2, 2], "hamming")), "unknown metric"),
               (lambda f, c: ("multiscale_quantize_step_backward",
                              (seeded_randn(1, 3, 2, 2, seed=0, device=f.device), c,
                               torch.zeros(1, 2, 3, dtype=torch.int64, device=f.device))), "indices must have")],
    "cuda": [(lambda f, c: ("multiscale_quantize_step", (f, c[:, :3], [2, 2], "l2")), "f_rest has C=4"),
             (lambda f, c: ("multiscale_quantize_step", (f, c, [0, 2], "l2")),
              "pn must be a size >= 1 or a pair of them"),
             (lambda f, c: ("multiscale_quantize_step", (f, c, [2, 2], "l1")), "unknown metric 'l1'"),
             (lambda f, c: ("multiscale_quantize_step_backward",
                            (torch.zeros(2, 4, 2, 2, device=f.device), c,
                             torch.zeros(2, 2, 2, dtype=torch.int32, device=f.device))), "indices must be int64")],
}
KERNEL_BAD_INPUTS = {"triton": lambda: (seeded_randn(1, 3, 4, 4, seed=54), seeded_randn(5, 3, seed=55)),
                     "cuda": lambda: ms_data(2, 4, 6, 6, k=9, seed=36)}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    assert_kernel_rejects(backend, *make(*(t.to(backend.device) for t in KERNEL_BAD_INPUTS[backend.name]())), match)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@on_backends("triton", gpu=True)
def test_kernel_var_scales(backend, dtype):
    """VAR's scales on a 16 x 16 map, 4096 codes: pooling bit for bit F.interpolate (the CPU's for every scale
    but 1 x 1, which is PyTorch's own CUDA mean), indices and h as the reference's."""
    dev = backend.device
    f = seeded_randn(8, 32, 16, 16, seed=85, dtype=dtype, device=dev)
    cb = seeded_randn(4096, 32, seed=86, dtype=dtype, device=dev)
    backward = torch.ops.vqkernels.multiscale_quantize_step_backward
    for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16):
        rest = triton_area(f, p, p)
        want = F.interpolate(f if p == 1 else f.cpu(), size=(p, p), mode="area")
        assert_bitwise_equal(rest.cpu(), rows_of(want).cpu(), f"pn={p}")
        indices, h = step(f, cb, p)
        ri, rh = reference.multiscale_quantize_step(f, cb, [p, p])
        assert (indices != ri).float().mean() < 1e-2
        same = indices == ri
        assert torch.equal(h.permute(0, 2, 3, 1)[same], rh.permute(0, 2, 3, 1)[same])
        grad_h = seeded_randn(8, 32, p, p, seed=87, dtype=dtype, device=dev)
        with deterministic(True):
            a = backward(grad_h, cb, indices)
            b = backward(grad_h, cb, indices)
        assert_bitwise_equal(a, b)
        want = reference.multiscale_quantize_step_backward(grad_h.cpu(), cb.cpu(), indices.cpu())
        assert_bitwise_equal(a.cpu(), want)
        fast = backward(grad_h, cb, indices)
        torch.testing.assert_close(fast.float(), a.float(), rtol=1e-2, atol=1e-2)


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "multiscale_quantize_step", seeded_randn(1, 5, 2, 2, seed=92),
                               seeded_randn(6, 5, seed=93), [1, 1], "l2")


# ---------------------------------------------------------------------------------------
# MultiScaleVQ against VAR's loop (vqkernels.bench.plain.plain_var_quantize)

PNS = (1, 2, 3, 5, 8)

# id: constructor keywords. share_quant_resi 3 exercises the 1/(2K) ticks, 4 the 1/(3K) ones.
CONFIGS = {
    "partially-shared-4": dict(share_quant_resi=4),
    "partially-shared-3": dict(share_quant_resi=3, quant_resi=-0.4),
    "shared": dict(share_quant_resi=1),
    "non-shared": dict(share_quant_resi=0),
    "non-shared-3": dict(share_quant_resi=0, default_qresi_counts=3),
    "identity": dict(quant_resi=0.0),
}


def make_vq(config, using_znorm=False, dtype=torch.float64, pns=PNS, seed=20, vocab=64, cvae=8):
    torch.manual_seed(seed)
    vq = MultiScaleVQ(vocab, cvae, using_znorm=using_znorm, v_patch_nums=pns, **CONFIGS[config]).to(dtype)
    with torch.no_grad():  # non-zero biases, so a wrong Phi shows
        for name, p in vq.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return vq


def train_step(fn, vq, f64):
    """fn(f) -> (f_hat, loss); backward of loss + sum(f_hat * G); returns outputs and gradients."""
    f = f64.to(vq.embedding.weight.dtype).requires_grad_()
    for p in vq.parameters():
        p.grad = None
    f_hat, loss = fn(f)
    (loss + (f_hat * torch.linspace(-1, 2, f_hat.numel()).view_as(f_hat)).sum()).backward()
    grads = {"f": f.grad, **{name: p.grad for name, p in vq.named_parameters()}}
    return f_hat.detach(), loss.detach(), grads


def assert_grads_close(got, want, rtol):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:  # a Phi no scale uses
            assert got[name] is None, name
            continue
        w = want[name].double()
        torch.testing.assert_close(got[name].double(), w, rtol=rtol, atol=rtol * float(w.abs().max()),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("using_znorm", [False, True], ids=["l2", "znorm"])
@pytest.mark.parametrize("config", CONFIGS)
def test_module_matches_var_loop(config, using_znorm):
    """float64: the same indices per scale (their counts from forward, the indices from
    f_to_idxBl_or_fhat), f_hat, loss and gradients to f, the embedding and every Phi."""
    vq = make_vq(config, using_znorm)
    f64 = torch.randn(2, 8, 8, 8, generator=gen(21), dtype=torch.float64)
    ours = train_step(lambda f: vq(f)[::2], vq, f64)
    plain = train_step(lambda f: plain_var_quantize(f, vq.embedding, vq.quant_resi, PNS, vq.beta, using_znorm)[:2],
                       vq, f64)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-12, atol=1e-14)
    assert_grads_close(ours[2], plain[2], rtol=1e-10)
    _, _, idx_Bl, hits = plain_var_quantize(f64, vq.embedding, vq.quant_resi, PNS, vq.beta, using_znorm)
    got = vq.f_to_idxBl_or_fhat(f64, to_fhat=False)
    for si, (a, b) in enumerate(zip(got, idx_Bl)):
        fail_rows(a.reshape(-1) != b.reshape(-1), f"scale {si}: indices differ from VAR's", ours=a.reshape(-1),
                  var=b.reshape(-1))
    # One training forward from a fresh module: scale 0's hits copied, the others 0.1 * hits.
    ema = vq.ema_vocab_hit_SV
    assert torch.equal(ema[0], hits[0].to(ema.dtype))
    for si in range(1, len(PNS)):
        assert torch.equal(ema[si].float(), hits[si] * torch.tensor(0.1)), f"scale {si}: hit counts differ"


@pytest.mark.parametrize("config", ["partially-shared-4", "non-shared"])
def test_module_float32_matches_var_loop(config):
    """float32, VAR's dtype (and a float16 input, cast as VAR does): the same indices, f_hat,
    loss and gradients to float32 rounding."""
    vq = make_vq(config, dtype=torch.float32)
    f64 = torch.randn(2, 8, 8, 8, generator=gen(22), dtype=torch.float64)
    ours = train_step(lambda f: vq(f)[::2], vq, f64)
    plain = train_step(lambda f: plain_var_quantize(f, vq.embedding, vq.quant_resi, PNS, vq.beta)[:2], vq, f64)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-7)
    assert_grads_close(ours[2], plain[2], rtol=1e-4)
    assert vq(f64.half())[0].dtype == torch.float32
    _, _, idx_Bl, _ = plain_var_quantize(f64.float(), vq.embedding, vq.quant_resi, PNS, vq.beta)
    for a, b in zip(vq.f_to_idxBl_or_fhat(f64.float(), to_fhat=False), idx_Bl):
        assert torch.equal(a, b)


def var_phi_index(k, at):
    """VAR's PhiPartiallyShared / PhiNonShared choice, written out with numpy."""
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return np.argmin(np.abs(ticks - at)).item()


@pytest.mark.parametrize("share, sn, want", [
    (4, 10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),  # VAR's default; scale 2 (2/9) is halfway between two ticks
    # in exact arithmetic, and float64 rounding gives it the second
    (4, 5, [0, 1, 2, 2, 3]),
    (3, 5, [0, 0, 1, 2, 2]),
    (0, 10, list(range(10))),
    (1, 4, [0, 0, 0, 0]),
])
def test_phi_choice_per_scale(share, sn, want):
    """The Phi each scale uses, in forward and by VAR's quant_resi[si / (SN - 1)]."""
    vq = MultiScaleVQ(16, 4, v_patch_nums=tuple(range(1, sn + 1)), share_quant_resi=share)
    assert list(vq._phi_ids) == want
    if share != 1:
        assert want == [var_phi_index(share or sn, si / (sn - 1)) for si in range(sn)]
    phis = list(vq.quant_resi.qresi_ls if share > 1 else vq.quant_resi if share == 0 else [vq.quant_resi.qresi])
    for si in range(sn):
        assert vq.quant_resi[si / (sn - 1)] is phis[want[si]] is vq._phi(si)


def test_phi_forward():
    phi = Phi(6, -0.3)
    h = torch.randn(2, 6, 5, 5, generator=gen(23))
    want = h * 0.7 + F.conv2d(h, phi.weight, phi.bias, padding=1) * 0.3
    torch.testing.assert_close(phi(h), want)


def state_dict_keys(config, sn=len(PNS)):
    keys = {"embedding.weight", "ema_vocab_hit_SV"}
    convs = {"partially-shared-4": [f"qresi_ls.{i}" for i in range(4)],
             "partially-shared-3": [f"qresi_ls.{i}" for i in range(3)], "shared": ["qresi"],
             "non-shared": [str(i) for i in range(sn)], "non-shared-3": ["0", "1", "2"], "identity": []}[config]
    return keys | {f"quant_resi.{c}.{p}" for c in convs for p in ("weight", "bias")}


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_is_vars(config):
    """VAR's keys and shapes, so VAR checkpoints load; a round trip gives the same module."""
    vq = make_vq(config, dtype=torch.float32)
    sd = vq.state_dict()
    assert set(sd) == state_dict_keys(config)
    assert sd["embedding.weight"].shape == (64, 8) and sd["ema_vocab_hit_SV"].shape == (len(PNS), 64)
    assert all(sd[k].shape == ((8, 8, 3, 3) if k.endswith("weight") else (8,)) for k in sd if "quant_resi" in k)
    f = torch.randn(2, 8, 8, 8, generator=gen(24))
    vq(f)  # training forward: the hit statistics become non-zero
    other = make_vq(config, dtype=torch.float32, seed=25)
    other.load_state_dict(vq.state_dict(), strict=True)
    for name, t in vq.state_dict().items():
        assert bits(other.state_dict()[name]).equal(bits(t)), name
    vq.eval(), other.eval()
    for a, b in zip(vq(f), other(f)):
        if a is not None:
            assert bits(a).equal(bits(b))


def test_hit_statistics_and_usages():
    """ema_vocab_hit_SV follows VAR's schedule (copy, then 0.9 / 0.1 below 100 scale updates, then
    0.99 / 0.01); eval mode leaves it; usages are the % of codes above VAR's margin."""
    vq = make_vq("shared", dtype=torch.float32)
    f = torch.randn(2, 8, 8, 8, generator=gen(26))
    _, _, _, hits = plain_var_quantize(f, vq.embedding, vq.quant_resi, PNS, vq.beta)
    vq(f)
    ema1 = vq.ema_vocab_hit_SV.clone()
    assert int(vq.record_hit) == len(PNS)
    vq.record_hit.fill_(99)
    vq(f)
    assert torch.equal(vq.ema_vocab_hit_SV[0], ema1[0] * 0.9 + hits[0] * 0.1)
    assert torch.equal(vq.ema_vocab_hit_SV[1], ema1[1] * 0.99 + hits[1] * 0.01)
    before = vq.ema_vocab_hit_SV.clone()
    vq.eval()
    _, usages, _ = vq(f, ret_usages=True)
    assert torch.equal(vq.ema_vocab_hit_SV, before)
    margin = (2 * 8 * 8) / 64 * 0.08
    assert usages == [(before[si] >= margin).float().mean().item() * 100 for si in range(len(PNS))]
    assert vq(f)[1] is None


def test_nan_cells_are_not_counted():
    """A NaN in the input makes its cells index -1: they count as no hit. Scale 0's NaN code,
    upsampled, makes all of that image's residual NaN, so only the other image's cells count."""
    vq = make_vq("shared", dtype=torch.float32)
    f = torch.randn(2, 8, 8, 8, generator=gen(35))
    f[1, 3, 6, 6] = float("nan")
    f_hat, _, _ = vq(f)
    counted = vq.ema_vocab_hit_SV[0].sum() + sum(vq.ema_vocab_hit_SV[si].sum() / 0.1 for si in range(1, len(PNS)))
    torch.testing.assert_close(counted, torch.tensor(float(sum(pn * pn for pn in PNS))))
    assert bool(torch.isnan(f_hat[1]).all()) and not bool(torch.isnan(f_hat[0]).any())


def test_eini():
    """VAR's embedding initialisations: truncated normal (eini > 0), uniform +-|eini| / K (< 0)."""
    vq = make_vq("shared", dtype=torch.float32)
    vq.eini(0.02)
    w = vq.embedding.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.005 and float(w.abs().max()) < 0.2
    vq.eini(-1.0)
    assert float(w.abs().max()) <= 1 / 64 and float(w.std()) > 1 / 64 / 4


def test_single_scale_is_plain_vq():
    """One scale (VAR divides by zero there; position 0 here) with Phi the identity is plain VQ:
    f_hat's value is vq_quantize's codes, the loss (1 + beta) times its loss."""
    vq = make_vq("identity", pns=(8,))
    f = torch.randn(2, 8, 8, 8, generator=gen(36), dtype=torch.float64)
    f_hat, _, loss = vq(f)
    quantized, _, commit, _ = vqkernels.vq_quantize(rows_of(f), vq.embedding.weight.detach())
    torch.testing.assert_close(rows_of(f_hat), quantized)
    torch.testing.assert_close(loss, (1 + vq.beta) * commit)


def test_rejects_wrong_feature_map():
    vq = make_vq("shared")
    with pytest.raises(ValueError, match=r"\(H, W\) = the last patch size \(8, 8\), got shape \(2, 8, 7, 7\)"):
        vq(torch.randn(2, 8, 7, 7, dtype=torch.float64))
    with pytest.raises(ERRORS, match=r"f_rest has C=5 .*codebook has C=8"):
        vq(torch.randn(2, 5, 8, 8, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# helpers against VAR's code


def var_embed_to_fhat(vq, ms_h_BChw, all_to_max_scale=True):
    """VAR's embed_to_fhat, written plainly (F.interpolate bicubic, in-place sums)."""
    pns, out = vq.v_patch_nums, []
    B, sn, H = ms_h_BChw[0].shape[0], len(vq.v_patch_nums), vq.v_patch_nums[-1]
    if all_to_max_scale:
        f_hat = ms_h_BChw[0].new_zeros(B, vq.Cvae, H, H)
        for si in range(sn):
            h = ms_h_BChw[si]
            if si < sn - 1:
                h = F.interpolate(h, size=(H, H), mode="bicubic")
            f_hat.add_(vq.quant_resi[si / (sn - 1)](h))
            out.append(f_hat.clone())
    else:
        f_hat = ms_h_BChw[0].new_zeros(B, vq.Cvae, pns[0], pns[0])
        for si, pn in enumerate(pns):
            f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
            f_hat.add_(vq.quant_resi[si / (sn - 1)](ms_h_BChw[si]))
            out.append(f_hat)
    return out


def var_idxBl_to_var_input(vq, gt_ms_idx_Bl):
    """VAR's idxBl_to_var_input, written plainly."""
    pns, next_scales = vq.v_patch_nums, []
    B, C, H, sn = gt_ms_idx_Bl[0].shape[0], vq.Cvae, pns[-1], len(pns)
    f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, H, dtype=vq.embedding.weight.dtype)
    pn_next = pns[0]
    for si in range(sn - 1):
        h = F.interpolate(vq.embedding(gt_ms_idx_Bl[si]).transpose_(1, 2).view(B, C, pn_next, pn_next), size=(H, H),
                          mode="bicubic")
        f_hat.add_(vq.quant_resi[si / (sn - 1)](h))
        pn_next = pns[si + 1]
        next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
    return torch.cat(next_scales, dim=1)


@torch.no_grad()
def test_helpers_match_var():
    vq = make_vq("partially-shared-4")
    f = torch.randn(2, 8, 8, 8, generator=gen(27), dtype=torch.float64)
    idx_Bl = vq.f_to_idxBl_or_fhat(f, to_fhat=False)
    B, C = 2, 8
    # teacher forcing input: [B, sum(pn^2 for the scales after the first), C]
    got = vq.idxBl_to_var_input(idx_Bl)
    assert got.shape == (B, sum(pn * pn for pn in PNS[1:]), C)
    torch.testing.assert_close(got, var_idxBl_to_var_input(vq, idx_Bl), rtol=1e-12, atol=1e-12)
    # the codes of every scale back to f_hat, both ways
    ms_h = [vq.embedding(idx).transpose(1, 2).reshape(B, C, pn, pn) for idx, pn in zip(idx_Bl, PNS)]
    for all_to_max in (True, False):
        got = vq.embed_to_fhat(ms_h, all_to_max_scale=all_to_max)
        want = var_embed_to_fhat(vq, ms_h, all_to_max)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(vq.embed_to_fhat(ms_h, all_to_max, last_one=True), got[-1])
    # f_to_idxBl_or_fhat(to_fhat=True): the running f_hat, the same as embed_to_fhat of the codes,
    # ending at forward's f_hat
    fhats = vq.f_to_idxBl_or_fhat(f, to_fhat=True)
    for a, b in zip(fhats, vq.embed_to_fhat(ms_h)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fhats[-1], vq.eval()(f)[0], rtol=1e-12, atol=1e-12)
    # VAR inference, scale by scale: the same inputs as teacher forcing
    f_hat = f.new_zeros(B, C, 8, 8)
    inputs = []
    for si in range(len(PNS)):
        f_hat, nxt = vq.get_next_autoregressive_input(si, len(PNS), f_hat, ms_h[si])
        inputs.append(nxt)
    torch.testing.assert_close(f_hat, fhats[-1], rtol=1e-12, atol=1e-12)
    teacher = torch.cat([t.reshape(B, C, -1).transpose(1, 2) for t in inputs[:-1]], 1)
    torch.testing.assert_close(teacher, vq.idxBl_to_var_input(idx_Bl), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ret_indices_are_f_to_idxBl(training):
    vq = make_vq("partially-shared-4").train(training)
    f = torch.randn(2, 8, 8, 8, generator=gen(29), dtype=torch.float64, requires_grad=True)
    f_hat, usages, loss, ids = vq(f, ret_indices=True)
    assert usages is None and f_hat.shape == f.shape
    assert [t.shape for t in ids] == [(2, pn * pn) for pn in PNS]
    for a, b in zip(ids, vq.f_to_idxBl_or_fhat(f.detach(), to_fhat=False)):
        assert torch.equal(a, b)
    loss.backward()  # the fourth item changes nothing of the training pass
    assert f.grad is not None and torch.isfinite(f.grad).all()


@torch.no_grad()
def test_f_to_idxBl_with_rectangular_patches():
    vq = make_vq("shared")
    f = torch.randn(2, 8, 6, 9, generator=gen(28), dtype=torch.float64)
    pns = [(1, 2), (2, 3), 4, (6, 9)]
    got = vq.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=pns)
    _, _, want, _ = plain_var_quantize(f, vq.embedding, vq.quant_resi, pns, vq.beta)
    assert [t.shape for t in got] == [(2, 2), (2, 6), (2, 16), (2, 54)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"last patch size \(6, 8\)"):
        vq.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=[1, (6, 8)])


@pytest.mark.parametrize("sizes", [((1, 1), (16, 16)), ((3, 5), (16, 16)), ((13, 13), (16, 16)), ((4, 4), (4, 4)),
                                   ((7, 6), (3, 2))], ids=str)
def test_upsample_bicubic_is_interpolate(sizes):
    (h, w), size = sizes
    x = torch.randn(2, 3, h, w, generator=gen(29), dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, *size, generator=gen(30), dtype=torch.float64)
    got = upsample_bicubic(x, size)
    want = F.interpolate(x, size=size, mode="bicubic")
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    grads = [torch.autograd.grad((y * g).sum(), x)[0] for y in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------
# torch.compile


def test_compiled_training_step_matches_eager():
    """Inductor, fullgraph=True: forward with the hit statistics, backward into f, the embedding
    and the Phis; two steps, the second without recompiling."""
    torch._dynamo.reset()
    pns = (1, 4)  # a small graph: inductor's compile time dominates this file
    eager, comp = make_vq("non-shared", dtype=torch.float32, pns=pns), make_vq("non-shared", dtype=torch.float32,
                                                                                 pns=pns)
    compiled = torch.compile(lambda f: comp(f)[::2], fullgraph=True)
    for seed in (31, 32):
        f64 = torch.randn(2, 8, 4, 4, generator=gen(seed), dtype=torch.float64)
        want = train_step(lambda f: eager(f)[::2], eager, f64)
        with torch.compiler.set_stance("fail_on_recompile" if seed == 32 else "default"):
            got = train_step(compiled, comp, f64)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert_grads_close(got[2], want[2], rtol=1e-5)
        assert torch.equal(comp.ema_vocab_hit_SV, eager.ema_vocab_hit_SV)
        assert torch.equal(comp.record_hit, eager.record_hit)


def test_aot_dispatch_with_grad():
    """What opcheck's test_aot_dispatch_dynamic cannot run with a codebook that requires grad
    (vq_helpers.INT_FIRST_OUTPUT): AOTAutograd with dynamic shapes gives eager's h and gradient."""
    torch._dynamo.reset()

    def fn(f_rest, codebook):
        return [step(f_rest, codebook, pn, metric)[1] for pn, metric in ((2, "l2"), (3, "cosine"), (5, "ip"))]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    f = torch.randn(2, 4, 5, 5, generator=gen(33))
    results = []
    for run in (fn, compiled):
        codebook = torch.randn(10, 4, generator=gen(34)).requires_grad_()
        hs = run(f, codebook)
        sum(h.square().sum() * (i + 1) for i, h in enumerate(hs)).backward()
        results.append([*hs, codebook.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
