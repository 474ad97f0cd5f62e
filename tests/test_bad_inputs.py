"""Invalid inputs raise an error naming the offending argument; the 'meta' device stands in
for a second device."""

import pytest
import torch

from vq_helpers import vqkernels

ERRORS = (ValueError, RuntimeError)

SEARCH_OPS = {
    "nearest_code": lambda x, codebook, metric: vqkernels.nearest_code(x, codebook, metric),
    "nearest_code_topk": lambda x, codebook, metric: vqkernels.nearest_code_topk(x, codebook, 1, metric),
    "vq_quantize": lambda x, codebook, metric: vqkernels.vq_quantize(x, codebook, metric),
}

X = torch.randn(4, 3)
CB = torch.randn(5, 3)

# id: (x, codebook, metric, pattern the message must match)
BAD_SEARCH = {
    "x-1d": (torch.randn(3), CB, "l2", r"\bx must be 2-D"),
    "x-3d": (torch.randn(2, 4, 3), CB, "l2", r"\bx must be 2-D"),
    "codebook-1d": (X, torch.randn(3), "l2", r"codebook must be 2-D"),
    "codebook-3d": (X, torch.randn(1, 5, 3), "l2", r"codebook must be 2-D"),
    "x-int64": (X.long(), CB, "l2", r"\bx must be float32, float16, bfloat16 or float64"),
    "x-int32": (X.int(), CB, "l2", r"\bx must be float"),
    "x-complex": (X.to(torch.complex64), CB, "l2", r"\bx must be float"),
    "codebook-int": (X, CB.int(), "l2", r"codebook must be float"),
    "codebook-complex": (X, CB.to(torch.complex128), "l2", r"codebook must be float"),
    "mismatched-D": (X, torch.randn(5, 4), "l2", r"x has D=3 .*codebook has D=4"),
    "codebook-other-device": (X, CB.to("meta"), "l2", r"x is on cpu but codebook is on meta"),
    "x-other-device": (X.to("meta"), CB, "l2", r"x is on meta but codebook is on cpu"),
    "empty-codebook": (X, torch.randn(0, 3), "l2", r"codebook is empty"),
    "unknown-metric": (X, CB, "l1", r"unknown metric 'l1'"),
    "metric-case": (X, CB, "L2", r"unknown metric 'L2'"),
}


@pytest.mark.parametrize("case", BAD_SEARCH)
@pytest.mark.parametrize("op", SEARCH_OPS)
def test_search_ops_reject(op, case):
    x, codebook, metric, pattern = BAD_SEARCH[case]
    with pytest.raises(ERRORS, match=pattern):
        SEARCH_OPS[op](x, codebook, metric)


@pytest.mark.parametrize("k", [0, -1, 6, 100])
def test_topk_rejects_k_outside_1_to_K(k):
    with pytest.raises(ERRORS, match=rf"\bk must be in \[1, K=5\], got k={k}"):
        vqkernels.nearest_code_topk(X, CB, k)


def test_topk_accepts_k_equal_K():
    assert vqkernels.nearest_code_topk(X, CB, 5)[0].shape == (4, 5)


def ema_args(**changes):
    args = dict(codebook=torch.randn(6, 3), cluster_size=torch.ones(6), embed_sum=torch.randn(6, 3),
                x=torch.randn(4, 3), indices=torch.tensor([0, 1, -1, 5]), decay=0.9, eps=1e-5)
    args.update(changes)
    return args


# id: (changed arguments, pattern the message must match)
BAD_EMA = {
    "codebook-1d": (dict(codebook=torch.randn(6)), r"codebook must be 2-D"),
    "codebook-int": (dict(codebook=torch.ones(6, 3, dtype=torch.int32)), r"codebook must be float"),
    "x-wrong-D": (dict(x=torch.randn(4, 2)), r"\bx must be 2-D \[N, D=3\]"),
    "x-1d": (dict(x=torch.randn(3)), r"\bx must be 2-D"),
    "x-complex": (dict(x=torch.randn(4, 3, dtype=torch.complex64)), r"\bx must be float"),
    "cluster_size-shape": (dict(cluster_size=torch.ones(5)), r"cluster_size must have shape \[K=6\]"),
    "embed_sum-shape": (dict(embed_sum=torch.randn(6, 4)), r"embed_sum must have shape \[K=6, D=3\]"),
    "buffers-half": (dict(cluster_size=torch.ones(6).half(), embed_sum=torch.randn(6, 3).half()),
                     r"cluster_size and embed_sum must both be float32 or both float64"),
    "buffers-mixed": (dict(embed_sum=torch.randn(6, 3).double()), r"cluster_size and embed_sum must both be"),
    "indices-int32": (dict(indices=torch.tensor([0, 1, -1, 5], dtype=torch.int32)), r"indices must be int64"),
    "indices-length": (dict(indices=torch.tensor([0, 1, 2])), r"indices must be 1-D of length N=4"),
    "indices-2d": (dict(indices=torch.zeros(4, 1, dtype=torch.int64)), r"indices must be 1-D"),
    "indices-K": (dict(indices=torch.tensor([0, 6, 1, 2])), r"indices must be in \[-1, K=6\)"),
    "indices-below-minus-one": (dict(indices=torch.tensor([0, 1, -2, 2])), r"indices must be in \[-1, K=6\)"),
    "x-other-device": (dict(x=torch.randn(4, 3, device="meta")), r"x is on meta but codebook is on cpu"),
    "embed_sum-other-device": (dict(embed_sum=torch.randn(6, 3, device="meta")),
                               r"embed_sum is on meta but codebook is on cpu"),
    "decay-above-1": (dict(decay=1.5), r"decay must be in \[0, 1\]"),
    "decay-negative": (dict(decay=-0.1), r"decay must be in \[0, 1\]"),
    "decay-nan": (dict(decay=float("nan")), r"decay must be in \[0, 1\]"),
    "eps-negative": (dict(eps=-1e-5), r"eps must be >= 0"),
}


@pytest.mark.parametrize("case", BAD_EMA)
def test_ema_update_rejects(case):
    changes, pattern = BAD_EMA[case]
    with pytest.raises(ERRORS, match=pattern):
        vqkernels.ema_update_(**ema_args(**changes))


def test_ema_update_accepts_the_base_arguments():
    """The base arguments of the cases above are valid: each failure is the changed argument's."""
    args = ema_args()
    vqkernels.ema_update_(**args)
    assert bool(torch.isfinite(args["codebook"]).all())
