"""Helpers shared by the vqkernels tests: float64 ground truth, tolerances, data builders,
memory layouts, determinism and opcheck wrappers.

Everything here is computed independently of ``vqkernels.reference`` (direct-form
distances, hand-written normalisation), so the tests can judge the reference too.
"""

import contextlib
import os
import warnings
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # no extension built: the reference serves the CPU
    import vqkernels
    from vqkernels import reference  # noqa: F401  (re-exported for the tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
METRICS = ("l2", "cosine", "ip")
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
NORM_EPS = 1e-12  # as torch.nn.functional.normalize, which the spec's "l2-normalised" refers to

# Hypothesis: no deadline (the first call of a shape can be slow), and function-scoped
# fixtures (the ISA switch) are fine to share between the examples of one test.
HYPOTHESIS_SETTINGS = dict(deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])


def hyp_settings(max_examples):
    """Settings of one property test; VQK_HYPOTHESIS_SCALE=n runs n times the examples (soak runs)."""
    scale = int(os.environ.get("VQK_HYPOTHESIS_SCALE", "1"))
    return settings(max_examples=max_examples * scale, **HYPOTHESIS_SETTINGS)


def require_triton():
    """vqkernels.triton, or skip the calling test module: Triton missing, or no GPU and no
    interpreter (tests/conftest.py turns TRITON_INTERPRET=1 on when there is no GPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
    import vqkernels.triton
    return vqkernels.triton


def reference_serves(op):
    """True when the pure-PyTorch reference kernel serves `op` on the CPU."""
    return vqkernels.backend(op, "cpu").startswith("reference")


def reference_xfail(op, reason, strict=False):
    """Mark a test of a known defect of the reference kernel of `op` (reported, not fixed
    here) as an expected failure while the reference serves the CPU. strict=False where the
    defect shows on some data only."""
    return pytest.mark.xfail(reference_serves(op), reason=f"reference kernel: {reason}", strict=strict)


# Known defects of the reference kernels:
# Its matrix product (MKL GEMM) rounds the dot products with identical codebook rows
# differently depending on the column, so a later copy of a code can win by one ulp,
# against "ties go to the lowest index". The copy rule is checked whenever compiled
# kernels serve the CPU; under the reference the tests dedicated to it are expected failures.
DUPLICATE_BUG = "GEMM rounds identical codebook rows differently by column, so a later copy can win"
# vq_quantize's losses are torch.mean, whose parallel reduction sums in another order with
# 1 thread than with 2: the losses differ in the last bits.
LOSS_THREADS_BUG = "torch.mean of the losses differs bitwise between 1 and 2 threads"


def duplicates_xfail(op):
    return reference_xfail(op, DUPLICATE_BUG)


# ---------------------------------------------------------------------------------------
# dtypes and tolerances


def compute_dtype(*tensors):
    """The spec's result dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def unit_roundoff(dtype):
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def _nan_rows(t):
    return torch.isnan(t.double()).any(1)


def distance_tolerance(x, codebook, metric):
    """Per-row bound [N] (float64) on how far a correct kernel may stray from exact arithmetic.

    A kernel may use the expanded form |x|^2 + |c|^2 - 2<x, c> with accumulation in the
    compute dtype (unit roundoff u = 2**-24 for float32, 2**-53 for float64). Each length-D
    sum of it has a worst-case rounding error of at most D*u*sum|terms| whatever the
    summation order, and every sum|terms| is at most S = |x|^2 + |c|^2 (Cauchy-Schwarz:
    2*sum|x_i c_i| <= |x|^2 + |c|^2); the final additions add about 4u*S. One computed
    distance is so within 2*(D + 2)*u*S of the exact one, and the chosen code can lose to
    the true minimum by the error of two distances, 4*(D + 2)*u*S. We allow twice that:

        l2:     tol = 8 * (D + 2) * u * (|x|^2 + max_k |c_k|^2)
        ip:     tol = 8 * (D + 2) * u * |x| * max_k |c_k|      (one dot product: D*u*|x||c|)
        cosine: tol = 8 * (D + 2) * u                           (unit vectors: normalising
                each side costs about (D/2 + 2)u, the dot D*u, and 1 - s one more u)

    Inputs are judged as the kernel sees them, i.e. already rounded to their dtype.
    """
    d = x.shape[1]
    u = unit_roundoff(compute_dtype(x, codebook))
    xd, cd = x.double(), codebook.double()
    good = ~_nan_rows(cd)
    cmax = cd[good].norm(dim=1).max() if bool(good.any()) else torch.tensor(0.0, dtype=torch.float64)
    xn = xd.norm(dim=1)
    if metric == "l2":
        scale = xn.square() + cmax.square()
    elif metric == "ip":
        scale = xn * cmax
    else:
        scale = torch.ones_like(xn)
    return 8.0 * (d + 2) * u * scale


def normalize64(t):
    """Rows divided by max(|row|, 1e-12), in float64 (what 'l2-normalised' means in the spec)."""
    t = t.double()
    return t / t.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def true_distances(x, codebook, metric):
    """All distances [N, K] in float64 from the (dtype-rounded) inputs; +inf for NaN codes.

    l2 uses the direct form sum((x - c)^2) (no cancellation, relative error of a few ulps
    of float64), ip and cosine a float64 matrix product; both are far below the tolerance.
    """
    xd, cd = x.double(), codebook.double()
    if metric == "l2":
        dist = torch.cdist(xd, cd, compute_mode="donot_use_mm_for_euclid_dist").square()
    elif metric == "ip":
        dist = -(xd @ cd.T)
    else:
        dist = 1.0 - normalize64(xd) @ normalize64(cd).T
    return dist.masked_fill(_nan_rows(cd).unsqueeze(0), float("inf"))


def first_identical_row(codebook):
    """[K] int64: for every code, the lowest index of a code with exactly the same values."""
    k = codebook.shape[0]
    _, inverse = torch.unique(codebook.double(), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), k, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(k), reduce="amin")
    return first[inverse]


# ---------------------------------------------------------------------------------------
# assertion helpers


def fail_rows(bad, what, **columns):
    """Raise an AssertionError naming the first rows where `bad` [N] is True."""
    bad = bad.reshape(-1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten()[:5].tolist()
    detail = "; ".join(
        f"row {r}: " + ", ".join(f"{name}={col[r].tolist()}" for name, col in columns.items()) for r in rows)
    raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} rows fail; {detail}")


def check_search_outputs(x, codebook, indices, distances, extra_shape=()):
    n = x.shape[0]
    assert indices.dtype == torch.int64, indices.dtype
    assert tuple(indices.shape) == (n, *extra_shape), indices.shape
    if distances is not None:
        assert distances.dtype == compute_dtype(x, codebook), distances.dtype
        assert tuple(distances.shape) == (n, *extra_shape), distances.shape


def check_nearest(x, codebook, metric, indices, distances, op="nearest_code", duplicates=None):
    """Judge nearest_code's output row by row against float64 truth (see distance_tolerance).

    * a row of x with a NaN: index -1 and distance NaN;
    * no usable code (every code holds a NaN): index -1 and distance NaN;
    * else the chosen code's exact distance is within tol of the exact minimum, the
      returned distance is within tol of the chosen code's exact distance, and no
      earlier code has exactly the same values (ties go to the lowest index; `duplicates`
      None: checked unless the reference serves `op`, see DUPLICATE_BUG).
    `distances` may be None (vq_quantize returns none).
    """
    check_search_outputs(x, codebook, indices, distances)
    n, k = x.shape[0], codebook.shape[0]
    if n == 0:
        return
    nan_row = _nan_rows(x)
    usable = ~_nan_rows(codebook)
    no_code = nan_row | (not bool(usable.any()))
    fail_rows(no_code & (indices != -1), "rows without a nearest code must get index -1", index=indices)
    if distances is not None:
        fail_rows(no_code & ~torch.isnan(distances), "rows without a nearest code must get distance NaN",
                  distance=distances)
    ok = ~no_code
    if not bool(ok.any()):
        return
    idx, xs = indices[ok], x[ok]
    fail_rows((idx < 0) | (idx >= k), "index out of range", index=idx)
    fail_rows(~usable[idx], "chose a codebook row holding a NaN", index=idx)
    dist = true_distances(xs, codebook, metric)
    tol = distance_tolerance(xs, codebook, metric)
    best, best_idx = dist.min(1)
    chosen = dist.gather(1, idx.unsqueeze(1)).squeeze(1)
    fail_rows(chosen > best + tol, f"{metric}: chosen code is not the nearest within tolerance", index=idx,
              true_index=best_idx, chosen=chosen, best=best, tol=tol)
    if distances is not None:
        got = distances[ok].double()
        fail_rows(~((got - chosen).abs() <= tol), f"{metric}: returned distance is not the chosen code's",
                  returned=got, exact=chosen, tol=tol)
    if duplicates or (duplicates is None and not reference_serves(op)):
        first = first_identical_row(codebook)
        fail_rows(first[idx] != idx, "ties go to the lowest index: an identical earlier row exists", index=idx,
                  first_identical=first[idx])


def check_topk(x, codebook, metric, k, indices, distances, duplicates=None):
    """Judge nearest_code_topk's output row by row against float64 truth.

    Beyond the rules of check_nearest: the j-th returned code's exact distance is within tol
    of the exact j-th smallest distance, codes are distinct, returned distances are sorted
    with equal distances in increasing index order, an identical earlier code comes before
    a later one (not checked under the reference, see DUPLICATE_BUG), and slots
    beyond the usable codes hold -1 / +inf.
    """
    check_search_outputs(x, codebook, indices, distances, (k,))
    n = x.shape[0]
    if n == 0:
        return
    nan_row = _nan_rows(x)
    fail_rows(nan_row & (indices != -1).any(1), "a NaN row must get indices -1", indices=indices)
    fail_rows(nan_row & ~torch.isnan(distances).all(1), "a NaN row must get distances NaN", distances=distances)
    ok = ~nan_row
    if not bool(ok.any()):
        return
    idx, got, xs = indices[ok], distances[ok].double(), x[ok]
    usable = ~_nan_rows(codebook)
    n_usable = int(usable.sum())
    present = min(k, n_usable)
    missing_idx, missing_dist = idx[:, present:], got[:, present:]
    fail_rows((missing_idx != -1).any(1) | ~(missing_dist == float("inf")).all(1),
              "slots beyond the usable codes must hold -1 / +inf", indices=missing_idx, distances=missing_dist)
    if present == 0:
        return
    idx, got = idx[:, :present], got[:, :present]
    fail_rows(((idx < 0) | (idx >= codebook.shape[0])).any(1), "index out of range", indices=idx)
    fail_rows((~usable[idx.clamp(0, codebook.shape[0] - 1)]).any(1), "chose a codebook row holding a NaN",
              indices=idx)
    srt = idx.sort(1).values
    fail_rows((srt[:, 1:] == srt[:, :-1]).any(1), "codes repeat within a row", indices=idx)
    dist = true_distances(xs, codebook, metric)
    tol = distance_tolerance(xs, codebook, metric).unsqueeze(1)
    kth_best = dist.sort(1).values[:, :present]
    chosen = dist.gather(1, idx)
    fail_rows((chosen > kth_best + tol).any(1), f"{metric}: j-th code is not the j-th nearest within tolerance",
              indices=idx, chosen=chosen, best=kth_best)
    fail_rows((~((got - chosen).abs() <= tol)).any(1), f"{metric}: returned distances are not the codes'",
              returned=got, exact=chosen)
    fail_rows((got[:, 1:] < got[:, :-1]).any(1), "distances are not sorted", distances=got)
    tie = got[:, 1:] == got[:, :-1]
    fail_rows((tie & (idx[:, 1:] < idx[:, :-1])).any(1), "equal distances must list the lower index first",
              indices=idx, distances=got)
    if duplicates or (duplicates is None and not reference_serves("nearest_code_topk")):
        first = first_identical_row(codebook)[idx]  # [n, present]
        # slot s holds a later copy of a code: that code's first copy must sit in a slot t < s
        earlier = torch.ones(present, present, dtype=torch.bool).tril(-1)  # [s, t]: t < s
        found = ((idx.unsqueeze(1) == first.unsqueeze(2)) & earlier).any(2)
        fail_rows(((first != idx) & ~found).any(1), "a later identical code is listed without the earlier one first",
                  indices=idx, first_identical=first)


def bits(t):
    """The tensor's raw bits (so NaN == NaN and -0.0 != 0.0 when compared)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.contiguous().view(view) if t.is_floating_point() else t


def assert_bitwise_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{what}: results differ bitwise"


@contextlib.contextmanager
def forced_cpu_isa(wanted):
    """The CPU kernels forced to the instruction set ``wanted`` for the block (the test is skipped where this CPU
    lacks it), then 'auto' again."""
    try:
        got = vqkernels.set_cpu_isa(wanted)
    except (ValueError, RuntimeError) as exc:
        vqkernels.set_cpu_isa("auto")
        pytest.skip(f"CPU ISA {wanted!r} unavailable: {exc}")
    if got != wanted:
        vqkernels.set_cpu_isa("auto")
        pytest.skip(f"CPU ISA {wanted!r} unavailable here (set_cpu_isa gave {got!r})")
    try:
        yield
    finally:
        vqkernels.set_cpu_isa("auto")


def num_threads(n):
    return _temporarily(torch.get_num_threads, torch.set_num_threads, n)


def assert_deterministic(fn):
    """fn() returns a tuple of tensors: equal bitwise when repeated and with 1 or 2 threads."""
    with num_threads(2):
        first = fn()
        again = fn()
    with num_threads(1):
        single = fn()
    for label, other in (("repeated call", again), ("1 thread vs 2", single)):
        assert len(first) == len(other)
        for i, (a, b) in enumerate(zip(first, other)):
            assert_bitwise_equal(a, b, f"{label}, output {i}")


# ---------------------------------------------------------------------------------------
# data


def gen(seed):
    return torch.Generator().manual_seed(seed)


def with_layout(t, layout):
    """The same values as t in another memory layout; padding around views is NaN, so a
    kernel that ignores strides or the storage offset reads NaNs."""
    n, d = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major: strides (1, n)
        return t.t().contiguous().t()
    if layout == "strided":  # every other row, every third column
        view = t.new_full((2 * n + 1, 3 * d), float("nan"))[1::2, ::3]
    elif layout == "offset":  # x = big[3:, 2:]
        view = t.new_full((n + 3, d + 2), float("nan"))[3:, 2:]
    else:
        raise ValueError(layout)
    view.copy_(t)
    return view


def as_input(t64, dtype, layout="contiguous", requires_grad=False):
    t = with_layout(t64.to(dtype), layout)
    return t.requires_grad_(requires_grad) if requires_grad else t


def clustered(n, k, d, seed, scale=1.0, noise=0.1, n_dup=0):
    """float64 (x [n, d], codebook [k, d], targets [n]): Gaussian codes times `scale`, x =
    the target code plus noise * scale * N(0, 1) (noise None: x unrelated to the codes).
    `n_dup` codebook rows are overwritten with copies of other rows, and half the rows of x
    then aim at a copied row (ties the kernel must send to the lower index)."""
    g = gen(seed)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, k, (n,), generator=g)
    copies = []
    for _ in range(n_dup if k > 1 else 0):
        src, dst = torch.randperm(k, generator=g)[:2].tolist()
        codebook[dst] = codebook[src]
        copies += [src, dst]
    if copies and n:
        pick = torch.randint(0, len(copies), (n,), generator=g)
        aim = torch.tensor(copies)[pick]
        targets = torch.where(torch.rand(n, generator=g) < 0.5, aim, targets)
    if noise is None:
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    else:
        x = codebook[targets] + torch.randn(n, d, generator=g, dtype=torch.float64) * (noise * scale)
    return x, codebook, targets


def max_separated_codes(d):
    """How many codes separated() can build in dimension d (grid base at most 4)."""
    return 0 if d < 2 else min(2000, 4 ** (d - 1))


def separated(n, k, d, seed, scale=1.0):
    """float64 (x [n, d], codebook [k, d], targets [n]) with one unambiguous nearest code per
    row under every metric, even after rounding to bfloat16.

    Codes are distinct points of a small grid (base B <= 4, centred digits) in d - 1
    coordinates plus a last coordinate 2, scaled to unit length: no two are parallel, so
    they are apart in angle and in distance (|c_i - c_j|^2 >= 1 / max|grid point|^2, at
    least 1/79 for d = 300). Equal norms make ip agree with l2 and cosine. x is the target
    code plus noise of norm about 1e-3, times a power-of-two scale.
    """
    assert 1 <= k <= max_separated_codes(d)
    g = gen(seed)
    base = 2
    while base ** (d - 1) < k:
        base += 1
    digits = torch.empty(k, d - 1, dtype=torch.float64)
    j = torch.arange(k)
    for col in range(d - 1):
        digits[:, col] = (j % base).double()
        j = j // base
    grid = torch.cat([digits - (base - 1) / 2.0, torch.full((k, 1), 2.0, dtype=torch.float64)], 1)
    signs = torch.randint(0, 2, (1, d), generator=g).double() * 2 - 1  # flip axes: codes in every orthant
    codes = (grid * signs)[torch.randperm(k, generator=g)]
    codes = codes / codes.norm(dim=1, keepdim=True)
    targets = torch.randint(0, k, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) * (1e-3 / d ** 0.5)
    return (codes[targets] + noise) * scale, codes * scale, targets


def margin_ok(x, codebook, metric, targets):
    """True per row when the target is the exact nearest code by more than twice the tolerance."""
    dist = true_distances(x, codebook, metric)
    tol = distance_tolerance(x, codebook, metric)
    own = dist.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = dist.scatter(1, targets.unsqueeze(1), float("inf")).min(1).values
    return others - own > 2 * tol


def _size(draw, lo, hi):
    """An integer in [lo, hi] from a drawn third of the range (low, middle or top), so that
    large shapes come up as often as small ones (plain st.integers favours small values)."""
    a, b = lo + (hi - lo) // 20, lo + (hi - lo) // 3
    band = draw(st.sampled_from([(lo, a), (a + 1, b), (b + 1, hi)]))
    return draw(st.integers(*band))


@st.composite
def search_cases(draw, max_n=300, max_d=300, max_k=2000):
    """Drawn parameters of a search problem (the tensors come from a drawn seed)."""
    k = _size(draw, 1, max_k)
    return dict(
        n=_size(draw, 0, max_n), d=_size(draw, 1, max_d), k=k,
        metric=draw(st.sampled_from(METRICS)),
        x_dtype=draw(st.sampled_from(DTYPES)), cb_dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(LAYOUTS)), cb_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        scale=draw(st.sampled_from([1e-2, 1.0, 30.0])),
        noise=draw(st.sampled_from([None, 1e-3, 0.1, 1.0])),
        n_dup=draw(st.integers(0, min(k - 1, 8))),
    )


@st.composite
def separated_cases(draw, max_n=300, max_d=300):
    d = _size(draw, 2, max_d)
    return dict(
        n=_size(draw, 1, max_n), d=d, k=_size(draw, 1, max_separated_codes(d)),
        metric=draw(st.sampled_from(METRICS)),
        x_dtype=draw(st.sampled_from(DTYPES)), cb_dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(LAYOUTS)), cb_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        scale=draw(st.sampled_from([2.0 ** -4, 1.0, 2.0 ** 4])),
    )


def build_case(case, separated_codes=False):
    """(x, codebook, targets) of a drawn case, in the drawn dtypes and layouts."""
    if separated_codes:
        x, codebook, targets = separated(case["n"], case["k"], case["d"], case["seed"], case["scale"])
    else:
        x, codebook, targets = clustered(case["n"], case["k"], case["d"], case["seed"], case["scale"],
                                         case["noise"], case["n_dup"])
    return (as_input(x, case["x_dtype"], case["x_layout"]), as_input(codebook, case["cb_dtype"], case["cb_layout"]),
            targets)


def assert_separated(x, codebook, metric, targets, indices):
    """Well-separated data: the construction guarantees a clear winner (checked first, so a
    weak generator cannot make the test vacuous), and the index must be exactly it."""
    ok = margin_ok(x, codebook, metric, targets)
    fail_rows(~ok, "generator: target not separated from the other codes", target=targets)
    fail_rows(indices != targets, f"{metric}: wrong index on well-separated data", index=indices, target=targets)


# ---------------------------------------------------------------------------------------
# vector-quantize-pytorch's LFQ clamps probabilities at this inside its logs (the truths of the LFQ tests use it)
LFQ_PROB_EPS = 1e-5
# where the Triton tests run: the GPU, else CPU tensors through the interpreter
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------
# backends: the `backend` fixture (tests/conftest.py) runs a test with one backend serving the ops
#
# A test taking `backend` runs once per backend of DEFAULT_BACKENDS, or with the ones it names through
# on_backends(...) / per_backend(...) (per-backend cases: the Triton interpreter is ~1000x slower, so its
# shapes stay tiny). The fixture skips what cannot run here (CUDA without a GPU, Triton not installed) and,
# for the test, routes every op the backend implements on its device to it (vqkernels.use_backend): the
# public ops, torch.ops.vqkernels.<op> and vqkernels.<op>, then run that backend's kernels. Its own namespace
# (Backend.ops) is for what only the backend's kernel says (its input checks); float64 calls go through the
# public op, whose router hands them to the reference.

GPU = torch.cuda.is_available()
# the devices the backends' tests put their tensors on
BACKEND_DEVICES = {"cpu": "cpu", "reference": "cpu", "triton": TRITON_DEV, "cuda": "cuda"}
# the backends a test taking `backend` runs with unless it names others: the compiled kernels
DEFAULT_BACKENDS = ("cpu", "triton", "cuda")
# the dtypes the kernels compute in float32 (float64 goes to the reference)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend(NamedTuple):
    """What the `backend` fixture gives a test: the backend serving the ops now and its tensors' device."""
    name: str
    device: str

    @property
    def ops(self):
        """The backend's own op namespace (torch.ops.vqkernels_triton, ...): its kernels called directly."""
        return getattr(torch.ops, vqkernels._backend.NAMESPACES[self.name])


def backend_marks(name, gpu=False):
    """The marks of a `backend` parameter: `gpu_backend` for the GPU backends' (the tests benchmarks/gpu.sh
    runs); `cuda` and a skip without a GPU for the CUDA backend, and for any with gpu=True (real sizes)."""
    if name not in BACKEND_DEVICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(BACKEND_DEVICES)}")
    marks = [pytest.mark.gpu_backend] if name in vqkernels._backend.GPU_BACKENDS else []
    if gpu or name == "cuda":
        marks += [pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a CUDA device")]
    if name == "cuda":
        marks.append(pytest.mark.skipif(not vqkernels.cuda_compiled(),
                                        reason="the extension was built without its CUDA sources"))
    return marks


def backend_params(*names, gpu=False):
    """pytest parameters of the `backend` fixture (indirect): the named backends, DEFAULT_BACKENDS if none."""
    return [pytest.param(name, marks=backend_marks(name, gpu), id=name) for name in names or DEFAULT_BACKENDS]


def on_backends(*names, gpu=False):
    """Decorator: the test runs with each named backend (gpu=True: only on a GPU, marked `cuda`)."""
    return pytest.mark.parametrize("backend", backend_params(*names, gpu=gpu), indirect=True)


def case_id(value):
    """A parameter's part of a test id: shapes as 2x3x4, dtypes without "torch.", builders left out (None)."""
    if callable(value):  # a builder: the other values name the case
        return None
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def per_backend(argnames, cases, gpu=False):
    """Decorator: @pytest.mark.parametrize("backend, <argnames>") with each backend's own cases.

    ``cases`` maps a backend name (or several, comma-separated) to its list of values of ``argnames`` (a tuple
    per case when argnames names several), e.g. per_backend("shape", {"cpu, triton": TINY, "cuda": REAL_SHAPES});
    gpu=True as on_backends.
    """
    names = [a.strip() for a in argnames.split(",")]
    params = []
    for key, values in cases.items():
        for name, value in ((n.strip(), v) for n in key.split(",") for v in values):
            value = tuple(value) if len(names) > 1 else (value,)
            assert len(value) == len(names), (argnames, value)
            params.append(pytest.param(name, *value, marks=backend_marks(name, gpu),
                                       id="-".join([name] + [i for i in map(case_id, value) if i is not None])))
    return pytest.mark.parametrize(["backend"] + names, params, indirect=["backend"])


def backend_names(fn):
    """The backends a test function runs with, from its parametrize marks (tests/test_registry.py)."""
    import inspect
    names = set()
    marked = False
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = mark.args[0]
        argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        if "backend" not in argnames:
            continue
        marked = True
        indirect = mark.kwargs.get("indirect", False)
        if not (indirect is True or "backend" in (indirect or ())):
            continue  # not the fixture's parameters (test_backends.py names its own argument `backend`)
        i = argnames.index("backend")
        for value in mark.args[1]:
            values = value.values if hasattr(value, "values") else value if len(argnames) > 1 else (value,)
            names.add(values[i])
    if not marked and "backend" in inspect.signature(fn).parameters:
        names.update(DEFAULT_BACKENDS)
    return names


# ---------------------------------------------------------------------------------------
# the GPU kernels' search checks: data, and a float32-accumulation tolerance


def randn_problem(n, k, d, dtype, seed=0, device="cpu"):
    """(x [n, d], codebook [k, d]): standard normal values (drawn in float32) in dtype, on device."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    return x.to(device), c.to(device)


def near_codes_problem(n, k, d, dtype, seed=0, device="cpu"):
    """(x, codebook) in dtype on device: rows of x near codes (vq_helpers.clustered, noise 0.3), so that the
    k nearest codes are spread out and not all ties."""
    x, c, _ = clustered(n, k, d, seed, noise=0.3)
    return x.to(dtype).to(device), c.to(dtype).to(device)


def assert_float64_is_the_reference(got, same_device, cpu, rtol=1e-12, atol=1e-12):
    """float64 calls go to the reference: ``got`` is exactly its outputs on the same tensors (``same_device``),
    and close to its outputs on CPU copies (``cpu``)."""
    assert len(got) == len(same_device) == len(cpu)
    for g, s, c in zip(got, same_device, cpu):
        assert_bitwise_equal(g, s, "float64")
        torch.testing.assert_close(g.cpu(), c, rtol=rtol, atol=atol, equal_nan=True)


def integer_problem(n, k, d, dtype, seed=0, device="cpu"):
    """(x, codebook) with entries in {-3..3}: every l2 / ip distance is exact in float32, in any summation order."""
    g = gen(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    c = torch.randint(-3, 4, (k, d), generator=g).to(dtype)
    return x.to(device), c.to(device)


def f32_tolerance(x, codebook, metric):
    """Per-row tolerance [N] (float64, CPU) of a float32-accumulated distance: 1e-5 sqrt(D) for cosine, else
    2e-6 sqrt(D) (1 + |x|^2 + max_k |c_k|^2) (the GPU kernels' tests; distance_tolerance is the rigorous one)."""
    x, c = x.detach().double().cpu(), codebook.detach().double().cpu()
    d = max(x.shape[1], 1)
    if metric == "cosine":
        return torch.full((x.shape[0],), 1e-5 * d ** 0.5, dtype=torch.float64)
    return 2e-6 * d ** 0.5 * (1.0 + (x * x).sum(1) + (c * c).sum(1).max())


def check_nearest_f32(x, codebook, metric, indices, distances):
    """A float32 kernel's nearest_code outputs on finite data, on x's device: indices of a nearest code within
    f32_tolerance of the float64 truth, float32 distances those of the chosen codes within it."""
    n = x.shape[0]
    assert indices.shape == (n,) and indices.dtype == torch.int64 and indices.device == x.device
    assert distances.shape == (n,) and distances.dtype == torch.float32 and distances.device == x.device
    if n == 0:
        return
    idx = indices.cpu()
    assert bool(((idx >= 0) & (idx < codebook.shape[0])).all()), idx
    truth, tol = true_distances(x.cpu(), codebook.cpu(), metric), f32_tolerance(x, codebook, metric)
    chosen = truth.gather(1, idx.unsqueeze(1)).squeeze(1)
    gap = chosen - truth.min(1).values
    assert bool((gap <= tol).all()), f"not nearest: gap {gap.max().item()} > tol"
    err = (distances.cpu().double() - chosen).abs()
    assert bool((err <= tol).all()), f"distance error {err.max().item()}"


def check_topk_f32(x, codebook, metric, k, indices, distances):
    """A float32 kernel's nearest_code_topk outputs on finite data: k distinct codes, each within f32_tolerance
    of the k nearest, distances sorted and within it of the chosen codes'."""
    n = x.shape[0]
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert distances.shape == (n, k) and distances.dtype == torch.float32
    if n == 0:
        return
    idx, dist = indices.cpu(), distances.cpu().double()
    assert bool(((idx >= 0) & (idx < codebook.shape[0])).all()), idx
    assert all(len(set(row)) == k for row in idx.tolist()), "repeated code in a row"
    truth, tol = true_distances(x.cpu(), codebook.cpu(), metric), f32_tolerance(x, codebook, metric).unsqueeze(1)
    chosen = truth.gather(1, idx)
    kth = truth.sort(1).values[:, k - 1:k]
    assert bool((chosen <= kth + tol).all()), "a chosen code is not among the k nearest"
    assert bool(((dist - chosen).abs() <= tol).all()), f"distance error {(dist - chosen).abs().max().item()}"
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "distances not sorted"


def _search_sample(xdt, cdt, layout="contiguous", n=9):
    def build(device):
        x, c = randn_problem(9, 6, 5, torch.float32, seed=13)
        code_layout = "transposed" if layout == "strided" else "contiguous"
        return with_layout(x[:n].to(xdt), layout).to(device), with_layout(c.to(cdt), code_layout).to(device)
    return build


# opcheck samples of the search kernels: name -> a builder of (x [9, 5], codebook [6, 5]) on a device (called in
# the tests, so that collecting them needs no GPU)
KERNEL_SEARCH_SAMPLES = {
    "f32": _search_sample(torch.float32, torch.float32), "f16-bf16": _search_sample(torch.float16, torch.bfloat16),
    "bf16": _search_sample(torch.bfloat16, torch.bfloat16), "f16": _search_sample(torch.float16, torch.float16),
    "f64": _search_sample(torch.float64, torch.float64),
    "strided": _search_sample(torch.float32, torch.float32, "strided"),
    "empty": _search_sample(torch.float32, torch.float32, n=0),
}


def kernel_opcheck(backend, op, args):
    """opcheck of the backend's own op, or of the public op (served by the backend) for a call with a float64
    tensor: the router hands those to the reference, and the GPU backends' ops refuse them."""
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
        opcheck(op, args)
    else:
        opcheck(getattr(backend.ops, op).default, args)


def seeded_randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    """Standard normal values (drawn in float64) times scale, in dtype on device."""
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def nan_equal(a, b):
    """Equal values (NaN == NaN), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# tolerance of a float32-computed result stored in dtype, against the float64 truth (the CUDA kernels' tests)
KERNEL_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
              torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def f64(t):
    """A CPU float64 copy of a floating tensor (other tensors: a CPU copy)."""
    return t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu()


def close_to_f64(actual, expected, dtype=None, **kw):
    """actual (any device and dtype) against expected (CPU float64) within KERNEL_TOL of ``dtype`` (default:
    actual's; ``kw`` overrides), NaNs in the same places."""
    opts = dict(KERNEL_TOL[dtype or actual.dtype], **kw)
    torch.testing.assert_close(actual.cpu().double(), expected.double(), equal_nan=True, check_dtype=False, **opts)


def nan_search_problem(k, dtype, device):
    """(x [40, 13], codebook [k, 13], keep, usable) in dtype on device: rows 0, 17 and 39 of x hold a NaN, codes 1
    and k - 5 too (code k - 5 would be nearest to row 3); keep [40] and usable [k] mark the others (CPU)."""
    x, c = randn_problem(40, k, 13, torch.float32, seed=7)
    x[[0, 17, 39], [5, 0, 12]] = float("nan")
    c[k - 5] = x[3]
    c[k - 5, 2] = float("nan")
    c[1, 0] = float("nan")
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 17, 39]] = False
    usable = torch.ones(k, dtype=torch.bool)
    usable[[k - 5, 1]] = False
    return x.to(dtype).to(device), c.to(dtype).to(device), keep, usable


def assert_kernel_rejects(backend, op, args, match):
    """The backend's own op refuses ``args`` with a ValueError naming the op: "vqkernels.triton.<op>: ... <match>"
    (the Triton launchers' checks) or "vqkernels.<op>: <match>" (the CUDA kernels', csrc/checks.h)."""
    prefix = rf"vqkernels\.triton\.{op}: .*" if backend.name == "triton" else rf"vqkernels\.{op}: "
    with pytest.raises(ValueError, match=prefix + match):
        getattr(backend.ops, op)(*args)


def assert_rejects_cpu_tensors(backend, op, *args):
    """The Triton kernel on a GPU refuses CPU tensors."""
    assert_kernel_rejects(backend, op, args, "inputs are on cpu; the Triton kernel needs CUDA")


@contextlib.contextmanager
def _temporarily(get, set_, value):
    old = get()
    set_(value)
    try:
        yield
    finally:
        set_(old)


def deterministic(flag=True):
    """torch.use_deterministic_algorithms(flag) inside, the previous setting restored afterwards."""
    return _temporarily(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, flag)


# opcheck

# nearest_code and nearest_code_topk return int64 indices first. torch's
# test_aot_dispatch_dynamic sums every output into an accumulator that then starts as an
# int64 tensor, and adding the float distances into it in place fails ("result type Float
# can't be cast to the desired output type Long") as soon as an input requires grad: a
# limit of the test helper, not of the op. Those cases run the other test utils here, and
# test_compile.py checks the AOT-dispatch forward and backward of both ops itself.
INT_FIRST_OUTPUT = ("nearest_code", "nearest_code_topk")
DEFAULT_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


# A backend namespace's op (vqkernels_cpu, _cuda, _triton, _ref) has no autograd of its own: the public op owns it.
BACKEND_TEST_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args):
    """torch.library.opcheck of ``op``: a name of the public ``vqkernels::`` op, or any namespace's op overload
    (``torch.ops.vqkernels_triton.nearest_code.default``), whose autograd registration is not checked. The one
    opcheck wrapper of the test suite."""
    if isinstance(op, str):
        op = getattr(torch.ops.vqkernels, op).default
    utils = DEFAULT_TEST_UTILS if op.namespace == "vqkernels" else BACKEND_TEST_UTILS
    name = op.name().split("::")[-1]
    if name in INT_FIRST_OUTPUT and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        utils = tuple(u for u in utils if u != "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert set(result) == set(utils) and all(v == "SUCCESS" for v in result.values()), result


def search_opcheck_samples():
    """(x, codebook) samples for the search ops: dtypes, layouts, grad, empty x."""
    g = gen(7)
    x = torch.randn(9, 5, generator=g)
    cb = torch.randn(6, 5, generator=g)
    return [
        pytest.param(x, cb, id="f32"),
        pytest.param(x.clone().requires_grad_(), cb.clone().requires_grad_(), id="f32-grad"),
        pytest.param(x.double().requires_grad_(), cb.double(), id="f64-grad-x"),
        pytest.param(x.half(), cb.bfloat16(), id="f16-bf16"),
        pytest.param(x.bfloat16(), cb.clone().requires_grad_(), id="bf16-grad-cb"),
        pytest.param(with_layout(x, "strided"), with_layout(cb, "transposed"), id="strided"),
        pytest.param(x[:0], cb, id="empty"),
    ]


def tie_problem(positions, d, k, seed=0):
    """float64 (x [4, d], codebook [k, d]) with exact ties under every metric.

    The codes at `positions` are the unit vectors e_0, e_1, e_2, e_3 (cycled); the rows of
    x are t * (1, 1, 1, 1, 0, ...) for t in (1, 2, 3, 0.5). Every distance to those codes
    is the same, 3t^2 + (t - 1)^2, -t or 1/2, and exact in any dtype and summation order;
    every other code has all entries <= -1 and is farther under every metric.
    """
    assert d >= 4
    g = gen(seed)
    codebook = -(1.0 + torch.randn(k, d, generator=g, dtype=torch.float64).abs())
    for i, p in enumerate(positions):
        codebook[p] = 0.0
        codebook[p, i % 4] = 1.0
    x = torch.zeros(4, d, dtype=torch.float64)
    x[:, :4] = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64).unsqueeze(1)
    return x, codebook


# positions of the tied codes: several 16-code panels and lanes, the lowest one first, in
# a later panel than a lower lane, or all in the tail
TIE_POSITIONS = ([5, 18, 47, 69], [18, 47, 69], [47, 66, 69], [0, 69], [66, 67, 68, 69])


# ---------------------------------------------------------------------------------------
# Gumbel-softmax quantization and the rotation trick


def run_without_extension(code):
    """Runs `code` in a fresh interpreter where vqkernels._C cannot load (the reference then
    serves every op, with a RuntimeWarning silenced here); it must print exactly 'ok'."""
    import subprocess
    import sys
    prelude = ("import sys, warnings\n"
               "sys.modules['vqkernels._C'] = None\n"
               "warnings.simplefilter('ignore', RuntimeWarning)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# multiscale (VAR's multi-scale residual quantizer): int64 indices come first there too
INT_FIRST_OUTPUT += ("multiscale_quantize_step",)


# ---------------------------------------------------------------------------------------
# peak memory of a step, measured in a fresh process

PEAK_RSS_PRELUDE = r"""
import warnings
import torch
warnings.simplefilter("ignore")


def peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])


def measure(step, warmup_args, args):
    # Peak resident-size growth (KiB) of step(*args), after step(*warmup_args) has loaded the
    # libraries and started the threads (not the step's memory).
    step(*warmup_args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size restarts from the current one
    before = peak_kib()
    step(*args)
    return peak_kib() - before
"""


def peak_memory_kib(code):
    """Runs PEAK_RSS_PRELUDE + ``code`` (which prints integers, e.g. from ``measure``) in a fresh
    interpreter and returns the integers of its last output line. glibc gives every block of
    128 KiB or more its own mapping and unmaps it on free (MALLOC_MMAP_THRESHOLD_), so the peak
    resident size follows the live allocations instead of depending on which freed heap pages
    happen to be reused. Skips where /proc/self/clear_refs cannot reset the peak."""
    import subprocess
    import sys
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_PRELUDE + code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return [int(v) for v in run.stdout.strip().splitlines()[-1].split()]


def op_samples(device="cpu", dtype=torch.float32, seed=0):
    """One small, tie-free argument tuple for every ``torch.ops.vqkernels`` op: {op: args}.

    Backward ops get the indices their forward op chooses (computed by the reference), so any
    backend can be run on the same arguments and compared with another one.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    ref = vqkernels.reference
    x, c, cbs = randn(13, 5), randn(7, 5), randn(3, 7, 5)
    idx = ref.nearest_code(x, c)[0]
    ridx = ref.residual_quantize(x, cbs)[1]
    z, levels = randn(13, 4), [3, 5, 4, 8]
    rscales = torch.stack([torch.tensor(levels, device=device).float() ** -level for level in range(3)])
    bits = randn(13, 6)
    avg = ref.lfq_entropy(bits, 10.0)[2]
    logits, gumbels = randn(13, 7), randn(13, 7)
    gidx = ref.gumbel_quantize(logits, c, gumbels, 1.0, True)[1]
    f = randn(2, 5, 6, 6)
    midx = ref.multiscale_quantize_step(f, c, [3, 3])[0]
    acc = torch.float32 if dtype != torch.float64 else torch.float64
    scalar = lambda v: torch.tensor(v, dtype=acc, device=device)  # noqa: E731
    return {
        "nearest_code": (x, c, "l2"),
        "nearest_code_topk": (x, c, 3, "l2"),
        "vq_quantize": (x, c, "l2"),
        "vq_quantize_backward": (randn(13, 5), scalar(0.7), scalar(1.3), x, c, idx),
        "ema_update_": (c.clone(), torch.rand(7, generator=g, dtype=torch.float64).to(device, acc),
                        randn(7, 5).to(acc), x, idx, 0.9, 1e-5),
        "residual_quantize": (x, cbs, -1, 1),
        "residual_quantize_backward": (randn(13, 5), randn(3).to(acc), randn(3).to(acc), x, cbs, ridx),
        "fsq_quantize": (z, levels),
        "fsq_quantize_backward": (randn(13, 4), z, levels),
        "residual_fsq_quantize": (z, rscales, levels, True, True),
        "residual_fsq_quantize_backward": (randn(13, 4), z, rscales, levels, True, True),
        "latent_quantize": (z, randn(20), levels),
        "lfq_quantize": (bits, 1.0),
        "lfq_entropy": (bits, 10.0),
        "lfq_entropy_backward": (scalar(0.5), scalar(-1.5), randn(64).to(acc), bits, avg, 10.0),
        "gumbel_quantize": (logits, c, gumbels, 1.0, True),
        "gumbel_quantize_backward": (randn(13, 5), scalar(0.3), logits, c, gumbels, gidx, 1.0, True),
        "rotation_trick": (x, randn(13, 5)),
        "rotation_trick_backward": (randn(13, 5), x, randn(13, 5)),
        "multiscale_quantize_step": (f, c, [3, 3], "l2"),
        "multiscale_quantize_step_backward": (randn(2, 5, 3, 3), c, midx),
        "binary_one_hot": (bits, torch.randint(0, 64, (13,), generator=g).to(device)),
        "binary_one_hot_backward": (randn(13, 64).float(), bits),
    }


def run_op(op, args):
    """Calls torch.ops.vqkernels.<op> on copies of ``args``; returns its outputs (the mutated
    tensors for an in-place op) as a tuple."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(torch.ops.vqkernels, op)(*args)
    if out is None:  # in place: the mutated arguments are the result
        return tuple(a for a in args[:3])
    return out if isinstance(out, tuple) else (out,)


def assert_outputs_close(got, want, rtol=1e-4, atol=1e-5):
    """Integer outputs equal, floating outputs close (NaN where the other has NaN), same dtypes."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=f"output {i}")
        else:
            assert torch.equal(a, b), f"output {i}: {a} != {b}"
