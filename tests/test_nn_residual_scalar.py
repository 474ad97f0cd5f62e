"""vqkernels.nn.ResidualFSQ, ResidualLFQ and their grouped forms as drop-ins for vector-quantize-pytorch 1.32.0's: the same
outputs, indices, codes, gradients and state_dict; quantize dropout; torch.compile."""

import pytest
import torch
import vector_quantize_pytorch as vqp

from nn_helpers import run_residual_pair
from vq_helpers import gen, vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import GroupedResidualFSQ, GroupedResidualLFQ, ResidualFSQ, ResidualLFQ

CASES = {
    "default": (dict(levels=[8, 5, 5, 5], num_quantizers=3), (2, 9, 4)),
    "projections": (dict(levels=[7, 5, 4], num_quantizers=2, dim=12), (3, 6, 12)),
    "channel-first-image": (dict(levels=[6, 5], num_quantizers=4, dim=5, is_channel_first=True), (2, 5, 3, 4)),
    "tanh-bound": (dict(levels=[8, 6, 5], num_quantizers=3, bound_hard_clamp=False), (2, 7, 3)),
    "tanh-soft-clamp": (dict(levels=[5, 5], num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=1.5),
                        (2, 7, 2)),
}


def _pair(cls_theirs, cls_ours, kw):
    torch.manual_seed(0)
    theirs = cls_theirs(**kw)
    ours = cls_ours(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", CASES)
def test_matches_vector_quantize_pytorch(case, mode):
    """Indices equal; outputs, every level's codes and input / parameter gradients equal to float32 rounding."""
    kw, shape = CASES[case]
    theirs, ours = _pair(vqp.ResidualFSQ, ResidualFSQ, kw)
    getattr(theirs, mode)(), getattr(ours, mode)()
    x = torch.randn(shape, generator=gen(1)) * 1.5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_t, i_t, codes_t = theirs(xa, return_all_codes=True)
    q_o, i_o, codes_o = ours(xb, return_all_codes=True)
    assert i_o.dtype == i_t.dtype and torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    if kw.get("is_channel_first"):  # theirs reads [b, q, h, w] indices as if q were last: ours are [q, b, h, w, d]
        assert codes_o.shape == (kw["num_quantizers"], shape[0], *shape[2:], len(kw["levels"]))
        torch.testing.assert_close(ours.project_out(codes_o.sum(0)).movedim(-1, 1), q_o.detach(), rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(codes_o, codes_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)
    g = torch.randn(q_t.shape, generator=gen(2))
    (q_t * g).sum().backward()
    (q_o * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if not kw.get("is_channel_first"):
        torch.testing.assert_close(ours.get_output_from_indices(i_o), q_o.detach(), rtol=1e-6, atol=1e-6)


def test_quantize_dropout_with_a_fixed_seed_matches_theirs():
    """The same seed drops the same levels (-1 indices, zero codes) as theirs; without a seed the kept prefix
    varies between steps and never ends before the cutoff."""
    kw = dict(levels=[8, 5, 5], num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    theirs, ours = _pair(vqp.ResidualFSQ, ResidualFSQ, kw)
    theirs.train(), ours.train()
    x = torch.randn(2, 6, 3, generator=gen(3))
    for seed in range(6):
        q_t, i_t = theirs(x, rand_quantize_dropout_fixed_seed=seed)
        q_o, i_o = ours(x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(i_o, i_t), seed
        torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    kept = {int((ours(x)[1][0, 0] >= 0).sum()) for _ in range(40)}
    assert kept == {2, 3, 4}


def test_grouped_matches_vector_quantize_pytorch():
    kw = dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=2)
    theirs, ours = _pair(vqp.GroupedResidualFSQ, GroupedResidualFSQ, kw)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 7, 8, generator=gen(4))
    q_t, i_t = theirs(x)
    q_o, i_o = ours(x)
    assert torch.equal(i_o, i_t) and i_o.shape == (2, 2, 7, 2)
    torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_t, rtol=1e-6, atol=1e-6)
    image = GroupedResidualFSQ(dim=8, groups=2, levels=[5, 5, 5, 5], num_quantizers=2, accept_image_fmap=True).eval()
    q, idx = image(torch.randn(2, 8, 3, 4, generator=gen(5)))
    assert q.shape == (2, 8, 3, 4) and idx.shape == (2, 2, 2, 3, 4)


def test_compiled_training_matches_eager():
    from nn_helpers import assert_compiled_training_matches_eager
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(2, 12, 16, generator=g) for _ in range(3)]
    assert_compiled_training_matches_eager(lambda: ResidualFSQ(levels=[8, 5, 5], num_quantizers=3, dim=16), batches)


@pytest.mark.parametrize("kw, pattern", [
    (dict(levels=[8, 1], num_quantizers=2), "at least 2"),
    (dict(levels=[8, 5], num_quantizers=0), "num_quantizers must be >= 1"),
    (dict(levels=[8, 5], num_quantizers=2, quantize_dropout_cutoff_index=2), "cutoff_index"),
    (dict(levels=[8, 5], num_quantizers=2, soft_clamp_input_value=2.0), "bound_hard_clamp sets"),
])
def test_bad_configurations(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        ResidualFSQ(**kw)


# ---------------------------------------------------------------------------------------
# ResidualLFQ

LFQ_CASES = {
    "default": (dict(dim=6, num_quantizers=3, codebook_size=2 ** 6), (2, 17, 6)),
    "projections-commit": (dict(dim=10, num_quantizers=2, codebook_size=2 ** 5, commitment_loss_weight=0.25), (2, 9, 10)),
    "soft-clamp": (dict(dim=5, num_quantizers=3, codebook_size=2 ** 5, soft_clamp_input_value=2.0), (3, 7, 5)),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", LFQ_CASES)
def test_residual_lfq_matches_vector_quantize_pytorch(case, mode):
    """Indices equal, outputs and codes to float32 rounding, the per-level aux losses within LFQ's bound (our
    per-sample entropy is the exact one, theirs clamps code probabilities at 1e-5: at most 2**d * 1e-5 / e
    higher, times entropy_loss_weight), gradients of the output within float32 rounding."""
    kw, shape = LFQ_CASES[case]
    theirs, ours = _pair(vqp.ResidualLFQ, ResidualLFQ, kw)
    getattr(theirs, mode)(), getattr(ours, mode)()
    x = torch.randn(shape, generator=gen(7))
    xa, xb, (q_t, i_t, l_t, codes_t), (q_o, i_o, l_o, codes_o) = run_residual_pair(theirs, ours, x)
    torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codes_o, codes_t)
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)
    assert l_o.shape == l_t.shape == (kw["num_quantizers"],)
    bound = 0.1 * (2 ** 6 * 1e-5 / 2.718 + 3e-5) + 1e-6
    assert ((l_o - l_t).abs() <= bound).all(), (l_o, l_t)
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_o.detach(), rtol=1e-6, atol=1e-6)
    assert q_o.requires_grad == q_t.requires_grad  # in eval, LFQ's codes carry no gradient (as there)
    if mode == "train":
        g = torch.randn(q_t.shape, generator=gen(8))
        (q_t * g).sum().backward()
        (q_o * g).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)


def test_residual_lfq_dropout_grouped_and_bad_inputs():
    kw = dict(dim=6, num_quantizers=3, codebook_size=2 ** 6, quantize_dropout=True)
    theirs, ours = _pair(vqp.ResidualLFQ, ResidualLFQ, kw)
    theirs.train(), ours.train()
    x = torch.randn(2, 5, 6, generator=gen(9))
    for seed in range(5):
        assert torch.equal(ours(x, rand_quantize_dropout_fixed_seed=seed)[1],
                           theirs(x, rand_quantize_dropout_fixed_seed=seed)[1])
    gkw = dict(dim=8, groups=2, num_quantizers=2, codebook_size=2 ** 4)
    g_theirs, g_ours = _pair(vqp.GroupedResidualLFQ, GroupedResidualLFQ, gkw)
    g_theirs.eval(), g_ours.eval()
    xg = torch.randn(2, 5, 8, generator=gen(10))
    (q_t, i_t, _), (q_o, i_o, _) = g_theirs(xg), g_ours(xg)
    assert torch.equal(i_o, i_t) and i_o.shape == (2, 2, 5, 2)
    torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mask must be a bool"):
        ours(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="power of 2"):
        ResidualLFQ(dim=6, num_quantizers=2, codebook_size=48)


@pytest.mark.parametrize("make", [lambda: ResidualFSQ(levels=[8, 5, 5], num_quantizers=2, dim=16),
                                  lambda: ResidualLFQ(dim=16, num_quantizers=2, codebook_size=2 ** 6)],
                         ids=["fsq", "lfq"])
def test_odd_inputs(make):
    """No tokens gives empty results (LFQ once failed to reshape them), and another feature count is a clear
    error naming the layer, not a matmul shape error."""
    layer = make().train()
    out = layer(torch.randn(2, 0, 16))
    assert out[0].shape == (2, 0, 16) and out[1].shape == (2, 0, 2)
    with pytest.raises(ValueError, match=r"(ResidualFSQ|ResidualLFQ): expected 16 features, got shape \(2, 7, 15\)"):
        layer(torch.randn(2, 7, 15))


@pytest.mark.parametrize("kw", [dict(diversity_gamma=1.0, entropy_loss_weight=0.1),
                                dict(frac_per_sample_entropy=1.0, commitment_loss_weight=0.5)], ids=str)
def test_residual_lfq_mask_is_training_on_the_kept_tokens(kw):
    """ResidualLFQ's mask reaches every level's LFQ: in training, the masked batch gives theirs' results on its kept
    tokens alone (outputs, indices, every level's aux loss, input gradients); theirs' own masked batch entropy reads
    the folded codebook axis as the sequence, so the comparison is with theirs on the kept tokens."""
    kw = dict(dim=6, num_quantizers=3, codebook_size=2 ** 6, **kw)
    theirs, ours = _pair(vqp.ResidualLFQ, ResidualLFQ, kw)
    theirs.train(), ours.train()
    mask = torch.arange(7) < torch.tensor([7, 3])[:, None]
    x = torch.randn(2, 7, 6, generator=gen(11))
    x_o, x_t = x.clone().requires_grad_(), x.detach()[mask].unsqueeze(0).requires_grad_()
    q_o, i_o, l_o = ours(x_o, mask=mask)
    q_t, i_t, l_t = theirs(x_t)
    assert torch.equal(i_o[mask], i_t[0])
    torch.testing.assert_close(q_o[mask], q_t[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
    (q_o.square().sum() + l_o.sum()).backward()
    (q_t.square().sum() + l_t.sum()).backward()
    torch.testing.assert_close(x_o.grad[mask], x_t.grad[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(bound_hard_clamp=False), dict(quantize_dropout=True)], ids=str)
def test_fused_levels_are_the_level_loop_bitwise(kw):
    """ResidualFSQ's fused op (residual_fsq_quantize) gives the level-by-level loop's outputs, indices and input
    gradients bit for bit (quantize dropout with the same seed too); a level keyword that changes a level
    (noise_dropout) runs the loop."""
    fused = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=16, **kw).train()
    assert fused.fused and not ResidualFSQ(levels=[8, 5], num_quantizers=2, noise_dropout=0.5).fused
    x = torch.randn(3, 11, 16, generator=gen(12)) * 2
    results = []
    for on in (True, False):
        fused.fused = on
        xr = x.clone().requires_grad_()
        q, idx = fused(xr, rand_quantize_dropout_fixed_seed=3)
        (q * torch.randn(q.shape, generator=gen(13))).sum().backward()
        results.append((q.detach(), idx, xr.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
