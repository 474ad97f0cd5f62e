"""vqkernels.ema_update_: the in-place EMA codebook update (Sonnet VectorQuantizerEMA).

The GPU kernels' tests (CUDA, Triton) come last, run by the `backend` fixture (tests/conftest.py).
"""

from functools import partial

import pytest
import torch

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_TOL, assert_bitwise_equal, assert_deterministic,
                        assert_kernel_rejects, case_id, close_to_f64, deterministic, f64, gen, kernel_opcheck,
                        on_backends, opcheck, per_backend, reference, vqkernels, with_layout)

ema_update_ = vqkernels.ema_update_


def sonnet_update(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    """The update written out independently, in float64 (Sonnet's VectorQuantizerEMA)::

        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum    = decay * embed_sum    + (1 - decay) * sums
        n            = sum(cluster_size)
        smoothed     = (cluster_size + eps) / (n + K * eps) * n
        codebook     = embed_sum / smoothed[:, None]

    counts and sums via a one-hot matrix (rows with index -1 match no code).
    Returns float64 (codebook, cluster_size, embed_sum).
    """
    k = codebook.shape[0]
    onehot = (indices.unsqueeze(1) == torch.arange(k).unsqueeze(0)).double()  # [N, K]
    counts = onehot.sum(0)
    sums = onehot.T @ x.double()
    cs = decay * cluster_size.double() + (1 - decay) * counts
    es = decay * embed_sum.double() + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + k * eps) * n
    return es / smoothed.unsqueeze(1), cs, es


def ema_state(n, k, d, seed, buf_dtype=torch.float32, cb_dtype=torch.float32, x_dtype=torch.float32,
              unassigned=0.1):
    """(codebook, cluster_size, embed_sum, x, indices): a fraction `unassigned` of the rows
    has index -1, and codes k-3 .. k-1 get no row at all."""
    g = gen(seed)
    codebook = torch.randn(k, d, generator=g).to(cb_dtype)
    cluster_size = (torch.rand(k, generator=g) * 5 + 0.5).to(buf_dtype)
    embed_sum = torch.randn(k, d, generator=g).to(buf_dtype)
    x = (torch.randn(n, d, generator=g) * 2 + 1).to(x_dtype)
    indices = torch.randint(0, max(1, k - 3), (n,), generator=g)
    indices[torch.rand(n, generator=g) < unassigned] = -1
    return codebook, cluster_size, embed_sum, x, indices


TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_state_close(got, want, dtypes):
    """got: the three updated tensors; want: float64 values; relative tolerance per dtype."""
    for name, t, w, dt in zip(("codebook", "cluster_size", "embed_sum"), got, want, dtypes):
        assert t.dtype == dt, (name, t.dtype)
        tol = max(TOLERANCES[dt], TOLERANCES[got[1].dtype])
        torch.testing.assert_close(t.double(), w, rtol=tol, atol=tol * float(w.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


# (x dtype, codebook dtype): mixed and half dtypes; buffers float32 or float64
DTYPE_MIXES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float64, torch.float16), (torch.float32, torch.float64)]
DECAY_EPS = [(0.0, 1e-5), (0.5, 0.0), (0.99, 1e-5), (1.0, 1e-3)]


@pytest.mark.parametrize("decay, eps", DECAY_EPS)
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("x_dtype, cb_dtype", DTYPE_MIXES, ids=str)
def test_matches_sonnet_formula(isa, x_dtype, cb_dtype, buf_dtype, decay, eps):
    state = ema_state(300, 40, 9, seed=51, buf_dtype=buf_dtype, cb_dtype=cb_dtype, x_dtype=x_dtype)
    want = sonnet_update(*state, decay, eps)
    codebook, cluster_size, embed_sum, x, indices = state
    before = x.clone(), indices.clone()
    assert ema_update_(codebook, cluster_size, embed_sum, x, indices, decay, eps) is None
    assert_state_close((codebook, cluster_size, embed_sum), want, (cb_dtype, buf_dtype, buf_dtype))
    assert torch.equal(x, before[0]) and torch.equal(indices, before[1]), "x and indices are inputs only"


@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cb_dtype", DTYPES, ids=str)
def test_matches_float64_reference(isa, cb_dtype, buf_dtype):
    state = ema_state(500, 64, 12, seed=52, buf_dtype=buf_dtype, cb_dtype=cb_dtype, x_dtype=torch.bfloat16)
    as64 = [t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone() for t in state]
    reference.ema_update_(*as64, 0.9, 1e-5)
    ema_update_(*state, 0.9, 1e-5)
    assert_state_close(state[:3], as64[:3], (cb_dtype, buf_dtype, buf_dtype))


@pytest.mark.parametrize("n", [0, 7])
def test_no_assigned_rows_only_decays(isa, n):
    """N = 0, or every index -1: counts and sums are zero, the statistics only decay."""
    codebook, cluster_size, embed_sum, x, indices = ema_state(n, 10, 4, seed=53, unassigned=1.0)
    cs0, es0 = cluster_size.double(), embed_sum.double()
    ema_update_(codebook, cluster_size, embed_sum, x, indices, 0.8, 1e-5)
    torch.testing.assert_close(cluster_size.double(), 0.8 * cs0, rtol=1e-6, atol=0)
    torch.testing.assert_close(embed_sum.double(), 0.8 * es0, rtol=1e-6, atol=0)
    total = 0.8 * cs0.sum()
    want = 0.8 * es0 / ((0.8 * cs0 + 1e-5) / (total + 10 * 1e-5) * total).unsqueeze(1)
    torch.testing.assert_close(codebook.double(), want, rtol=1e-5, atol=1e-6)


def test_strided_views_update_in_place(isa):
    """Non-contiguous buffers and x, updated through their views; memory around them untouched."""
    codebook, cluster_size, embed_sum, x, indices = ema_state(200, 24, 6, seed=54)
    want = sonnet_update(codebook, cluster_size, embed_sum, x, indices, 0.95, 1e-5)
    big_cb = torch.full((24, 12), 7.0)
    cb_view = big_cb[:, ::2]
    cb_view.copy_(codebook)
    big_cs = torch.full((72,), 7.0)
    cs_view = big_cs[::3]
    cs_view.copy_(cluster_size)
    es_view = with_layout(embed_sum, "transposed")
    x_view = with_layout(x, "offset")
    idx_view = torch.stack([indices, torch.zeros_like(indices)], 1)[:, 0]  # stride 2
    ema_update_(cb_view, cs_view, es_view, x_view, idx_view, 0.95, 1e-5)
    assert_state_close((cb_view, cs_view, es_view), want, (torch.float32,) * 3)
    assert bool((big_cb[:, 1::2] == 7.0).all()) and bool((big_cs.view(24, 3)[:, 1:] == 7.0).all())


@pytest.mark.parametrize("bad", [24, 25, 2 ** 40, -2, -(2 ** 40)])
def test_out_of_range_indices_raise(isa, bad):
    """Indices >= K or < -1 raise an error naming `indices`, before anything is written."""
    state = ema_state(50, 24, 5, seed=55)
    state[4][17] = bad
    saved = [t.clone() for t in state[:3]]
    with pytest.raises((ValueError, RuntimeError), match="indices"):
        ema_update_(*state, 0.9, 1e-5)
    for t, s in zip(state[:3], saved):
        assert torch.equal(t, s), "a failed update must leave the codebook and statistics unchanged"


def test_deterministic(isa):
    """Bitwise identical when repeated and with 1 or 2 threads (sums of ~300 rows per code)."""
    state = ema_state(20000, 64, 32, seed=56)

    def run():
        out = [t.clone() for t in state]
        ema_update_(*out, 0.99, 1e-5)
        return out[:3]

    assert_deterministic(run)


def ema_opcheck_samples():
    f32 = ema_state(30, 8, 5, seed=57)
    mixed = ema_state(30, 8, 5, seed=58, buf_dtype=torch.float64, cb_dtype=torch.bfloat16, x_dtype=torch.float16)
    cb, cs, es, x, idx = ema_state(30, 8, 5, seed=59)
    strided = (with_layout(cb, "strided"), cs, with_layout(es, "transposed"), with_layout(x, "offset"), idx)
    empty = ema_state(0, 8, 5, seed=60)
    return [pytest.param(f32, id="f32"), pytest.param(mixed, id="f64-bf16-f16"), pytest.param(strided, id="strided"),
            pytest.param(empty, id="empty")]


@pytest.mark.parametrize("state", ema_opcheck_samples())
def test_opcheck(state):
    opcheck("ema_update_", (*state, 0.9, 1e-5))



# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture). The Triton tests judge against sonnet_update, the CUDA
# tests against the reference on float64 copies, with their own data (normal_ema_state).


def normal_ema_state(n, k, d, seed, cb_dtype=torch.float32, x_dtype=torch.float32, buf_dtype=torch.float32):
    """(codebook, cluster_size, embed_sum, x, indices): normal values, cluster sizes in [0, 5), indices in [-1, K)."""
    g = gen(seed)
    codebook = torch.randn(k, d, generator=g).to(cb_dtype)
    cluster_size = (torch.rand(k, generator=g) * 5).to(buf_dtype)
    embed_sum = torch.randn(k, d, generator=g).to(buf_dtype)
    x = torch.randn(n, d, generator=g).to(x_dtype)
    indices = torch.randint(-1, k, (n,), generator=g)
    return codebook, cluster_size, embed_sum, x, indices


def on_device(state, device):
    return [t.to(device, copy=True) for t in state]  # the state itself stays for the truth


def run_ema(state, decay, eps, det=False):
    with deterministic(det):
        assert ema_update_(*state, decay, eps) is None


def reference_ema(state, decay, eps):
    """The reference's update of float64 copies of state: (codebook, cluster_size, embed_sum)."""
    cb, cs, es, x, idx = (f64(t) for t in state)
    reference.ema_update_(cb, cs, es, x, idx, decay, eps)
    return cb, cs, es


def check_sonnet(state, got, decay, eps):
    """Within assert_state_close of sonnet_update; x and indices unchanged."""
    want = sonnet_update(*state, decay, eps)
    assert_state_close([t.cpu() for t in got[:3]], want, (state[0].dtype, state[1].dtype, state[1].dtype))
    assert torch.equal(got[3].cpu(), state[3]) and torch.equal(got[4].cpu(), state[4]), "x and indices are inputs only"


def check_reference(state, got, decay, eps):
    """Within KERNEL_TOL of the reference on float64 copies (the sums 1e-4 more: float atomics add many rows
    in any order)."""
    rcb, rcs, res = reference_ema(state, decay, eps)
    close_to_f64(got[1], rcs)
    close_to_f64(got[2], res, atol=1e-4)
    close_to_f64(got[0], rcb, atol=KERNEL_TOL[got[0].dtype]["atol"] + 1e-4)
    assert got[0].dtype == state[0].dtype and got[1].dtype == state[1].dtype


# (x dtype, codebook dtype, decay, eps), float32 statistics
TRITON_EMA_CASES = [(torch.float32, torch.float32, 0.0, 1e-5), (torch.float32, torch.float32, 0.99, 1e-5),
                    (torch.float32, torch.float32, 1.0, 1e-3), (torch.float32, torch.float32, 0.5, 0.0),
                    (torch.float16, torch.float32, 0.9, 1e-5), (torch.bfloat16, torch.bfloat16, 0.9, 1e-5),
                    (torch.float64, torch.float16, 0.9, 1e-5), (torch.float32, torch.float64, 0.9, 1e-5)]
# the state as a builder (collection makes no tensors), named in the test's id
MATCH_CASES = {
    "triton": [(f"x={case_id(xdt)}-cb={case_id(cdt)}",
                partial(ema_state, 90, 40, 9, seed=40, cb_dtype=cdt, x_dtype=xdt), check_sonnet, decay, eps, det)
               for xdt, cdt, decay, eps in TRITON_EMA_CASES for det in (False, True)],
    "cuda": [(f"{n}x{k}x{d}-x={case_id(xdt)}-cb={case_id(cdt)}",
              partial(normal_ema_state, n, k, d, seed=n + k + d, cb_dtype=cdt, x_dtype=xdt), check_reference, 0.9, 1e-5,
              False)
             for cdt in KERNEL_DTYPES for xdt in KERNEL_DTYPES
             for n, k, d in [(0, 5, 3), (1, 1, 1), (7, 5, 3), (1000, 37, 19), (4096, 512, 64)]]
    + [("300x17x8", partial(normal_ema_state, 300, 17, 8, seed=3), check_reference, decay, eps, False)
       for decay, eps in [(0.0, 1e-5), (1.0, 1e-5), (0.99, 0.0), (0.5, 1.0)]],
}


@per_backend("name, make, check, decay, eps, det", MATCH_CASES)
def test_kernel_matches_the_truth(backend, name, make, check, decay, eps, det):
    """Mixed dtypes (float64 ones go to the reference), decays 0 to 1, the atomic and the deterministic mode."""
    state = make()
    got = on_device(state, backend.device)
    run_ema(got, decay, eps, det)
    check(state, got, decay, eps)


@per_backend("make, decay", {
    "triton": [(partial(ema_state, 60, 12, 5, seed=41, buf_dtype=torch.float64, cb_dtype=torch.bfloat16), 0.9)],
    "cuda": [(partial(normal_ema_state, 100, 9, 5, seed=7, cb_dtype=torch.float64, x_dtype=torch.float64,
                      buf_dtype=torch.float64), 0.8)]})
def test_kernel_float64_is_the_reference(backend, make, decay):
    """float64 statistics (and x and codebook, for CUDA): exactly the reference on the same tensors, within
    KERNEL_TOL of it on float64 CPU copies."""
    state = make()
    got, same = on_device(state, backend.device), on_device(state, backend.device)
    run_ema(got, decay, 1e-5)
    reference.ema_update_(*same, decay, 1e-5)
    for a, b, c in zip(got[:3], same[:3], reference_ema(state, decay, 1e-5)):
        assert_bitwise_equal(a, b, "float64 statistics")
        close_to_f64(a, c)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@on_backends("triton")
def test_kernel_strided_views_update_in_place(backend, det):
    dev = backend.device
    codebook, cluster_size, embed_sum, x, indices = on_device(ema_state(70, 24, 6, seed=42), dev)
    want = sonnet_update(*(t.cpu() for t in (codebook, cluster_size, embed_sum, x, indices)), 0.95, 1e-5)
    big_cb = torch.full((24, 12), 7.0, device=dev)
    cb_view = big_cb[:, ::2]
    cb_view.copy_(codebook)
    big_cs = torch.full((72,), 7.0, device=dev)
    cs_view = big_cs[::3]
    cs_view.copy_(cluster_size)
    idx_view = torch.stack([indices, torch.zeros_like(indices)], 1)[:, 0]  # stride 2
    state = [cb_view, cs_view, with_layout(embed_sum, "transposed"), with_layout(x, "offset"), idx_view]
    run_ema(state, 0.95, 1e-5, det)
    assert_state_close([t.cpu() for t in state[:3]], want, (torch.float32,) * 3)
    assert bool((big_cb[:, 1::2] == 7.0).all()) and bool((big_cs.view(24, 3)[:, 1:] == 7.0).all())


@on_backends("cuda")
def test_kernel_strided_state_as_the_reference(backend):
    cb, cs, es, x, idx = normal_ema_state(200, 11, 6, seed=4)
    big_cb = torch.full((11, 12), float("nan"))
    big_cb[:, ::2] = cb
    cbd, csd, esd, xd, idxd = on_device((big_cb, cs, es.t().contiguous(), x.t().contiguous(), idx), backend.device)
    cb_view, es_view, x_view = cbd[:, ::2], esd.t(), xd.t()
    run_ema([cb_view, csd, es_view, x_view, idxd], 0.9, 1e-5)
    rcb, rcs, res = reference_ema((cb, cs, es, x, idx), 0.9, 1e-5)
    close_to_f64(cb_view, rcb, atol=1e-4)
    close_to_f64(csd, rcs)
    close_to_f64(es_view, res, atol=1e-4)
    assert torch.isnan(cbd[:, 1::2]).all()  # the padding is untouched


@pytest.mark.parametrize("n", [0, 7])
@on_backends("triton")
def test_kernel_no_assigned_rows_only_decays(backend, n):
    state = ema_state(n, 10, 4, seed=43, unassigned=1.0)
    got = on_device(state, backend.device)
    run_ema(got, 0.8, 1e-5)
    check_sonnet(state, got, 0.8, 1e-5)


@on_backends("cpu", "reference", "triton", "cuda")
def test_kernel_nan_row(backend):
    """A NaN in row 7 (index 2) of x: only that column of that code is NaN, as the reference."""
    state = normal_ema_state(50, 6, 4, seed=5)
    state[3][7, 2] = float("nan")
    state[4][7] = 2
    got = on_device(state, backend.device)
    run_ema(got, 0.9, 1e-5)
    cb, es = got[0], got[2]
    rcb, _, res = reference_ema(state, 0.9, 1e-5)
    assert torch.isnan(cb[2, 2]) and torch.isnan(es[2, 2])
    assert not torch.isnan(cb[:, [0, 1, 3]]).any()
    close_to_f64(es, res, atol=1e-4)
    close_to_f64(cb, rcb, atol=1e-4)


@per_backend("make, row, bad, match", {
    "triton": [(partial(ema_state, 50, 24, 5, seed=44), 17, bad,
                r"vqkernels.triton.ema_update_: indices must be in \[-1, K=24\)") for bad in (24, 2 ** 40, -2)],
    "cuda": [(partial(normal_ema_state, 20, 5, 3, seed=8), 11, bad,
              r"vqkernels\.ema_update_: indices must be in \[-1, K=5\), got values outside it")  # the reference's
             for bad in (5, -2, 1 << 40)]})
def test_kernel_out_of_range_indices_raise(backend, make, row, bad, match):
    """The backend's own op checks the indices (its message) before anything is written."""
    state = on_device(make(), backend.device)
    state[4][row] = bad
    saved = [t.clone() for t in state[:3]]
    with pytest.raises(ValueError, match=match):
        backend.ops.ema_update_(*state, 0.9, 1e-5)
    for t, s in zip(state[:3], saved):
        assert torch.equal(t, s), "a failed update must leave the codebook and statistics unchanged"


def agrees_with_atomics(state, first, decay, eps):
    """The float-atomics path gives the same values up to rounding."""
    fast = on_device(state, first[0].device)
    run_ema(fast, decay, eps, det=False)
    for a, b in zip(first[:3], fast[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def near_the_reference(state, first, decay, eps):
    rcb, rcs, res = reference_ema(state, decay, eps)
    close_to_f64(first[1], rcs)
    close_to_f64(first[2], res, atol=1e-4)
    close_to_f64(first[0], rcb, atol=1e-4)


@per_backend("make, decay, check", {
    "triton": [(partial(ema_state, 400, 16, 20, seed=45), 0.99, agrees_with_atomics)],
    "cuda": [(partial(normal_ema_state, 5000, 64, 32, seed=6, x_dtype=torch.bfloat16), 0.9, near_the_reference)]})
def test_kernel_deterministic_repeats_bitwise(backend, make, decay, check):
    state = make()
    first, again = on_device(state, backend.device), on_device(state, backend.device)
    run_ema(first, decay, 1e-5, det=True)
    run_ema(again, decay, 1e-5, det=True)
    for a, b in zip(first[:3], again[:3]):
        assert_bitwise_equal(a, b, "deterministic repeat")
    check(state, first, decay, 1e-5)


def _strided_state(seed):
    cb, cs, es, x, idx = ema_state(30, 8, 5, seed=seed)
    return with_layout(cb, "strided"), cs, with_layout(es, "transposed"), with_layout(x, "offset"), idx


KERNEL_OPCHECK_STATES = {
    "f32": partial(ema_state, 30, 8, 5, seed=46), "strided": partial(_strided_state, 50),
    "empty": partial(ema_state, 0, 8, 5, seed=49),
    "f64-buffers": partial(ema_state, 30, 8, 5, seed=47, buf_dtype=torch.float64, cb_dtype=torch.bfloat16),
    "bf16-f16": partial(ema_state, 30, 8, 5, seed=48, cb_dtype=torch.bfloat16, x_dtype=torch.float16),
    "normal-empty": partial(normal_ema_state, 0, 8, 5, seed=10, cb_dtype=torch.bfloat16),
    "normal": partial(normal_ema_state, 30, 8, 5, seed=10, cb_dtype=torch.bfloat16),
}


@per_backend("state, det", {"triton": [("f32", False), ("strided", False), ("empty", False), ("f64-buffers", False),
                                       ("bf16-f16", True)],
                            "cuda": [("normal-empty", False), ("normal", False)]})
def test_kernel_opcheck(backend, state, det):
    with deterministic(det):
        kernel_opcheck(backend, "ema_update_", (*on_device(KERNEL_OPCHECK_STATES[state](), backend.device), 0.9, 1e-5))


KERNEL_BAD = {  # what the backend's own op says of bad inputs
    "triton": [(lambda s: (s[0], s[1].half(), s[2], s[3], s[4], 0.9, 1e-5),
                "cluster_size and embed_sum must both be float32"),
               (lambda s: (s[0], s[1][:3], s[2], s[3], s[4], 0.9, 1e-5), r"cluster_size must have shape \[K=8\]"),
               (lambda s: (s[0], s[1], s[2], s[3][:, :2], s[4], 0.9, 1e-5), r"x must be 2-D \[N, D=5\]"),
               (lambda s: (s[0], s[1], s[2], s[3], s[4].int(), 0.9, 1e-5), "indices must be int64"),
               (lambda s: (s[0], s[1], s[2], s[3], s[4], 1.5, 1e-5), r"decay must be in \[0, 1\]"),
               (lambda s: (s[0], s[1], s[2], s[3], s[4], 0.9, -1.0), "eps must be >= 0")],
    "cuda": [(lambda s: (s[0], s[1].half(), s[2], s[3], s[4], 0.9, 1e-5),
              "cluster_size and embed_sum must both be float32 or both float64"),
             (lambda s: (s[0], s[1], s[2], s[3], s[4], 1.5, 1e-5), r"decay must be in \[0, 1\]"),
             (lambda s: (s[0], s[1], s[2], s[3][:, :2], s[4], 0.9, 1e-5), r"x must be 2-D \[N, D=3\]"),
             (lambda s: (s[0], s[1], s[2], s[3], s[4].int(), 0.9, 1e-5), "indices must be int64"),
             (lambda s: (s[0], s[1], s[2], s[3].cpu(), s[4], 0.9, 1e-5), "x is on cpu")],
}
KERNEL_BAD_STATE = {"triton": partial(ema_state, 6, 8, 5, seed=51), "cuda": partial(normal_ema_state, 20, 5, 3, seed=9)}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    assert_kernel_rejects(backend, "ema_update_", make(on_device(KERNEL_BAD_STATE[backend.name](), backend.device)),
                          match)


@on_backends("triton", gpu=True)
def test_kernel_large(backend, det):
    state = ema_state(20000, 512, 64, seed=62, x_dtype=torch.bfloat16)
    want = sonnet_update(*state, 0.99, 1e-5)
    runs = []
    for _ in range(2):
        out = on_device(state, backend.device)
        run_ema(out, 0.99, 1e-5, det)
        runs.append(out[:3])
    assert_state_close([t.cpu() for t in runs[0]], want, (torch.float32,) * 3)
    if det:
        for a, b in zip(*runs):
            assert_bitwise_equal(a, b, "deterministic repeat")
