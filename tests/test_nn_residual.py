"""vqkernels.nn.ResidualVQ / GroupedResidualVQ: drop-in for vector-quantize-pytorch, the
RQ-VAE losses and gradients, quantize dropout, beam search, EMA per level."""

import pytest
import torch

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn.residual import GroupedResidualVQ, ResidualVQ

vqp = pytest.importorskip("vector_quantize_pytorch")

CONFIGS = [
    dict(dim=16, num_quantizers=4, codebook_size=32),
    dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True),
    dict(dim=24, num_quantizers=3, codebook_size=16, codebook_dim=8),
]


def _input(kw, b=2, n=13):
    if kw.get("accept_image_fmap"):
        return torch.randn(b, kw["dim"], 4, 3)
    return torch.randn(b, n, kw["dim"])


def _pair(cls_theirs, cls_ours, kw, seed=0):
    torch.manual_seed(seed)
    theirs = cls_theirs(**kw)
    with torch.no_grad():  # vector-quantize-pytorch's init leaves later levels' residual scales unlike real data
        for name, buf in theirs.named_buffers():
            if name.endswith("_codebook.embed"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    ours = cls_ours(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _train_step_both(theirs, ours, x, forward_kw=None, seed=None, q_tol=(1e-5, 1e-5), loss_tol=(1e-5, 1e-6),
                     grad_tol=(1e-4, 1e-5)):
    """One training step of both layers on copies of x (the same seed before each forward, when given): equal
    indices; outputs, losses and input gradients (of sum q^2 + sum losses) close. Returns our indices."""
    forward_kw = forward_kw or {}
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    results = []
    for layer, inp in ((theirs, x_t), (ours, x_o)):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(layer(inp, **forward_kw))
    (q_t, i_t, l_t), (q_o, i_o, l_o) = results
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=q_tol[0], atol=q_tol[1])
    torch.testing.assert_close(l_o, l_t, **({} if loss_tol is None else dict(rtol=loss_tol[0], atol=loss_tol[1])))
    (q_t.square().sum() + l_t.sum()).backward()
    (q_o.square().sum() + l_o.sum()).backward()
    torch.testing.assert_close(x_o.grad, x_t.grad, rtol=grad_tol[0], atol=grad_tol[1])
    return i_o


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_eval_matches_vector_quantize_pytorch(kw):
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    theirs.eval()
    ours.eval()
    x = _input(kw)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert i_o.shape == i_t.shape
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
    assert l_o.shape == l_t.shape and not l_o.any()
    torch.testing.assert_close(ours.get_codes_from_indices(i_o), theirs.get_codes_from_indices(i_t))
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_t, rtol=1e-5, atol=1e-5)


def test_grouped_eval_matches_vector_quantize_pytorch():
    kw = dict(dim=16, groups=2, num_quantizers=3, codebook_size=16)
    theirs, ours = _pair(vqp.GroupedResidualVQ, GroupedResidualVQ, kw)
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 11, 16)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
    assert l_o.shape == l_t.shape
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_training_step_matches_vector_quantize_pytorch(shared):
    """Same state and batch, no rotation trick: same indices, per-level losses, output, EMA codebooks."""
    kw = dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=shared, rotation_trick=False)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    for _ in range(2):
        x = torch.randn(2, 13, 16)
        q_t, i_t, l_t = theirs(x)
        q_o, i_o, l_o = ours(x)
        assert torch.equal(i_o, i_t)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.codebooks, theirs.codebooks, rtol=1e-5, atol=1e-6)


def test_losses_are_the_rq_vae_commitment_and_reach_x():
    """losses[l] = w * mean ||x - sg(q_1 + ... + q_l)||^2 and the gradient of every term reaches x."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, commitment_weight=0.5, rotation_trick=False,
                     ema_update=False, learnable_codebook=True)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    rvq.double()
    xr = x.clone().requires_grad_()
    q, idx, losses = rvq(xr)
    codes = rvq.get_codes_from_indices(idx).detach()  # [L, B, N, D]
    cum = codes.cumsum(0)
    want = torch.stack([((x - cum[level]) ** 2).mean() for level in range(3)]) * 0.5
    torch.testing.assert_close(losses.detach(), want)
    torch.testing.assert_close(q.detach(), cum[-1])
    g = torch.randn_like(q)
    ((q * g).sum() + losses.sum()).backward()
    n = x.numel()
    want_grad = g + sum(0.5 * 2.0 * (x - cum[level]) / n for level in range(3))
    torch.testing.assert_close(xr.grad, want_grad)
    # learnable codebooks get the codebook terms' gradient
    assert all(layer._codebook.embed.grad is not None and layer._codebook.embed.grad.abs().sum() > 0
               for layer in rvq.layers)


def test_quantize_dropout_pads_indices_and_losses():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=6, codebook_size=16, quantize_dropout=True,
                     quantize_dropout_cutoff_index=1, rotation_trick=False)
    rvq.train()
    seen = set()
    for _ in range(20):
        _, idx, losses = rvq(torch.randn(2, 5, 8))
        kept = int((idx[0, 0] >= 0).sum())
        seen.add(kept)
        assert kept >= 2
        assert torch.all(idx[..., kept:] == -1) and torch.all(idx[..., :kept] >= 0)
        assert not losses[kept:].any() and losses[:kept].all()
    assert len(seen) > 1
    # codes of dropped levels count as zero in the output reconstruction
    out = rvq.get_output_from_indices(idx)
    assert torch.isfinite(out).all()


def test_image_fmap_layout_matches_tokens():
    torch.manual_seed(0)
    tok = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    img = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, accept_image_fmap=True)
    img.load_state_dict(tok.state_dict())
    tok.eval()
    img.eval()
    x = torch.randn(2, 8, 4, 3)
    q_i, i_i, _ = img(x)
    q_t, i_t, _ = tok(x.flatten(2).transpose(1, 2))
    assert i_i.shape == (2, 4, 3, 3)
    assert torch.equal(i_i.reshape(2, 12, 3), i_t)
    torch.testing.assert_close(q_i, q_t.transpose(1, 2).reshape(2, 8, 4, 3))
    torch.testing.assert_close(img.get_output_from_indices(i_i), q_i)


def test_beam_search_lowers_the_error():
    torch.manual_seed(0)
    kw = dict(dim=8, num_quantizers=4, codebook_size=16, rotation_trick=False)
    greedy = ResidualVQ(**kw)
    beam = ResidualVQ(beam_size=4, **kw)
    beam.load_state_dict(greedy.state_dict())
    greedy.eval()
    beam.eval()
    x = torch.randn(3, 50, 8)
    q_g, _, _ = greedy(x)
    q_b, _, _ = beam(x)
    err_g = ((x - q_g) ** 2).sum(-1)
    err_b = ((x - q_b) ** 2).sum(-1)
    # not row by row (a beam can prune the greedy path), but on average
    assert err_b.mean() < err_g.mean()
    assert torch.any(err_b < err_g - 1e-6)


def test_kmeans_init_runs_level_by_level():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, kmeans_init=True, kmeans_iters=3,
                     rotation_trick=False)
    rvq.train()
    x = torch.randn(1, 300, 4)
    rvq(x)
    cbs = rvq.codebooks
    assert all(not layer._codebook.needs_init for layer in rvq.layers)
    # each later level's codes fit smaller residuals
    norms = cbs.norm(dim=-1).mean(-1)
    assert norms[1] < norms[0] and norms[2] < norms[0]


@pytest.mark.parametrize("kw,err", [(dict(beam_score_quantizer_weights=[1.0, 2.0, 3.0]), ValueError),
                                    (dict(implicit_neural_codebook=True, accept_image_fmap=True), ValueError),
                                    (dict(use_cosine_sim=True, accept_image_fmap=True), ValueError),
                                    (dict(separate_codebook_per_head=True), ValueError),
                                    (dict(implicit_neural_codebook=True, beam_size=2), ValueError),
                                    (dict(heads=2), ValueError),
                                    (dict(bogus=3), TypeError)])
def test_unsupported_options_raise(kw, err):
    with pytest.raises(err, match="ResidualVQ"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, **kw)


def test_level_keywords_pass_through_as_theirs():
    """Keywords of VectorQuantize reach each level: at their default they are accepted (theirs passes
    them through too), otherwise the level refuses them as it would on its own."""
    kw = dict(dim=32, num_quantizers=2, codebook_size=16, orthogonal_reg_weight=0.0)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 9, 32)
    assert torch.equal(ours(x)[1], theirs(x)[1])
    assert ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, decay=0.9).layers[1]._codebook.decay == 0.9
    assert ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, orthogonal_reg_weight=0.5).by_level
    assert ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, orthogonal_reg_weight=0.5, beam_size=2).level_beam
    with pytest.raises(ValueError, match="orthogonal_reg_weight"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=8, orthogonal_reg_weight=0.5, accept_image_fmap=True)
    with pytest.raises(ValueError, match="GroupedResidualVQ|ResidualVQ"):
        GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=8, heads=2)


def test_codebook_size_per_level_gives_num_quantizers():
    """A per-level codebook_size sequence gives the number of levels (as theirs); a contradicting
    num_quantizers, a shared codebook of several sizes and an int without num_quantizers are refused."""
    ours = ResidualVQ(dim=16, codebook_size=(32, 32, 32))
    assert ours.num_quantizers == 3 and ours.codebooks.shape == (3, 32, 16)
    with pytest.raises(ValueError, match="num_quantizers=2 differs"):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=[8, 8, 8])
    with pytest.raises(ValueError, match=r"shared_codebook needs one codebook size"):
        ResidualVQ(dim=16, codebook_size=(32, 16), shared_codebook=True)
    with pytest.raises(TypeError, match="num_quantizers is required"):
        ResidualVQ(dim=16, codebook_size=8)


@pytest.mark.parametrize("beam", [None, 3])
def test_levels_of_different_sizes_match_vector_quantize_pytorch(beam):
    """Codebooks of 32, 8 and 16 codes (padded with never-chosen NaN rows in the fused op): the same indices,
    output, codes from indices and state_dict as theirs in eval mode (with beam search too), and the same
    losses, gradients and EMA codebooks over training steps."""
    kw = dict(dim=16, codebook_size=(32, 8, 16), beam_size=beam)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    assert [c.shape[0] for c in ours.codebooks] == [32, 8, 16]
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 13, 16)
    q_t, i_t, _ = theirs(x)
    q_o, i_o, _ = ours(x)
    assert int(i_o[..., 1].max()) < 8 and int(i_o[..., 2].max()) < 16 and (i_o >= 0).all()
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_o, rtol=1e-5, atol=1e-5)
    if beam is not None:  # theirs keeps other beams than ours: here ours reconstructs at least as well
        assert ((x - q_o) ** 2).sum() <= ((x - q_t) ** 2).sum() + 1e-4
        return
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
    theirs.train()
    ours.train()
    for step in range(3):
        x_t = torch.randn(3, 11, 16, requires_grad=True)
        x_o = x_t.detach().clone().requires_grad_()
        q_t, i_t, l_t = theirs(x_t)
        q_o, i_o, l_o = ours(x_o)
        assert torch.equal(i_o, i_t), step
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        q_o.sum().backward()
        for level in range(3):
            torch.testing.assert_close(ours.layers[level]._codebook.embed, theirs.layers[level]._codebook.embed,
                                       rtol=1e-5, atol=1e-6)
        assert torch.isfinite(l_o).all() and l_o.shape == l_t.shape


def test_state_dict_round_trip_shared():
    a = ResidualVQ(dim=8, num_quantizers=3, codebook_size=8, shared_codebook=True)
    b = ResidualVQ(dim=8, num_quantizers=3, codebook_size=8, shared_codebook=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.codebooks, b.codebooks)
    assert b.layers[2]._codebook is b.layers[0]._codebook


@pytest.mark.parametrize("kw", [dict(threshold_ema_dead_code=1.0, kmeans_init=True),
                                dict(shared_codebook=True),
                                dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=1.0),
                                dict(beam_size=2)], ids=str)
def test_compiled_training_matches_eager(kw):
    from nn_helpers import assert_compiled_training_matches_eager
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 24, 8, generator=g) for _ in range(3)]
    assert_compiled_training_matches_eager(
        lambda: ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, rotation_trick=False, **kw), batches)


def test_levels_of_different_sizes_learn_by_gradient():
    """A learned codebook per level of different sizes: the NaN padding never reaches a loss or a gradient."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, codebook_size=(16, 4, 8), learnable_codebook=True, ema_update=False,
                     rotation_trick=False).train()
    x = torch.randn(2, 10, 8, requires_grad=True)
    q, _, losses = rvq(x)
    (q.sum() + losses.sum()).backward()
    assert torch.isfinite(losses).all() and torch.isfinite(x.grad).all()
    for layer in rvq.layers:
        grad = layer._codebook.embed.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_video_fmap_is_the_token_layout():
    """accept_3d_fmap reaches ResidualVQ's own layout (not only its levels): [B, C, T, H, W] gives the same codes as
    the flattened tokens, indices [B, T, H, W, levels], and get_output_from_indices gives the output back;
    GroupedResidualVQ splits the channels."""
    torch.manual_seed(0)
    video = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, accept_3d_fmap=True).eval()
    tokens = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16).eval()
    tokens.load_state_dict(video.state_dict())
    x = torch.randn(2, 8, 3, 4, 5)
    q, idx, _ = video(x)
    q_tok, idx_tok, _ = tokens(x.flatten(2).transpose(1, 2))
    assert q.shape == x.shape and idx.shape == (2, 3, 4, 5, 2)
    assert torch.equal(idx.reshape(2, -1, 2), idx_tok)
    torch.testing.assert_close(q, q_tok.transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(video.get_output_from_indices(idx), q)
    grouped = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16, accept_3d_fmap=True).eval()
    assert grouped(x)[0].shape == x.shape


@pytest.mark.parametrize("kw", [dict(dim=16, num_quantizers=3, codebook_size=32, use_cosine_sim=True),
                                dict(dim=16, num_quantizers=3, codebook_size=32, quant_grad_frac=0.5),
                                dict(dim=24, num_quantizers=2, codebook_size=16, codebook_dim=8, use_cosine_sim=True,
                                     rotation_trick=False)], ids=str)
def test_level_by_level_options_match_vector_quantize_pytorch(kw):
    """use_cosine_sim and quant_grad_frac run the levels one by one, as theirs: the same indices, outputs,
    per-level losses, input gradients and EMA codebooks over training steps, and the same eval result (from
    their own initialisation: cosine codebooks hold unit rows)."""
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(**kw)
    ours = ResidualVQ(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for mode in ("eval", "train", "train"):
        getattr(theirs, mode)(), getattr(ours, mode)()
        x = torch.randn(2, 9, kw["dim"])
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_t, i_t, l_t = theirs(xa)
        q_o, i_o, l_o = ours(xb)
        assert torch.equal(i_o, i_t), mode
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
        if mode == "train":
            ((q_t ** 2).sum() + l_t.sum()).backward()
            ((q_o ** 2).sum() + l_o.sum()).backward()
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(theirs.layers, ours.layers):
        torch.testing.assert_close(b._codebook.embed, a._codebook.embed, rtol=1e-5, atol=1e-6)



LENS = torch.tensor([13, 6, 1])
MASK = torch.arange(13) < LENS[:, None]


@pytest.mark.parametrize("kw", [dict(dim=16, num_quantizers=3, codebook_size=32, rotation_trick=False),
                                dict(dim=16, num_quantizers=3, codebook_size=32, threshold_ema_dead_code=0.5),
                                dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True),
                                dict(dim=16, codebook_size=(32, 16), learnable_codebook=True, ema_update=False),
                                dict(dim=16, num_quantizers=2, codebook_size=32, return_zeros_for_masked_padding=False),
                                dict(dim=16, num_quantizers=3, codebook_size=32, quant_grad_frac=0.5,
                                     rotation_trick=False)], ids=str)
def test_mask_matches_vector_quantize_pytorch(kw):
    """forward's mask: indices -1, output 0 (or the input) and no loss or codebook update from padded tokens,
    as theirs: same indices, outputs, per-level losses and codebooks over 3 training steps. The input gradient
    is compared on the level-by-level path only (the fused one differs by design; see the class docstring)."""
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    for step in range(3):
        x = torch.randn(3, 13, 16)
        x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_t, i_t, l_t = theirs(x_t, mask=MASK)
        q_o, i_o, l_o = ours(x_o, mask=MASK)
        assert torch.equal(i_o, i_t) and torch.all(i_o[~MASK] == -1)
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
        for c_o, c_t in zip(ours.codebooks, theirs.codebooks):
            torch.testing.assert_close(c_o, c_t, rtol=1e-5, atol=1e-6)
        if ours.by_level:
            (q_t.square().sum() + l_t.sum()).backward()
            (q_o.square().sum() + l_o.sum()).backward()
            torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(num_quantizers=3, codebook_size=32, threshold_ema_dead_code=1e-3),
                                dict(num_quantizers=3, codebook_size=32, beam_size=3),
                                dict(codebook_size=(32, 8), learnable_codebook=True, ema_update=False),
                                dict(num_quantizers=2, codebook_size=16, codebook_dim=8, shared_codebook=True)],
                         ids=str)
def test_padded_tokens_change_nothing(kw):
    """A padded batch trains the layer exactly as its valid tokens alone: codebooks, losses, valid outputs
    and input gradients; padded tokens get no gradient."""
    torch.manual_seed(0)
    padded, alone = ResidualVQ(dim=16, **kw).train(), ResidualVQ(dim=16, **kw).train()
    alone.load_state_dict(padded.state_dict())
    for step in range(3):
        x = torch.randn(3, 13, 16).requires_grad_()
        valid = x.detach()[MASK].unsqueeze(0).requires_grad_()
        q_p, i_p, l_p = padded(x, mask=MASK)
        q_a, i_a, l_a = alone(valid)
        assert torch.equal(i_p[MASK], i_a[0]) and torch.all(q_p[~MASK] == 0)
        torch.testing.assert_close(q_p[MASK], q_a[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l_p, l_a, rtol=1e-5, atol=1e-7)
        (q_p.square().sum() + l_p.sum()).backward()
        (q_a.square().sum() + l_a.sum()).backward()
        torch.testing.assert_close(x.grad[MASK], valid.grad[0], rtol=1e-5, atol=1e-6)
        assert torch.all(x.grad[~MASK] == 0)
        for c_p, c_a in zip(padded.codebooks, alone.codebooks):
            torch.testing.assert_close(c_p, c_a, rtol=1e-5, atol=1e-6)


def test_return_all_codes_matches_vector_quantize_pytorch():
    kw = dict(dim=16, num_quantizers=3, codebook_size=32, quantize_dropout=True)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 13, 16)
    got_t, got_o = theirs(x, return_all_codes=True), ours(x, return_all_codes=True)
    assert len(got_o) == len(got_t) == 4
    torch.testing.assert_close(got_o[3], got_t[3])


def test_mask_errors():
    rvq = ResidualVQ(dim=16, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="bool"):
        rvq(torch.randn(3, 13, 16), mask=MASK.long())
    with pytest.raises(ValueError, match="feature maps"):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=8, accept_image_fmap=True)(
            torch.randn(3, 16, 2, 2), mask=MASK)


@pytest.mark.parametrize("kw,forward_kw", [(dict(num_quantizers=3, codebook_size=32), {}),
                                           (dict(num_quantizers=2, codebook_size=32, codebook_dim=8), dict(mask=MASK))],
                         ids=["tokens", "projected-masked"])
def test_diveq_matches_vector_quantize_pytorch(kw, forward_kw):
    """DiVeQ: learned codes reached through the levels' full gradient and the noisy directional
    reparametrisation of the output (same noise draws): outputs, losses, input and codebook gradients
    agree over 3 SGD steps."""
    kw = dict(dim=16, diveq=True, **kw)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    assert ours.by_level and all(layer.learnable_codebook and not layer.ema_update for layer in ours.layers)
    for step in range(3):
        _train_step_both(theirs, ours, torch.randn(3, 13, 16), forward_kw, seed=step, q_tol=(1e-5, 1e-6),
                         loss_tol=None, grad_tol=(1e-5, 1e-6))
        for layer_t, layer_o in zip(theirs.layers, ours.layers):
            torch.testing.assert_close(layer_o._codebook.embed.grad, layer_t._codebook.embed.grad, rtol=1e-5, atol=1e-6)
            for layer in (layer_t, layer_o):
                with torch.no_grad():
                    layer._codebook.embed -= 0.1 * layer._codebook.embed.grad
                layer._codebook.embed.grad = None


@pytest.mark.parametrize("kw,forward_kw", [
    (dict(num_quantizers=3, codebook_size=32), {}),
    (dict(num_quantizers=3, codebook_size=32, rotation_trick=False, mlp_kwargs=dict(depth=2, dim_hidden=24)),
     dict(mask=MASK)),
    (dict(codebook_size=(32, 16), codebook_dim=8, threshold_ema_dead_code=1e-3), {}),
    (dict(num_quantizers=3, codebook_size=32, shared_codebook=True), {}),
], ids=["tokens", "masked-small-mlp", "per-level-sizes-projected", "shared"])
def test_implicit_neural_codebook_matches_vector_quantize_pytorch(kw, forward_kw, monkeypatch):
    """QINCo: every level after the first transforms its codes with an MLP conditioned on the reconstruction
    so far. Ours searches in row chunks (a small chunk here, so several run) and transforms only the chosen
    codes with gradients; theirs builds every token's codebook. Same indices, outputs, losses, input, codebook
    and MLP gradients over 3 SGD steps; the output from indices equals eval's forward."""
    from vqkernels.nn import implicit_codebook
    monkeypatch.setattr(implicit_codebook, "SEARCH_CHUNK_ELEMENTS", 2000)
    kw = dict(dim=16, implicit_neural_codebook=True, **kw)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    assert ours.by_level and len(ours.mlps) == ours.num_quantizers - 1
    for step in range(3):
        _train_step_both(theirs, ours, torch.randn(3, 13, 16), forward_kw)
        for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters()):
            assert (p_t.grad is None) == (p_o.grad is None), name
            if p_t.grad is not None:
                torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        for layer in (theirs, ours):
            with torch.no_grad():
                for p in layer.parameters():
                    if p.grad is not None:
                        p -= 0.05 * p.grad
            layer.zero_grad(set_to_none=True)
    ours.eval()
    x = torch.randn(2, 5, 16)
    q, idx, _ = ours(x)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q, rtol=1e-5, atol=1e-6)


def test_implicit_neural_codebook_training_compiles():
    from nn_helpers import assert_compiled_training_matches_eager
    g = torch.Generator().manual_seed(5)
    assert_compiled_training_matches_eager(
        lambda: ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True),
        [torch.randn(2, 6, 8, generator=g) for _ in range(2)])


@pytest.mark.parametrize("kw,forward_kw", [
    (dict(stochastic_sample_codes=True, sample_codebook_temp=0.3), {}),
    (dict(stochastic_sample_codes=True), dict(sample_codebook_temp=0.5, mask=MASK)),
    (dict(orthogonal_reg_weight=2.0, rotation_trick=False), {}),
    (dict(affine_param=True), {}),
    (dict(codebook_diversity_loss_weight=0.5, ema_update=False), {}),
    (dict(learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.3)),
     {}),
], ids=["sampled", "sampled-forward-temp-masked", "orthogonal", "affine", "diversity", "in-place-optimizer"])
def test_level_options_run_the_levels_one_by_one_as_theirs(kw, forward_kw):
    """A VectorQuantize option the fused op does not honour moves the layer to the level-by-level path, where
    each level's VectorQuantize applies it: the same draws, indices, outputs, losses, input gradients and
    buffers as theirs over 3 training steps."""
    kw = dict(dim=16, num_quantizers=3, codebook_size=32, **kw)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    assert ours.by_level
    for step in range(3):
        _train_step_both(theirs, ours, torch.randn(3, 13, 16), forward_kw, seed=step, grad_tol=(1e-4, 2e-5))
        for name, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_fixed_dropout_seed_matches_vector_quantize_pytorch():
    kw = dict(dim=16, num_quantizers=4, codebook_size=32, quantize_dropout=True, rotation_trick=False)
    theirs, ours = _pair(vqp.ResidualVQ, ResidualVQ, kw)
    for seed in range(4):
        x = torch.randn(2, 13, 16)
        _, i_t, l_t = theirs(x, rand_quantize_dropout_fixed_seed=seed)
        _, i_o, l_o = ours(x, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(i_o, i_t)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(use_cosine_sim=True), dict(quant_grad_frac=0.5, rotation_trick=False),
                                dict(stochastic_sample_codes=True)], ids=str)
def test_shared_codebook_level_by_level_matches_vector_quantize_pytorch(kw):
    """A shared codebook on the level-by-level path, in theirs' order: every level adds its statistics, the codes
    are recomputed once at the end of the step. Same indices, outputs, losses, gradients and codebook."""
    kw = dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True, **kw)
    torch.manual_seed(0)
    theirs, ours = vqp.ResidualVQ(**kw), ResidualVQ(**kw)
    ours.load_state_dict(theirs.state_dict())
    assert ours.by_level and all(layer._codebook is ours.layers[0]._codebook for layer in ours.layers)
    for step in range(3):
        _train_step_both(theirs, ours, torch.randn(3, 13, 16), seed=step)
        torch.testing.assert_close(ours.codebooks, theirs.codebooks, rtol=1e-5, atol=1e-6)


def test_shared_codebook_level_by_level_restarts_dead_codes_from_unpadded_inputs():
    """Dead codes restart from the levels' inputs, never from padded tokens (here huge)."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=64, shared_codebook=True, quant_grad_frac=0.5,
                     threshold_ema_dead_code=2.0).train()
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    x[~mask] = 1000.0
    rvq(x, mask=mask)
    restarted = rvq.layers[0]._codebook.cluster_size[0] == 2.0
    assert int(restarted.sum()) > 0 and rvq.layers[0].codebook.abs().max() < 100


@pytest.mark.parametrize("kw,forward_kw", [
    (dict(beam_size=3, beam_score_quantizer_weights=[1.0, 0.5, 0.25]), {}),
    (dict(beam_size=2, use_cosine_sim=True), {}),
    (dict(beam_size=2, quant_grad_frac=0.5, rotation_trick=False), dict(mask=MASK)),
    (dict(beam_size=2, shared_codebook=True, use_cosine_sim=True), {}),
], ids=["weighted", "cosine", "frac-masked", "shared-cosine"])
def test_level_by_level_beam_search_matches_vector_quantize_pytorch(kw, forward_kw):
    """Beam search on the level-by-level path (weighted scores, or levels the fused op does not run): each
    level's VectorQuantize top-k, scores minus the weighted per-token losses, as theirs. Eval: the same
    indices, outputs and losses. Training: the same outputs, losses and input gradients for the step, and every
    level learns from the winning beam's inputs and codes (theirs updates only the first level: it takes
    level 0 of its stacked inputs where it means beam 0), checked against update_indices on those inputs."""
    kw = dict(dim=16, num_quantizers=3, codebook_size=32, **kw)
    torch.manual_seed(0)  # their initial codebooks (unit codes for the cosine levels)
    theirs, ours = vqp.ResidualVQ(**kw), ResidualVQ(**kw)
    ours.load_state_dict(theirs.state_dict())
    assert ours.level_beam
    theirs.eval()
    ours.eval()
    for _ in range(2):
        x = torch.randn(3, 13, 16)
        q_t, i_t, l_t = theirs(x, **forward_kw)
        q_o, i_o, l_o = ours(x, **forward_kw)
        assert torch.equal(i_o, i_t)
        torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
    reference = ResidualVQ(**kw)
    reference.load_state_dict(ours.state_dict())
    theirs.train()
    ours.train()
    x = torch.randn(3, 13, 16)
    i_o = _train_step_both(theirs, ours, x, forward_kw)
    if kw.get("shared_codebook"):
        return  # theirs' end-of-step shared update sees only the first level's statistics (the bug above)
    torch.testing.assert_close(ours.layers[0].codebook, theirs.layers[0].codebook, rtol=1e-5, atol=1e-6)
    inputs, residual = [], x
    for level, layer in enumerate(reference.layers):  # the winning beam's inputs, from the codes before the step
        inputs.append(residual)
        residual = residual - layer.get_codes_from_indices(i_o[..., level])
    for level, layer in enumerate(reference.layers):
        layer.train().update_indices(inputs[level], i_o[..., level], mask=forward_kw.get("mask"))
        torch.testing.assert_close(ours.layers[level].codebook, layer.codebook, rtol=1e-5, atol=1e-6)


def test_implicit_neural_codebook_keeps_the_input_dtype():
    """A float16 input to a float32 QINCo layer comes back float16, as the plain levels' outputs do."""
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, implicit_neural_codebook=True).train()
    q, idx, losses = rvq(torch.randn(2, 5, 8).half())
    assert q.dtype == torch.float16 and idx.shape == (2, 5, 2) and torch.isfinite(losses).all()
