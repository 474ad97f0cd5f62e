"""vqkernels.residual_quantize (greedy and beam search, losses, autograd) and
vqkernels::residual_quantize_backward, for the compiled kernel and the reference.

The ground truth here is independent of vqkernels.reference: residuals are emulated level
by level (float64 difference rounded to the compute dtype, which is what one correctly
rounded subtraction in that dtype gives), greedy choices are judged per level against
float64 distances with vq_helpers' tolerance, and beam search is a brute force over every
code of every kept path with the documented tie rule.

The GPU kernels' tests (CUDA, Triton) come last, run by the `backend` fixture (tests/conftest.py).
"""

from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vq_helpers import (DTYPES, KERNEL_DTYPES, KERNEL_TOL, LAYOUTS, LOSS_THREADS_BUG, as_input, assert_bitwise_equal,
                        assert_deterministic, assert_float64_is_the_reference, assert_kernel_rejects,
                        assert_rejects_cpu_tensors, bits, case_id, check_nearest, close_to_f64, compute_dtype,
                        deterministic, f64, fail_rows, gen, hyp_settings, kernel_opcheck, nan_equal, on_backends,
                        opcheck, per_backend, reference, reference_serves, reference_xfail, seeded_randn, unit_roundoff,
                        vqkernels, with_layout)

residual_quantize = vqkernels.residual_quantize
# "op": through the dispatcher (the compiled kernel when built, with the op's autograd);
# "reference": the pure-PyTorch function called directly.
IMPLS = {"op": residual_quantize, "reference": reference.residual_quantize}


def level_codebook(codebooks, level):
    return codebooks[level] if codebooks.dim() == 3 else codebooks


def num_levels_of(codebooks, num_levels):
    return codebooks.shape[0] if codebooks.dim() == 3 else num_levels


def code_rows(codebook, idx, dt):
    """codebook[idx] in dt, NaN rows where idx is -1."""
    rows = codebook.to(dt)[idx.clamp_min(0)]
    return rows.masked_fill((idx < 0).unsqueeze(1), float("nan"))


def path_residuals(x, codebooks, indices):
    """[r_0, ..., r_L] along the code path `indices` [N, L], each in the compute dtype."""
    dt = compute_dtype(x, codebooks)
    r = x.to(dt)
    out = [r]
    for level in range(indices.shape[1]):
        q = code_rows(level_codebook(codebooks, level), indices[:, level], torch.float64)
        r = (r.double() - q).to(dt)
        out.append(r)
    return out


def beam_truth(x, codebooks, levels, beam):
    """Brute-force beam search, row by row: every kept path is extended by every usable code,
    the candidates are ranked by (new residual's squared norm, exact then rounded to the
    compute dtype; path rank; code index) and the best `beam` kept; a row left without any
    candidate takes the best path so far and -1 from there on."""
    dt = compute_dtype(x, codebooks)
    n = x.shape[0]
    out = torch.full((n, levels), -1, dtype=torch.int64)
    cbs = [level_codebook(codebooks, level).double() for level in range(levels)]
    for i in range(n):
        beams = [(x[i].to(dt), [])]
        for level in range(levels):
            cb = cbs[level]
            usable = ~torch.isnan(cb).any(1)
            cands = []
            for rank, (r, path) in enumerate(beams):
                keys = (r.double() - cb).square().sum(1).to(dt).tolist()
                cands += [(keys[c], rank, c) for c in range(cb.shape[0]) if usable[c] and keys[c] == keys[c]]
            if not cands:
                beams = [(None, beams[0][1] + [-1] * (levels - level))]
                break
            cands.sort()
            beams = [((beams[rank][0].double() - cb[c]).to(dt), beams[rank][1] + [c]) for _, rank, c in cands[:beam]]
        out[i] = torch.tensor(beams[0][1], dtype=torch.int64)
    return out


def final_error(x, codebooks, indices):
    """|r_L|^2 per row, float64."""
    return path_residuals(x, codebooks, indices)[-1].double().square().sum(1)


def check_outputs(x, codebooks, num_levels, outputs):
    """Shapes and dtypes; quantized bitwise the compute-dtype sum of the chosen rows in level
    order (NaN rows where a level has index -1); indices -1 from the first -1 on; the losses
    mean(|r_l - q_l|^2) of the path, NaN from a level with a -1 on."""
    quantized, indices, commit, codebook_losses = outputs
    n, d = x.shape
    levels = num_levels_of(codebooks, num_levels)
    dt = compute_dtype(x, codebooks)
    assert quantized.dtype == x.dtype and quantized.shape == x.shape
    assert indices.dtype == torch.int64 and indices.shape == (n, levels)
    for loss in (commit, codebook_losses):
        assert loss.dtype == dt and loss.shape == (levels,)
    assert bits(commit).equal(bits(codebook_losses)), "the two loss vectors must hold the same values"
    if n == 0:
        assert not bool(commit.any()), "N = 0: the losses are zeros"
        return
    failed = indices < 0
    fail_rows((failed[:, :-1] & ~failed[:, 1:]).any(1), "a valid index after a -1", indices=indices)
    total = torch.zeros(n, d, dtype=dt)
    for level in range(levels):
        total = total + code_rows(level_codebook(codebooks, level), indices[:, level], dt)
    bad = failed.any(1)
    want = total.to(x.dtype)
    fail_rows(bad & ~torch.isnan(quantized).all(1), "a row with index -1 must be NaN", quantized=quantized)
    fail_rows(~bad & (bits(quantized) != bits(want)).any(1), "quantized is not the sum of the chosen codes",
              got=quantized, want=want)
    res = path_residuals(x, codebooks, indices)
    u = unit_roundoff(dt)
    for level in range(levels):
        if bool(failed[:, level].any()):
            assert bool(torch.isnan(commit[level])), f"level {level} has a -1: its loss must be NaN"
            continue
        q = code_rows(level_codebook(codebooks, level), indices[:, level], torch.float64)
        want_loss = (res[level].double() - q).square().mean()
        # float64 terms (exact differences, one rounding each), then one rounding to dt
        rtol = 2.0 * (n * d + 3) * 2.0 ** -53 + u
        torch.testing.assert_close(commit[level].double(), want_loss, rtol=rtol, atol=1e-300)


def check_greedy(x, codebooks, num_levels, indices, duplicates=None):
    """Every level's code is the nearest (check_nearest's rules and tolerance) to that level's
    residual along the returned path."""
    res = path_residuals(x, codebooks, indices)
    for level in range(indices.shape[1]):
        check_nearest(res[level], level_codebook(codebooks, level), "l2", indices[:, level], None,
                      op="residual_quantize", duplicates=duplicates)


def make_problem(n, k, d, levels, shared, seed, n_dup=0):
    """float64 x [n, d] and codebooks ([levels, k, d], or [k, d] shared), each level's codes
    at half the previous scale (like trained RQ codebooks); `n_dup` rows copied per level."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    shape = (k, d) if shared else (levels, k, d)
    cbs = torch.randn(shape, generator=g, dtype=torch.float64)
    if not shared:
        cbs = cbs * (0.5 ** torch.arange(levels, dtype=torch.float64)).view(-1, 1, 1)
    for cb in ([cbs] if shared else list(cbs)):
        for _ in range(n_dup if k > 1 else 0):
            src, dst = torch.randperm(k, generator=g)[:2].tolist()
            cb[dst] = cb[src]
    return x, cbs


def integer_problem(n, k, d, levels, shared, seed):
    """Small-integer x and codes: every distance and residual is exact in every dtype, and
    exact ties are everywhere (the tie rules decide)."""
    g = gen(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).double()
    shape = (k, d) if shared else (levels, k, d)
    return x, torch.randint(-2, 3, shape, generator=g).double()


def codebook_layout(cbs, layout):
    """codebooks in another memory layout (NaN padding around views, as vq_helpers.with_layout)."""
    if cbs.dim() == 2:
        return as_input(cbs, cbs.dtype, layout)
    if layout == "contiguous":
        return cbs.contiguous()
    if layout == "transposed":
        return cbs.transpose(1, 2).contiguous().transpose(1, 2)
    view = cbs.new_full((cbs.shape[0] * 2, cbs.shape[1] + 3, cbs.shape[2] * 2), float("nan"))[::2, 3:, ::2]
    view.copy_(cbs)
    return view


@st.composite
def residual_cases(draw):
    k = draw(st.integers(1, 80))
    return dict(n=draw(st.sampled_from([0, 1, 7, 13, 50, 131])), k=k, d=draw(st.integers(1, 40)),
                levels=draw(st.integers(1, 5)), shared=draw(st.booleans()), beam=draw(st.integers(1, min(k, 4))),
                x_dtype=draw(st.sampled_from(DTYPES)), cb_dtype=draw(st.sampled_from(DTYPES)),
                x_layout=draw(st.sampled_from(LAYOUTS)), cb_layout=draw(st.sampled_from(LAYOUTS)),
                n_dup=draw(st.integers(0, min(k - 1, 3))), seed=draw(st.integers(0, 2 ** 31 - 1)))


def build(case):
    x, cbs = make_problem(case["n"], case["k"], case["d"], case["levels"], case["shared"], case["seed"],
                          case["n_dup"])
    x = as_input(x, case["x_dtype"], case["x_layout"])
    cbs = codebook_layout(cbs.to(case["cb_dtype"]), case["cb_layout"])
    return x, cbs, case["levels"] if case["shared"] else -1


# ---------------------------------------------------------------------------------------
# forward


@hyp_settings(40)
@given(case=residual_cases())
def test_greedy_matches_float64_truth(isa, case):
    """Any shape (N = 0 included), dtype mix, layout, shared or per-level codebooks, copied
    codes: each level's code is the nearest to its residual, quantized and the losses follow."""
    x, cbs, num_levels = build(case)
    saved = bits(x).clone(), bits(cbs).clone()
    out = residual_quantize(x, cbs, num_levels)
    assert torch.equal(bits(x), saved[0]) and torch.equal(bits(cbs), saved[1]), "inputs were modified"
    check_greedy(x, cbs, num_levels, out[1])
    check_outputs(x, cbs, num_levels, out)
    ref = reference.residual_quantize(x, cbs, num_levels)
    check_greedy(x, cbs, num_levels, ref[1], duplicates=False)
    check_outputs(x, cbs, num_levels, ref)


@hyp_settings(25)
@given(case=residual_cases())
def test_beam_matches_brute_force_float64(isa, case):
    """float64 inputs (no near-ties): kernel and reference give exactly the brute-force paths."""
    case = dict(case, x_dtype=torch.float64, cb_dtype=torch.float64, n=min(case["n"], 13), k=min(case["k"], 12),
                beam=min(case["beam"], case["k"], 12))
    x, cbs, num_levels = build(case)
    want = beam_truth(x, cbs, case["levels"], case["beam"])
    # The reference's GEMM may rank exact copies of a code out of index order (DUPLICATE_BUG).
    impls = {name: impl for name, impl in IMPLS.items()
             if case["n_dup"] == 0 or (name == "op" and not reference_serves("residual_quantize"))}
    for name, impl in impls.items():
        out = impl(x, cbs, num_levels, case["beam"])
        check_outputs(x, cbs, num_levels, out)
        if case["shared"]:
            # A shared codebook makes the paths (a, b) and (b, a) end at the same residual up to
            # rounding: which one wins is decided by the last bits of float64 sums, so here only
            # the final error must be the brute force's (exact ties: test_integer_data_exact...).
            torch.testing.assert_close(final_error(x, cbs, out[1]), final_error(x, cbs, want), rtol=1e-12, atol=0)
        else:
            fail_rows((out[1] != want).any(1), f"{name}: beam search differs from the brute force", got=out[1],
                      want=want)


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("beam", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_data_exact_with_tie_rules(isa, dtype, beam, shared):
    """Small integers: exact in every dtype and full of ties, so the paths must equal the
    brute force's (ties: lower path rank, then lower code index) bit for bit."""
    x, cbs = integer_problem(40, 6, 3, 4, shared, seed=int(beam) + 10 * shared)
    x, cbs = x.to(dtype), cbs.to(dtype)
    num_levels = 4 if shared else -1
    want = beam_truth(x, cbs, 4, beam)
    for name, impl in IMPLS.items():
        out = impl(x, cbs, num_levels, beam)
        fail_rows((out[1] != want).any(1), f"{name}: differs from the brute force", got=out[1], want=want)
        check_outputs(x, cbs, num_levels, out)


def test_tie_rule_lower_beam_then_lower_code(isa):
    """Hand-made ties. x = 0, level 0 codes (+1, 0), (-1, 0), (0, 3): beams (+1,0) [code 0]
    and (-1,0) [code 1] tie at |r|^2 = 1, code 0 ranks first. Level 1 codes (1, 0), (-1, 0):
    from beam 0 (r = (-1, 0)) code 1 gives 0, from beam 1 (r = (1, 0)) code 0 gives 0: the
    tie goes to beam 0, i.e. the path (0, 1)."""
    x = torch.zeros(1, 2)
    cbs = torch.zeros(2, 3, 2)
    cbs[0, 0], cbs[0, 1], cbs[0, 2] = torch.tensor([1.0, 0]), torch.tensor([-1.0, 0]), torch.tensor([0, 3.0])
    cbs[1, 0], cbs[1, 1], cbs[1, 2] = torch.tensor([1.0, 0]), torch.tensor([-1.0, 0]), torch.tensor([0, 9.0])
    for impl in IMPLS.values():
        assert impl(x, cbs, -1, 2)[1].tolist() == [[0, 1]]
        assert impl(x, cbs, -1, 3)[1].tolist() == [[0, 1]]
        assert impl(x, cbs, -1, 1)[1].tolist() == [[0, 1]]


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
def test_beam_one_is_greedy(isa, shared):
    """beam_size=1 is the plain per-level nearest code (float64: exactly the brute force's)."""
    x, cbs = make_problem(200, 50, 9, 4, shared, seed=5)
    num_levels = 4 if shared else -1
    want = beam_truth(x, cbs, 4, 1)
    for name, impl in IMPLS.items():
        got = impl(x, cbs, num_levels, 1)[1]
        fail_rows((got != want).any(1), f"{name}: beam_size=1 is not the greedy path", got=got, want=want)
        assert torch.equal(impl(x, cbs, num_levels)[1], got), "the default beam_size is 1"


@pytest.mark.parametrize("beam", [2, 4, 8])
def test_beam_not_worse_than_greedy(isa, beam):
    """With L = 2 the greedy first code stays in the beam and the last level takes the best
    candidate, so no row ends worse. With more levels a path dropped early could have ended
    better, so only the mean final error is compared (and it must improve)."""
    for levels in (2, 6):
        x, cbs = make_problem(200, 32, 8, levels, False, seed=6 + levels)
        greedy = final_error(x, cbs, residual_quantize(x, cbs, -1, 1)[1])
        for impl in IMPLS.values():
            err = final_error(x, cbs, impl(x, cbs, -1, beam)[1])
            if levels == 2:
                fail_rows(err > greedy, "beam search ended worse than greedy", beam=err, greedy=greedy)
            assert float(err.mean()) < float(greedy.mean()), (levels, float(err.mean()), float(greedy.mean()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_level_equals_vq_quantize(isa, dtype):
    """L = 1 (per-level [1, K, D] or shared with num_levels=1) is vq_quantize: same indices,
    quantized, losses and gradients."""
    x64, cbs64 = make_problem(300, 40, 11, 1, False, seed=8)
    for cb64, num_levels in ((cbs64, -1), (cbs64[0], 1)):
        x = x64.to(dtype).clone().requires_grad_()
        cb = cb64.to(dtype).clone().requires_grad_()
        q, idx, commit, cbl = residual_quantize(x, cb, num_levels)
        (q.square().sum() + 0.7 * commit.sum() - 1.3 * cbl.sum()).backward()
        x2 = x64.to(dtype).clone().requires_grad_()
        cb2 = cb64[0 if cb64.dim() == 3 else slice(None)].to(dtype).clone().requires_grad_()
        q2, idx2, commit2, cbl2 = vqkernels.vq_quantize(x2, cb2)
        (q2.square().sum() + 0.7 * commit2 - 1.3 * cbl2).backward()
        assert torch.equal(idx[:, 0], idx2) and bits(q).equal(bits(q2))
        rtol = 4 * unit_roundoff(commit.dtype) * x.numel()
        torch.testing.assert_close(commit[0], commit2, rtol=rtol, atol=0)
        torch.testing.assert_close(cbl[0], cbl2, rtol=rtol, atol=0)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(cb.grad.reshape(cb2.shape), cb2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_degenerate_shapes(isa, impl):
    """N = 0 (zero losses), D = 0 (index 0 everywhere), K = 1, N = 1."""
    fn = IMPLS[impl]
    q, idx, commit, cbl = fn(torch.empty(0, 5, dtype=torch.float16), torch.randn(3, 4, 5), -1, 2)
    assert q.shape == (0, 5) and q.dtype == torch.float16 and idx.shape == (0, 3)
    assert commit.dtype == torch.float32 and torch.equal(commit, torch.zeros(3)) and torch.equal(cbl, commit)
    q, idx, commit, _ = fn(torch.empty(4, 0, dtype=torch.float64), torch.empty(3, 0), 2, 3)
    assert q.shape == (4, 0) and torch.equal(idx, torch.zeros(4, 2, dtype=torch.int64))
    assert commit.dtype == torch.float64 and torch.equal(commit, torch.zeros(2, dtype=torch.float64))
    x, cbs = make_problem(1, 1, 3, 2, False, seed=9)
    q, idx, commit, _ = fn(x, cbs)
    assert idx.tolist() == [[0, 0]] and torch.equal(q, cbs[0, :1] + cbs[1, :1])
    torch.testing.assert_close(commit, torch.stack([(x - cbs[0, 0]).square().mean(),
                                                    (x - cbs[0, 0] - cbs[1, 0]).square().mean()]))


# ---------------------------------------------------------------------------------------
# NaN rules


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_and_nan_codes(isa, dtype, beam):
    """A NaN row of x: -1 at every level, a NaN quantized row, NaN losses; codebook rows with
    a NaN are never chosen (beam search with fewer usable codes than the beam at one level);
    the other rows are unaffected."""
    x64, cbs64 = make_problem(20, 6, 5, 3, False, seed=10)
    x64[4, 2] = float("nan")
    cbs64[1, [0, 2, 3, 5], 1] = float("nan")  # level 1: two usable codes (< beam 3)
    x, cbs = x64.to(dtype), cbs64.to(dtype)
    want = beam_truth(x, cbs, 3, beam)
    assert want[4].tolist() == [-1, -1, -1] and bool(torch.isin(want[:, 1], torch.tensor([-1, 1, 4])).all())
    for name, impl in IMPLS.items():
        out = impl(x, cbs, -1, beam)
        check_outputs(x, cbs, -1, out)
        assert out[1][4].tolist() == [-1, -1, -1] and bool(torch.isnan(out[0][4]).all())
        assert bool(torch.isnan(out[2]).all()) and bool(torch.isnan(out[3]).all())
        fail_rows(~torch.isin(out[1][:, 1], torch.tensor([-1, 1, 4])), f"{name}: chose a NaN code", got=out[1])
        if dtype == torch.float64:
            fail_rows((out[1] != want).any(1), f"{name}: differs from the brute force", got=out[1], want=want)
        elif beam == 1:
            check_greedy(x, cbs, -1, out[1], duplicates=None if name == "op" else False)
        keep = torch.arange(20) != 4
        clean = impl(x[keep], cbs, -1, beam)
        assert torch.equal(clean[1], out[1][keep]) and bits(clean[0]).equal(bits(out[0][keep]))
        assert bool(torch.isfinite(clean[2]).all())


@pytest.mark.parametrize("beam", [1, 2])
@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
def test_level_without_usable_codes(isa, beam, shared):
    """Every code of level 1 is NaN: indices -1 from level 1 on, losses finite at level 0 and
    NaN after; the gradient still reaches level 0's codebook and is NaN-free there."""
    x, cbs = make_problem(15, 5, 4, 3, False, seed=11)
    cbs[1] = float("nan")
    if shared:  # a shared codebook with no usable code fails at level 0
        cbs = cbs[1]
    for name, impl in IMPLS.items():
        c = cbs.clone().requires_grad_()
        q, idx, commit, cbl = impl(x, c, 3 if shared else -1, beam)
        first = 0 if shared else 1
        assert bool((idx[:, first:] == -1).all()) and bool((idx[:, :first] >= 0).all()), name
        assert bool(torch.isnan(q).all()) and bool(torch.isnan(commit[first:]).all())
        assert bool(torch.isfinite(commit[:first]).all())
        if not shared and name == "op":  # the op's autograd (the plain reference function has none)
            cbl[0].backward()
            assert bool(torch.isfinite(c.grad[0]).all()) and bool(c.grad[0].any()) and not bool(c.grad[1:].any())


# ---------------------------------------------------------------------------------------
# gradients

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)]
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def expected_grads(x, cbs, indices, g, wc, wb):
    """float64 gradients of sum(quantized * g) + wc . commit_losses + wb . codebook_losses."""
    res = path_residuals(x, cbs, indices)
    scale = 2.0 / x.numel()
    gx = g.double().clone()
    gc = torch.zeros(cbs.shape, dtype=torch.float64)
    for level in range(indices.shape[1]):
        nxt = res[level + 1].double()
        gx += wc[level] * scale * nxt
        valid = indices[:, level] >= 0  # -1: nothing scattered
        level_codebook(gc, level).index_add_(0, indices[valid, level], -wb[level] * scale * nxt[valid])
    return gx, gc


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
def test_gradients_match_formulas(isa, dtypes, shared, beam):
    """quantized straight-through to x; commit_losses[l]: 2 r_{l+1} / (N D) to x only;
    codebook_losses[l]: -2 r_{l+1} / (N D) scattered onto level l's chosen rows only (summed
    over the levels for a shared codebook)."""
    x64, cbs64 = make_problem(40, 24, 6, 3, shared, seed=12)
    x = as_input(x64, dtypes[0], requires_grad=True)
    cbs = cbs64.to(dtypes[1]).requires_grad_()
    num_levels = 3 if shared else -1
    q, idx, commit, cbl = residual_quantize(x, cbs, num_levels, beam)
    g = torch.randn(q.shape, generator=gen(13)).to(q.dtype)
    wc, wb = torch.tensor([0.7, -0.2, 1.5]), torch.tensor([0.3, 2.0, -1.1])
    ((q * g).sum() + (wc.to(commit.dtype) * commit).sum() + (wb.to(cbl.dtype) * cbl).sum()).backward()
    want_x, want_cb = expected_grads(x.detach(), cbs.detach(), idx, g, wc.double(), wb.double())
    for got, want, t in ((x.grad, want_x, x), (cbs.grad, want_cb, cbs)):
        assert got.dtype == t.dtype and got.shape == t.shape
        rtol = GRAD_RTOL[t.dtype]
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))
    unchosen = torch.ones(cbs.shape[:-1], dtype=torch.bool)
    for level in range(3):
        if shared:
            unchosen[idx[:, level]] = False
        else:
            unchosen[level, idx[:, level]] = False
    assert bool(unchosen.any()) and not bool(cbs.grad[unchosen].any()), "gradient left the chosen rows"


def test_straight_through_only(isa):
    """Only quantized used: x's gradient is quantized's, bit for bit; the codebooks get zeros."""
    x64, cbs64 = make_problem(30, 10, 5, 3, False, seed=14)
    x, cbs = x64.float().requires_grad_(), cbs64.float().requires_grad_()
    q = residual_quantize(x, cbs, -1, 2)[0]
    g = torch.randn(q.shape, generator=gen(15))
    (q * g).sum().backward()
    assert bits(x.grad).equal(bits(g))
    assert cbs.grad is None or not bool(cbs.grad.any())


@pytest.mark.parametrize("beam", [1, 2])
def test_gradcheck(beam):
    """float64 gradcheck: commit_losses in x; codebook_losses[l] in codebook l alone (the
    others fixed: through sg(r_l) the earlier levels get no gradient by definition)."""
    x, cbs = make_problem(6, 5, 3, 3, False, seed=16)
    assert torch.autograd.gradcheck(lambda a: residual_quantize(a, cbs, -1, beam)[2], (x.clone().requires_grad_(),))
    for level in range(3):
        def loss(c, level=level):
            full = torch.cat([cbs[:level], c.unsqueeze(0), cbs[level + 1:]])
            return residual_quantize(x, full, -1, beam)[3][level]
        assert torch.autograd.gradcheck(loss, (cbs[level].clone().requires_grad_(),))
    shared = cbs[0].clone().requires_grad_()  # shared with one level: nothing before it
    assert torch.autograd.gradcheck(lambda c: residual_quantize(x, c, 1, beam)[3], (shared,))


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
def test_backward_op(isa, impl, dtypes):
    """residual_quantize_backward called directly with arbitrary gradients and paths,
    including -1 from some level on (NaN grad_x row, nothing scattered)."""
    fn = (torch.ops.vqkernels.residual_quantize_backward if impl == "op"
          else reference.residual_quantize_backward)
    x64, cbs64 = make_problem(30, 8, 5, 3, False, seed=17)
    x, cbs = x64.to(dtypes[0]), cbs64.to(dtypes[1])
    idx = torch.randint(0, 8, (30, 3), generator=gen(18))
    idx[3, 1:] = -1
    g = torch.randn(30, 5, generator=gen(19)).to(x.dtype)
    wc, wb = torch.tensor([0.25, -1.0, 2.0]), torch.tensor([-3.0, 0.5, 1.0])
    gx, gc = fn(g, wc, wb, x, cbs, idx)
    assert gx.dtype == x.dtype and gc.dtype == cbs.dtype and gc.shape == cbs.shape
    assert bool(torch.isnan(gx[3]).all())
    want_x, want_cb = expected_grads(x, cbs, idx, g, wc.double(), wb.double())
    keep = torch.arange(30) != 3
    for got, want, dt in ((gx[keep], want_x[keep], x.dtype), (gc, want_cb, cbs.dtype)):
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[dt], atol=GRAD_RTOL[dt] * float(want.abs().max()))


# ---------------------------------------------------------------------------------------
# determinism, opcheck


@reference_xfail("residual_quantize", LOSS_THREADS_BUG)
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
def test_deterministic(isa, shared, beam):
    x64, cbs64 = make_problem(1500, 64, 12, 3, shared, seed=20)

    def run():
        x, cbs = x64.float().requires_grad_(), cbs64.float().requires_grad_()
        q, idx, commit, cbl = residual_quantize(x, cbs, 3 if shared else -1, beam)
        (q.sum() + commit.sum() + cbl.sum()).backward()
        return q, idx, commit, cbl, x.grad, cbs.grad

    assert_deterministic(run)


def forward_opcheck_samples():
    g = gen(21)
    x = torch.randn(9, 5, generator=g)
    cbs = torch.randn(3, 6, 5, generator=g)
    return [
        pytest.param(x, cbs, -1, 1, id="f32"),
        pytest.param(x.clone().requires_grad_(), cbs.clone().requires_grad_(), 3, 2, id="f32-grad-beam"),
        pytest.param(x.double().requires_grad_(), cbs[0].double(), 4, 1, id="f64-shared-grad-x"),
        pytest.param(x.half(), cbs.bfloat16(), -1, 3, id="f16-bf16"),
        pytest.param(x.bfloat16(), cbs[1].clone().requires_grad_(), 2, 6, id="bf16-shared-grad-cb-beam-K"),
        pytest.param(as_input(x, torch.float32, "strided"), codebook_layout(cbs, "transposed"), -1, 2, id="strided"),
        pytest.param(x[:0], cbs, -1, 2, id="empty"),
    ]


@pytest.mark.parametrize("x, cbs, num_levels, beam", forward_opcheck_samples())
def test_opcheck(x, cbs, num_levels, beam):
    opcheck("residual_quantize", (x, cbs, num_levels, beam))


def backward_opcheck_samples():
    g = gen(22)
    x = torch.randn(9, 5, generator=g)
    cbs = torch.randn(3, 6, 5, generator=g)
    idx = torch.randint(0, 6, (9, 3), generator=g)
    grad = torch.randn(9, 5, generator=g)
    wc, wb = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.5, 1.0, 3.0])
    return [
        pytest.param((grad, wc, wb, x, cbs, idx), id="f32"),
        pytest.param((grad.double(), wc.double(), wb.double(), x.double(), cbs.double(), idx), id="f64"),
        pytest.param((grad.bfloat16(), wc, wb, x.bfloat16(), cbs[0], idx), id="bf16-shared"),
        pytest.param((grad.t().contiguous().t(), wc, wb, x, codebook_layout(cbs, "transposed"),
                      idx.t().contiguous().t()), id="strided"),
        pytest.param((grad[:0], wc, wb, x[:0], cbs, idx[:0]), id="empty"),
    ]


@pytest.mark.parametrize("args", backward_opcheck_samples())
def test_backward_opcheck(args):
    opcheck("residual_quantize_backward", args)


# ---------------------------------------------------------------------------------------
# bad inputs

X = torch.randn(4, 3)
CBS = torch.randn(2, 5, 3)

# id: (x, codebooks, num_levels, beam_size, pattern the message must match)
BAD_FORWARD = {
    "x-1d": (torch.randn(3), CBS, -1, 1, r"\bx must be 2-D \[N, D\]"),
    "x-3d": (torch.randn(2, 4, 3), CBS, -1, 1, r"\bx must be 2-D"),
    "codebooks-1d": (X, torch.randn(3), -1, 1, r"codebooks must be \[L, K, D\] .* or \[K, D\]"),
    "codebooks-4d": (X, torch.randn(1, 2, 5, 3), -1, 1, r"codebooks must be \[L, K, D\]"),
    "x-int": (X.long(), CBS, -1, 1, r"\bx must be float32, float16, bfloat16 or float64"),
    "codebooks-int": (X, CBS.int(), -1, 1, r"codebooks must be float"),
    "mismatched-D": (X, torch.randn(2, 5, 4), -1, 1, r"x has D=3 .*codebooks has D=4"),
    "mismatched-D-shared": (X, torch.randn(5, 4), 2, 1, r"x has D=3 .*codebooks has D=4"),
    "codebooks-other-device": (X, CBS.to("meta"), -1, 1, r"x is on cpu but codebooks is on meta"),
    "no-codes": (X, torch.randn(2, 0, 3), -1, 1, r"codebooks has no codes .*K must be at least 1"),
    "no-levels": (X, torch.randn(0, 5, 3), -1, 1, r"codebooks has no levels .*L must be at least 1"),
    "num_levels-mismatch": (X, CBS, 3, 1, r"num_levels=3 does not match codebooks' L=2 .*pass -1 or 2"),
    "num_levels-zero-per-level": (X, CBS, 0, 1, r"num_levels=0 does not match codebooks' L=2"),
    "num_levels-missing-shared": (X, CBS[0], -1, 1, r"a shared codebook \[K, D\] needs num_levels >= 1, got "
                                                    r"num_levels=-1"),
    "num_levels-zero-shared": (X, CBS[0], 0, 1, r"a shared codebook \[K, D\] needs num_levels >= 1, got num_levels=0"),
    "beam-zero": (X, CBS, -1, 0, r"beam_size must be in \[1, K=5\], got beam_size=0"),
    "beam-negative": (X, CBS, -1, -2, r"beam_size must be in \[1, K=5\], got beam_size=-2"),
    "beam-above-K": (X, CBS[0], 2, 6, r"beam_size must be in \[1, K=5\], got beam_size=6"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_rejects(impl, case):
    x, cbs, num_levels, beam, pattern = BAD_FORWARD[case]
    with pytest.raises(ValueError, match="vqkernels.residual_quantize: " + pattern):
        IMPLS[impl](x, cbs, num_levels, beam)


def test_forward_accepts_the_base_arguments():
    """The base arguments of the cases above are valid: each failure is the changed argument's."""
    for impl in IMPLS.values():
        assert impl(X, CBS, 2, 5)[1].shape == (4, 2)
        assert impl(X, CBS[0], 3, 5)[1].shape == (4, 3)


def backward_args(**changes):
    args = dict(grad_quantized=torch.randn(4, 3), grad_commit_losses=torch.ones(2),
                grad_codebook_losses=torch.ones(2), x=X, codebooks=CBS, indices=torch.tensor([[0, 1]] * 4))
    args.update(changes)
    return args


BAD_BACKWARD = {
    "codebooks-1d": (dict(codebooks=torch.randn(3)), r"codebooks must be \[L, K, D\]"),
    "indices-int32": (dict(indices=torch.zeros(4, 2, dtype=torch.int32)), r"indices must be int64"),
    "indices-1d": (dict(indices=torch.zeros(4, dtype=torch.int64)), r"indices must be 2-D \[N=4, L\]"),
    "indices-N": (dict(indices=torch.zeros(3, 2, dtype=torch.int64)), r"indices must be 2-D \[N=4, L\]"),
    "indices-L": (dict(indices=torch.zeros(4, 3, dtype=torch.int64)),
                  r"indices has L=3 columns but codebooks has L=2"),
    "grad_quantized-shape": (dict(grad_quantized=torch.randn(4, 2)), r"grad_quantized must have x's shape"),
    "grad_commit_losses-shape": (dict(grad_commit_losses=torch.ones(3)),
                                 r"grad_commit_losses must have shape \[L=2\], got \(3,\)"),
    "grad_codebook_losses-scalar": (dict(grad_codebook_losses=torch.tensor(1.0)),
                                    r"grad_codebook_losses must have shape \[L=2\], got \(\)"),
}


@pytest.mark.parametrize("case", BAD_BACKWARD)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_backward_rejects(impl, case):
    fn = (torch.ops.vqkernels.residual_quantize_backward if impl == "op"
          else reference.residual_quantize_backward)
    changes, pattern = BAD_BACKWARD[case]
    with pytest.raises(ValueError, match="vqkernels.residual_quantize_backward: " + pattern):
        fn(**backward_args(**changes))


@pytest.mark.skipif(not vqkernels.compiled(), reason="the compiled kernel checks index values")
@pytest.mark.parametrize("bad", [5, -2])
def test_backward_kernel_rejects_indices_out_of_range(bad):
    """The C++ backward reads codebook rows by index, so it checks their range (the reference
    leaves that to torch's indexing, which raises its own error)."""
    indices = torch.tensor([[0, 1]] * 4)
    indices[2, 1] = bad
    with pytest.raises(ValueError, match=r"indices must be in \[-1, K=5\), got values outside it"):
        torch.ops.vqkernels.residual_quantize_backward(**backward_args(indices=indices))
    assert torch.ops.vqkernels.residual_quantize_backward(**backward_args())[1].shape == CBS.shape


# ---------------------------------------------------------------------------------------
# the GPU kernels (CUDA, Triton; the `backend` fixture): the Triton interpreter's shapes tiny. The Triton tests
# judge against the float32 code path written here (float32_path_truth) on normal values, the CUDA tests
# against the reference on float64 copies (check_rq) on hierarchical data (rq_data).


def float32_path_truth(x, codebooks, indices):
    """Walks the kernel's code path: checks every level's index is the nearest code of the float32 residual
    (float64 distances, tolerance of float32 rounding) and returns the float32 running sum quantized and the
    float64 losses, both computed here."""
    n, d = x.shape
    r = x.float()
    quant = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    losses = []
    for level in range(indices.shape[1]):
        cb, r64 = level_codebook(codebooks, level).double(), r.double()
        dist = ((r64 * r64).sum(1, keepdim=True) - 2.0 * r64 @ cb.t() + (cb * cb).sum(1)).clamp_min(0.0)
        idx = indices[:, level]
        ok = idx >= 0
        chosen = dist[ok].gather(1, idx[ok].unsqueeze(1)).squeeze(1)
        tol = 1e-5 * (1.0 + (r.double()[ok] ** 2).sum(1) + (cb ** 2).sum(1).max())
        assert bool((chosen - dist[ok].min(1).values <= tol).all()), f"level {level}: not the nearest code"
        q = torch.where(ok.unsqueeze(1), level_codebook(codebooks, level).float()[idx.clamp_min(0)], float("nan"))
        losses.append(((r.double() - q.double()) ** 2).sum() / max(n * d, 1))
        r = r - q
        quant = quant + q
    return quant, torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)


def normal_problem(n, d, k, levels, shared, dtype, device):
    """(x, codebooks, num_levels): normal values, per-level codebooks at half scale."""
    x = seeded_randn(n, d, seed=n + d, dtype=dtype, device=device)
    cbs = (seeded_randn(k, d, seed=k, dtype=dtype, device=device) if shared
           else seeded_randn(levels, k, d, seed=k, dtype=dtype, device=device, scale=0.5))
    return x, cbs, levels if shared else -1


def check_float32_path(x, cbs, num_levels, out):
    quantized, indices, commit, codebook = out
    n, levels = x.shape[0], indices.shape[1]
    assert quantized.dtype == x.dtype and indices.shape == (n, levels) and indices.dtype == torch.int64
    assert commit.dtype == codebook.dtype == torch.float32 and commit.shape == (levels,)
    assert bool(((indices >= 0) & (indices < cbs.shape[-2])).all())
    quant, losses = float32_path_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(x.dtype), "quantized")
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)
    assert_bitwise_equal(commit, codebook, "codebook_losses")
    assert commit.data_ptr() != codebook.data_ptr()


def rq_data(n, d, levels, k, seed, shared=False, x_dtype=torch.float32, cb_dtype=torch.float32):
    """Hierarchical data: level l's codes scaled by 10**-l and x = a sum of one code per level plus noise far
    below the last level's code spacing, so every level's nearest code is the planted one by a wide margin in
    float32 and float64 alike."""
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


def rq_path_truth(x, codebooks, idx):
    """quantized [N, D] and the per-level losses of the code path idx [N, L], in float64, written out
    independently of reference.py (NaN rows from an index -1 on)."""
    res = f64(x)
    n, d = res.shape
    qsum = torch.zeros_like(res)
    losses = []
    for level in range(idx.shape[1]):
        k = idx[:, level]
        q = f64(level_codebook(codebooks, level))[k.clamp_min(0)]
        q[k < 0] = float("nan")
        losses.append((res - q).square().sum() / max(n * d, 1))
        res, qsum = res - q, qsum + q
    return qsum, torch.stack(losses)


def check_nearest_path(x, codebooks, idx):
    """Greedy: each level's index is a nearest code of that level's float64 residual up to float32 rounding (the
    slack), and -1 exactly for the rows whose residual holds a NaN."""
    res = f64(x)
    for level in range(idx.shape[1]):
        cb = f64(level_codebook(codebooks, level))
        k = idx[:, level]
        nan_row = torch.isnan(res).any(1)
        assert torch.equal(k < 0, nan_row), f"level {level}: -1 must mark exactly the NaN rows"
        ok = ~nan_row
        d2 = (res[ok].unsqueeze(1) - cb.unsqueeze(0)).square().sum(-1)
        chosen = d2.gather(1, k[ok].unsqueeze(1)).squeeze(1)
        slack = 1e-5 * (res[ok].square().sum(1) + cb.square().sum(1).max())
        assert (chosen <= d2.min(1).values + slack).all(), f"level {level}: a chosen code is not a nearest one"
        res = res - cb[k.clamp_min(0)]


def check_rq(x, codebooks, num_levels, out, beam=1, exact=True, greedy=True):
    """out: the op's on x and codebooks, against the reference on float64 copies. exact: the indices must equal
    the reference's (data without near-ties); else they are checked along their own path."""
    ref = reference.residual_quantize(f64(x), f64(codebooks), num_levels, beam)
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
        close_to_f64(got, want, **(loss_tol if got.dim() == 1 else dict(atol=KERNEL_TOL[x.dtype]["atol"])))
    if torch.equal(idx, ridx):
        close_to_f64(q, rq, atol=KERNEL_TOL[x.dtype]["atol"])
        close_to_f64(commit, rcommit, **loss_tol)
        close_to_f64(cbl, rcbl, **loss_tol)


def rq_problem(n, d, levels, k, seed, device, **kw):
    x, cbs = rq_data(n, d, levels, k, seed, **kw)
    return x.to(device), cbs.to(device), -1


TRUTH_CASES = {
    "triton": [(f"{n}x{d}x{k}x{levels}-{case_id(dt)}-{'shared' if shared else 'per-level'}",
                partial(normal_problem, n, d, k, levels, shared, dt), check_float32_path)
               for n, d, k, levels in [(1, 1, 1, 1), (37, 11, 20, 3), (6, 20, 40, 2), (0, 5, 4, 2)]
               for dt in KERNEL_DTYPES for shared in (False, True)],
    # half inputs: rounding noise of the size of the last level's codes, so ties are possible there
    "cuda": [(f"{n}x{d}x{levels}x{k}-x={case_id(xdt)}-cb={case_id(cdt)}",
              partial(rq_problem, n, d, levels, k, n + d, x_dtype=xdt, cb_dtype=cdt),
              partial(check_rq, exact=xdt == torch.float32))
             for xdt in KERNEL_DTYPES for cdt in KERNEL_DTYPES
             for n, d, levels, k in [(1, 1, 1, 1), (7, 5, 3, 9), (300, 16, 3, 64), (2049, 33, 2, 100)]]
    + [("60x8x3x16-seed-15", partial(rq_problem, 60, 8, 3, 16, 15), check_rq)],  # the data of the beam test below
}


@per_backend("name, make, check", TRUTH_CASES)
def test_kernel_vs_float64_truth(backend, name, make, check):
    x, cbs, num_levels = make(device=backend.device)
    check(x, cbs, num_levels, residual_quantize(x, cbs, num_levels))


@on_backends("triton")
def test_kernel_nan_rows_and_codes_as_the_reference(backend):
    """NaN rows -> index -1 and NaN from there; NaN codes never chosen; the rest bit for bit the reference
    (well-separated data: no float32 near-ties)."""
    x = seeded_randn(40, 13, seed=1, device=backend.device)
    cbs = seeded_randn(3, 25, 13, seed=2, device=backend.device)
    x[[0, 17], [5, 0]] = float("nan")
    cbs[0, 4, 1] = float("nan")
    cbs[1, :, 2] = float("nan")  # level 1 has no usable code: -1 for every row from there
    out = residual_quantize(x, cbs)
    assert (out[1][:, 1:] == -1).all() and bool(out[0].isnan().all()) and bool(out[2][1:].isnan().all())
    cbs[1, :, 2] = 0.5
    out = residual_quantize(x, cbs)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu())
    assert out[1][[0, 17]].eq(-1).all() and not (out[1][:, 0] == 4).any()
    assert torch.equal(out[1].cpu(), ref[1]) and nan_equal(out[0].cpu(), ref[0])
    assert bool(out[2].isnan().all())  # NaN rows make every level's loss NaN
    keep = torch.ones(40, dtype=torch.bool, device=backend.device)
    keep[[0, 17]] = False
    out = residual_quantize(x[keep], cbs)
    ref = reference.residual_quantize(x[keep].cpu(), cbs.cpu())
    assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[0].cpu(), ref[0])
    torch.testing.assert_close(out[2].cpu(), ref[2], rtol=1e-6, atol=0.0)


@on_backends("cpu", "reference", "triton", "cuda")
def test_kernel_nan_row(backend):
    x, cbs = rq_data(40, 8, 3, 16, seed=13)
    x[5, 3] = float("nan")
    out = residual_quantize(x.to(backend.device), cbs.to(backend.device))
    check_rq(x, cbs, -1, out)
    assert (out[1][5] == -1).all() and torch.isnan(out[0][5]).all() and torch.isnan(out[2]).all()


@on_backends("triton")
@hyp_settings(5)
@given(n=st.integers(0, 20), d=st.integers(1, 9), k=st.integers(1, 12), levels=st.integers(1, 3),
       shared=st.booleans(), dtype=st.sampled_from(KERNEL_DTYPES), seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_random_shapes(backend, n, d, k, levels, shared, dtype, seed):
    x = seeded_randn(n, d, seed=seed, dtype=dtype, device=backend.device)
    cbs = (seeded_randn(k, d, seed=seed + 1, dtype=dtype, device=backend.device) if shared
           else seeded_randn(levels, k, d, seed=seed + 1, dtype=dtype, device=backend.device))
    quantized, indices, commit, _ = residual_quantize(x, cbs, levels if shared else -1)
    quant, losses = float32_path_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(dtype), "quantized")
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)


@on_backends("triton")
def test_kernel_mixed_dtypes_layouts(backend):
    x = seeded_randn(21, 9, seed=3, device=backend.device)
    cbs = seeded_randn(2, 17, 9, seed=4, device=backend.device)
    xs = with_layout(x.half(), "strided")
    cb_t = cbs.bfloat16().transpose(1, 2).contiguous().transpose(1, 2)
    out = residual_quantize(xs, cb_t)
    ref = reference.residual_quantize(xs.cpu(), cb_t.cpu())
    assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[0].cpu(), ref[0])


@on_backends()
def test_kernel_strided_inputs(backend):
    x, cbs = rq_data(100, 8, 2, 16, seed=14)
    xs = x.to(backend.device).t().contiguous().t()
    cbs_s = cbs.to(backend.device).transpose(1, 2).contiguous().transpose(1, 2)
    check_rq(xs, cbs_s, -1, residual_quantize(xs, cbs_s))


@on_backends()
def test_kernel_shared_codebook(backend):
    x, cb = rq_data(500, 12, 1, 40, seed=11, shared=True)
    out = residual_quantize(x.to(backend.device), cb.to(backend.device), 3)
    ref = reference.residual_quantize(f64(x), f64(cb), 3)
    assert torch.equal(out[1][:, 0].cpu(), ref[1][:, 0])  # the planted level; later ones search noise
    check_rq(x, cb, 3, out, exact=False)


@on_backends("cpu", "reference", "triton", "cuda")
def test_kernel_empty_and_zero_d(backend):
    x, cbs = rq_data(0, 6, 2, 5, seed=12)
    check_rq(x, cbs, -1, residual_quantize(x.to(backend.device), cbs.to(backend.device)))
    q, idx, commit, cbl = residual_quantize(torch.empty(4, 0, device=backend.device),
                                            torch.empty(2, 3, 0, device=backend.device), -1, 1)
    assert q.shape == (4, 0) and torch.equal(idx.cpu(), torch.zeros(4, 2, dtype=torch.int64))
    assert torch.equal(commit.cpu(), torch.zeros(2)) and torch.equal(cbl.cpu(), torch.zeros(2))


def normal_delegated(case, device):
    d = 0 if case == "D=0" else 6
    x = seeded_randn(12, d, seed=5, dtype=torch.float64 if case == "float64" else torch.float32, device=device)
    return x, seeded_randn(3, 8, d, seed=6, dtype=x.dtype, device=device), 3 if case == "beam" else 1


def rq_delegated(dtype, beam, device):
    x, cbs = rq_data(60, 8, 3, 16, seed=15, x_dtype=dtype, cb_dtype=dtype)
    return x.to(device), cbs.to(device), beam


@per_backend("name, make", {
    "triton": [(case, partial(normal_delegated, case)) for case in ("beam", "float64", "D=0")],
    "cuda": [("beam", partial(rq_delegated, torch.float32, 3)),
             ("beam-float64", partial(rq_delegated, torch.float64, 3)),
             ("float64", partial(rq_delegated, torch.float64, 1))]})
def test_kernel_beam_float64_and_zero_d_are_the_reference(backend, name, make):
    """Beam search, float64 and D = 0 are served by the reference: its results bit for bit (distinct loss
    tensors), and those of the reference on float64 copies (check_rq) for the CUDA tests' data."""
    x, cbs, beam = make(backend.device)
    out = residual_quantize(x, cbs, -1, beam)
    for a, b in zip(out, reference.residual_quantize(x, cbs, -1, beam)):
        assert_bitwise_equal(a, b, name)
    assert out[2].data_ptr() != out[3].data_ptr()
    if backend.name == "cuda":
        check_rq(x, cbs, -1, out, beam=beam, greedy=beam == 1)


@on_backends("triton")
def test_kernel_deterministic_bitwise(backend):
    n, d, k = 60, 12, 3  # few codes: long per-code segments, many atomic collisions
    x = seeded_randn(n, d, seed=20, device=backend.device)
    cbs = seeded_randn(k, d, seed=21, device=backend.device)
    grads = seeded_randn(3, seed=22, device=backend.device), seeded_randn(3, seed=23, device=backend.device)
    with deterministic(True):
        fwd = [residual_quantize(x, cbs, 3) for _ in range(2)]
        bwd = [torch.ops.vqkernels.residual_quantize_backward(x, *grads, x, cbs, fwd[0][1]) for _ in range(2)]
    for a, b in zip(fwd[0] + bwd[0], fwd[1] + bwd[1]):
        assert_bitwise_equal(a, b)


@on_backends("cuda")
def test_kernel_forward_repeats_bitwise(backend):
    x, cbs = rq_data(3000, 16, 3, 64, seed=16)
    x, cbs = x.to(backend.device), cbs.to(backend.device)
    first, again = residual_quantize(x, cbs, -1, 1), residual_quantize(x, cbs, -1, 1)
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@on_backends("triton", gpu=True)
def test_kernel_large(backend, dtype):
    n, d, k, levels = 8192, 96, 1024, 4
    dev = backend.device
    x = seeded_randn(n, d, seed=80, dtype=dtype, device=dev)
    cbs = seeded_randn(levels, k, d, seed=81, dtype=dtype, device=dev, scale=0.5)
    quantized, indices, commit, _ = residual_quantize(x, cbs)
    quant, losses = float32_path_truth(x, cbs, indices)
    assert_bitwise_equal(quantized, quant.to(dtype))
    torch.testing.assert_close(commit.double(), losses, rtol=1e-6, atol=0.0)
    ref = reference.residual_quantize(x.cpu(), cbs.cpu())
    assert (indices.cpu() != ref[1]).float().mean() < 1e-3  # float32 near-ties only
    gq, gc, gb = (seeded_randn(n, d, seed=82, device=dev), seeded_randn(levels, seed=83, device=dev),
                  seeded_randn(levels, seed=84, device=dev))
    backward = torch.ops.vqkernels.residual_quantize_backward
    fast = backward(gq, gc, gb, x, cbs, indices)
    with deterministic(True):
        det = [backward(gq, gc, gb, x, cbs, indices) for _ in range(2)]
    ref = reference.residual_quantize_backward(gq.cpu(), gc.cpu(), gb.cpu(), x.cpu(), cbs.cpu(), indices.cpu())
    for a, b, r in zip(det[0], det[1], ref):
        assert_bitwise_equal(a, b)
        assert_bitwise_equal(a.cpu(), r)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a.cpu().float(), r.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-6)


# --- residual_quantize_backward


def float32_path_backward_truth(gq, gc, gb, x, cbs, indices):
    """float64 gradients, written from the spec: grad_x = gq + sum_l gc_l 2/(ND) r_{l+1}, codebook row i_l of
    level l gets -gb_l 2/(ND) r_{l+1} (float32 residuals, as the forward)."""
    n, d = x.shape
    scale = 2.0 / max(n * d, 1)
    gx = gq.double()
    gcb = torch.zeros(cbs.shape, dtype=torch.float64, device=x.device)
    r = x.float()
    for level in range(indices.shape[1]):
        idx = indices[:, level]
        q = torch.where((idx >= 0).unsqueeze(1), level_codebook(cbs, level).float()[idx.clamp_min(0)], float("nan"))
        r = r - q
        gx = gx + gc[level].double() * scale * r.double()
        for row in range(n):
            if idx[row] >= 0:
                level_codebook(gcb, level)[idx[row]] -= gb[level].double() * scale * r[row].double()
    return gx, gcb


@pytest.mark.parametrize("shared", [False, True], ids=["per-level", "shared"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@on_backends("triton")
def test_kernel_backward_vs_truth_and_reference(backend, dtype, shared):
    n, d, k, levels = 23, 10, 6, 3
    dev = backend.device
    x = seeded_randn(n, d, seed=7, dtype=dtype, device=dev)
    cbs = (seeded_randn(k, d, seed=8, dtype=dtype, device=dev) if shared
           else seeded_randn(levels, k, d, seed=8, dtype=dtype, device=dev))
    indices = torch.randint(0, k, (n, levels), generator=gen(9)).to(dev)
    indices[::4, -1] = -1  # no usable code at the last level: NaN grad_x rows, nothing to the codebook
    gq = seeded_randn(n, d, seed=10, dtype=dtype, device=dev)
    gc, gb = seeded_randn(levels, seed=11, device=dev), seeded_randn(levels, seed=12, device=dev)
    gx_truth, gcb_truth = float32_path_backward_truth(gq, gc, gb, x, cbs, indices)
    backward = torch.ops.vqkernels.residual_quantize_backward
    for det in (False, True):
        with deterministic(det):
            gx, gcb = backward(gq, gc, gb, x, cbs, indices)
        assert gx.dtype == dtype and gcb.dtype == dtype and gcb.shape == cbs.shape
        tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
        finite = ~gx_truth.isnan()
        torch.testing.assert_close(gx.double()[finite], gx_truth[finite], **tol)
        assert bool(gx.isnan()[~finite].all())
        torch.testing.assert_close(gcb.double(), gcb_truth, **tol)
    # The deterministic path: bit for bit the reference's sequential index_add_.
    with deterministic(True):
        got = backward(gq, gc, gb, x, cbs, indices)
    ref = reference.residual_quantize_backward(gq.cpu(), gc.cpu(), gb.cpu(), x.cpu(), cbs.cpu(), indices.cpu())
    for a, b in zip(got, ref):
        assert nan_equal(a.cpu(), b)


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


def check_rq_backward(args, device):
    gx, gcb = torch.ops.vqkernels.residual_quantize_backward(*(t.to(device) for t in args))
    rgx, rgcb = reference.residual_quantize_backward(*(f64(t) for t in args))
    assert gx.dtype == args[3].dtype and gcb.dtype == args[4].dtype
    assert gx.shape == args[3].shape and gcb.shape == args[4].shape
    close_to_f64(gx, rgx, atol=KERNEL_TOL[gx.dtype]["atol"] + 1e-5)
    close_to_f64(gcb, rgcb, atol=KERNEL_TOL[gcb.dtype]["atol"] + 1e-5)
    return gx, gcb


@pytest.mark.parametrize("x_dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("cb_dtype", KERNEL_DTYPES, ids=str)
@per_backend("n, d, levels, k, shared", {"cuda": [(1, 1, 1, 1, False), (7, 5, 3, 4, False), (7, 5, 3, 4, True),
                                                  (1000, 24, 4, 50, False), (1000, 24, 4, 50, True)]})
def test_kernel_backward_matches_reference(backend, x_dtype, cb_dtype, n, d, levels, k, shared):
    args = rq_backward_args(n, d, levels, k, seed=n + levels, shared=shared, x_dtype=x_dtype, cb_dtype=cb_dtype)
    gx, _ = check_rq_backward(args, backend.device)
    missing = (args[5] < 0).any(1).to(backend.device)  # r_{l+1} is NaN from a -1 on: grad_x NaN there
    assert torch.isnan(gx[missing]).all()
    assert not torch.isnan(gx[~missing]).any()


@per_backend("make", {
    "triton": [lambda: (seeded_randn(8, 4, seed=16, dtype=torch.float64), seeded_randn(2, seed=17),
                        seeded_randn(2, seed=18), seeded_randn(8, 4, seed=13, dtype=torch.float64),
                        seeded_randn(2, 5, 4, seed=14, dtype=torch.float64),
                        torch.randint(0, 5, (8, 2), generator=gen(15)))],
    "cuda": [partial(rq_backward_args, 20, 5, 2, 3, seed=19, x_dtype=torch.float64, cb_dtype=torch.float64)]})
def test_kernel_backward_float64_is_the_reference(backend, make):
    args = tuple(t.to(backend.device) for t in make())
    assert_float64_is_the_reference(torch.ops.vqkernels.residual_quantize_backward(*args),
                                    reference.residual_quantize_backward(*args),
                                    reference.residual_quantize_backward(*(t.cpu() for t in args)), rtol=1e-10,
                                    atol=1e-5)


@on_backends()
def test_kernel_backward_empty(backend):
    dev = backend.device
    x0, cbs = seeded_randn(0, 4, seed=19, device=dev), seeded_randn(2, 5, 4, seed=14, device=dev)
    gx, gcb = torch.ops.vqkernels.residual_quantize_backward(x0, seeded_randn(2, seed=17, device=dev),
                                                             seeded_randn(2, seed=18, device=dev), x0, cbs,
                                                             torch.zeros(0, 2, dtype=torch.int64, device=dev))
    assert gx.shape == (0, 4) and torch.equal(gcb, torch.zeros_like(gcb))
    check_rq_backward(rq_backward_args(0, 5, 2, 3, seed=18), dev)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@on_backends("triton")
def test_kernel_backward_out_of_range_indices_count_as_minus_one(backend, det):
    """Not range-checked by the Triton kernel (no GPU sync), but memory-safe: an index >= K or < -1 acts as -1."""
    dev = backend.device
    x, cbs = seeded_randn(10, 4, seed=36, device=dev), seeded_randn(2, 5, 4, seed=37, device=dev)
    idx = torch.randint(0, 5, (10, 2), generator=gen(38)).to(dev)
    bad, minus = idx.clone(), idx.clone()
    bad[[1, 6], 1], bad[3, 1] = 5, -7
    minus[[1, 6, 3], 1] = -1
    grads = (seeded_randn(10, 4, seed=39, device=dev), seeded_randn(2, seed=40, device=dev),
             seeded_randn(2, seed=41, device=dev))
    with deterministic(det):
        for a, b in zip(torch.ops.vqkernels.residual_quantize_backward(*grads, x, cbs, bad),
                        torch.ops.vqkernels.residual_quantize_backward(*grads, x, cbs, minus)):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("bad", [16, -2])
@on_backends("cuda")
def test_kernel_backward_bad_index_raises(backend, bad):
    """The CUDA kernel range-checks the indices."""
    args = [t.to(backend.device) for t in rq_backward_args(10, 4, 2, 16, seed=21)]
    args[5][3, 1] = bad
    with pytest.raises(ValueError, match=r"residual_quantize_backward: indices must be in \[-1, K=16\)"):
        backend.ops.residual_quantize_backward(*args)


@pytest.mark.parametrize("shared", [True, False])
@on_backends("cuda")
def test_kernel_backward_deterministic_bitwise(backend, shared):
    # no index -1: a row's -1 makes its later residuals NaN, and with one shared codebook those NaNs reach every
    # code, which would leave nothing of grad_codebooks to compare
    args = [t.to(backend.device) for t in rq_backward_args(4000, 32, 3, 16, seed=20, shared=shared,
                                                            with_missing=False)]
    with deterministic():
        first = torch.ops.vqkernels.residual_quantize_backward(*args)
        again = torch.ops.vqkernels.residual_quantize_backward(*args)
    assert not torch.isnan(first[1]).any()
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b)
    rgx, rgcb = reference.residual_quantize_backward(*(f64(t) for t in args))
    close_to_f64(first[0], rgx, atol=1e-5)
    close_to_f64(first[1], rgcb, atol=1e-5)


# --- opcheck and the backends' own input checks

def kernel_forward_samples():
    x, cbs = seeded_randn(9, 5, seed=24), seeded_randn(2, 6, 5, seed=25)
    xh, cbs_h = rq_data(30, 8, 3, 16, seed=22, x_dtype=torch.float16)
    return {"f32": (x, cbs, -1, 1), "shared-f16": (x.half(), cbs[0].bfloat16(), 2, 1), "beam": (x, cbs, 2, 2),
            "empty": (x[:0], cbs, -1, 1), "f16": (xh, cbs_h, -1, 1)}


@per_backend("sample", {"triton": ["f32", "shared-f16", "beam", "empty"], "cuda": ["f16"]})
def test_kernel_opcheck(backend, sample):
    args = kernel_forward_samples()[sample]
    kernel_opcheck(backend, "residual_quantize", tuple(a.to(backend.device) if torch.is_tensor(a) else a for a in args))


@per_backend("make", {
    # no index -1: NaN outputs never compare equal
    "triton": [lambda: (seeded_randn(9, 5, seed=29), seeded_randn(2, seed=30), seeded_randn(2, seed=31),
                        seeded_randn(9, 5, seed=26), seeded_randn(2, 6, 5, seed=27),
                        torch.randint(0, 6, (9, 2), generator=gen(28)))],
    "cuda": [partial(rq_backward_args, 30, 8, 3, 16, seed=23, cb_dtype=torch.bfloat16, with_missing=False)]})
def test_kernel_backward_opcheck(backend, make):
    with deterministic(backend.name == "triton"):
        kernel_opcheck(backend, "residual_quantize_backward", tuple(t.to(backend.device) for t in make()))


KERNEL_BAD = {
    "triton": [(lambda x, c: (x[0], c, -1, 1), "x must be 2-D"),
               (lambda x, c: (x, c[0, 0], -1, 1), "codebooks must be"),
               (lambda x, c: (x.int(), c, -1, 1), "x must be float32"),
               (lambda x, c: (x, c[:, :, :3], -1, 1), "has D=5"),
               (lambda x, c: (x, c, 3, 1), "num_levels=3 does not match"),
               (lambda x, c: (x, c[0], 0, 1), "needs num_levels >= 1"),
               (lambda x, c: (x, c, -1, 7), "beam_size must be in")],
    "cuda": [(lambda x, c: (x, c, 2, 1), "num_levels=2 does not match codebooks' L=3"),
             (lambda x, c: (x, c, -1, 17), r"beam_size must be in \[1, K=16\]"),
             (lambda x, c: (x[:, :7], c, -1, 1), "x has D=7")],
}
KERNEL_BAD_INPUTS = {"triton": lambda: (seeded_randn(4, 5, seed=32), seeded_randn(2, 6, 5, seed=33)),
                     "cuda": lambda: rq_data(10, 8, 3, 16, seed=17)}


@per_backend("make, match", KERNEL_BAD)
def test_kernel_bad_inputs(backend, make, match):
    x, cbs = (t.to(backend.device) for t in KERNEL_BAD_INPUTS[backend.name]())
    assert_kernel_rejects(backend, "residual_quantize", make(x, cbs), match)


@on_backends("triton")
def test_kernel_backward_bad_inputs(backend):
    x, cbs = seeded_randn(4, 5, seed=34, device=backend.device), seeded_randn(2, 6, 5, seed=35, device=backend.device)
    idx = torch.zeros(4, 3, dtype=torch.int64, device=backend.device)
    grads = seeded_randn(3, seed=0, device=backend.device)
    assert_kernel_rejects(backend, "residual_quantize_backward", (x, grads, grads, x, cbs, idx), "indices has L=3")


@on_backends("triton", gpu=True)
def test_triton_cpu_tensors_rejected(backend):
    assert_rejects_cpu_tensors(backend, "residual_quantize", seeded_randn(4, 5, seed=92),
                               seeded_randn(2, 6, 5, seed=93))
