"""vqkernels.nn.FSQ and vqkernels.nn.LFQ as drop-ins for vector-quantize-pytorch 1.32.0's FSQ and LFQ:
same keywords, outputs, indices and state_dict; unsupported options refused; torch.compile; memory."""

import math

import pytest
import torch
import vector_quantize_pytorch as vqp

from nn_helpers import assert_same
from nn_helpers import pair_with_theirs as pair
from vq_helpers import LFQ_PROB_EPS as PROB_EPS
from vq_helpers import gen, peak_memory_kib
from vqkernels.nn.fsq import FSQ
from vqkernels.nn.lfq import LFQ, LossBreakdown, Return


# ---------------------------------------------------------------------------------------
# FSQ

# (keywords, input shape)
FSQ_CASES = {
    "default": (dict(levels=[8, 5, 5, 5]), (2, 9, 4)),
    "image-projections-2-codebooks": (dict(levels=[7, 5, 4], dim=12, num_codebooks=2), (3, 12, 6, 5)),
    "channel-first-3d": (dict(levels=[3, 4], dim=5, channel_first=True), (3, 5, 7)),
    "no-bias": (dict(levels=[8, 6, 5], dim=8, projection_has_bias=False), (2, 11, 8)),
    "no-indices": (dict(levels=[5, 5], return_indices=False), (4, 3, 2)),
    "keep-codebook-dim": (dict(levels=[6, 5, 3], keep_num_codebooks_dim=True, scale=0.5), (2, 7, 3)),
    "video": (dict(levels=[4, 4, 3], dim=6), (2, 6, 3, 4, 2)),
    "float64-forced-f32": (dict(levels=[8, 5, 5], allowed_dtypes=(torch.float32,)), (2, 9, 3)),
    "float64-native": (dict(levels=[8, 5, 5], force_quantization_f32=False), (2, 9, 3)),
    "symmetric": (dict(levels=[8, 5, 2, 3], preserve_symmetry=True), (2, 9, 4)),
    "symmetric-image-projections": (dict(levels=[4, 2, 7], dim=5, preserve_symmetry=True), (2, 5, 4, 3)),
    "hard-clamp": (dict(levels=[8, 5, 5, 4], bound_hard_clamp=True), (2, 9, 4)),
    "symmetric-hard-clamp": (dict(levels=[6, 5, 2], preserve_symmetry=True, bound_hard_clamp=True), (3, 7, 3)),
    "symmetric-float64": (dict(levels=[8, 3], preserve_symmetry=True, force_quantization_f32=False), (2, 9, 2)),
    "hard-clamp-float64": (dict(levels=[8, 3], bound_hard_clamp=True, force_quantization_f32=False), (2, 9, 2)),
}
FSQ_DTYPES = {"float64-forced-f32": torch.float64, "float64-native": torch.float64,
              "symmetric-float64": torch.float64, "hard-clamp-float64": torch.float64}


@pytest.mark.parametrize("case", FSQ_CASES)
def test_fsq_matches_vqp(case):
    """Outputs and indices bitwise equal (FSQ has no train/eval difference); input and parameter
    gradients equal to float32 rounding (tanh's last bit may differ between the two)."""
    kwargs, shape = FSQ_CASES[case]
    theirs, ours = pair(vqp.FSQ, FSQ, kwargs)
    dtype = FSQ_DTYPES.get(case, torch.float32)
    theirs.to(dtype), ours.to(dtype)
    z = (torch.randn(shape, generator=gen(1)) * 1.5).to(dtype)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_a, idx_a = theirs(za)
    out_b, idx_b = ours(zb)
    assert_same(out_a, out_b, "quantized")
    if kwargs.get("return_indices", True):
        assert_same(idx_a, idx_b, "indices")
        assert_same(theirs.indices_to_codes(idx_a), ours.indices_to_codes(idx_b), "indices_to_codes")
        assert_same(theirs.indices_to_level_indices(idx_a), ours.indices_to_level_indices(idx_b), "level indices")
        assert_same(theirs.implicit_codebook, ours.implicit_codebook, "implicit_codebook")
        assert theirs.codebook_size == ours.codebook_size
    else:
        assert idx_a is None and idx_b is None
    g = torch.randn(out_a.shape, generator=gen(2)).to(dtype)
    (out_a * g).sum().backward()
    (out_b * g).sum().backward()
    torch.testing.assert_close(zb.grad, za.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("symmetric", [False, True])
def test_fsq_codes_to_indices_matches_vqp(symmetric):
    theirs, ours = pair(vqp.FSQ, FSQ, dict(levels=[8, 5, 5, 5], preserve_symmetry=symmetric))
    codes = theirs.implicit_codebook
    assert_same(theirs.codes_to_indices(codes), ours.codes_to_indices(codes), "codes_to_indices")
    assert torch.equal(ours.codes_to_indices(codes), torch.arange(1000, dtype=torch.int32))


def test_fsq_hard_clamp_saturates_and_stops_the_gradient():
    """bound_hard_clamp: inputs far outside the range take the outer levels and get no gradient (tanh would
    still pass a little), for the plain and the symmetric bound."""
    for symmetric in (False, True):
        layer = FSQ(levels=[5, 4], bound_hard_clamp=True, preserve_symmetry=symmetric)
        z = torch.tensor([[[-3.0, 3.0], [0.2, -0.1]]], requires_grad=True)
        out, idx = layer(z)
        assert out[0, 0].abs().tolist() == [1.0, 1.0 if symmetric else 0.5]
        out.sum().backward()
        assert z.grad[0, 0].tolist() == [0.0, 0.0] and (z.grad[0, 1] > 0).all()


def _noise_stats(layer, z, clean, idx):
    """(share of code values moved, mean and spread of the offsets the clamp left alone) of one training call."""
    torch.manual_seed(6)
    noisy, noisy_idx = layer.train()(z)
    assert torch.equal(noisy_idx, idx)  # the indices are the noiseless codes'
    moved = noisy != clean
    delta = (noisy - clean)[moved & (noisy.abs() < 1)]
    return moved.float().mean().item(), delta.mean().item(), delta.std().item()


def test_fsq_noise_dropout_distribution_matches_vqp():
    """noise_dropout (stochastic): in training each code value moves by U[-0.5, 0.5) with probability p and is
    clamped to [-1, 1]; compared by distribution, not bits; eval mode adds nothing. vector-quantize-pytorch
    1.32.0 draws its mask with ``full_like(z, p).bernoulli_()``, which ignores p and moves half of the values
    whatever p is: at p = 0.5 the two agree, at p = 0.3 ours moves 30% (before the clamp) and theirs still
    half."""
    z = torch.randn(64, 256, 3, generator=gen(5))
    stats = {}
    for p in (0.5, 0.3):
        theirs, ours = pair(vqp.FSQ, FSQ, dict(levels=[8, 5, 3], preserve_symmetry=True, noise_dropout=p))
        clean, idx = ours.eval()(z)
        assert_same(clean, theirs.eval()(z)[0], "eval mode")
        stats[p] = _noise_stats(theirs, z, clean, idx), _noise_stats(ours, z, clean, idx)
        # an offset moves a value unless the clamp takes it back to an outer level it already held
        kept = ((clean.abs() == 1).float().mean() * 0.5).item()
        assert abs(stats[p][1][0] - p * (1 - kept)) < 0.01, (p, stats[p])
    (share_t, mean_t, std_t), (share_o, mean_o, std_o) = stats[0.5]
    assert abs(share_t - share_o) < 0.01 and abs(mean_o - mean_t) < 0.01 and abs(std_o - std_t) < 0.01
    assert abs(stats[0.3][0][0] - share_t) < 0.01  # theirs moves as many at 0.3 as at 0.5


def test_fsq_half_input():
    """bfloat16 in: quantized in float32 (force_quantization_f32), returned as bfloat16, as there."""
    theirs, ours = pair(vqp.FSQ, FSQ, dict(levels=[8, 5, 5, 5], dim=16))
    theirs.bfloat16(), ours.bfloat16()
    z = torch.randn(2, 9, 16, generator=gen(3)).bfloat16()
    out_a, idx_a = theirs(z)
    out_b, idx_b = ours(z)
    assert_same(out_a, out_b, "quantized")
    assert_same(idx_a, idx_b, "indices")


def test_fsq_state_dict_round_trip():
    ours = FSQ(levels=[7, 5, 4], dim=12, num_codebooks=2)
    again = FSQ(levels=[7, 5, 4], dim=12, num_codebooks=2)
    again.load_state_dict(ours.state_dict())
    theirs = vqp.FSQ(levels=[7, 5, 4], dim=12, num_codebooks=2)
    theirs.load_state_dict(ours.state_dict())
    z = torch.randn(2, 4, 12, generator=gen(4))
    for other in (again, theirs):
        for a, b in zip(ours(z), other(z)):
            assert_same(a, b, "after loading")


@pytest.mark.parametrize("kwargs, option", [
    (dict(noise_dropout=0.1), "noise_dropout"),
    (dict(noise_dropout=1.5, preserve_symmetry=True), "noise_dropout"),
    (dict(orthogonal_rotation=True), "orthogonal_rotation"),
])
def test_fsq_rejects_unsupported_options(kwargs, option):
    with pytest.raises(ValueError, match=rf"vqkernels\.nn\.FSQ: {option}=.* is not supported"):
        FSQ(levels=[8, 5, 5], **kwargs)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(levels=[8, 2, 5]), ValueError, r"levels=\[8, 2, 5\] is not supported"),
    (dict(levels=[8, 1001]), ValueError, r"every level must be in \[2, 1000\]"),
    (dict(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False), ValueError, r"keep_num_codebooks_dim"),
    (dict(levels=[8, 5], not_an_option=1), TypeError, r"not_an_option"),
])
def test_fsq_rejects_bad_configurations(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FSQ(**kwargs)


def test_fsq_rejects_wrong_feature_dim():
    with pytest.raises(ValueError, match=r"expected the feature dimension 3"):
        FSQ(levels=[8, 5, 5])(torch.randn(2, 4, 4))


# ---------------------------------------------------------------------------------------
# LFQ

LFQ_CASES = {
    "default": (dict(dim=8), (2, 33, 8)),
    "projections-2-codebooks-commit": (dict(dim=20, codebook_size=2 ** 6, num_codebooks=2,
                                            commitment_loss_weight=0.25, codebook_scale=0.5), (2, 17, 20)),
    "image": (dict(dim=6), (2, 6, 4, 5)),
    "soft-clamp-no-bias": (dict(dim=10, codebook_size=2 ** 5, soft_clamp_input_value=2.0, projection_has_bias=False),
                           (3, 11, 10)),
    "softplus-gamma": (dict(dim=6, experimental_softplus_entropy_loss=True, diversity_gamma=2.5,
                            entropy_loss_weight=0.3, entropy_loss_offset=1.0), (2, 25, 6)),
    "forced-projections-keep-dim": (dict(dim=5, has_projections=True, keep_num_codebooks_dim=True,
                                         commitment_loss_weight=1.0), (4, 9, 5)),
    "channel-first-3d": (dict(dim=7, channel_first=True, codebook_scale=2.0), (2, 7, 12)),
    "spherical": (dict(dim=8, spherical=True), (2, 33, 8)),
    "spherical-scaled-2-codebooks-commit": (dict(dim=12, codebook_size=2 ** 5, num_codebooks=2, spherical=True,
                                                 codebook_scale=1.5, commitment_loss_weight=0.25), (2, 17, 12)),
}


def aux_loss_tolerance(module, codebook_dim):
    """Ours minus theirs: the exact per-sample entropy exceeds vector-quantize-pytorch's clamped one by
    at most 2**d * 1e-5 / e per token (see vqkernels.lfq_entropy); the rest is float32 rounding of
    entropies of size <= d log 2 (1e-5 absolute, also through diversity_gamma) and of the commitment loss.
    A softplus has slope < 1: the bound holds through it."""
    clamp = 2 ** codebook_dim * PROB_EPS / math.e
    return (module.entropy_loss_weight * (clamp + (1 + abs(module.diversity_gamma)) * 1e-5)
            + module.commitment_loss_weight * 1e-6, clamp)


@pytest.mark.parametrize("case", LFQ_CASES)
def test_lfq_eval_matches_vqp_exactly(case):
    kwargs, shape = LFQ_CASES[case]
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    theirs.eval(), ours.eval()
    x = torch.randn(shape, generator=gen(5)).requires_grad_()
    a, b = theirs(x), ours(x)
    assert isinstance(b, Return)
    assert_same(a.quantized, b.quantized, "quantized")
    assert_same(a.indices, b.indices, "indices")
    assert_same(a.entropy_aux_loss, b.entropy_aux_loss, "aux loss (zero in eval)")
    assert a.quantized.requires_grad == b.quantized.requires_grad
    assert_same(theirs.indices_to_codes(a.indices), ours.indices_to_codes(b.indices), "indices_to_codes")
    assert_same(theirs.indices_to_codes(a.indices, project_out=False),
                ours.indices_to_codes(b.indices, project_out=False), "indices_to_codes without project_out")
    assert_same(theirs.codebook, ours.codebook, "codebook")


@pytest.mark.parametrize("tau", [100.0, 1.0])
@pytest.mark.parametrize("case", LFQ_CASES)
def test_lfq_training_matches_vqp(case, tau):
    """Training: indices equal; quantized equal to float32 rounding (theirs is x + (q - x).detach());
    the aux loss and its breakdown within aux_loss_tolerance (per-sample entropy: ours >= theirs);
    input and parameter gradients of sum(quantized * G) + aux_loss within 1e-3 of their largest (the
    clamp also changes the per-sample entropy's gradient, by at most about 3e-4 of it in these cases)."""
    kwargs, shape = LFQ_CASES[case]
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    theirs.train(), ours.train()
    x = torch.randn(shape, generator=gen(6))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, la = theirs(xa, inv_temperature=tau, return_loss_breakdown=True)
    b, lb = ours(xb, inv_temperature=tau, return_loss_breakdown=True)
    assert isinstance(lb, LossBreakdown)
    assert_same(a.indices, b.indices, "indices")
    torch.testing.assert_close(b.quantized, a.quantized, rtol=1e-6, atol=1e-6)
    tol, clamp = aux_loss_tolerance(ours, ours.codebook_dim)
    gap = {name: float((getattr(lb, name) - getattr(la, name)).detach()) for name in LossBreakdown._fields}
    assert abs(float((b.entropy_aux_loss - a.entropy_aux_loss).detach())) <= tol
    assert -1e-5 <= gap["per_sample_entropy"] <= clamp + 1e-5
    assert abs(gap["batch_entropy"]) <= 1e-5 and abs(gap["commitment"]) <= 1e-6
    g = torch.randn(a.quantized.shape, generator=gen(7))
    ((a.quantized * g).sum() + a.entropy_aux_loss).backward()
    ((b.quantized * g).sum() + b.entropy_aux_loss).backward()
    pairs = [("x", xa.grad, xb.grad)] + [(n, p.grad, q.grad) for (n, p), q in
                                         zip(theirs.named_parameters(), ours.parameters())]
    for name, ga, gb in pairs:
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-3 * float(ga.abs().max()), msg=lambda m: f"{name}: {m}")


def test_lfq_entropy_gradient_is_checked():
    """The gradient comparison above is not vacuous: the entropy term's gradient alone is compared, and a
    wrong scale of it (the diversity term dropped) is far outside the tolerance."""
    kwargs = dict(dim=8, entropy_loss_weight=1.0)
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    x = torch.randn(2, 33, 8, generator=gen(8))
    grads = []
    for module, gamma in ((theirs, 1.0), (ours, 1.0), (ours, 0.0)):
        module.train()
        module.diversity_gamma = gamma
        xx = x.clone().requires_grad_()
        module(xx, inv_temperature=1.0).entropy_aux_loss.backward()
        grads.append(xx.grad)
    scale = float(grads[0].abs().max())
    assert float((grads[1] - grads[0]).abs().max()) <= 1e-3 * scale
    assert float((grads[2] - grads[0]).abs().max()) > 0.1 * scale


def test_lfq_state_dict_round_trip():
    kwargs = dict(dim=20, codebook_size=2 ** 6, num_codebooks=2)
    ours, again = LFQ(**kwargs), LFQ(**kwargs)
    again.load_state_dict(ours.state_dict())
    theirs = vqp.LFQ(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == {"mask", "project_in.weight", "project_in.bias", "project_out.weight",
                                      "project_out.bias"}
    x = torch.randn(2, 5, 20, generator=gen(9))
    for other in (again, theirs):
        other.eval()
        assert_same(ours.eval()(x).quantized, other(x).quantized, "after loading")


@pytest.mark.parametrize("kwargs, option", [
    (dict(straight_through_activation=torch.nn.Tanh()), "straight_through_activation"),
    (dict(cosine_sim_project_in=True), "cosine_sim_project_in"),
    (dict(cosine_sim_project_in_scale=2.0), "cosine_sim_project_in_scale"),
    (dict(orthogonal_rotation=True), "orthogonal_rotation"),
    (dict(force_quantization_f32=False), "force_quantization_f32"),
])
def test_lfq_rejects_unsupported_options(kwargs, option):
    with pytest.raises(ValueError, match=rf"vqkernels\.nn\.LFQ: {option}=.* is not supported"):
        LFQ(dim=8, **kwargs)


def test_lfq_frac_per_sample_entropy_matches_vqp_in_distribution():
    """frac_per_sample_entropy < 1 (stochastic): both entropies read a random share of the tokens each step. Over
    many steps the breakdown's mean and spread match theirs (their clamp puts their per-sample entropy a little
    lower, by at most aux_loss_tolerance's clamp term), the quantized output and indices do not change, and the
    subset's batch entropy is lower on average than the whole batch's (fewer tokens spread over the codes)."""
    kwargs = dict(dim=6, frac_per_sample_entropy=0.25)
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    full = LFQ(dim=6).train()
    x = torch.randn(2, 48, 6, generator=gen(8))
    draws = {}
    for name, layer in (("theirs", theirs.train()), ("ours", ours.train())):
        torch.manual_seed(9)
        out = [layer(x, inv_temperature=1.0, return_loss_breakdown=True) for _ in range(300)]
        assert all(torch.equal(o[0].indices, out[0][0].indices) for o in out)
        draws[name] = torch.tensor([[float(o[1].per_sample_entropy.detach()), float(o[1].batch_entropy.detach())]
                                    for o in out])
    _, clamp = aux_loss_tolerance(ours, 6)
    sem = (draws["theirs"].std(0) + draws["ours"].std(0)) / math.sqrt(300)
    gap = draws["ours"].mean(0) - draws["theirs"].mean(0)
    assert (draws["ours"].std(0) > 0).all()
    assert -4 * sem[0] <= gap[0] <= clamp + 4 * sem[0] and abs(gap[1]) <= 4 * sem[1], (gap, sem)
    whole = float(full(x, inv_temperature=1.0, return_loss_breakdown=True)[1].batch_entropy)
    assert draws["ours"][:, 1].mean() < whole


def test_lfq_accepts_identity_activation():
    assert LFQ(dim=4, straight_through_activation=torch.nn.Identity()).train()(torch.randn(1, 3, 4)).indices.shape == (
        1, 3)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(), ValueError, r"either dim or codebook_size"),
    (dict(codebook_size=100), ValueError, r"codebook_size must be a power of 2"),
    (dict(dim=31), ValueError, r"codebook_size must be at most 2\*\*30"),
    (dict(dim=4, soft_clamp_input_value=0.5), ValueError, r"soft_clamp_input_value"),
    (dict(dim=4, frac_per_sample_entropy=0.0), ValueError, r"frac_per_sample_entropy must be in \(0, 1\]"),
    (dict(dim=8, codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), ValueError,
     r"keep_num_codebooks_dim"),
    (dict(dim=4, not_an_option=1), TypeError, r"not_an_option"),
])
def test_lfq_rejects_bad_configurations(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LFQ(**kwargs)


def test_lfq_keyword_only_and_forward_checks():
    with pytest.raises(TypeError):
        LFQ(8)  # keyword-only, as there
    lfq = LFQ(dim=4)
    with pytest.raises(ValueError, match=r"expected the feature dimension 4"):
        lfq(torch.randn(1, 3, 5))
    for mask, got in ((torch.ones(1, 3), r"torch\.float32 of shape \(1, 3\)"),
                      (torch.ones(1, 4, dtype=torch.bool), r"torch\.bool of shape \(1, 4\)"),
                      (torch.ones(3, dtype=torch.bool), r"torch\.bool of shape \(3,\)")):
        for mode in (lfq.train(), lfq.eval()):
            with pytest.raises(ValueError, match=r"mask must be a bool tensor of the tokens' shape \(1, 3\) .*got "
                                                 + got):
                mode(torch.randn(1, 3, 4), mask=mask)
    image = LFQ(dim=4).train()
    with pytest.raises(ValueError, match=r"tokens' shape \(2, 6\)"):  # [b, h * w], as there
        image(torch.randn(2, 4, 2, 3), mask=torch.ones(2, 2, 3, dtype=torch.bool))
    assert image(torch.randn(2, 4, 2, 3), mask=torch.ones(2, 6, dtype=torch.bool)).indices.shape == (2, 2, 3)


# ---------------------------------------------------------------------------------------
# LFQ with a mask: the masked-out tokens count nowhere in the aux loss

LFQ_MASK_CASES = {name: LFQ_CASES[name] for name in (
    "default", "projections-2-codebooks-commit", "image", "soft-clamp-no-bias", "softplus-gamma",
    "forced-projections-keep-dim", "spherical-scaled-2-codebooks-commit")}


def masked_batch(shape, dim, seed):
    """(x of ``shape``, mask [b, tokens], tokens_of): about 70% of the tokens kept (each sample's first
    one always); the others hold large values of another distribution, which would show if they counted.
    ``tokens_of(x)`` is x as [b, tokens, dim] (image inputs are channel-first)."""
    image = len(shape) == 4
    b, n = shape[0], math.prod(shape[2:]) if image else shape[1]
    mask = torch.rand(b, n, generator=gen(seed)) < 0.7
    mask[:, 0] = True
    tokens = torch.randn(b, n, dim, generator=gen(seed + 1))
    tokens = torch.where(mask.unsqueeze(-1), tokens, 4 * torch.randn(b, n, dim, generator=gen(seed + 2)) + 3)
    x = tokens.transpose(1, 2).reshape(shape) if image else tokens

    def tokens_of(t):
        return t.flatten(2).transpose(1, 2) if image else t
    return x, mask, tokens_of


@pytest.mark.parametrize("tau", [100.0, 1.0])
@pytest.mark.parametrize("case", LFQ_MASK_CASES)
def test_lfq_mask_matches_vqp(case, tau):
    """Training with a mask: indices, quantized output, per-sample entropy and commitment loss as
    vector-quantize-pytorch's masked call (within test_lfq_training_matches_vqp's tolerances). Its masked batch
    entropy equals its per-sample entropy (it folds the codebook axis into the tokens); ours is the batch
    entropy it computes without a mask on the kept tokens alone, as are our aux loss and its gradient (input
    and parameters, with the quantized output's gradient from the masked call)."""
    kwargs, shape = LFQ_MASK_CASES[case]
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    theirs.train(), ours.train()
    x, mask, tokens_of = masked_batch(shape, kwargs["dim"], seed=12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, la = theirs(xa, inv_temperature=tau, return_loss_breakdown=True, mask=mask)
    b, lb = ours(xb, inv_temperature=tau, return_loss_breakdown=True, mask=mask)
    kept, lk = theirs(tokens_of(xa)[mask].unsqueeze(0), inv_temperature=tau, return_loss_breakdown=True)
    assert_same(a.indices, b.indices, "indices")
    torch.testing.assert_close(b.quantized, a.quantized, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(la.batch_entropy, la.per_sample_entropy)  # theirs' fold
    tol, clamp = aux_loss_tolerance(ours, ours.codebook_dim)
    for want in (la, lk):
        assert -1e-5 <= float((lb.per_sample_entropy - want.per_sample_entropy).detach()) <= clamp + 1e-5
        assert abs(float((lb.commitment - want.commitment).detach())) <= 1e-6
    assert abs(float((lb.batch_entropy - lk.batch_entropy).detach())) <= 1e-5
    assert abs(float((b.entropy_aux_loss - kept.entropy_aux_loss).detach())) <= tol
    g = torch.randn(a.quantized.shape, generator=gen(15))
    ((a.quantized * g).sum() + kept.entropy_aux_loss).backward()
    ((b.quantized * g).sum() + b.entropy_aux_loss).backward()
    pairs = [("x", xa.grad, xb.grad)] + [(n, p.grad, q.grad) for (n, p), q in
                                         zip(theirs.named_parameters(), ours.parameters())]
    for name, ga, gb in pairs:
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-3 * float(ga.abs().max()), msg=lambda m: f"{name}: {m}")


def aux_run(layer, x, mask, **kwargs):
    """(aux loss, its breakdown, x's gradient of the aux loss, the parameters' gradients where it reaches them) of
    one training call."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    ret, breakdown = layer(x, return_loss_breakdown=True, mask=mask, **kwargs)
    ret.entropy_aux_loss.backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return ret.entropy_aux_loss.detach(), LossBreakdown(*(t.detach() for t in breakdown)), x.grad, grads


def test_lfq_all_true_mask_is_no_mask():
    kwargs = dict(dim=20, codebook_size=2 ** 6, num_codebooks=2, commitment_loss_weight=0.25)
    layer = LFQ(**kwargs).train()
    x = torch.randn(3, 11, 20, generator=gen(16))
    with_mask = aux_run(layer, x, torch.ones(3, 11, dtype=torch.bool), inv_temperature=2.0)
    without = aux_run(layer, x, None, inv_temperature=2.0)
    for a, b in zip([*with_mask[:3], *with_mask[3]], [*without[:3], *without[3]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lfq_masked_tokens_count_nowhere():
    """What the masked-out tokens hold (zeros, or NaN and infinities) changes nothing in the aux loss, its
    breakdown or its gradient, bit for bit; their gradient from it is 0 (no projections here: a Linear layer
    would pass a NaN input row into its weight's gradient)."""
    layer = LFQ(dim=8, codebook_size=2 ** 4, num_codebooks=2, commitment_loss_weight=0.5).train()
    x = torch.randn(2, 13, 8, generator=gen(17))
    mask = torch.rand(2, 13, generator=gen(18)) < 0.6
    zeros, poisoned = x.masked_fill(~mask.unsqueeze(-1), 0.0), x.clone()
    poisoned[~mask] = float("nan")
    poisoned[0, ~mask[0]] = float("inf")
    ref, got = aux_run(layer, zeros, mask, inv_temperature=3.0), aux_run(layer, poisoned, mask, inv_temperature=3.0)
    assert_same(got[0], ref[0], "aux loss")
    for name in LossBreakdown._fields:
        assert_same(getattr(got[1], name), getattr(ref[1], name), name)
    assert_same(got[2], ref[2], "x's gradient")
    assert bool((got[2][~mask] == 0).all()) and bool(got[2].isfinite().all())
    assert float(ref[1].commitment) > 0 and float(ref[1].per_sample_entropy) > 0


def test_lfq_mask_keeping_nothing_gives_zero_losses():
    """A mask with no token kept: zero losses and gradients (vector-quantize-pytorch: NaN, means of nothing)."""
    kwargs = dict(dim=6, commitment_loss_weight=0.5)
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    x = torch.randn(2, 5, 6, generator=gen(19))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    loss, breakdown, grad, _ = aux_run(ours.train(), x, mask)
    assert float(loss) == 0 and all(float(getattr(breakdown, name)) == 0 for name in LossBreakdown._fields)
    assert bool((grad == 0).all())
    assert torch.isnan(theirs.train()(x, mask=mask).entropy_aux_loss)


def test_lfq_entropy_weights_draw_the_subset_of_the_kept_tokens():
    """frac_per_sample_entropy < 1: every draw keeps exactly floor(frac * kept) tokens, all of them kept by the
    mask (floor(frac * tokens) of all without one), each kept token equally likely (binomial frequencies over
    2000 draws within 5 standard deviations)."""
    layer = LFQ(dim=4, frac_per_sample_entropy=0.3)
    keep = torch.rand(50, generator=gen(20)) < 0.6
    m = int(keep.sum())
    torch.manual_seed(21)
    draws = torch.stack([layer._entropy_weights(keep, 50, keep.device) for _ in range(2000)])
    assert draws.dtype == torch.float32 and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert bool((draws.sum(1) == math.floor(0.3 * m)).all()) and not bool(draws[:, ~keep].any())
    p = math.floor(0.3 * m) / m
    freq = draws[:, keep].mean(0)
    assert float((freq - p).abs().max()) <= 5 * math.sqrt(p * (1 - p) / 2000)
    assert bool((layer._entropy_weights(None, 50, keep.device).sum() == 15))
    assert LFQ(dim=4)._entropy_weights(None, 50, keep.device) is None
    assert torch.equal(LFQ(dim=4)._entropy_weights(keep, 50, keep.device), keep.float())


def test_lfq_frac_per_sample_entropy_with_mask_matches_vqp_in_distribution():
    """frac_per_sample_entropy < 1 with a mask (stochastic): over many steps our breakdown's mean matches
    vector-quantize-pytorch's on the kept tokens alone without a mask (its masked call draws (token, codebook)
    pairs and folds the batch entropy into the per-sample one); the masked-out tokens, NaN here, are never
    drawn (every loss finite)."""
    kwargs = dict(dim=6, frac_per_sample_entropy=0.25)
    theirs, ours = pair(vqp.LFQ, LFQ, kwargs)
    x, mask, _ = masked_batch((2, 60, 6), 6, seed=22)
    x[~mask] = float("nan")
    draws = {}
    for name, layer, call in (("theirs", theirs.train(), {}), ("ours", ours.train(), {"mask": mask})):
        xx = x if call else x[mask].unsqueeze(0)
        torch.manual_seed(23)
        out = [layer(xx, inv_temperature=1.0, return_loss_breakdown=True, **call) for _ in range(300)]
        draws[name] = torch.tensor([[float(o[1].per_sample_entropy.detach()), float(o[1].batch_entropy.detach())]
                                    for o in out])
    assert bool(draws["ours"].isfinite().all()) and (draws["ours"].std(0) > 0).all()
    _, clamp = aux_loss_tolerance(ours, 6)
    sem = (draws["theirs"].std(0) + draws["ours"].std(0)) / math.sqrt(300)
    gap = draws["ours"].mean(0) - draws["theirs"].mean(0)
    assert -4 * sem[0] <= gap[0] <= clamp + 4 * sem[0] and abs(gap[1]) <= 4 * sem[1], (gap, sem)


def test_lfq_masked_training_step_on_meta_tensors():
    """Forward and backward with a mask (and a random subset) on meta tensors, which hold no data: nothing is
    read back (vector-quantize-pytorch's x[mask] cannot run there)."""
    kwargs = dict(dim=12, codebook_size=2 ** 5, num_codebooks=2, commitment_loss_weight=0.25,
                  frac_per_sample_entropy=0.5)
    x = torch.randn(2, 9, 12, device="meta", requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool, device="meta")
    ret = LFQ(**kwargs).train().to("meta")(x, mask=mask)
    (ret.quantized.sum() + ret.entropy_aux_loss).backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    with pytest.raises(NotImplementedError):
        vqp.LFQ(**kwargs).train().to("meta")(x, mask=mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_lfq_masked_training_step_never_syncs_on_cuda(frac):
    layer = LFQ(dim=12, codebook_size=2 ** 5, num_codebooks=2, commitment_loss_weight=0.25,
                frac_per_sample_entropy=frac).train().cuda()
    x = torch.randn(2, 9, 12, device="cuda", requires_grad=True)
    mask = torch.rand(2, 9, device="cuda") < 0.7
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ret = layer(x, mask=mask)
        (ret.quantized.sum() + ret.entropy_aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------
# torch.compile: training forward + backward, fullgraph


def training_step(fsq, lfq, z, x, mask=None):
    """Both modules in one function (one compilation): a loss through each output."""
    out, fsq_indices = fsq(z)
    ret = lfq(x, mask=mask)
    loss = (out * out).sum() + (ret.quantized * ret.quantized).sum() + ret.entropy_aux_loss
    return loss, out, fsq_indices, ret.quantized, ret.indices


@pytest.mark.parametrize("masked, frac", [(False, 1.0), (True, 1.0), (True, 0.5)], ids=["plain", "mask", "mask-frac"])
def test_compiled_training_step_matches_eager(masked, frac):
    """Inductor, fullgraph=True: forward and backward of FSQ (projections, 2 codebooks, image input)
    and LFQ (projections, 2 codebooks, commitment loss) in training mode give eager's results; also with
    LFQ's mask, and with a random subset of the kept tokens (inductor's fallback random: both runs draw the
    same). fullgraph fails on any graph break, e.g. a value read back with .item(); shapes that depend on the
    data (x[mask]) compile here, so test_lfq_masked_training_step_on_meta_tensors checks those."""
    torch._dynamo.reset()
    torch.manual_seed(11)
    fsq = FSQ(levels=[8, 5, 5, 5], dim=12, num_codebooks=2).train()
    lfq = LFQ(dim=12, codebook_size=2 ** 5, num_codebooks=2, commitment_loss_weight=0.25,
              frac_per_sample_entropy=frac).train()
    compiled = torch.compile(training_step, fullgraph=True)
    z = torch.randn(2, 12, 3, 3, generator=gen(10))
    x = torch.randn(2, 7, 12, generator=gen(11))
    mask = torch.rand(2, 7, generator=gen(12)) < 0.6 if masked else None
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (training_step, compiled):
            fsq.zero_grad(), lfq.zero_grad()
            zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
            torch.manual_seed(13)
            outputs = fn(fsq, lfq, zz, xx, mask)
            outputs[0].backward()
            results.append([*outputs, zz.grad, xx.grad] +
                           [p.grad.clone() for p in [*fsq.parameters(), *lfq.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# LFQ memory: d = 16, 4096 tokens

MEMORY_SCRIPT = r"""
from vqkernels.nn.lfq import LFQ
import vector_quantize_pytorch as vqp


def step_of(module):
    module.train()

    def step(x):
        x = x.clone().requires_grad_()
        ret = module(x)
        (ret.quantized.sum() + ret.entropy_aux_loss).backward()
        assert x.grad.shape == x.shape
    return step


g = torch.Generator().manual_seed(0)
x16, x10 = torch.randn(1, 4096, 16, generator=g), torch.randn(1, 4096, 10, generator=g)
print(measure(step_of(LFQ(dim=16)), (x16[:, :64],), (x16,)),
      measure(step_of(vqp.LFQ(dim=10)), (x10[:, :64],), (x10,)))
"""


def test_lfq_peak_memory_d16():
    """One training step (forward + backward) of LFQ(dim=16) on 4096 tokens: vector-quantize-pytorch
    holds several 4096 x 2**16 float32 matrices (1 GiB each); ours must stay within 64 MiB beyond the
    inputs. Measured as in test_lfq.test_peak_memory_d16 (peak resident size of a fresh process,
    reset through /proc/self/clear_refs, every block of 128 KiB or more its own mapping); the same
    measurement of vector-quantize-pytorch's LFQ(dim=10) must see at least one 4096 x 2**10 matrix."""
    ours_kib, theirs_kib = peak_memory_kib(MEMORY_SCRIPT)
    assert theirs_kib >= 4096 * 2 ** 10 * 4 // 1024, f"the measurement missed their 16 MiB matrix ({theirs_kib} KiB)"
    assert ours_kib <= 64 * 1024, f"LFQ(dim=16) used {ours_kib / 1024:.1f} MiB for one step"
