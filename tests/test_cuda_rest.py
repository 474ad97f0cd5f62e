"""The CUDA C++ kernels of ema_update_, lfq_entropy, residual_quantize and multiscale_quantize_step
(and their backwards), called directly as torch.ops.vqkernels_cuda.<op> on CUDA tensors, against
vqkernels.reference.<op> run on CPU float64 copies of the same values (skipped without CUDA).

The kernels compute in float32 (half inputs accumulate in float32), so the reference on the exact
float64 values of the inputs differs only by float32 rounding: the tolerances below. Discrete
outputs (indices) are compared exactly on data whose choices are well separated, or checked to be
a nearest code within the float32 tolerance where ties cannot be ruled out.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from vq_helpers import opcheck, reference, vqkernels  # noqa: F401  (vqkernels: loads the extension)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_op(name):
    return getattr(torch.ops.vqkernels_cuda, name)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tol(dtype):
    """Tolerance of a float32-computed result stored in dtype, against the float64 truth."""
    return {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]


def close(actual, expected, dtype=None, **kw):
    """actual (CUDA, any dtype) against expected (CPU float64), NaNs in the same places."""
    opts = dict(tol(dtype or actual.dtype), **kw)
    torch.testing.assert_close(actual.cpu().double(), expected.double(), equal_nan=True, check_dtype=False, **opts)


def bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.cpu().view(-1).view(torch.uint8) if a.dtype != torch.int64 else a.cpu(),
                       b.cpu().view(-1).view(torch.uint8) if b.dtype != torch.int64 else b.cpu())


@contextlib.contextmanager
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def f64(t):
    return t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu()


# ---------------------------------------------------------------------------------------
# ema_update_


def ema_state(n, k, d, seed, cb_dtype=torch.float32, x_dtype=torch.float32, buf_dtype=torch.float32):
    g = gen(seed)
    codebook = torch.randn(k, d, generator=g).to(cb_dtype)
    cluster_size = (torch.rand(k, generator=g) * 5).to(buf_dtype)
    embed_sum = torch.randn(k, d, generator=g).to(buf_dtype)
    x = torch.randn(n, d, generator=g).to(x_dtype)
    indices = torch.randint(-1, k, (n,), generator=g)
    return codebook, cluster_size, embed_sum, x, indices


def run_ema_cuda(state, decay, eps):
    cb, cs, es, x, idx = (t.to(DEV, copy=True) for t in state)  # the state itself stays for the reference
    cuda_op("ema_update_")(cb, cs, es, x, idx, decay, eps)
    return cb, cs, es


def run_ema_reference(state, decay, eps):
    cb, cs, es, x, idx = (f64(t) for t in state)
    reference.ema_update_(cb, cs, es, x, idx, decay, eps)
    return cb, cs, es


def check_ema(state, decay=0.9, eps=1e-5):
    cb, cs, es = run_ema_cuda(state, decay, eps)
    rcb, rcs, res = run_ema_reference(state, decay, eps)
    close(cs, rcs)
    close(es, res, atol=1e-4)  # float atomics: sums of many rows in any order
    close(cb, rcb, atol=tol(cb.dtype)["atol"] + 1e-4)
    assert cb.dtype == state[0].dtype and cs.dtype == state[1].dtype


@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("x_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,k,d", [(0, 5, 3), (1, 1, 1), (7, 5, 3), (1000, 37, 19), (4096, 512, 64)])
def test_ema_matches_reference(cb_dtype, x_dtype, n, k, d):
    check_ema(ema_state(n, k, d, seed=n + k + d, cb_dtype=cb_dtype, x_dtype=x_dtype))


@pytest.mark.parametrize("decay,eps", [(0.0, 1e-5), (1.0, 1e-5), (0.99, 0.0), (0.5, 1.0)])
def test_ema_decay_eps(decay, eps):
    check_ema(ema_state(300, 17, 8, seed=3), decay, eps)


def test_ema_strided_state():
    cb, cs, es, x, idx = ema_state(200, 11, 6, seed=4)
    big_cb = torch.full((11, 12), float("nan"))
    big_cb[:, ::2] = cb
    state = (cb, cs, es, x, idx)
    cbd, csd, esd, xd, idxd = (t.to(DEV, copy=True) for t in (big_cb, cs, es.t().contiguous(), x.t().contiguous(), idx))
    cb_view, es_view, x_view = cbd[:, ::2], esd.t(), xd.t()
    cuda_op("ema_update_")(cb_view, csd, es_view, x_view, idxd, 0.9, 1e-5)
    rcb, rcs, res = run_ema_reference(state, 0.9, 1e-5)
    close(cb_view, rcb, atol=1e-4)
    close(csd, rcs)
    close(es_view, res, atol=1e-4)
    assert torch.isnan(cbd[:, 1::2]).all()  # the padding is untouched


def test_ema_nan_row():
    state = ema_state(50, 6, 4, seed=5)
    state[3][7, 2] = float("nan")
    state[4][7] = 2
    cb, _, es = run_ema_cuda(state, 0.9, 1e-5)
    rcb, _, res = run_ema_reference(state, 0.9, 1e-5)
    assert torch.isnan(cb[2, 2]) and torch.isnan(es[2, 2])  # only that column of that code
    assert not torch.isnan(cb[:, [0, 1, 3]]).any()
    close(es, res, atol=1e-4)
    close(cb, rcb, atol=1e-4)


def test_ema_deterministic_bitwise():
    state = ema_state(5000, 64, 32, seed=6, x_dtype=torch.bfloat16)
    with deterministic():
        first = run_ema_cuda(state, 0.9, 1e-5)
        again = run_ema_cuda(state, 0.9, 1e-5)
    for a, b in zip(first, again):
        bitwise_equal(a, b)
    rcb, rcs, res = run_ema_reference(state, 0.9, 1e-5)
    close(first[1], rcs)
    close(first[2], res, atol=1e-4)
    close(first[0], rcb, atol=1e-4)


def test_ema_float64_delegates():
    state = ema_state(100, 9, 5, seed=7, cb_dtype=torch.float64, x_dtype=torch.float64, buf_dtype=torch.float64)
    cb, cs, es = run_ema_cuda(state, 0.8, 1e-5)
    rcb, rcs, res = run_ema_reference(state, 0.8, 1e-5)
    for a, b in ((cb, rcb), (cs, rcs), (es, res)):
        close(a, b)


@pytest.mark.parametrize("bad", [5, -2, 1 << 40])
def test_ema_bad_index_raises_and_leaves_state(bad):
    cb, cs, es, x, idx = (t.to(DEV) for t in ema_state(20, 5, 3, seed=8))
    idx[11] = bad
    before = [t.clone() for t in (cb, cs, es)]
    message = r"vqkernels\.ema_update_: indices must be in \[-1, K=5\), got values outside it"  # the reference's
    with pytest.raises(ValueError, match=message):
        cuda_op("ema_update_")(cb, cs, es, x, idx, 0.9, 1e-5)
    for a, b in zip((cb, cs, es), before):
        assert torch.equal(a, b)


def test_ema_bad_arguments():
    cb, cs, es, x, idx = (t.to(DEV) for t in ema_state(20, 5, 3, seed=9))
    op = cuda_op("ema_update_")
    with pytest.raises(ValueError, match="cluster_size and embed_sum must both be float32 or both float64"):
        op(cb, cs.half(), es, x, idx, 0.9, 1e-5)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        op(cb, cs, es, x, idx, 1.5, 1e-5)
    with pytest.raises(ValueError, match=r"x must be 2-D \[N, D=3\]"):
        op(cb, cs, es, x[:, :2], idx, 0.9, 1e-5)
    with pytest.raises(ValueError, match="indices must be int64"):
        op(cb, cs, es, x, idx.int(), 0.9, 1e-5)
    with pytest.raises(ValueError, match="x is on cpu"):
        op(cb, cs, es, x.cpu(), idx, 0.9, 1e-5)


@pytest.mark.parametrize("n", [0, 30])
def test_ema_opcheck(n):
    opcheck(cuda_op("ema_update_").default, (*(t.to(DEV) for t in ema_state(n, 8, 5, seed=10, cb_dtype=torch.bfloat16)),
                                 0.9, 1e-5))


# ---------------------------------------------------------------------------------------
# residual_quantize


def rq_data(n, d, levels, k, seed, shared=False, x_dtype=torch.float32, cb_dtype=torch.float32):
    """Hierarchical data: level l's codes scaled by 10**-l and x = a sum of one code per level
    plus noise far below the last level's code spacing, so every level's nearest code is the
    planted one by a wide margin in float32 and float64 alike."""
    g = gen(seed)
    scales = torch.tensor([10.0 ** -level for level in range(levels)]).view(levels, 1, 1)
    cbs = (torch.randn(1 if shared else levels, k, d, generator=g) * (1.0 if shared else scales))
    planted = torch.randint(0, k, (n, levels), generator=g)
    x = torch.randn(n, d, generator=g) * 10.0 ** -(levels + 1)
    if not shared:
        for level in range(levels):
            x += cbs[level][planted[:, level]]
    else:  # one codebook: only level 0's code is planted, the rest is whatever is nearest
        x += cbs[0][planted[:, 0]]
    codebooks = cbs[0] if shared else cbs
    return x.to(x_dtype), codebooks.to(cb_dtype)


def run_rq(x, codebooks, num_levels=-1, beam_size=1):
    out = cuda_op("residual_quantize")(x.to(DEV), codebooks.to(DEV), num_levels, beam_size)
    ref = reference.residual_quantize(f64(x), f64(codebooks), num_levels, beam_size)
    return out, ref


def level_codebook64(codebooks, level):
    return f64(codebooks[level] if codebooks.dim() == 3 else codebooks)


def rq_path_truth(x, codebooks, idx):
    """quantized [N, D] and the per-level losses of the code path idx [N, L], in float64,
    written out independently of reference.py (NaN rows from an index -1 on)."""
    res = f64(x)
    n, d = res.shape
    qsum = torch.zeros_like(res)
    losses = []
    for level in range(idx.shape[1]):
        k = idx[:, level]
        q = level_codebook64(codebooks, level)[k.clamp_min(0)]
        q[k < 0] = float("nan")
        losses.append((res - q).square().sum() / max(n * d, 1))
        res, qsum = res - q, qsum + q
    return qsum, torch.stack(losses)


def check_nearest_path(x, codebooks, idx):
    """Greedy: each level's index is a nearest code of that level's float64 residual up to float32
    rounding (the slack), and -1 exactly for the rows whose residual holds a NaN."""
    res = f64(x)
    for level in range(idx.shape[1]):
        cb = level_codebook64(codebooks, level)
        k = idx[:, level]
        nan_row = torch.isnan(res).any(1)
        assert torch.equal(k < 0, nan_row), f"level {level}: -1 must mark exactly the NaN rows"
        ok = ~nan_row
        d2 = (res[ok].unsqueeze(1) - cb.unsqueeze(0)).square().sum(-1)
        chosen = d2.gather(1, k[ok].unsqueeze(1)).squeeze(1)
        slack = 1e-5 * (res[ok].square().sum(1) + cb.square().sum(1).max())
        assert (chosen <= d2.min(1).values + slack).all(), f"level {level}: a chosen code is not a nearest one"
        res = res - cb[k.clamp_min(0)]


def check_rq(out, ref, x, codebooks, exact=True, greedy=True):
    """out: the CUDA op's; ref: reference.residual_quantize on float64 copies. exact: the indices must
    equal the reference's (data without near-ties); else they are checked along their own path."""
    q, idx, commit, cbl = out
    rq, ridx, rcommit, rcbl = ref
    assert q.dtype == x.dtype and idx.dtype == torch.int64
    loss_dtype = torch.float64 if torch.float64 in (x.dtype, codebooks.dtype) else torch.float32
    assert commit.dtype == cbl.dtype == loss_dtype
    idx = idx.cpu()
    if greedy:
        check_nearest_path(x, codebooks, idx)
    if exact:
        assert torch.equal(idx, ridx)
    tq, tlosses = rq_path_truth(x, codebooks, idx)
    # the float32 residuals carry absolute errors ~1e-7 against losses ~noise**2: a few 1e-3 relative
    loss_tol = dict(rtol=5e-3, atol=1e-12)
    for got, want in ((q, tq), (commit, tlosses), (cbl, tlosses)):
        close(got, want, **(loss_tol if got.dim() == 1 else dict(atol=tol(x.dtype)["atol"])))
    if torch.equal(idx, ridx):
        close(q, rq, atol=tol(x.dtype)["atol"])
        close(commit, rcommit, **loss_tol)
        close(cbl, rcbl, **loss_tol)


@pytest.mark.parametrize("x_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,d,levels,k", [(1, 1, 1, 1), (7, 5, 3, 9), (300, 16, 3, 64), (2049, 33, 2, 100)])
def test_rq_matches_reference(x_dtype, cb_dtype, n, d, levels, k):
    if d < 4 and k > 1:
        pytest.skip("the planted codes need D >= 4 to be well separated")
    x, cbs = rq_data(n, d, levels, k, seed=n + d, x_dtype=x_dtype, cb_dtype=cb_dtype)
    # half inputs: rounding noise of the size of the last level's codes, so ties are possible there
    check_rq(*run_rq(x, cbs), x, cbs, exact=x_dtype == torch.float32)


def test_rq_shared_codebook():
    x, cb = rq_data(500, 12, 1, 40, seed=11, shared=True)
    out, ref = run_rq(x, cb, num_levels=3)
    assert torch.equal(out[1][:, 0].cpu(), ref[1][:, 0])  # the planted level; later ones search noise
    check_rq(out, ref, x, cb, exact=False)


def test_rq_empty_and_zero_d():
    x, cbs = rq_data(0, 6, 2, 5, seed=12)
    check_rq(*run_rq(x, cbs), x, cbs)
    q, idx, commit, cbl = cuda_op("residual_quantize")(torch.empty(4, 0, device=DEV), torch.empty(2, 3, 0, device=DEV),
                                                       -1, 1)
    assert q.shape == (4, 0) and torch.equal(idx.cpu(), torch.zeros(4, 2, dtype=torch.int64))
    assert torch.equal(commit.cpu(), torch.zeros(2)) and torch.equal(cbl.cpu(), torch.zeros(2))


def test_rq_nan_row():
    x, cbs = rq_data(40, 8, 3, 16, seed=13)
    x[5, 3] = float("nan")
    out, ref = run_rq(x, cbs)
    check_rq(out, ref, x, cbs)
    assert (out[1][5] == -1).all() and torch.isnan(out[0][5]).all() and torch.isnan(out[2]).all()


def test_rq_strided_inputs():
    x, cbs = rq_data(100, 8, 2, 16, seed=14)
    xs = x.t().contiguous().t()
    cbs_s = cbs.transpose(1, 2).contiguous().transpose(1, 2)
    check_rq(*run_rq(xs, cbs_s), xs, cbs_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rq_beam_and_float64_delegate(dtype):
    x, cbs = rq_data(60, 8, 3, 16, seed=15, x_dtype=dtype, cb_dtype=dtype)
    check_rq(*run_rq(x, cbs, beam_size=3), x, cbs, greedy=False)
    check_rq(*run_rq(x, cbs), x, cbs)


def test_rq_deterministic_bitwise():
    x, cbs = rq_data(3000, 16, 3, 64, seed=16)
    first = cuda_op("residual_quantize")(x.to(DEV), cbs.to(DEV), -1, 1)
    again = cuda_op("residual_quantize")(x.to(DEV), cbs.to(DEV), -1, 1)
    for a, b in zip(first, again):
        bitwise_equal(a, b)


def test_rq_bad_inputs():
    x, cbs = rq_data(10, 8, 3, 16, seed=17)
    op = cuda_op("residual_quantize")
    with pytest.raises(ValueError, match="num_levels=2 does not match codebooks' L=3"):
        op(x.to(DEV), cbs.to(DEV), 2, 1)
    with pytest.raises(ValueError, match=r"beam_size must be in \[1, K=16\]"):
        op(x.to(DEV), cbs.to(DEV), -1, 17)
    with pytest.raises(ValueError, match="x has D=7"):
        op(x[:, :7].to(DEV), cbs.to(DEV), -1, 1)


def rq_backward_args(n, d, levels, k, seed, shared=False, x_dtype=torch.float32, cb_dtype=torch.float32,
                     with_missing=True):
    g = gen(seed)
    x = torch.randn(n, d, generator=g).to(x_dtype)
    codebooks = torch.randn(*((k, d) if shared else (levels, k, d)), generator=g).to(cb_dtype)
    indices = torch.randint(-1 if with_missing else 0, k, (n, levels), generator=g)
    grad_q = torch.randn(n, d, generator=g).to(x_dtype)
    loss_dtype = torch.float64 if torch.float64 in (x_dtype, cb_dtype) else torch.float32
    gc = torch.randn(levels, generator=g).to(loss_dtype)
    gb = torch.randn(levels, generator=g).to(loss_dtype)
    return grad_q, gc, gb, x, codebooks, indices


def check_rq_backward(args):
    gx, gcb = cuda_op("residual_quantize_backward")(*(t.to(DEV) for t in args))
    rgx, rgcb = reference.residual_quantize_backward(*(f64(t) for t in args))
    assert gx.dtype == args[3].dtype and gcb.dtype == args[4].dtype
    assert gx.shape == args[3].shape and gcb.shape == args[4].shape
    close(gx, rgx, atol=tol(gx.dtype)["atol"] + 1e-5)
    close(gcb, rgcb, atol=tol(gcb.dtype)["atol"] + 1e-5)
    return gx, gcb


@pytest.mark.parametrize("x_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,d,levels,k,shared", [(1, 1, 1, 1, False), (7, 5, 3, 4, False), (7, 5, 3, 4, True),
                                                 (1000, 24, 4, 50, False), (1000, 24, 4, 50, True)])
def test_rq_backward_matches_reference(x_dtype, cb_dtype, n, d, levels, k, shared):
    args = rq_backward_args(n, d, levels, k, seed=n + levels, shared=shared, x_dtype=x_dtype, cb_dtype=cb_dtype)
    gx, _ = check_rq_backward(args)
    missing = (args[5] < 0).any(1)  # r_{l+1} is NaN from a -1 on: grad_x NaN there, codebooks untouched
    assert torch.isnan(gx[missing.to(DEV)]).all()
    assert not torch.isnan(gx[~missing.to(DEV)]).any()


def test_rq_backward_empty_and_float64():
    check_rq_backward(rq_backward_args(0, 5, 2, 3, seed=18))
    check_rq_backward(rq_backward_args(20, 5, 2, 3, seed=19, x_dtype=torch.float64, cb_dtype=torch.float64))


@pytest.mark.parametrize("shared", [True, False])
def test_rq_backward_deterministic_bitwise(shared):
    # no index -1: a row's -1 makes its later residuals NaN, and with one shared codebook those NaNs
    # reach every code, which would leave nothing of grad_codebooks to compare
    args = [t.to(DEV) for t in rq_backward_args(4000, 32, 3, 16, seed=20, shared=shared, with_missing=False)]
    with deterministic():
        first = cuda_op("residual_quantize_backward")(*args)
        again = cuda_op("residual_quantize_backward")(*args)
    assert not torch.isnan(first[1]).any()
    for a, b in zip(first, again):
        bitwise_equal(a, b)
    rgx, rgcb = reference.residual_quantize_backward(*(f64(t) for t in args))
    close(first[0], rgx, atol=1e-5)
    close(first[1], rgcb, atol=1e-5)


@pytest.mark.parametrize("bad", [16, -2])
def test_rq_backward_bad_index(bad):
    args = [t.to(DEV) for t in rq_backward_args(10, 4, 2, 16, seed=21)]
    args[5][3, 1] = bad
    with pytest.raises(ValueError, match=r"residual_quantize_backward: indices must be in \[-1, K=16\)"):
        cuda_op("residual_quantize_backward")(*args)


def test_rq_opcheck():
    x, cbs = rq_data(30, 8, 3, 16, seed=22, x_dtype=torch.float16)
    opcheck(cuda_op("residual_quantize").default, (x.to(DEV), cbs.to(DEV), -1, 1))
    # no index -1, so no NaN rows: opcheck compares its runs without equal_nan
    args = rq_backward_args(30, 8, 3, 16, seed=23, cb_dtype=torch.bfloat16, with_missing=False)
    opcheck(cuda_op("residual_quantize_backward").default, tuple(t.to(DEV) for t in args))


# ---------------------------------------------------------------------------------------
# lfq_entropy


def lfq_x(n, d, seed, dtype=torch.float32, scale=0.3):
    return (torch.randn(n, d, generator=gen(seed)) * scale).to(dtype)


def check_lfq(x, inv_t):
    ps, cbe, avg = cuda_op("lfq_entropy")(x.to(DEV), inv_t)
    rps, rcbe, ravg = reference.lfq_entropy(f64(x), inv_t)
    assert ps.dtype == cbe.dtype == avg.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert ps.shape == () and cbe.shape == () and avg.shape == (2 ** x.shape[1],)
    close(avg, ravg, rtol=1e-4, atol=1e-7)
    close(ps, rps, rtol=1e-4, atol=1e-6)
    close(cbe, rcbe, rtol=1e-4, atol=1e-6)
    return ps, cbe, avg


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,d", [(0, 4), (1, 1), (7, 2), (7, 5), (300, 12), (2000, 17)])
@pytest.mark.parametrize("inv_t", [1.0, 10.0])
def test_lfq_entropy_matches_reference(dtype, n, d, inv_t):
    check_lfq(lfq_x(n, d, seed=n + d, dtype=dtype), inv_t)


def test_lfq_entropy_strided_and_special_values():
    x = lfq_x(50, 6, seed=24)
    x[3, 1] = float("inf")
    x[4, 2] = -float("inf")
    check_lfq(x.t().contiguous().t(), 2.0)
    x[9, 0] = float("nan")  # a NaN row: every code's average and both entropies NaN, as the reference
    ps, cbe, avg = check_lfq(x, 2.0)
    assert torch.isnan(avg).all() and torch.isnan(ps) and torch.isnan(cbe)


def lfq_backward_args(n, d, seed, dtype=torch.float32, inv_t=3.0):
    g = gen(seed)
    x = lfq_x(n, d, seed, dtype)
    _, _, avg = reference.lfq_entropy(f64(x), inv_t)
    return (torch.randn((), generator=g), torch.randn((), generator=g), torch.randn(2 ** d, generator=g) * 0.1, x,
            avg.float(), inv_t)


def check_lfq_backward(args):
    dev = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in args)
    grad = cuda_op("lfq_entropy_backward")(*dev)
    rgrad = reference.lfq_entropy_backward(*(f64(t) if isinstance(t, torch.Tensor) else t for t in args))
    assert grad.dtype == args[3].dtype and grad.shape == args[3].shape and grad.is_contiguous()
    scale = max(rgrad.abs().max().item(), 1e-6) if rgrad.numel() else 1.0
    close(grad, rgrad, rtol=max(tol(grad.dtype)["rtol"], 1e-3), atol=max(tol(grad.dtype)["atol"], 1e-4) * scale)
    return grad


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,d", [(0, 3), (1, 1), (7, 2), (7, 5), (300, 12), (1000, 16)])
def test_lfq_entropy_backward_matches_reference(dtype, n, d):
    check_lfq_backward(lfq_backward_args(n, d, seed=n * d + 1, dtype=dtype))


def test_lfq_entropy_backward_infinite_logits():
    args = list(lfq_backward_args(20, 6, seed=25))
    args[3][2, 3] = float("inf")  # sigmoid saturates: the per-sample term adds 0, no NaN
    grad = check_lfq_backward(tuple(args))
    assert not torch.isnan(grad).any()


def test_lfq_entropy_deterministic_bitwise():
    x = lfq_x(5000, 14, seed=26).to(DEV)
    first = cuda_op("lfq_entropy")(x, 5.0)
    again = cuda_op("lfq_entropy")(x, 5.0)
    for a, b in zip(first, again):
        bitwise_equal(a, b)
    args = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in lfq_backward_args(5000, 14, seed=26))
    bitwise_equal(cuda_op("lfq_entropy_backward")(*args), cuda_op("lfq_entropy_backward")(*args))


def test_lfq_entropy_float64_delegates():
    check_lfq(lfq_x(40, 6, seed=27, dtype=torch.float64), 2.0)
    args = lfq_backward_args(40, 6, seed=27, dtype=torch.float64)
    dev = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in args)
    grad = cuda_op("lfq_entropy_backward")(*dev)
    rgrad = reference.lfq_entropy_backward(*(f64(t) if isinstance(t, torch.Tensor) else t for t in args))
    close(grad, rgrad)


def test_lfq_entropy_autocast():
    x = lfq_x(64, 10, seed=28).to(DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = cuda_op("lfq_entropy")(x, 4.0)
    check = reference.lfq_entropy(f64(x), 4.0)
    for a, b in zip(out, check):
        assert a.dtype == torch.float32
        close(a, b, rtol=1e-4, atol=1e-6)


def test_lfq_entropy_bad_inputs():
    op = cuda_op("lfq_entropy")
    with pytest.raises(ValueError, match=r"x must have d in \[1, 30\] columns"):
        op(torch.zeros(2, 31, device=DEV), 1.0)
    with pytest.raises(ValueError, match="inv_temperature must be finite"):
        op(torch.zeros(2, 3, device=DEV), float("inf"))
    with pytest.raises(ValueError, match="x must be float32, float16, bfloat16 or float64"):
        op(torch.zeros(2, 3, device=DEV, dtype=torch.int32), 1.0)
    args = [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in lfq_backward_args(5, 3, seed=29)]
    args[2] = args[2][:4]
    with pytest.raises(ValueError, match=r"grad_avg_probs must have shape \[2\*\*d=8\]"):
        cuda_op("lfq_entropy_backward")(*args)


def test_lfq_entropy_opcheck():
    opcheck(cuda_op("lfq_entropy").default, (lfq_x(30, 7, seed=30, dtype=torch.bfloat16).to(DEV), 3.0))
    args = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in lfq_backward_args(30, 7, seed=31))
    opcheck(cuda_op("lfq_entropy_backward").default, args)


def lfq_weights(n, seed):
    """[n] float32 row weights in [0, 3), about a third of them exactly 0."""
    g = gen(seed)
    return torch.rand(n, generator=g) * 3 * (torch.rand(n, generator=g) < 0.67)


def weighted_lfq_args(n, d, seed, dtype=torch.float32, inv_t=3.0):
    """Backward arguments with row weights (lfq_backward_args + weights); the rows of weight 0 hold NaN."""
    args = list(lfq_backward_args(n, d, seed, dtype, inv_t))
    w = lfq_weights(n, seed + 1000)
    args[3][w == 0] = float("nan")
    args[4] = reference.lfq_entropy(f64(args[3]), inv_t, w)[2].float()
    return tuple(args) + (w,)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (7, 2), (7, 5), (300, 12), (2000, 17)])
def test_lfq_entropy_weighted_matches_reference(dtype, n, d):
    """Row weights: the reference's weighted outputs and gradient; the rows of weight 0 (NaN here) count
    nowhere and get a zero gradient."""
    args = weighted_lfq_args(n, d, seed=n * d + 3, dtype=dtype)
    x, w = args[3], args[6]
    ps, cbe, avg = cuda_op("lfq_entropy")(x.to(DEV), 3.0, w.to(DEV))
    rps, rcbe, ravg = reference.lfq_entropy(f64(x), 3.0, w)
    assert ps.dtype == cbe.dtype == avg.dtype == torch.float32
    close(avg, ravg, rtol=1e-4, atol=1e-7)
    close(ps, rps, rtol=1e-4, atol=1e-6)
    close(cbe, rcbe, rtol=1e-4, atol=1e-6)
    grad = check_lfq_backward(args)
    assert bool((grad.cpu()[w == 0] == 0).all())


def test_lfq_entropy_weights_mask_none_kept_float64():
    """A 0/1 mask gives the kept rows' results; all-zero weights give zeros and a zero gradient; float64
    goes to the reference with its weights."""
    x = lfq_x(500, 9, seed=32).to(DEV)
    w = (torch.rand(500, generator=gen(33)) < 0.5).float().to(DEV)
    keep = w != 0
    for a, b in zip(cuda_op("lfq_entropy")(x, 2.0, w), cuda_op("lfq_entropy")(x[keep], 2.0)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    zero = torch.zeros(500, device=DEV)
    out = cuda_op("lfq_entropy")(x, 2.0, zero)
    assert all(bool((t == 0).all()) for t in out)
    one = torch.ones((), device=DEV)
    grad = cuda_op("lfq_entropy_backward")(one, -one, torch.ones(512, device=DEV), x, out[2], 2.0, zero)
    assert bool((grad == 0).all())
    x64 = lfq_x(40, 6, seed=34, dtype=torch.float64)
    w64 = lfq_weights(40, seed=35).double()
    for a, b in zip(cuda_op("lfq_entropy")(x64.to(DEV), 2.0, w64.to(DEV)), reference.lfq_entropy(x64, 2.0, w64)):
        close(a, b)


def test_lfq_entropy_weighted_deterministic_bitwise():
    args = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in weighted_lfq_args(5000, 14, seed=36))
    x, w = args[3], args[6]
    for a, b in zip(cuda_op("lfq_entropy")(x, 3.0, w), cuda_op("lfq_entropy")(x, 3.0, w)):
        bitwise_equal(a, b)
    bitwise_equal(cuda_op("lfq_entropy_backward")(*args), cuda_op("lfq_entropy_backward")(*args))


def test_lfq_entropy_weighted_no_host_sync():
    """Forward and backward with weights never synchronise with the host (the weights' total stays on the
    device)."""
    args = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in weighted_lfq_args(300, 10, seed=37))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_op("lfq_entropy")(args[3], 3.0, args[6])
        cuda_op("lfq_entropy_backward")(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_lfq_entropy_bad_weights():
    x = torch.zeros(4, 3, device=DEV)
    with pytest.raises(ValueError, match=r"weights is on cpu but x is on cuda"):
        cuda_op("lfq_entropy")(x, 1.0, torch.ones(4))
    with pytest.raises(ValueError, match=r"weights must have shape \[N=4\], got \(5,\)"):
        cuda_op("lfq_entropy")(x, 1.0, torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match=r"weights must be float32, float16, bfloat16 or float64"):
        cuda_op("lfq_entropy")(x, 1.0, torch.ones(4, device=DEV, dtype=torch.bool))


def test_lfq_entropy_weighted_opcheck():
    args = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in weighted_lfq_args(30, 7, seed=38))
    opcheck(cuda_op("lfq_entropy").default, (args[3].nan_to_num(0.5).bfloat16(), 3.0, args[6].half()))
    opcheck(cuda_op("lfq_entropy_backward").default, args)


# ---------------------------------------------------------------------------------------
# multiscale_quantize_step


def ms_data(b, c, h, w, k, seed, f_dtype=torch.float32, cb_dtype=torch.float32):
    g = gen(seed)
    return torch.randn(b, c, h, w, generator=g).to(f_dtype), torch.randn(k, c, generator=g).to(cb_dtype)


def check_ms(f_rest, codebook, pn, metric="l2"):
    idx, h = cuda_op("multiscale_quantize_step")(f_rest.to(DEV), codebook.to(DEV), list(pn), metric)
    ridx, rh = reference.multiscale_quantize_step(f64(f_rest), f64(codebook), list(pn), metric)
    b, c = f_rest.shape[:2]
    assert idx.dtype == torch.int64 and idx.shape == (b, *pn)
    assert h.dtype == codebook.dtype and h.shape == (b, c, *pn) and h.is_contiguous()
    idx, h = idx.cpu(), h.cpu()
    # h is the chosen codes themselves, NCHW, NaN for -1
    expected_h = reference.lookup(codebook, idx.reshape(-1)).view(b, *pn, c).permute(0, 3, 1, 2)
    assert torch.equal(h.nan_to_num(7.0), expected_h.nan_to_num(7.0))
    # Each index is -1 exactly where the reference's is (NaN cells), else a nearest code of the
    # area-pooled cell in float64 up to float32 rounding (ties may break either way).
    assert torch.equal(idx < 0, ridx < 0)
    pooled = F.interpolate(f64(f_rest), size=tuple(pn), mode="area").permute(0, 2, 3, 1).reshape(-1, c)
    cb = f64(codebook)
    if metric == "cosine":
        pooled, cb = F.normalize(pooled, dim=1), F.normalize(cb, dim=1)
    valid = ridx.reshape(-1) >= 0
    dist = torch.cdist(pooled[valid], cb).square() if metric != "ip" else -(pooled[valid] @ cb.t())
    chosen = dist.gather(1, idx.reshape(-1)[valid].unsqueeze(1)).squeeze(1)
    best = dist.min(1).values
    # The kernel pools in f_rest's dtype (as the reference does on such inputs), the float64 truth
    # does not: distances may differ by ~3 u (|p|^2 + |c|^2), u the unit roundoff of that dtype.
    rel = {torch.float32: 1e-4, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-10}[f_rest.dtype]
    slack = rel * (pooled[valid].square().sum(1) + cb.square().sum(1).max())
    assert (chosen <= best + slack).all()
    if f_rest.dtype == torch.float32 and idx.numel():
        agree = (idx == ridx).float().mean().item()
        assert agree > 0.95, f"only {agree:.3f} of the indices agree with the reference"


@pytest.mark.parametrize("f_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape,pn", [((2, 4, 7, 5), (3, 2)), ((1, 3, 4, 4), (1, 1)), ((2, 5, 3, 3), (5, 4)),
                                      ((4, 32, 16, 16), (16, 16)), ((3, 16, 16, 16), (6, 6))])
def test_ms_matches_reference(f_dtype, cb_dtype, shape, pn):
    check_ms(*ms_data(*shape, k=37, seed=sum(shape), f_dtype=f_dtype, cb_dtype=cb_dtype), pn)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_ms_metrics(metric):
    check_ms(*ms_data(2, 8, 9, 9, k=20, seed=32), (4, 4), metric)


def test_ms_empty_nan_and_layouts():
    check_ms(*ms_data(0, 4, 5, 5, k=6, seed=33), (2, 2))
    idx, h = cuda_op("multiscale_quantize_step")(torch.zeros(2, 0, 3, 3, device=DEV), torch.zeros(4, 0, device=DEV),
                                                 [2, 2], "l2")
    assert torch.equal(idx.cpu(), torch.zeros(2, 2, 2, dtype=torch.int64)) and h.shape == (2, 0, 2, 2)
    f_rest, cb = ms_data(2, 6, 8, 8, k=10, seed=34)
    f_rest[1, 2, 5, 6] = float("nan")  # poisons the pooled cells whose windows cover it
    check_ms(f_rest, cb, (4, 4))
    check_ms(f_rest.contiguous(memory_format=torch.channels_last), cb.t().contiguous().t(), (3, 3))


def test_ms_float64_delegates():
    check_ms(*ms_data(2, 4, 6, 6, k=9, seed=35, f_dtype=torch.float64, cb_dtype=torch.float64), (3, 3))


def test_ms_bad_inputs():
    f_rest, cb = (t.to(DEV) for t in ms_data(2, 4, 6, 6, k=9, seed=36))
    op = cuda_op("multiscale_quantize_step")
    with pytest.raises(ValueError, match="f_rest has C=4"):
        op(f_rest, cb[:, :3], [2, 2], "l2")
    with pytest.raises(ValueError, match="pn must be a size >= 1 or a pair of them"):
        op(f_rest, cb, [0, 2], "l2")
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        op(f_rest, cb, [2, 2], "l1")
    with pytest.raises(ValueError, match="indices must be int64"):
        cuda_op("multiscale_quantize_step_backward")(torch.zeros(2, 4, 2, 2, device=DEV), cb,
                                                     torch.zeros(2, 2, 2, dtype=torch.int32, device=DEV))


def ms_backward_args(b, c, ph, pw, k, seed, g_dtype=torch.float32, cb_dtype=torch.float32):
    g = gen(seed)
    grad_h = torch.randn(b, c, ph, pw, generator=g).to(g_dtype)
    codebook = torch.randn(k, c, generator=g).to(cb_dtype)
    indices = torch.randint(-1, k, (b, ph, pw), generator=g)
    return grad_h, codebook, indices


def check_ms_backward(args):
    grad = cuda_op("multiscale_quantize_step_backward")(*(t.to(DEV) for t in args))
    rgrad = reference.multiscale_quantize_step_backward(*(f64(t) for t in args))
    assert grad.dtype == args[1].dtype and grad.shape == args[1].shape
    close(grad, rgrad, atol=tol(grad.dtype)["atol"] + 1e-5)
    return grad


@pytest.mark.parametrize("g_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("b,c,ph,pw,k", [(0, 3, 2, 2, 4), (1, 1, 1, 1, 1), (2, 5, 3, 4, 7), (8, 64, 16, 16, 300)])
def test_ms_backward_matches_reference(g_dtype, cb_dtype, b, c, ph, pw, k):
    check_ms_backward(ms_backward_args(b, c, ph, pw, k, seed=b + c + k, g_dtype=g_dtype, cb_dtype=cb_dtype))


def test_ms_backward_layouts_and_float64():
    grad_h, cb, idx = ms_backward_args(3, 6, 5, 4, 9, seed=37)
    check_ms_backward((grad_h.contiguous(memory_format=torch.channels_last), cb, idx))
    check_ms_backward((grad_h[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3), cb, idx))
    check_ms_backward(ms_backward_args(3, 6, 5, 4, 9, seed=38, g_dtype=torch.float64, cb_dtype=torch.float64))


def test_ms_backward_deterministic_bitwise():
    args = [t.to(DEV) for t in ms_backward_args(16, 32, 16, 16, 8, seed=39)]  # few codes: long segments
    with deterministic():
        first = cuda_op("multiscale_quantize_step_backward")(*args)
        again = cuda_op("multiscale_quantize_step_backward")(*args)
    bitwise_equal(first, again)
    close(first, reference.multiscale_quantize_step_backward(*(f64(t) for t in args)), atol=1e-4)


def test_ms_opcheck():
    f_rest, cb = ms_data(2, 4, 7, 5, k=9, seed=40, f_dtype=torch.float16)
    opcheck(cuda_op("multiscale_quantize_step").default, (f_rest.to(DEV), cb.to(DEV), [3, 2], "l2"))
    args = ms_backward_args(2, 4, 3, 2, 9, seed=41)
    opcheck(cuda_op("multiscale_quantize_step_backward").default, tuple(t.to(DEV) for t in args))
