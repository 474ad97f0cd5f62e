"""vqkernels.rotation_trick (Fifty et al. 2024) and vqkernels::rotation_trick_backward,
against vector-quantize-pytorch's own rotate_to (the installed package).

The tests run the op as dispatched (the C++ kernel when the extension is built) and the
pure-PyTorch reference called directly; the C++ backward's ISA paths (one body, compiled per ISA
without fused multiply-adds) must agree bit for bit.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

from vq_helpers import (DTYPES, LAYOUTS, as_input, bits, compute_dtype, fail_rows, forced_cpu_isa, gen, hyp_settings,
                        opcheck, reference, run_without_extension, vqkernels)

EPS = 1e-6  # vector-quantize-pytorch's l2norm and safe_div
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FORWARD_IMPLS = {"op": torch.ops.vqkernels.rotation_trick, "reference": reference.rotation_trick}
BACKWARD_IMPLS = {"op": torch.ops.vqkernels.rotation_trick_backward,
                  "reference": reference.rotation_trick_backward}


@pytest.fixture(params=list(FORWARD_IMPLS))
def forward_impl(request):
    return FORWARD_IMPLS[request.param]


@pytest.fixture(params=list(BACKWARD_IMPLS))
def backward_impl(request):
    return BACKWARD_IMPLS[request.param]


def regular_rows(n, d, seed):
    """float64 (src, tgt, grad) [n, d]: random rows of assorted norms."""
    g = gen(seed)
    src = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 4
    tgt = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    return src, tgt, torch.randn(n, d, generator=g, dtype=torch.float64)


def edge_rows(d, seed):
    """float64 (src, tgt, grad) [7, d] where vector-quantize-pytorch's clamps act or nearly
    do: src = 0, |src| < 1e-6, tgt = 0, |tgt| < 1e-6, tgt = -3 src (opposite: u + q = 0),
    tgt = 2 src (parallel), src = tgt."""
    src, tgt, grad = regular_rows(7, d, seed)
    src[0] = 0.0
    src[1] *= 1e-8 / src[1].norm()
    tgt[2] = 0.0
    tgt[3] *= 1e-8 / tgt[3].norm()
    tgt[4] = -3.0 * src[4]
    tgt[5] = 2.0 * src[5]
    tgt[6] = src[6]
    return src, tgt, grad


def vq_pytorch_grad(src, tgt, grad):
    """(src.grad, tgt.grad, value) of sum(rotate_to(src, tgt) * grad) by autograd."""
    s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    out = rotate_to(s, t)
    (out * grad).sum().backward()
    return s.grad, t.grad, out.detach()


def rotation_truth(src, tgt, grad):
    """float64 grad_src written out with the explicit D x D map: the row e goes to
    s e R with R = I - 2 w w^T + 2 u q^T, so grad_src = s grad R^T."""
    e, t, g = src.double(), tgt.double(), grad.double()
    u = e / e.norm(dim=1, keepdim=True).clamp_min(EPS)
    q = t / t.norm(dim=1, keepdim=True).clamp_min(EPS)
    v = u + q
    w = v / v.norm(dim=1, keepdim=True).clamp_min(EPS)
    eye = torch.eye(e.shape[1], dtype=torch.float64)
    r = eye - 2 * w.unsqueeze(2) * w.unsqueeze(1) + 2 * u.unsqueeze(2) * q.unsqueeze(1)  # [N, D, D]
    s = t.norm(dim=1) / e.norm(dim=1).clamp_min(EPS)
    return s.unsqueeze(1) * torch.einsum("nj,nij->ni", g, r), r, u, q


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("transposed", "strided"), ("offset", "contiguous")])
@pytest.mark.parametrize("dtypes", [(t, t) for t in DTYPES] + [(torch.float32, torch.bfloat16)], ids=str)
def test_forward_is_tgt(forward_impl, dtypes, layouts):
    """The value is tgt itself: a contiguous copy in tgt's dtype, bitwise."""
    src64, tgt64, _ = regular_rows(13, 6, seed=1)
    src, tgt = as_input(src64, dtypes[0], layouts[0]), as_input(tgt64, dtypes[1], layouts[1])
    out = forward_impl(src, tgt)
    assert out.dtype == tgt.dtype and out.shape == tgt.shape and out.is_contiguous()
    assert out.data_ptr() != tgt.data_ptr(), "the result must not alias tgt"
    assert bits(out).equal(bits(tgt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_matches_vq_pytorch_up_to_rounding(dtype):
    """vector-quantize-pytorch recomputes the value, s (e - 2 (e.w) w + 2 (e.u) q): tgt up to
    rounding, within 8 (D + 4) u |tgt| per row (the map's products and sums of D terms). Where
    its clamps act (src = 0 or |src| < 1e-6) its value is not tgt; ours still is."""
    d = 24
    src, tgt, _ = (t.to(dtype) for t in regular_rows(200, d, seed=2))
    theirs = rotate_to(src, tgt)
    ours = vqkernels.rotation_trick(src, tgt)
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    tol = 8 * (d + 4) * u * tgt.double().norm(dim=1)
    err = (theirs.double() - ours.double()).abs().max(1).values
    fail_rows(err > tol, "rotate_to's value is not tgt up to rounding", err=err, tol=tol)
    assert bool((err > 0).any()), "expected some rounding difference (else this test measures nothing)"
    src, tgt, _ = (t.to(dtype) for t in edge_rows(d, seed=3))
    theirs = rotate_to(src, tgt)
    assert bool(theirs[0].eq(0).all()) and not bool(torch.allclose(theirs[1], tgt[1])), \
        "documented deviation: rotate_to's value for |src| < 1e-6"
    assert bits(vqkernels.rotation_trick(src, tgt)).equal(bits(tgt))


@pytest.mark.parametrize("d", [1, 3, 16, 50])
@pytest.mark.parametrize("rows", ["regular", "edge"])
def test_gradient_matches_vq_pytorch_float64(rows, d):
    """float64: src's gradient through the op equals autograd through rotate_to, also where
    the clamps act; tgt gets none from either (its .grad stays None)."""
    src, tgt, grad = regular_rows(37, d, seed=4) if rows == "regular" else edge_rows(d, seed=5)
    want_src, want_tgt, _ = vq_pytorch_grad(src, tgt, grad)
    s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    (vqkernels.rotation_trick(s, t) * grad).sum().backward()
    assert want_tgt is None and t.grad is None
    scale = want_src.abs().max(1, keepdim=True).values.clamp_min(1e-300)
    fail_rows(((s.grad - want_src).abs() > 1e-12 * scale).any(1), "grad_src differs from rotate_to's",
              got=s.grad, want=want_src)


def test_backward_op_matches_vq_pytorch(backward_impl):
    """The backward op called directly (the op's kernel and the reference), regular and edge rows."""
    src = torch.cat([regular_rows(40, 9, seed=6)[0], edge_rows(9, seed=7)[0]])
    tgt = torch.cat([regular_rows(40, 9, seed=6)[1], edge_rows(9, seed=7)[1]])
    grad = torch.cat([regular_rows(40, 9, seed=6)[2], edge_rows(9, seed=7)[2]])
    want, _, _ = vq_pytorch_grad(src, tgt, grad)
    got = backward_impl(grad, src, tgt)
    assert got.dtype == src.dtype and got.shape == src.shape
    scale = want.abs().max(1, keepdim=True).values.clamp_min(1e-300)
    fail_rows(((got - want).abs() > 1e-12 * scale).any(1), "grad_src differs from rotate_to's", got=got, want=want)


def test_gradient_is_a_scaled_rotation():
    """Independent of vector-quantize-pytorch: on regular rows R maps u to q and is
    orthogonal, so |grad_src| = s |grad|; and grad_src = s grad R^T with R written out."""
    src, tgt, grad = regular_rows(30, 7, seed=8)
    want, r, u, q = rotation_truth(src, tgt, grad)
    torch.testing.assert_close(torch.einsum("ni,nij->nj", u, r), q, rtol=0, atol=1e-14)
    eye = torch.eye(7, dtype=torch.float64).expand(30, 7, 7)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, rtol=0, atol=1e-14)
    out = torch.ops.vqkernels.rotation_trick_backward(grad, src, tgt)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=1), tgt.norm(dim=1) / src.norm(dim=1) * grad.norm(dim=1), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
                                    (torch.float32, torch.float64, torch.float16)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_in_other_dtypes_and_layouts(backward_impl, dtypes, layout):
    """(grad, src, tgt) in the given dtypes and layouts: the float64 truth of the rounded
    inputs, within the output dtype's tolerance (the kernel works in double)."""
    src64, tgt64, grad64 = regular_rows(50, 11, seed=9)
    grad, src, tgt = (as_input(t, dt, layout) for t, dt in zip((grad64, src64, tgt64), dtypes))
    got = backward_impl(grad, src, tgt)
    assert got.dtype == src.dtype and got.is_contiguous()
    want, _, _, _ = rotation_truth(src, tgt, grad)
    rtol = max(GRAD_RTOL[src.dtype], GRAD_RTOL[compute_dtype(grad, src, tgt)])
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


@hyp_settings(30)
@given(n=st.integers(0, 120), d=st.integers(1, 70), dtypes=st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3),
       layouts=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3), seed=st.integers(0, 2 ** 31 - 1))
def test_random_shapes(forward_impl, backward_impl, n, d, dtypes, layouts, seed):
    """Random shapes, dtypes and layouts: the value is tgt, the gradient the float64 truth."""
    grad, src, tgt = (as_input(t, dt, layout)
                      for t, dt, layout in zip(regular_rows(n, d, seed)[::-1], dtypes, layouts))
    assert bits(forward_impl(src, tgt)).equal(bits(tgt.contiguous()))
    got = backward_impl(grad, src, tgt)
    want, _, _, _ = rotation_truth(src, tgt, grad)
    rtol = max(GRAD_RTOL[src.dtype], GRAD_RTOL[compute_dtype(grad, src, tgt)])
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()) if n else 0.0)


ISAS = ["avx512", "avx2", "portable"] if vqkernels.compiled() else []


@pytest.mark.skipif(not ISAS, reason="the C++ kernels' ISA paths (the extension is not built)")
@pytest.mark.parametrize("d", [1, 7, 8, 9, 17, 64, 70])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float64,) * 3, (torch.float16,) * 3,
                                    (torch.float32, torch.float64, torch.bfloat16)], ids=str)
def test_isas_agree_bitwise(d, dtypes):
    """Every ISA path gives the portable path's bits (the vector loops' tails at every d, the clamped edge rows
    included), and the float64 truth within the dtype's tolerance."""
    src64, tgt64, grad64 = (torch.cat(pair) for pair in zip(regular_rows(40, d, seed=d), edge_rows(d, seed=d)))
    grad, src, tgt = (t.to(dt) for t, dt in zip((grad64, src64, tgt64), dtypes))
    results = {}
    for isa in ISAS:
        with forced_cpu_isa(isa):
            results[isa] = torch.ops.vqkernels.rotation_trick_backward(grad, src, tgt)
    for isa, got in results.items():
        assert torch.equal(bits(got), bits(results["portable"])), f"{isa} differs from portable"
    want, _, _, _ = rotation_truth(src, tgt, grad)
    rtol = max(GRAD_RTOL[src.dtype], GRAD_RTOL[compute_dtype(grad, src, tgt)])
    regular = slice(0, 40)  # the edge rows' gradients are ill-conditioned: bitwise agreement only
    torch.testing.assert_close(results["portable"][regular].double(), want[regular], rtol=rtol,
                               atol=rtol * float(want[regular].abs().max()))


def test_nan_rows(backward_impl):
    """A NaN in a row of src or tgt: that row's gradient is NaN, the others are untouched;
    the value is tgt, NaN included."""
    src, tgt, grad = regular_rows(6, 4, seed=10)
    src[1, 2] = float("nan")
    tgt[4, 0] = float("nan")
    got = backward_impl(grad, src, tgt)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[1, 4]] = True
    assert bool(torch.isnan(got[bad]).all()) and bool(torch.isfinite(got[~bad]).all())
    want, _, _ = vq_pytorch_grad(src[~bad], tgt[~bad], grad[~bad])
    torch.testing.assert_close(got[~bad], want, rtol=1e-12, atol=1e-12)
    assert bits(vqkernels.rotation_trick(src, tgt)).equal(bits(tgt))


def test_empty(forward_impl, backward_impl):
    src = torch.empty(0, 5)
    assert forward_impl(src, src).shape == (0, 5)
    assert backward_impl(src, src, src).shape == (0, 5)


def opcheck_samples():
    src, tgt, _ = (t.float() for t in regular_rows(9, 5, seed=11))
    return [
        pytest.param((src, tgt), id="f32"),
        pytest.param((src.clone().requires_grad_(), tgt.clone().requires_grad_()), id="f32-grad"),
        pytest.param((src.double().requires_grad_(), tgt.double()), id="f64-grad-src"),
        pytest.param((src.half().requires_grad_(), tgt.bfloat16()), id="f16-bf16"),
        pytest.param((src.t().contiguous().t(), tgt[:, :]), id="strided"),
        pytest.param((src[:0], tgt[:0]), id="empty"),
    ]


@pytest.mark.parametrize("args", opcheck_samples())
def test_opcheck(args):
    opcheck("rotation_trick", args)


@pytest.mark.parametrize("args", opcheck_samples())
def test_backward_opcheck(args):
    src, tgt = (a.detach() for a in args)
    opcheck("rotation_trick_backward", (torch.randn(src.shape, generator=gen(12)).to(tgt.dtype), src, tgt))


S = torch.randn(4, 3)

# id: (src, tgt, pattern the message must match)
BAD = {
    "src-1d": (torch.randn(3), torch.randn(3), r"src must be 2-D \[N, D\]"),
    "src-3d": (torch.randn(2, 4, 3), torch.randn(2, 4, 3), r"src must be 2-D \[N, D\]"),
    "tgt-shape": (S, torch.randn(4, 2), r"tgt must have src's shape \(4, 3\), got \(4, 2\)"),
    "src-int": (S.long(), S, r"src must be float32, float16, bfloat16 or float64"),
    "tgt-complex": (S, S.to(torch.complex64), r"tgt must be float"),
    "tgt-other-device": (S, S.to("meta"), r"src is on cpu but tgt is on meta"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(forward_impl, case):
    src, tgt, pattern = BAD[case]
    with pytest.raises(ValueError, match=r"vqkernels\.rotation_trick: " + pattern):
        forward_impl(src, tgt)


@pytest.mark.parametrize("case", list(BAD) + ["grad-shape", "grad-int"])
def test_backward_bad_inputs(backward_impl, case):
    if case == "grad-shape":
        src, tgt, grad, pattern = S, S, torch.randn(4, 2), r"grad must have src's shape \(4, 3\), got \(4, 2\)"
    elif case == "grad-int":
        src, tgt, grad, pattern = S, S, S.int(), r"grad must be float"
    else:
        src, tgt, pattern = BAD[case]
        grad = S
    with pytest.raises(ValueError, match=r"vqkernels\.rotation_trick_backward: " + pattern):
        backward_impl(grad, src, tgt)


def test_runs_on_the_reference_without_the_extension():
    run_without_extension("""
import torch, vqkernels
assert vqkernels.backend("rotation_trick", "cpu").startswith("reference")
src = torch.randn(6, 5, requires_grad=True)
tgt = torch.randn(6, 5)
out = vqkernels.rotation_trick(src, tgt)
out.sum().backward()
assert torch.equal(out, tgt) and src.grad is not None
print("ok")
""")
