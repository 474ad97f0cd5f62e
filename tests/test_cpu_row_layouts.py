"""The C++ CPU kernels read their row inputs in any layout (RowSource, csrc/cpu/search.h): in place when the rows
are contiguous in the compute type, else converted block by block, with loops of their own for rows of another
dtype and for rows that repeat one value (stride 0 along the features, as a mean's expanded gradient). Each layout
must give exactly the bits of the same values laid out contiguously."""

import pytest
import torch

from vq_helpers import vqkernels

pytestmark = pytest.mark.skipif(not vqkernels.compiled(), reason="the C++ kernels (the extension is not built)")

N, D = 37, 6  # 37 rows: a ragged vector tail


def _layouts(t):
    """Tensors of t's shape by layout: each row one value of t (stride 0 along the features), one value (strides
    0, 0), t in column-major storage, t as every other column of a wider tensor."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    return {"row-expanded": t[:, :1].expand(t.shape), "expanded": t[:1, :1].expand(t.shape),
            "transposed": t.t().contiguous().t(), "strided": wide[:, ::2]}


def _backward_cases():
    torch.manual_seed(0)
    z = torch.randn(N, D)
    logits = torch.randn(N, 8)
    e, t = torch.randn(N, D), torch.randn(N, D)
    cb, x = torch.randn(16, D), torch.randn(N, D)
    idx = torch.randint(0, 16, (N,))
    one = torch.tensor(1.0)
    ops = torch.ops.vqkernels_cpu
    return {
        # name: (the gradient's shape, call(gradient) -> tensor or tuple)
        "fsq_quantize_backward": ((N, D), lambda g: ops.fsq_quantize_backward(g, z, [8, 5, 5, 5, 4, 3], False, False)),
        "rotation_trick_backward": ((N, D), lambda g: ops.rotation_trick_backward(g, e, t)),
        "vq_quantize_backward": ((N, D), lambda g: ops.vq_quantize_backward(g, one, one, x, cb, idx)),
        "binary_one_hot_backward": ((N, 256), lambda g: ops.binary_one_hot_backward(g, logits)),
    }


CASES = _backward_cases()


@pytest.mark.parametrize("layout", ["row-expanded", "expanded", "transposed", "strided"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_backward_gradient_layouts_give_the_contiguous_bits(op, layout):
    shape, call = CASES[op]
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    laid = _layouts(g)[layout]
    want = call(laid.contiguous())
    got = call(laid)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b), f"{op}: a {layout} gradient changed the result"


@pytest.mark.parametrize("layout", ["row-expanded", "expanded", "transposed", "strided", "float16"])
def test_search_rows_layouts_give_the_contiguous_bits(layout):
    torch.manual_seed(2)
    x, cb = torch.randn(N, D), torch.randn(40, D)
    if layout == "float16":
        laid = x.half()  # rows of another dtype than the codebook's: converted (the search computes in float32)
        want = torch.ops.vqkernels_cpu.nearest_code(laid.float(), cb, "l2")
    else:
        laid = _layouts(x)[layout]
        want = torch.ops.vqkernels_cpu.nearest_code(laid.contiguous(), cb, "l2")
    got = torch.ops.vqkernels_cpu.nearest_code(laid, cb, "l2")
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
