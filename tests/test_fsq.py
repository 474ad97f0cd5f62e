"""vqkernels.fsq_quantize (finite scalar quantization), its backward op and fsq_indices_to_codes.

The C++ kernels compute float32, float16 and bfloat16 inputs in float32 lanes: one body (and one
tanh of their own) compiled for AVX-512, AVX2 and a portable scalar path, chosen by the CPU ISA;
float64 inputs take a scalar path with std::tanh. The `impl` fixture runs the op under each ISA
and the pure-PyTorch reference called directly (tests of the op alone take the `isa` fixture),
and the ISAs must agree bit for bit.

Rounding ties: the kernels' tanh is within TANH_ULP of the exact value and torch.tanh (the
reference's) within about 1 ulp, so where a bounded value lies within a few ulp of a half-integer
the two can round it to neighbouring levels. check_fsq accepts either neighbour there (within its
tolerance; test_near_ties_round_to_a_neighbour puts values there on purpose); the bit-for-bit
comparisons with the reference use random data with no value that close to a tie.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, LAYOUTS, bits, compute_dtype, fail_rows, forced_cpu_isa, gen, hyp_settings, opcheck,
                        reference, unit_roundoff, vqkernels, with_layout)

ERRORS = (ValueError, RuntimeError)
IMPLS = {"op": vqkernels.fsq_quantize, "reference": reference.fsq_quantize}
BACKWARD_IMPLS = {"op": torch.ops.vqkernels.fsq_quantize_backward, "reference": reference.fsq_quantize_backward}
ISAS = ["avx512", "avx2", "portable"] if vqkernels.compiled() else []
TANH_ULP = 1.07  # the kernels' tanh: 1.066 ulp at most over every float32 (at x = 0.762640178)


@pytest.fixture(params=(ISAS or ["op"]) + ["reference"])
def impl(request):
    """'reference', or the op with the CPU kernels forced to the ISA named (restored after); 'op' as
    served when the extension is not built. Pass it to forward() / backward()."""
    if request.param not in ISAS:
        yield request.param
        return
    with forced_cpu_isa(request.param):
        yield request.param


def forward(impl):
    return IMPLS["reference" if impl == "reference" else "op"]


def backward(impl):
    return BACKWARD_IMPLS["reference" if impl == "reference" else "op"]


# ---------------------------------------------------------------------------------------
# float64 truth, written out independently of vqkernels.reference


def bound_constants(levels):
    """float64 arrays (half_l, offset, shift, half_width) of the FSQ bound. The spec takes half_l
    in float32 as vector-quantize-pytorch computes it, fl32(fl32(L - 1) * fl32(1.001)) / 2 (exact
    here in numpy float32); shift = atanh(offset / half_l) is exact here, the op rounds it to float32."""
    lv = np.array(levels, dtype=np.float64)
    half_l = ((lv - 1).astype(np.float32) * np.float32(1.001) / np.float32(2)).astype(np.float64)
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    return half_l, offset, np.arctanh(offset / half_l), (lv // 2)


def bounded_truth(z, levels):
    """(bounded [N, d] float64 of z as the op sees it, tolerance [d]).

    The op rounds z + shift, tanh (1-2 ulp), the product and the difference in its compute
    dtype (unit roundoff u): together at most about 6 u (half_l + 1), as tanh' <= 1. Its
    float32 shift is off by at most 2 ulp, moving bounded by half_l * |shift| * 2**-22. We
    allow 8 u (half_l + 1) plus that.
    """
    half_l, offset, shift, _ = (torch.from_numpy(a) for a in bound_constants(levels))
    b = torch.tanh(z.double() + shift) * half_l - offset
    tol = 8 * unit_roundoff(compute_dtype(z)) * (half_l + 1) + half_l * shift.abs() * 2.0 ** -22
    return b, tol


def decode_levels(indices, levels):
    """Per-dimension centred levels [N, d] (int64) of mixed-radix indices, the first dimension fastest."""
    out, rest = [], indices.clone()
    for lv in levels:
        out.append(rest % lv - lv // 2)
        rest = rest // lv
    return torch.stack(out, 1) if out else indices.new_zeros(indices.shape[0], 0)


def check_fsq(z, levels, codes, indices):
    """Judge (codes, indices) of z against the float64 truth.

    * shapes and dtypes: codes like z, indices int64 [N];
    * a row holding a NaN: index -1, and codes NaN exactly where z is NaN;
    * other rows: the level of each dimension (decoded from the index, so always in range)
      is round-half-even of the exact bounded value, or, where that value lies within the
      tolerance of a half-integer, either neighbour; codes = level / (L // 2) rounded to z's
      dtype, a zero code +0.0.
    Returns the number of dimensions decided by the tolerance (ambiguous).
    """
    n, d = z.shape
    assert codes.dtype == z.dtype and codes.shape == (n, d)
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    nan = torch.isnan(z.double())
    nan_row = nan.any(1)
    fail_rows(nan_row & (indices != -1), "a row holding a NaN must get index -1", index=indices)
    assert torch.equal(torch.isnan(codes[nan_row].double()), nan[nan_row]), "codes must be NaN exactly where z is"
    ok = ~nan_row
    size = math.prod(levels)
    fail_rows(ok & ((indices < 0) | (indices >= size)), "index out of range", index=indices)
    b, tol = bounded_truth(z[ok], levels)
    level = decode_levels(indices[ok], levels)
    want = torch.round(b)
    near_half = ((b - b.floor()) - 0.5).abs() <= tol
    either = (level == b.floor()) | (level == b.ceil())
    fail_rows(~((level == want) | (near_half & either)).all(1), "level is not round(bounded)", level=level,
              want=want, bounded=b)
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)
    expect = (level / half_width).to(compute_dtype(z)).to(z.dtype)
    mine = codes[ok]
    bad = (bits(mine) != bits(expect)).any(1) if mine.numel() else torch.zeros(0, dtype=torch.bool)
    fail_rows(bad, "codes are not level / (L // 2) (zero codes +0.0)", codes=mine, expected=expect)
    return int((near_half & (level != want)).sum())


# ---------------------------------------------------------------------------------------
# data

LEVEL_SETS = [[8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [3], [4, 1000], [999, 3, 4], [17, 16, 15, 14, 13, 12]]


def fsq_input(n, levels, seed, scale=1.0, dtype=torch.float32, layout="contiguous"):
    z = torch.randn(n, len(levels), generator=gen(seed), dtype=torch.float64) * scale
    return with_layout(z.to(dtype), layout)


@st.composite
def fsq_cases(draw):
    levels = draw(st.lists(st.one_of(st.integers(3, 16), st.integers(3, 1000)), min_size=1, max_size=8)
                  .filter(lambda lv: math.prod(lv) < 2 ** 63))  # larger products are refused (tested apart)
    return dict(n=draw(st.sampled_from([0, 1, 7, 33, draw(st.integers(0, 300))])), levels=levels,
                seed=draw(st.integers(0, 2 ** 31 - 1)), scale=draw(st.sampled_from([0.05, 1.0, 3.0, 30.0])),
                dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)))


# ---------------------------------------------------------------------------------------
# forward


@hyp_settings(60)
@given(case=fsq_cases())
def test_forward_matches_float64_truth(impl, case):
    z = fsq_input(case["n"], case["levels"], case["seed"], case["scale"], case["dtype"], case["layout"])
    saved = bits(z).clone()
    codes, indices = forward(impl)(z, case["levels"])
    assert torch.equal(bits(z), saved), "z was modified"
    ambiguous = check_fsq(z, case["levels"], codes, indices)
    assert ambiguous <= max(1, z.numel() // 1000), f"{ambiguous} levels were decided by the tolerance"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_levels_and_dtypes(impl, levels, dtype):
    """Every level of every dimension is reached (z spans the bound's range), in every dtype."""
    z = fsq_input(2000, levels, seed=1, scale=2.0, dtype=dtype)
    codes, indices = forward(impl)(z, levels)
    check_fsq(z, levels, codes, indices)
    level = decode_levels(indices, levels)
    for j, lv in enumerate(levels):
        if lv <= 16:
            assert level[:, j].unique().numel() == lv, f"dimension {j}: not all {lv} levels reached"


def test_extremes_and_zero_sign(impl):
    """+-inf reach the outer levels; the bound of +-large z stays in range; a zero code is +0.0
    (also for z = -0.0 and tiny negative z, whose rounded value is -0.0); the kernels' tanh
    switches formula at |x| = 0.75 and caps |x| at 9.1 (the last row goes near both)."""
    levels = [8, 5, 4, 3]
    z = torch.tensor([[float("inf"), -float("inf"), 1e30, -1e30], [-0.0, -1e-30, -0.0, -1e-3],
                      [-1e-30, -0.0, -1e-30, 0.0], [0.75, -9.1, 9.0, -1e-40]])
    codes, indices = forward(impl)(z, levels)
    check_fsq(z, levels, codes, indices)
    assert codes[0].tolist() == [0.75, -1.0, 0.5, -1.0]  # even L tops out at (L/2 - 1) / (L/2)
    assert not bool((bits(codes) == bits(torch.tensor(-0.0))).any()), "a code is -0.0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows(impl, dtype):
    levels = [8, 5, 5]
    z = fsq_input(9, levels, seed=2, dtype=dtype)
    z[3, 1] = float("nan")
    z[5] = float("nan")
    codes, indices = forward(impl)(z, levels)
    check_fsq(z, levels, codes, indices)
    assert indices[3] == -1 and indices[5] == -1 and not bool(torch.isnan(codes[3, [0, 2]].double()).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(impl, dtype):
    codes, indices = forward(impl)(torch.empty(0, 3, dtype=dtype), [3, 4, 5])
    assert codes.shape == (0, 3) and codes.dtype == dtype and indices.shape == (0,) and indices.dtype == torch.int64


def test_op_matches_reference_bitwise(isa):
    """The kernel and the reference round the same bounded values: on random data (no value near
    a half-integer within tanh's last bit) both give the same codes and indices."""
    levels = [8, 6, 5, 5, 3]
    z = fsq_input(3000, levels, seed=3, scale=1.5)
    got, want = vqkernels.fsq_quantize(z, levels), reference.fsq_quantize(z, levels)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1])


MODES = {"symmetric": dict(symmetric=True), "hard-clamp": dict(hard_clamp=True),
         "symmetric-hard-clamp": dict(symmetric=True, hard_clamp=True)}


def mode_truth(z, levels, symmetric=False, hard_clamp=False):
    """Float64 levels (0 .. L - 1) and d codes / dz of the symmetric / hard-clamp bounds, from their formulas."""
    zd, lv = z.double(), torch.tensor(levels, dtype=torch.float64)
    squash = (lambda v: v.clamp(-1, 1)) if hard_clamp else torch.tanh
    dsquash = (lambda v: ((v >= -1) & (v <= 1)).double()) if hard_clamp else (lambda v: 1 - torch.tanh(v) ** 2)
    if symmetric:  # the scale 2 / (L - 1) is float32 there, for every dtype
        scale = (2.0 / (lv - 1).float()).double()
        return torch.floor((lv - 1) * (squash(zd) + 1) / 2 + 0.5), dsquash(zd) * scale / 2 * (lv - 1)
    # the bound's constants are float32 there, for every dtype
    half_l, offset = ((lv - 1).float() * (1 + 1e-3) / 2).double(), (lv.remainder(2) == 0).double() * 0.5
    shift = (offset / half_l).float().double() if hard_clamp else torch.atanh(offset.float() / half_l.float()).double()
    return (squash(zd + shift) * half_l - offset).round() + torch.div(lv, 2, rounding_mode="floor"), \
        dsquash(zd + shift) * half_l / torch.div(lv, 2, rounding_mode="floor")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_modes_op_matches_reference_and_truth(isa, mode, dtype):
    """symmetric (vector-quantize-pytorch's preserve_symmetry, levels of 2 allowed) and hard_clamp: the kernel
    and the reference agree bit for bit (codes, indices, a NaN row's -1), their levels are the float64
    formula's wherever it is not within rounding of a level boundary, and indices are the levels' mixed radix."""
    levels = [8, 5, 2, 3]
    z = fsq_input(2000, levels, seed=21, scale=1.5).to(dtype)
    z[5, 2] = float("nan")
    kw = MODES[mode]
    got, want = vqkernels.fsq_quantize(z, levels, **kw), reference.fsq_quantize(z, levels, **kw)
    both_nan = torch.isnan(got[0]) & torch.isnan(want[0])  # a NaN's sign bit may differ in bfloat16
    assert ((bits(got[0]) == bits(want[0])) | both_nan).all() and torch.equal(got[1], want[1])
    assert got[1][5] == -1 and (got[1][torch.arange(2000) != 5] >= 0).all()
    level, _ = mode_truth(z.float() if dtype == torch.bfloat16 else z, levels, **kw)
    lv = torch.tensor(levels, dtype=torch.float64)
    codes = got[0].double()
    decoded = (codes + 1) * (lv - 1) / 2 if kw.get("symmetric") else codes * torch.div(lv, 2, rounding_mode="floor") \
        + torch.div(lv, 2, rounding_mode="floor")
    ok = (decoded.round() == level) | torch.isnan(level)
    assert ok[torch.arange(2000) != 5].float().mean() > 0.999, "levels differ from the float64 formula"
    basis = torch.tensor([1, 8, 40, 80], dtype=torch.int64)
    rows = torch.arange(2000) != 5
    assert torch.equal((decoded[rows].round().long() * basis).sum(1), got[1][rows])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_modes_backward_matches_truth(isa, mode, dtype):
    """The straight-through gradient of both bounds: the kernel (through autograd) and the reference
    against the float64 derivative of the squash (1 inside the hard clamp, 0 outside)."""
    levels = [8, 5, 2, 3]
    z = (fsq_input(500, levels, seed=22, scale=2.0).to(dtype)).requires_grad_()
    g = torch.randn(500, 4, generator=gen(23)).to(dtype)
    codes, _ = vqkernels.fsq_quantize(z, levels, **MODES[mode])
    (codes * g).sum().backward()
    _, slope = mode_truth(z.detach(), levels, **MODES[mode])
    want = g.double() * slope
    tol = 32 * unit_roundoff(dtype) * g.double().abs()  # 1 - tanh^2 near saturation: absolute, not relative, error
    for got in (z.grad, reference.fsq_quantize_backward(g, z.detach(), levels, **MODES[mode])):
        fail_rows(~((got.double() - want).abs() <= tol).all(1), "gradient", got=got, want=want)


@pytest.mark.parametrize("mode", MODES)
def test_modes_opcheck(mode):
    sym, hard = MODES[mode].get("symmetric", False), MODES[mode].get("hard_clamp", False)
    z = torch.randn(9, 4, generator=gen(24)) * 1.5
    opcheck("fsq_quantize", (z.requires_grad_(), [8, 5, 2, 3], sym, hard))
    opcheck("fsq_quantize_backward", (torch.randn(9, 4), z.detach(), [8, 5, 2, 3], sym, hard))


@pytest.mark.parametrize("symmetric", [False, True])
def test_indices_to_codes_inverts_both_bounds(symmetric):
    levels = [8, 5, 2, 3]
    z = fsq_input(500, levels, seed=25, scale=2.0)
    codes, indices = vqkernels.fsq_quantize(z, levels, symmetric=symmetric)
    assert torch.equal(bits(vqkernels.fsq_indices_to_codes(indices, levels, symmetric=symmetric)), bits(codes))


def test_large_codebook_indices_exact(isa):
    """A product of levels beyond 2**53: indices exact in int64 (float arithmetic would round them)."""
    levels = [999, 997, 991, 983, 977, 971]
    assert math.prod(levels) > 2 ** 59
    z = fsq_input(500, levels, seed=4, scale=2.0)
    codes, indices = vqkernels.fsq_quantize(z, levels)
    check_fsq(z, levels, codes, indices)
    assert bool((indices > 2 ** 53).any())


# ---------------------------------------------------------------------------------------
# the kernels' tanh, their ISA paths, rounding near ties, their cache of constants


def float32_grid(stride, start=0, stop=0x7F800001):
    """Every stride-th float32 bit pattern in [start, stop) (by default +0 to +inf), then their negatives."""
    pos = np.arange(start, stop, stride, dtype=np.uint32).view(np.float32)
    return np.concatenate([pos, -pos])


def tanh_ulp_error(got, x):
    """|got - tanh(x)| in units in the last place, in float32, of the exact (float64) tanh(x)."""
    want = np.tanh(x.astype(np.float64))
    ulp = np.ldexp(1.0, np.maximum(np.frexp(want)[1] - 24, -149))
    return np.abs(got.astype(np.float64) - want) / ulp


def test_tanh_within_bound(isa):
    """The kernels' float32 tanh (vqkernels._C.fsq_tanh runs it under the active ISA) within TANH_ULP
    over 8M float32 of every binade and every float32 around its branch point 0.75 and its cap 9.1;
    exact where it must be: +-0 keep their sign, tiny x gives x, |x| >= 9.1 and +-inf give +-1, NaN
    gives NaN; and odd bit for bit."""
    if isa == "reference":
        pytest.skip("the C++ kernels' tanh (the extension is not built)")
    tanh = vqkernels._backend._C.fsq_tanh
    x = np.concatenate([float32_grid(509), float32_grid(1, 0x3F3F0000, 0x3F410000),
                        float32_grid(1, 0x410F0000, 0x41130000)])
    y = tanh(x)
    err = tanh_ulp_error(y, x)
    assert err.max() <= TANH_ULP, f"{err.max():.3f} ulp at x = {x[err.argmax()]!r}"
    assert np.array_equal(tanh(-x).view(np.uint32), y.view(np.uint32) ^ np.uint32(0x80000000)), "tanh(-x) != -tanh(x)"
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-45, 9.1, -9.1, 20.0, 3e38, np.inf, -np.inf], np.float32)
    want = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-45, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0], np.float32)
    assert np.array_equal(tanh(special).view(np.uint32), want.view(np.uint32)), tanh(special)
    assert np.isnan(tanh(np.array([np.nan], np.float32))).all()


EDGE_VALUES = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-30, 0.75, -0.75, 9.1, -20.0, 1e30]
ISA_LEVELS = [[5], [8, 5, 3], [8, 8, 8, 5, 5, 5], [2, 3, 4, 5, 6, 7, 8], [3] * 16, [4] * 13, list(range(2, 19))]
# (d = 16 and 4 ** 13 = 2 ** 26 codes: the largest of the 16-row index sums; past them, the scalar sums)


def all_outputs(z, g, levels):
    """Codes and indices (float32 and bfloat16 z) and gradients of every mode, contiguous and strided."""
    out = []
    for symmetric in (False, True):
        for hard_clamp in (False, True):
            for layout in ("contiguous", "strided"):
                zl, gl = with_layout(z, layout), with_layout(g, layout)
                out += vqkernels.fsq_quantize(zl, levels, symmetric, hard_clamp)
                out += vqkernels.fsq_quantize(zl.bfloat16(), levels, symmetric, hard_clamp)
                out.append(torch.ops.vqkernels.fsq_quantize_backward(gl, zl, levels, symmetric, hard_clamp))
    return out


def edge_input(n, d, seed):
    """z [n, d], random with EDGE_VALUES at every third element (as many as fit)."""
    z = torch.randn(n, d, generator=gen(seed)) * 2
    flat = z.view(-1)
    k = min(len(EDGE_VALUES), (flat.numel() + 2) // 3)
    flat[::3][:k] = torch.tensor(EDGE_VALUES[:k])
    return z


def assert_isas_agree(outputs):
    """outputs() (a list of tensors) gives the same bits under every ISA this CPU runs as on the portable path."""
    results = {}
    try:
        for isa in ISAS:
            try:
                vqkernels.set_cpu_isa(isa)
            except ValueError:
                continue
            results[isa] = outputs()
    finally:
        vqkernels.set_cpu_isa("auto")
    for isa, outs in results.items():
        for i, (got, want) in enumerate(zip(outs, results["portable"])):
            assert torch.equal(bits(got), bits(want)), f"{isa} differs from portable in output {i}"


@pytest.mark.skipif(not ISAS, reason="the C++ kernels' ISA paths (the extension is not built)")
@pytest.mark.parametrize("levels", ISA_LEVELS, ids=str)
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33])
def test_isas_agree_bitwise(levels, n):
    """The ISA paths share one body in which nothing is fused into an FMA, so their codes, indices and
    gradients are the same bits: for every mode, for runs of every length (n * d elements, or d per row
    of a strided z: the vector loops' tails) and for edge values (+-0, +-inf, NaN, subnormal, the tanh's
    branch point and cap)."""
    z, g = edge_input(n, len(levels), seed=30 + n), torch.randn(n, len(levels), generator=gen(31))
    assert_isas_agree(lambda: all_outputs(z, g, levels))


def test_near_ties_round_to_a_neighbour(impl):
    """z whose bounded value lies within a few ulp of a half-integer, where a tanh 1 ulp off (the
    kernels' or torch.tanh in the reference) can round to either neighbour: every level is one of the
    two (check_fsq's tolerance) or, away from the tie, round(bounded); the index is that of the levels."""
    levels = [8, 7, 6, 5]
    half_l, offset, shift, _ = bound_constants(levels)
    columns = []
    for j in range(len(levels)):
        ties = np.arange(-levels[j], levels[j]) + 0.5
        ties = ties[np.abs(ties + offset[j]) < half_l[j]]
        z32 = (np.arctanh((ties + offset[j]) / half_l[j]) - shift[j]).astype(np.float32)
        nudged = [z32]
        for _ in range(3):  # 1 to 3 float32 steps either side
            nudged = [np.nextafter(nudged[0], -np.inf, dtype=np.float32)] + nudged + \
                [np.nextafter(nudged[-1], np.inf, dtype=np.float32)]
        columns.append(np.concatenate(nudged))
    rows = max(len(c) for c in columns)
    z = torch.from_numpy(np.stack([np.resize(c, rows) for c in columns], 1))
    b, tol = bounded_truth(z, levels)
    assert (((b - b.floor()) - 0.5).abs() <= tol).double().mean() > 0.5, "the data is not near ties"
    codes, indices = forward(impl)(z, levels)
    check_fsq(z, levels, codes, indices)


def test_constants_per_level_set_and_mode(isa):
    """The kernels keep each level set's constants (a cache of 64): the same levels with and without the
    hard clamp (whose shift differs), and more level sets than the cache holds, each get their own."""
    z = fsq_input(64, [5, 4], seed=41, scale=1.5)
    for k in range(3, 75):
        levels = [k, 4]
        for hard_clamp in ((True, False) if k % 2 else (False, True)):
            codes, indices = vqkernels.fsq_quantize(z, levels, hard_clamp=hard_clamp)
            if hard_clamp:  # no tanh: the kernel and the reference round the same values
                want = reference.fsq_quantize(z, levels, hard_clamp=True)
                assert torch.equal(bits(codes), bits(want[0])) and torch.equal(indices, want[1]), levels
            else:
                check_fsq(z, levels, codes, indices)


# ---------------------------------------------------------------------------------------
# fsq_indices_to_codes


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_indices_to_codes_inverts(levels):
    z = fsq_input(500, levels, seed=5, scale=2.0)
    codes, indices = vqkernels.fsq_quantize(z, levels)
    for idx in (indices, indices.int()):
        decoded = vqkernels.fsq_indices_to_codes(idx.reshape(20, 25), levels)
        assert decoded.dtype == torch.float32 and decoded.shape == (20, 25, len(levels))
        assert torch.equal(bits(decoded.reshape(500, -1)), bits(codes))


def test_indices_to_codes_out_of_range_is_nan():
    levels = [4, 3]
    codes = vqkernels.fsq_indices_to_codes(torch.tensor([-1, 0, 11, 12, 100]), levels)
    assert torch.isnan(codes[[0, 3, 4]]).all() and not torch.isnan(codes[[1, 2]]).any()
    assert codes[1].tolist() == [-1.0, -1.0] and codes[2].tolist() == [0.5, 1.0]


@pytest.mark.parametrize("indices, levels, pattern", [
    (torch.tensor([0.0]), [4, 3], r"indices must be an integer tensor"),
    (torch.tensor([True]), [4, 3], r"indices must be an integer tensor"),
    (torch.tensor([0]), [], r"levels must not be empty"),
    (torch.tensor([0]), [4, 1], r"every level must be in \[2, 1000\]"),
])
def test_indices_to_codes_rejects(indices, levels, pattern):
    with pytest.raises(ValueError, match=pattern):
        vqkernels.fsq_indices_to_codes(indices, levels)


# ---------------------------------------------------------------------------------------
# gradient: straight-through through the bound


def bound_grad_truth(z, levels, grad):
    """(want, tol) [N, d] float64: grad * d(bounded / (L // 2))/dz = grad * (1 - tanh^2(z + shift)) *
    half_l / (L // 2), the straight-through gradient, and its tolerance. Each factor carries a few
    roundings of the compute dtype (1 - t^2 loses nothing beyond 2u absolute), plus the float32
    shift's 2 ulp: |error| <= |grad| half_l / hw (16 u + 2**-21 |shift|), and the rounding of
    the result to a half dtype."""
    half_l, _, shift, half_width = (torch.from_numpy(a) for a in bound_constants(levels))
    t = torch.tanh(z.double() + shift)
    want = grad.double() * (1 - t * t) * half_l / half_width
    tol = grad.double().abs() * half_l / half_width * (16 * unit_roundoff(compute_dtype(z)) + 2.0 ** -21 * shift.abs())
    if z.dtype in (torch.float16, torch.bfloat16):
        tol = tol + want.abs() * 2.0 ** -(11 if z.dtype == torch.float16 else 8)
    return want, tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_op_matches_float64_truth(impl, dtype, layout):
    levels = [8, 5, 4, 3, 1000]
    z = fsq_input(300, levels, seed=6, scale=1.5, dtype=dtype, layout=layout)
    grad = with_layout(torch.randn(300, 5, generator=gen(7)).to(dtype), layout)
    got = backward(impl)(grad, z, levels)
    assert got.dtype == dtype and got.shape == z.shape and got.is_contiguous()
    want, tol = bound_grad_truth(z, levels, grad)
    fail_rows(~((got.double() - want).abs() <= tol).all(1), "gradient", got=got, want=want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_is_straight_through(isa, dtype):
    """The op's autograd sends sum(codes * G)'s gradient through the bound only (rounding =
    identity); indices carry none. The straight-through gradient is not the derivative of the
    piecewise-constant codes, so torch.autograd.gradcheck does not apply: the float64 run is held
    to the float64 truth instead."""
    levels = [8, 5, 5, 5]
    z = fsq_input(100, levels, seed=8, dtype=dtype).requires_grad_()
    codes, indices = vqkernels.fsq_quantize(z, levels)
    assert not indices.requires_grad
    g = torch.randn(codes.shape, generator=gen(9)).to(dtype)
    (codes * g).sum().backward()
    want, tol = bound_grad_truth(z.detach(), levels, g)
    fail_rows(~((z.grad.double() - want).abs() <= tol).all(1), "gradient", got=z.grad, want=want)


def test_reference_backward_matches_op(isa):
    levels = [7, 6, 5]
    z = fsq_input(200, levels, seed=10, scale=2.0)
    g = torch.randn(200, 3, generator=gen(11))
    torch.testing.assert_close(torch.ops.vqkernels.fsq_quantize_backward(g, z, levels),
                               reference.fsq_quantize_backward(g, z, levels), rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# opcheck, bad inputs


def opcheck_samples():
    z = torch.randn(9, 4, generator=gen(12))
    return [
        pytest.param(z, id="f32"),
        pytest.param(z.clone().requires_grad_(), id="f32-grad"),
        pytest.param(z.double().requires_grad_(), id="f64-grad"),
        pytest.param(z.bfloat16(), id="bf16"),
        pytest.param(z.half().requires_grad_(), id="f16-grad"),
        pytest.param(with_layout(z, "strided"), id="strided"),
        pytest.param(z[:0], id="empty"),
    ]


@pytest.mark.parametrize("z", opcheck_samples())
def test_opcheck(z):
    opcheck("fsq_quantize", (z, [8, 5, 5, 5]))


@pytest.mark.parametrize("args", [
    pytest.param((torch.randn(9, 3), torch.randn(9, 3), [4, 5, 6]), id="f32"),
    pytest.param((torch.randn(9, 3).double(), torch.randn(9, 3).double(), [4, 5, 6]), id="f64"),
    pytest.param((torch.randn(9, 3).half(), torch.randn(9, 3).half(), [4, 5, 6]), id="f16"),
    pytest.param((with_layout(torch.randn(9, 3), "transposed"), torch.randn(9, 3), [4, 5, 6]), id="strided"),
])
def test_backward_opcheck(args):
    opcheck("fsq_quantize_backward", args)


Z = torch.randn(4, 3)
BAD = {
    "z-1d": (torch.randn(3), [4, 5, 6], r"\bz must be 2-D"),
    "z-3d": (torch.randn(2, 4, 3), [4, 5, 6], r"\bz must be 2-D"),
    "z-int": (Z.long(), [4, 5, 6], r"\bz must be float32, float16, bfloat16 or float64"),
    "z-complex": (Z.to(torch.complex64), [4, 5, 6], r"\bz must be float"),
    "d-mismatch": (Z, [4, 5], r"z has d=3 \(shape \(4, 3\)\) but there are 2 levels"),
    "levels-empty": (Z[:, :0], [], r"levels must not be empty"),
    "level-1": (Z, [4, 1, 6], r"every level must be in \[2, 1000\], got levels=\[4, 1, 6\]"),
    "level-0": (Z, [4, 0, 6], r"every level must be in \[2, 1000\]"),
    "level-negative": (Z, [-4, 5, 6], r"every level must be in \[2, 1000\]"),
    "level-1001": (Z, [4, 1001, 6], r"every level must be in \[2, 1000\]"),
    "product-overflow": (torch.randn(4, 7), [1000] * 7, r"product of the levels must be below 2\*\*63"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kind", IMPLS)
@pytest.mark.parametrize("case", BAD)
def test_rejects(case, kind, device):
    """Every backend (C++, reference, fake kernel on 'meta') rejects with the same message."""
    z, levels, pattern = BAD[case]
    if device == "meta" and kind == "reference":
        pytest.skip("the meta device runs the fake kernel, the same for both")
    with pytest.raises(ERRORS, match=pattern):
        IMPLS[kind](z.to(device), levels)


@pytest.mark.parametrize("kind", BACKWARD_IMPLS)
@pytest.mark.parametrize("grad, pattern", [
    (torch.randn(4, 2), r"grad_codes must have z's shape \(4, 3\), got \(4, 2\)"),
    (torch.ones(4, 3, dtype=torch.int32), r"grad_codes must be float"),
    (torch.randn(4, 3, device="meta"), r"grad_codes is on meta but z is on cpu"),
])
def test_backward_rejects(kind, grad, pattern):
    with pytest.raises(ERRORS, match=pattern):
        BACKWARD_IMPLS[kind](grad, Z, [4, 5, 6])


# ---------------------------------------------------------------------------------------
# residual_fsq_quantize: the levels of vector-quantize-pytorch's ResidualFSQ in one op

ALL_MODES = {"plain": {}, **MODES}


def residual_scales(levels, num_levels, dtype=torch.float32):
    """ResidualFSQ's scales: L ** -l per level l, float32 as there."""
    lv = torch.tensor(levels).float()
    return torch.stack([lv ** -level for level in range(num_levels)]).to(dtype)


def level_loop(z, scales, levels, **mode):
    """The residual levels as a loop over fsq_quantize in plain PyTorch (ResidualFSQ's own loop): (quantized,
    indices [N, Q]), and through autograd the gradient of the straight-through sum."""
    residual, out, indices = z.to(compute_dtype(z, scales)), 0.0, []
    for s in scales.to(residual.dtype):
        codes, idx = vqkernels.fsq_quantize(residual / s, levels, **mode)
        q = codes * s
        residual = residual - q.detach()
        out = out + q
        indices.append(idx)
    return out, torch.stack(indices, 1)


@st.composite
def residual_cases(draw):
    levels = draw(st.lists(st.integers(3, 12), min_size=1, max_size=6))
    return dict(n=draw(st.sampled_from([0, 1, 7, 33, draw(st.integers(0, 200))])), levels=levels,
                num_levels=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2 ** 31 - 1)),
                scale=draw(st.sampled_from([0.05, 1.0, 3.0])), mode=draw(st.sampled_from(list(ALL_MODES))),
                dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)))


@hyp_settings(40)
@given(case=residual_cases())
def test_residual_matches_the_level_loop_bitwise(isa, case):
    """Quantized and indices are those of the loop over fsq_quantize, bit for bit, for every mode, dtype and layout;
    the reference gives the same, and z is not modified."""
    levels, mode = case["levels"], ALL_MODES[case["mode"]]
    z = fsq_input(case["n"], levels, case["seed"], case["scale"], case["dtype"], case["layout"])
    scales = residual_scales(levels, case["num_levels"])
    saved = bits(z).clone()
    got = vqkernels.residual_fsq_quantize(z, scales, levels, **mode)
    assert torch.equal(bits(z), saved), "z was modified"
    want_q, want_i = level_loop(z, scales, levels, **mode)
    assert got[0].dtype == z.dtype and got[1].dtype == torch.int64 and got[1].shape == (case["n"], case["num_levels"])
    assert torch.equal(got[1], want_i)
    assert torch.equal(bits(got[0]), bits(want_q.to(z.dtype)))
    ref = reference.residual_fsq_quantize(z, scales, levels, **mode)
    if not mode.get("hard_clamp") and case["dtype"] != torch.float64:  # torch.tanh and the kernels' may differ by
        return                                                         # an ulp (see the module's docstring)
    assert torch.equal(ref[1], want_i) and torch.equal(bits(ref[0]), bits(got[0]))


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_residual_backward_matches_autograd_through_the_loop(isa, mode, dtype, layout):
    """The backward op's gradient is autograd's through the loop over fsq_quantize (each level's straight-through
    gradient, the residual's subtracted codes detached), to float32 rounding; with the hard clamp, where no tanh
    differs, the reference's is the op's bit for bit."""
    levels, mode_kw = [8, 5, 5, 5], ALL_MODES[mode]
    z = fsq_input(300, levels, seed=40, scale=1.5, dtype=dtype, layout=layout)
    scales = residual_scales(levels, 4)
    g = torch.randn(300, 4, generator=gen(41)).to(dtype)
    zl = z.detach().clone().requires_grad_()
    level_loop(zl, scales, levels, **mode_kw)[0].backward(g.to(compute_dtype(z)))
    got = torch.ops.vqkernels.residual_fsq_quantize_backward(g, z, scales, levels, **mode_kw)
    assert got.dtype == z.dtype and got.shape == z.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), zl.grad.double(), rtol=tol, atol=tol)
    ref = reference.residual_fsq_quantize_backward(g, z, scales, levels, **mode_kw)
    if mode_kw.get("hard_clamp"):
        assert torch.equal(bits(ref), bits(got))
    else:
        torch.testing.assert_close(ref, got, rtol=1e-5, atol=1e-6)
    zo = z.detach().clone().requires_grad_()
    vqkernels.residual_fsq_quantize(zo, scales, levels, **mode_kw)[0].backward(g)
    assert torch.equal(bits(zo.grad), bits(got)), "autograd does not run the backward op"


def test_residual_nan_rows_empty_and_no_levels(isa):
    """A row holding a NaN gets -1 at every level and a NaN output row, the others are untouched; no rows or no
    levels give empty indices (and zeros for no levels)."""
    levels = [8, 5, 5]
    z = fsq_input(20, levels, seed=42)
    z[3, 1] = float("nan")
    scales = residual_scales(levels, 3)
    q, idx = vqkernels.residual_fsq_quantize(z, scales, levels, True, True)
    assert (idx[3] == -1).all() and torch.isnan(q[3]).any() and (idx[torch.arange(20) != 3] >= 0).all()
    keep = torch.arange(20) != 3
    want = vqkernels.residual_fsq_quantize(z[keep], scales, levels, True, True)
    assert torch.equal(q[keep], want[0]) and torch.equal(idx[keep], want[1])
    q, idx = vqkernels.residual_fsq_quantize(z[:0], scales, levels)
    assert q.shape == (0, 3) and idx.shape == (0, 3)
    q, idx = vqkernels.residual_fsq_quantize(z, scales[:0], levels)
    assert torch.equal(q, torch.zeros_like(z)) and idx.shape == (20, 0)
    grad = torch.ops.vqkernels.residual_fsq_quantize_backward(torch.ones_like(z), z, scales[:0], levels)
    assert torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("z_dtype, scales_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                    (torch.float16, torch.float64)], ids=str)
def test_residual_mixed_dtypes_compute_in_float64(isa, z_dtype, scales_dtype):
    """A float64 z or float64 scales make the levels run in float64 (as the loop's promotion), the results in z's
    dtype: the op gives the reference's bits, forward and backward."""
    levels = [8, 5, 5, 5]
    z = fsq_input(200, levels, seed=60, scale=1.5, dtype=z_dtype)
    scales = residual_scales(levels, 3, scales_dtype)
    g = torch.randn(200, 4, generator=gen(61)).to(z_dtype)
    got, want = (vqkernels.residual_fsq_quantize(z, scales, levels, True, True),
                 reference.residual_fsq_quantize(z, scales, levels, True, True))
    assert got[0].dtype == z_dtype and torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1])
    assert torch.equal(got[1], level_loop(z.double(), scales.double(), levels, symmetric=True, hard_clamp=True)[1])
    grad = torch.ops.vqkernels.residual_fsq_quantize_backward(g, z, scales, levels, True, True)
    assert grad.dtype == z_dtype
    assert torch.equal(bits(grad), bits(reference.residual_fsq_quantize_backward(g, z, scales, levels, True, True)))


@pytest.mark.skipif(not ISAS, reason="the C++ kernels' ISA paths (the extension is not built)")
@pytest.mark.parametrize("levels", ISA_LEVELS[:4], ids=str)
@pytest.mark.parametrize("n", [1, 7, 16, 17, 33])
def test_residual_isas_agree_bitwise(levels, n):
    """Every ISA gives the same quantized, indices and gradients, tails and edge values included."""
    z, g = edge_input(n, len(levels), seed=50 + n), torch.randn(n, len(levels), generator=gen(51))
    scales = residual_scales(levels, 3)

    def outputs():
        outs = []
        for mode in ALL_MODES.values():
            for layout in ("contiguous", "offset"):
                outs += vqkernels.residual_fsq_quantize(with_layout(z, layout), scales, levels, **mode)
                outs.append(torch.ops.vqkernels.residual_fsq_quantize_backward(
                    with_layout(g, layout), with_layout(z, layout), scales, levels, **mode))
        return outs

    assert_isas_agree(outputs)


@pytest.mark.parametrize("z", opcheck_samples())
def test_residual_opcheck(z):
    opcheck("residual_fsq_quantize", (z, residual_scales([8, 5, 5, 5], 3), [8, 5, 5, 5], True, True))


@pytest.mark.parametrize("args", [
    pytest.param((torch.randn(9, 3), torch.randn(9, 3), residual_scales([4, 5, 6], 2), [4, 5, 6]), id="f32"),
    pytest.param((torch.randn(9, 3).double(), torch.randn(9, 3), residual_scales([4, 5, 6], 2), [4, 5, 6]),
                 id="f64-grad"),
    pytest.param((torch.randn(9, 3).half(), torch.randn(9, 3).half(), residual_scales([4, 5, 6], 2), [4, 5, 6], True,
                  True), id="f16"),
    pytest.param((torch.randn(9, 3), with_layout(torch.randn(9, 3), "transposed"),
                  residual_scales([4, 5, 6], 3, torch.float64), [4, 5, 6]), id="strided-f64-scales"),
])
def test_residual_backward_opcheck(args):
    opcheck("residual_fsq_quantize_backward", args)


RESIDUAL_IMPLS = {"op": torch.ops.vqkernels.residual_fsq_quantize, "reference": reference.residual_fsq_quantize}
SCALES = residual_scales([4, 5, 6], 2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kind", RESIDUAL_IMPLS)
@pytest.mark.parametrize("z, scales, levels, pattern", [
    (Z, SCALES[0], [4, 5, 6], r"scales must be 2-D \[num_levels, d=3\], got shape \(3,\)"),
    (Z, SCALES[:, :2], [4, 5, 6], r"scales must be 2-D \[num_levels, d=3\], got shape \(2, 2\)"),
    (Z, SCALES.int(), [4, 5, 6], r"scales must be float32, float16, bfloat16 or float64"),
    (Z, SCALES, [4, 5], r"z has d=3 \(shape \(4, 3\)\) but there are 2 levels"),
    (Z.long(), SCALES, [4, 5, 6], r"\bz must be float32"),
])
def test_residual_rejects(kind, device, z, scales, levels, pattern):
    """Every backend (C++, reference, fake kernel on 'meta') rejects with the same message."""
    if device == "meta" and kind == "reference":
        pytest.skip("the meta device runs the fake kernel, the same for both")
    with pytest.raises(ERRORS, match=pattern):
        RESIDUAL_IMPLS[kind](z.to(device), scales.to(device), levels)


def test_residual_rejects_mismatched_devices_and_grads():
    with pytest.raises(ERRORS, match=r"scales is on meta but z is on cpu"):
        torch.ops.vqkernels.residual_fsq_quantize(Z, SCALES.to("meta"), [4, 5, 6])
    with pytest.raises(ERRORS, match=r"grad_quantized must have z's shape \(4, 3\), got \(4, 2\)"):
        torch.ops.vqkernels.residual_fsq_quantize_backward(torch.randn(4, 2), Z, SCALES, [4, 5, 6])
    with pytest.raises(ValueError, match=r"scales get no gradient"):
        vqkernels.residual_fsq_quantize(Z, SCALES.clone().requires_grad_(), [4, 5, 6])
    with torch.no_grad():  # no gradient is taken: the scales' flag does not matter
        vqkernels.residual_fsq_quantize(Z, SCALES.clone().requires_grad_(), [4, 5, 6])
