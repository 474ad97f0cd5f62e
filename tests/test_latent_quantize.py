"""vqkernels.latent_quantize: every value snaps to the nearest of its dimension's own values, the first minimum of
|z - value| as torch.argmin picks it (vector-quantize-pytorch's LatentQuantize search), its gradient, opcheck and
bad inputs. The C++ kernel and the reference are both checked against a float64 truth written out here."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import DTYPES, LAYOUTS, bits, compute_dtype, gen, hyp_settings, opcheck, reference, vqkernels, with_layout

ERRORS = (ValueError, RuntimeError)
IMPLS = {"op": vqkernels.latent_quantize, "reference": reference.latent_quantize}


def truth(z, values, levels):
    """(codes, positions, indices) by a plain loop over every value: the first value of least |z - v| in the
    compute dtype, NaN distances first (torch.argmin), -1 / NaN codes for a NaN z."""
    dt = compute_dtype(z, values)
    zs, v = z.to(dt).tolist(), values.to(dt)
    n, d = z.shape
    codes, positions, indices = torch.empty(n, d, dtype=dt), torch.empty(n, d, dtype=torch.int64), []
    starts = [sum(levels[:j]) for j in range(d)]
    for r in range(n):
        index = 0
        for j in range(d):
            if math.isnan(zs[r][j]):
                positions[r, j], codes[r, j], index = -1, float("nan"), None
                continue
            own = v[starts[j]:starts[j] + levels[j]]
            dist = (torch.tensor(zs[r][j], dtype=dt) - own).abs()
            nan = torch.isnan(dist).nonzero()
            p = int(nan[0]) if len(nan) else int((dist == dist.min()).nonzero()[0])
            positions[r, j], codes[r, j] = p, own[p]
            index = None if index is None else index + p * math.prod(levels[:j])
        indices.append(-1 if index is None else index)
    return codes, positions, torch.tensor(indices, dtype=torch.int64)


def table(levels, seed, dtype=torch.float32, sort=True):
    """Random values per dimension (sorted or not), one after another."""
    parts = [torch.randn(lv, generator=gen(seed + j), dtype=torch.float64) for j, lv in enumerate(levels)]
    return torch.cat([p.sort().values if sort else p for p in parts]).to(dtype)


@st.composite
def cases(draw):
    levels = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    return dict(n=draw(st.sampled_from([0, 1, 7, 33, draw(st.integers(0, 300))])), levels=levels,
                seed=draw(st.integers(0, 2 ** 31 - 1)), scale=draw(st.sampled_from([0.05, 1.0, 30.0])),
                dtype=draw(st.sampled_from(DTYPES)), values_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                sort=draw(st.booleans()), layout=draw(st.sampled_from(LAYOUTS)))


@pytest.mark.parametrize("impl", IMPLS)
@hyp_settings(40)
@given(case=cases())
def test_matches_float64_truth(impl, case):
    levels = case["levels"]
    z = torch.randn(case["n"], len(levels), generator=gen(case["seed"]), dtype=torch.float64) * case["scale"]
    z = with_layout(z.to(case["dtype"]), case["layout"])
    values = table(levels, case["seed"] + 1, case["values_dtype"], case["sort"])
    got = IMPLS[impl](z, values, levels)
    want = truth(z, values, levels)
    assert [t.dtype for t in got] == [want[0].dtype, torch.int64, torch.int64]
    for g, w in zip(got, want):
        assert torch.equal(bits(g), bits(w))


def test_ties_nan_inf_and_special_values():
    """Ties go to the earlier value, a NaN z gives -1 (its row index -1) and a NaN code, an infinite z the first
    value (every distance infinite), a NaN value wins where it sits (torch.argmin) and an infinite one meets an
    infinite z with a NaN distance: the op, the reference and theirs' argmin agree on all of them."""
    levels = [4, 3]
    values = torch.tensor([-1.0, 0.0, 1.0, 0.0, float("inf"), -2.0, 2.0])
    z = torch.tensor([[0.5, 0.0], [-0.5, 2.0], [float("nan"), 1.0], [float("inf"), float("inf")],
                      [-float("inf"), 5.0]])
    for impl in IMPLS.values():
        codes, positions, indices = impl(z, values, levels)
        assert positions.tolist() == [[1, 1], [0, 2], [-1, 2], [0, 0], [0, 2]]
        assert indices.tolist() == [5, 8, -1, 0, 8]
        assert torch.isnan(codes[2, 0]) and codes[0].tolist() == [0.0, -2.0]
        for j, (start, count) in enumerate(((0, 4), (4, 3))):  # theirs: argmin of abs(z - values)
            want = (z[:, j, None] - values[start:start + count]).abs().argmin(1)
            assert torch.equal(positions[:, j].masked_fill(z[:, j].isnan(), 0), want)
    with_nan = torch.tensor([-1.0, float("nan"), 1.0])
    for impl in IMPLS.values():
        assert impl(torch.tensor([[0.9], [-3.0]]), with_nan, [3])[1].tolist() == [[1], [1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_reaches_the_chosen_values(dtype):
    """z gets no gradient (the codes are piecewise constant in it); each value gets the summed gradient of the codes
    that chose it: gradcheck in float64, and autograd against the one-hot sum."""
    levels = [3, 4]
    values = torch.tensor([-1.0, 0.0, 1.0, -2.0, -0.5, 0.5, 2.0], dtype=dtype, requires_grad=True)
    z = torch.randn(50, 2, generator=gen(3), dtype=dtype) * 1.5
    z[7, 1] = float("nan")
    codes, positions, _ = vqkernels.latent_quantize(z, values, levels)
    g = torch.randn(50, 2, generator=gen(4), dtype=dtype)
    (codes.nan_to_num(0.0) * g).sum().backward()
    want = torch.zeros(7, dtype=dtype)
    for j, start in enumerate((0, 3)):
        keep = positions[:, j] >= 0
        want.index_add_(0, positions[keep, j] + start, g[keep, j])
    torch.testing.assert_close(values.grad, want)
    if dtype == torch.float64:
        zc = z[:7]  # no NaN: a perturbation of 1e-6 changes no choice
        assert torch.autograd.gradcheck(lambda v: vqkernels.latent_quantize(zc, v, levels)[0], (values,))
    zg = z.clone().requires_grad_()
    vqkernels.latent_quantize(zg, values.detach(), levels)[0].nan_to_num(0.0).sum().backward()
    assert zg.grad is None or torch.equal(zg.grad, torch.zeros_like(zg))


def test_empty_and_large_indices():
    codes, positions, indices = vqkernels.latent_quantize(torch.empty(0, 3), torch.zeros(6), [1, 2, 3])
    assert codes.shape == (0, 3) and positions.shape == (0, 3) and indices.shape == (0,)
    levels = [1000] * 6  # 10**18 codes: the index stays exact in int64
    z = torch.full((1, 6), 10.0)
    assert vqkernels.latent_quantize(z, torch.linspace(-1, 1, 1000).repeat(6), levels)[2].item() == 10 ** 18 - 1


def opcheck_samples():
    z, values = torch.randn(9, 3, generator=gen(12)), table([4, 5, 3], 13)
    return [
        pytest.param((z, values), id="f32"),
        pytest.param((z, values.clone().requires_grad_()), id="f32-grad"),
        pytest.param((z.double(), values.double().requires_grad_()), id="f64-grad"),
        pytest.param((z.bfloat16(), values), id="bf16"),
        pytest.param((with_layout(z, "strided"), values.half()), id="strided-f16-values"),
        pytest.param((z[:0], values), id="empty"),
    ]


@pytest.mark.parametrize("args", opcheck_samples())
def test_opcheck(args):
    opcheck("latent_quantize", (*args, [4, 5, 3]))


Z, VALUES = torch.randn(4, 3), torch.zeros(12)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kind", IMPLS)
@pytest.mark.parametrize("z, values, levels, pattern", [
    (Z, VALUES, [], r"levels must not be empty"),
    (Z, VALUES, [4, 0, 8], r"every level must be at least 1, got levels=\[4, 0, 8\]"),
    (torch.randn(4, 7), torch.zeros(7000), [1000] * 7, r"product of the levels must be below 2\*\*63"),
    (torch.randn(3), VALUES, [4, 4, 4], r"\bz must be 2-D"),
    (Z.long(), VALUES, [4, 4, 4], r"\bz must be float32"),
    (Z, VALUES, [6, 6], r"z has d=3 \(shape \(4, 3\)\) but there are 2 levels"),
    (Z, torch.zeros(11), [4, 4, 4], r"values must be 1-D holding sum\(levels\)=12 values, got shape \(11,\)"),
    (Z, torch.zeros(3, 4), [4, 4, 4], r"values must be 1-D holding sum\(levels\)=12 values, got shape \(3, 4\)"),
    (Z, VALUES.int(), [4, 4, 4], r"values must be float32, float16, bfloat16 or float64"),
])
def test_rejects(kind, device, z, values, levels, pattern):
    """Every backend (C++, reference, fake kernel on 'meta') rejects with the same message."""
    if device == "meta" and kind == "reference":
        pytest.skip("the meta device runs the fake kernel, the same for both")
    with pytest.raises(ERRORS, match=pattern):
        IMPLS[kind](z.to(device), values.to(device), levels)


def test_rejects_values_on_another_device():
    with pytest.raises(ERRORS, match=r"values is on meta but z is on cpu"):
        vqkernels.latent_quantize(Z, VALUES.to("meta"), [4, 4, 4])
