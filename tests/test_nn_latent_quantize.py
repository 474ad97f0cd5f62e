"""vqkernels.nn.LatentQuantize as a drop-in for vector-quantize-pytorch 1.32.0's: the same outputs (bit for bit),
indices, loss, input and projection gradients, public methods and state_dict; where theirs' indices are wrong
(levels whose values are not binary fractions) ours decode to the output; unsupported options refused;
odd inputs; torch.compile."""

import math

import pytest
import torch
import vector_quantize_pytorch as vqp
from einops import pack

from nn_helpers import assert_compiled_training_matches_eager, assert_same, pair_with_theirs
from vq_helpers import gen
from vqkernels.nn import LatentQuantize

# (keywords, channel-first input shape, input scale); their indices are right for these levels
CASES = {
    "tokens": (dict(levels=[8, 5, 5, 5], dim=4), (2, 4, 13), 1.0),
    "image-projections-2-codebooks": (dict(levels=[7, 5, 3, 4], dim=12, num_codebooks=2), (2, 12, 3, 5), 1.0),
    "int-levels": (dict(levels=5, codebook_dim=3, dim=3), (3, 3, 7), 0.5),
    "one-token-per-sample": (dict(levels=[4, 3, 9, 2], dim=4), (6, 4), 1.0),
    "video-keep-codebook-dim": (dict(levels=[8, 4], dim=2, keep_num_codebooks_dim=True), (2, 2, 3, 2, 2), 1.0),
    "fixed-values-weights": (dict(levels=[16, 3, 2], dim=5, optimize_values=False, commitment_loss_weight=0.25,
                                  quantization_loss_weight=2.0), (2, 5, 9), 2.0),
    "no-commitment-loss": (dict(levels=[8, 5], dim=2, commitment_loss_weight=0.0), (2, 2, 11), 1.0),
    "large-inputs": (dict(levels=[8, 5, 5], dim=3), (2, 3, 17), 30.0),
}


def pair(kw, seed=0):
    return pair_with_theirs(vqp.LatentQuantize, LatentQuantize, kw, seed)


def mixed_radix_argmin(layer, z):
    """The spec, independently: per dimension the first argmin of |z - value| (channel-last z [..., d])."""
    levels = torch.stack([(z[..., i, None] - v).abs().argmin(-1) for i, v in enumerate(layer.values_per_latent)], -1)
    basis = torch.tensor([math.prod(layer.levels[:i]) for i in range(len(layer.levels))])
    return (levels * basis).sum(-1).int()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_matches_vector_quantize_pytorch(case, train):
    kw, shape, scale = CASES[case]
    theirs, ours = pair(kw)
    theirs.train(train), ours.train(train)
    x = torch.randn(shape, generator=gen(1)) * scale
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_t, i_t, l_t = theirs(xa)
    q_o, i_o, l_o = ours(xb)
    assert_same(q_o, q_t, "quantized")
    assert_same(i_o, i_t, "indices")
    assert_same(l_o, l_t, "loss")
    g = torch.randn(q_t.shape, generator=gen(2))
    objective_t, objective_o = (q_t * g).sum() + l_t, (q_o * g).sum() + l_o
    objective_t.backward(), objective_o.backward()
    assert_same(xb.grad, xa.grad, "input gradient")
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        if name.startswith("values_per_latent"):  # reached only through the straight-through estimator
            assert pa.grad is None and pb.grad is None, name
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert_same(ours.indices_to_codes(i_o), theirs.indices_to_codes(i_t), "indices_to_codes")
    assert_same(ours.indices_to_codes(i_o, project_out=False), theirs.indices_to_codes(i_t, project_out=False),
                "indices_to_codes without project_out")


def test_attributes_and_buffers_match():
    kw = dict(levels=[8, 6, 5], dim=7, num_codebooks=2, commitment_loss_weight=0.3)
    theirs, ours = pair(kw)
    for name in ("dim", "codebook_dim", "num_codebooks", "effective_codebook_dim", "keep_num_codebooks_dim",
                 "has_projections", "codebook_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("_levels", "_basis", "commitment_loss_weight", "quantization_loss_weight", "implicit_codebook"):
        assert_same(getattr(ours, name), getattr(theirs, name), name)
    fresh = LatentQuantize(**kw)
    for i, (a, b) in enumerate(zip(fresh.values_per_latent, theirs.values_per_latent)):
        assert_same(a.detach(), b.detach(), f"initial values of dimension {i}")
    assert len(list(ours.parameters())) == len(list(theirs.parameters()))
    # their keep_num_codebooks_dim=False with several codebooks keeps it (the assert after it never fires)
    for layer in (vqp.LatentQuantize, LatentQuantize):
        assert layer(levels=[4, 4], dim=4, num_codebooks=2, keep_num_codebooks_dim=False).keep_num_codebooks_dim


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype):
    """Half inputs are compared with the float32 values (their output is float32), float64 ones in float64."""
    theirs, ours = pair(dict(levels=[8, 5, 3, 4], dim=4))
    x = torch.randn(3, 4, 50, generator=gen(3)).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (q_t, i_t, l_t), (q_o, i_o, l_o) = theirs(xa), ours(xb)
    assert q_o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for a, b, what in ((q_o, q_t, "quantized"), (i_o, i_t, "indices"), (l_o, l_t, "loss")):
        assert_same(a, b, what)
    (q_t.sum() + l_t).backward(), (q_o.sum() + l_o).backward()
    assert_same(xb.grad, xa.grad, "input gradient")


def _near_midpoints(values, dtype, steps):
    """Inputs at the midpoints between neighbouring values and up to ``steps`` representable numbers either side."""
    v = values.detach().sort().values.to(dtype)
    around = [((v[1:] + v[:-1]) / 2).to(dtype)]
    for direction in (1.0, -1.0):
        x = around[0]
        for _ in range(steps):
            x = x.nextafter(torch.tensor(direction, dtype=dtype))
            around.append(x)
    return torch.cat(around + [v])


@pytest.mark.parametrize("values", ["initial", "moved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_near_ties_resolve_as_theirs(dtype, values):
    """Inputs at and next to the midpoints between values (levels 10 to 15, initial or moved at random and
    loaded into both), where the distances tie or nearly do: the choice is theirs (the first minimum of
    |z - value| in the promoted dtype), not merely the nearest value."""
    levels = [10, 11, 12, 13, 14, 15]
    theirs, ours = pair(dict(levels=levels, dim=len(levels)))
    if values == "moved":
        with torch.no_grad():
            for i, v in enumerate(theirs.values_per_latent):
                v.copy_(torch.rand(v.shape, generator=gen(20 + i)) - 0.5)
        ours.load_state_dict(theirs.state_dict())
    cols = [_near_midpoints(v, dtype, 32) for v in ours.values_per_latent]
    n = max(len(c) for c in cols)
    z = torch.stack([c.repeat(n // len(c) + 1)[:n] for c in cols], -1)  # [n, d] tokens
    x = z.T.unsqueeze(0).contiguous()  # [1, d, n]
    (q_t, _, _), (q_o, i_o, _) = theirs(x), ours(x)
    assert_same(q_o, q_t, "quantized")
    assert torch.equal(i_o[0], mixed_radix_argmin(ours, z))


def test_indices_decode_to_the_output_where_theirs_do_not():
    """Levels 6, 15 and 10: theirs truncate a float sum, one level low for many tokens; ours are the chosen levels'
    index, which indices_to_codes turns back into the output (the output itself is theirs, bit for bit)."""
    theirs, ours = pair(dict(levels=[6, 15, 10], dim=3))
    x = torch.randn(4, 3, 300, generator=gen(4)) * 2
    (q_t, i_t, _), (q_o, i_o, _) = theirs(x), ours(x)
    assert_same(q_o, q_t, "quantized")
    assert torch.equal(i_o, mixed_radix_argmin(ours, x.transpose(1, 2)))
    torch.testing.assert_close(ours.indices_to_codes(i_o), q_o, rtol=0, atol=1e-6)
    wrong = i_t != i_o
    assert wrong.float().mean() > 0.05  # theirs: 1 step too low in some dimension
    err_t = (theirs.indices_to_codes(i_t) - q_t).abs().amax(1)
    assert (err_t[wrong] > 0.05).all()
    every = torch.arange(ours.codebook_size)
    level = (every[:, None] // ours._basis) % ours._levels
    outputs = torch.stack([v.detach()[level[:, i]] for i, v in enumerate(ours.values_per_latent)], -1)
    assert torch.equal(ours.codes_to_indices(outputs), every.int())
    assert not torch.equal(theirs.codes_to_indices(outputs), every.int())  # e.g. level 15's 8th value -> 6


def test_codes_to_indices_and_quantize_match():
    theirs, ours = pair(dict(levels=[8, 5, 4, 3], dim=8, num_codebooks=2))
    grid = ours.implicit_codebook
    assert_same(ours.codes_to_indices(grid), theirs.codes_to_indices(grid), "codes_to_indices of the grid")
    z = torch.randn(2, 10, 2, 4, generator=gen(5))
    assert_same(ours.quantize(z), theirs.quantize(z), "quantize")
    _, ps = pack([torch.zeros(2, 5, 2, 8)], "b * d")
    for a, b, what in zip(ours.quantize_and_project(z, True, ps), theirs.quantize_and_project(z, True, ps),
                          ("codes", "output", "indices")):
        assert_same(a, b, what)
    with pytest.raises(ValueError, match="codes must have 4 values"):
        ours.codes_to_indices(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="expected 4 values"):
        ours.quantize(torch.zeros(3, 5))


def test_nan_tokens_and_out_of_range_indices():
    """A token holding a NaN gets index -1 and NaN in its output (theirs: an arbitrary index);
    indices outside [0, codebook_size) decode to NaN."""
    ours = LatentQuantize(levels=[8, 5], dim=2)
    x = torch.tensor([[[0.1, float("nan"), -0.3], [0.2, 0.4, float("nan")]]])
    q, i, _ = ours(x)
    assert i.tolist() == [[i[0, 0].item(), -1, -1]] and i[0, 0] >= 0
    assert torch.isnan(q[0, 0, 1]) and torch.isnan(q[0, 1, 2]) and not torch.isnan(q[:, :, 0]).any()
    codes = ours.indices_to_codes(torch.tensor([[-1, 0, 39, 40]]))
    assert torch.isnan(codes[0, :, [0, 3]]).all() and not torch.isnan(codes[0, :, 1:3]).any()


def test_no_tokens_and_empty_batch():
    theirs, ours = pair(dict(levels=[8, 5, 5], dim=6))
    x = torch.randn(2, 6, 0)
    for a, b, what in zip(ours(x), theirs(x), ("quantized", "indices", "loss")):
        assert_same(a, b, what)  # the loss is the mean of nothing (NaN) in both
    q, i, loss = ours(torch.randn(0, 6, 3, 2))  # their reshape fails on an empty batch
    assert q.shape == (0, 6, 3, 2) and i.shape == (0, 3, 2) and i.dtype == torch.int32


def test_none_loss_weight_turns_that_loss_off():
    theirs, ours = pair(dict(levels=[8, 5], dim=2, commitment_loss_weight=0.0))
    ours_none = LatentQuantize(levels=[8, 5], dim=2, commitment_loss_weight=None)
    x = torch.randn(2, 2, 9, generator=gen(6))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (q_t, _, l_t), (q_o, _, l_o) = theirs(xa), ours_none(xb)
    assert_same(l_o, l_t, "loss")
    (q_t.sum() + l_t).backward(), (q_o.sum() + l_o).backward()
    assert_same(xb.grad, xa.grad, "input gradient")
    both_off = LatentQuantize(levels=[8, 5], dim=2, commitment_loss_weight=None, quantization_loss_weight=0)
    assert both_off(x)[2].item() == 0.0 and not both_off(x)[2].requires_grad


def test_state_dict_round_trip_with_theirs():
    """Trained-looking weights (moved values, projections) go theirs -> ours -> theirs with the same outputs."""
    kw = dict(levels=[8, 5, 5, 5], dim=6)
    theirs, _ = pair(kw)
    with torch.no_grad():
        for v in theirs.values_per_latent:
            v.add_(torch.randn(v.shape, generator=gen(7)) * 0.05)
    ours = LatentQuantize(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = vqp.LatentQuantize(**kw)
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 6, 8, generator=gen(8))
    assert_same(ours(x)[0], theirs(x)[0], "quantized with moved values")
    assert_same(back(x)[0], theirs(x)[0], "quantized after the round trip")
    fixed_t, fixed_o = pair(dict(kw, optimize_values=False))
    assert list(fixed_o.state_dict()) == ["project_in.weight", "project_in.bias", "project_out.weight",
                                          "project_out.bias"]
    assert [v.dtype for v in fixed_o.double().values_per_latent] == [torch.float64] * 4  # they follow .to()


def test_training_with_an_optimizer_matches_theirs():
    """Adam on every parameter, as a user would: the projections move as theirs, the values never do."""
    theirs, ours = pair(dict(levels=[8, 5, 5, 5], dim=16))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (theirs, ours)]
    values_before = [v.detach().clone() for v in ours.values_per_latent]
    for step in range(5):
        x = torch.randn(4, 16, 10, generator=gen(10 + step))
        for layer, opt in zip((theirs, ours), opts):
            q, _, loss = layer(x)
            opt.zero_grad()
            ((q - x).square().mean() + loss).backward()
            opt.step()
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert all(torch.equal(v, b) for v, b in zip(ours.values_per_latent, values_before))
    assert not torch.equal(ours.project_in.weight, pair(dict(levels=[8, 5, 5, 5], dim=16))[1].project_in.weight)


def test_in_place_codebook_optimizer_is_refused():
    theirs = vqp.LatentQuantize(levels=[5, 5], dim=2, in_place_codebook_optimizer=torch.optim.Adam)
    with pytest.raises(AttributeError, match="optimize_values"):  # theirs cannot train with it
        theirs(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="in_place_codebook_optimizer"):
        LatentQuantize(levels=[5, 5], dim=2, in_place_codebook_optimizer=torch.optim.Adam)


@pytest.mark.parametrize("kw, pattern", [
    (dict(levels=5, dim=3), "codebook_dim=-1"),
    (dict(levels=[5, 5, 5], dim=3, codebook_dim=2), "codebook_dim=2"),
    (dict(levels=[5, 1], dim=2), "at least 2 values"),
    (dict(levels=[], dim=2), "at least 2 values"),
    (dict(levels=[2 ** 16, 2 ** 15], dim=2), "int32"),
], ids=["int-levels-without-codebook-dim", "codebook-dim-mismatch", "level-1", "no-levels", "too-many-codes"])
def test_bad_configurations(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        LatentQuantize(**kw)


def test_wrong_input_shapes():
    layer = LatentQuantize(levels=[8, 5], dim=2)
    with pytest.raises(ValueError, match=r"channel-first input \[b, 2, ...\]"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="channel-first input"):
        layer(torch.randn(2))


@pytest.mark.parametrize("kw, shape", [(dict(levels=[8, 5, 6], dim=6, num_codebooks=2), (2, 6, 5, 3)),
                                       (dict(levels=[8, 5, 6], dim=3, optimize_values=False,
                                             commitment_loss_weight=0.0), (3, 3, 7))],
                         ids=["projections-2-codebooks-image", "fixed-values-tokens"])
def test_compiled_training_step_matches_eager(kw, shape):
    """Inductor, fullgraph=True (a host sync would break the graph): outputs, gradients and indices as eager."""
    assert_compiled_training_matches_eager(lambda: LatentQuantize(**kw), [torch.randn(shape, generator=gen(11)),
                                                                          torch.randn(shape, generator=gen(12))])
    torch._dynamo.reset()
    layer = LatentQuantize(**kw)
    x = torch.randn(shape, generator=gen(13))
    eager, compiled = layer(x), torch.compile(layer, fullgraph=True)(x)
    assert_same(compiled[0], eager[0], "quantized")
    assert_same(compiled[1], eager[1], "indices")
    torch._dynamo.reset()
