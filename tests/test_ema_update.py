"""vqkernels.ema_update_: the in-place EMA codebook update (Sonnet VectorQuantizerEMA)."""

import pytest
import torch

from vq_helpers import DTYPES, assert_deterministic, gen, opcheck, reference, vqkernels, with_layout

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
