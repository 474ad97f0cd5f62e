"""vqkernels.nn.VectorQuantize: drop-in for vector-quantize-pytorch, k-means init, dead-code
restart, frozen codebooks, state_dict, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn.codebook import kmeans
from vqkernels.nn.vq import VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch")

DROP_IN_CONFIGS = [
    dict(dim=32, codebook_size=64),
    dict(dim=32, codebook_size=64, codebook_dim=8),
    dict(dim=32, codebook_size=48, heads=4, separate_codebook_per_head=True, codebook_dim=8),
    dict(dim=32, codebook_size=64, heads=2, codebook_dim=16),
    dict(dim=32, codebook_size=64, use_cosine_sim=True),
    dict(dim=16, codebook_size=64, accept_image_fmap=True),
    dict(dim=16, codebook_size=33, channel_last=False),
]


def _input(kw, b=3, n=17):
    if kw.get("accept_image_fmap"):
        return torch.randn(b, kw["dim"], 5, 4)
    if kw.get("channel_last") is False:
        return torch.randn(b, kw["dim"], n)
    return torch.randn(b, n, kw["dim"])


def _pair(kw, seed=0):
    torch.manual_seed(seed)
    theirs = vqp.VectorQuantize(**kw)
    ours = VectorQuantize(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("kw", DROP_IN_CONFIGS, ids=str)
def test_eval_matches_vector_quantize_pytorch(kw):
    theirs, ours = _pair(kw)
    theirs.eval()
    ours.eval()
    x = _input(kw)
    q_t, i_t, l_t = theirs(x)
    q_o, i_o, l_o = ours(x)
    assert i_o.shape == i_t.shape and q_o.shape == q_t.shape
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
    assert float(l_o) == float(l_t) == 0.0
    torch.testing.assert_close(ours.get_codes_from_indices(i_o), theirs.get_codes_from_indices(i_t))
    if not kw.get("accept_image_fmap") and kw.get("channel_last", True):
        torch.testing.assert_close(ours.get_output_from_indices(i_o), q_t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(dim=32, codebook_size=64, orthogonal_reg_weight=10.0, rotation_trick=False),
                                dict(dim=16, codebook_size=32, orthogonal_reg_weight=2.0, learnable_codebook=True,
                                     ema_update=False, rotation_trick=False),
                                dict(dim=32, codebook_size=48, heads=2, separate_codebook_per_head=True, codebook_dim=8,
                                     orthogonal_reg_weight=1.0, rotation_trick=False),
                                dict(dim=32, codebook_size=64, orthogonal_reg_weight=3.0, rotation_trick=False,
                                     orthogonal_reg_active_codes_only=True)], ids=str)
def test_orthogonal_reg_and_loss_breakdown_match_vector_quantize_pytorch(kw):
    """orthogonal_reg_weight (with active codes only): the same loss, breakdown, input and codebook
    gradients and codebooks as theirs over 3 training steps; eval mode: zero losses."""
    theirs, ours = _pair(kw)
    for step in range(3):
        x_t = torch.randn(3, 17, kw["dim"], requires_grad=True)
        x_o = x_t.detach().clone().requires_grad_()
        q_t, i_t, l_t, b_t = theirs(x_t, return_loss_breakdown=True)
        q_o, i_o, l_o, b_o = ours(x_o, return_loss_breakdown=True)
        assert torch.equal(i_o, i_t), step
        assert b_o._fields == b_t._fields
        for name in ("commitment", "orthogonal_reg"):
            torch.testing.assert_close(getattr(b_o, name), getattr(b_t, name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert float(b_o.orthogonal_reg.detach()) != 0.0
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
        ((q_t * q_t.detach()).sum() + l_t).backward()
        ((q_o * q_o.detach()).sum() + l_o).backward()
        torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-4, atol=1e-6)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours._codebook.embed.detach(), theirs._codebook.embed.detach(), rtol=1e-5, atol=1e-6)
    ours.eval()
    _, _, loss, breakdown = ours(torch.randn(2, 5, kw["dim"]), return_loss_breakdown=True)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in breakdown)


def test_orthogonal_reg_max_codes_is_a_random_subset():
    """orthogonal_reg_max_codes (stochastic): each step's loss is the regulariser of a uniformly drawn subset of
    that many codes (of the active ones with both options): over many draws its mean matches theirs' (randperm
    subsets) and it differs from the whole codebook's; and with max_codes >= the active count it is exact."""
    kw = dict(dim=8, codebook_size=64, orthogonal_reg_weight=1.0, orthogonal_reg_max_codes=8, rotation_trick=False,
              commitment_weight=0.0)
    theirs, ours = _pair(kw)
    x = torch.randn(2, 40, 8)
    draws = {}
    for name, layer in (("theirs", theirs), ("ours", ours)):
        layer.train()
        draws[name] = torch.tensor([float(layer(x, freeze_codebook=True, return_loss_breakdown=True)[3].orthogonal_reg)
                                    for _ in range(400)])
    assert draws["ours"].std() > 0
    assert abs(draws["ours"].mean() - draws["theirs"].mean()) < 3 * (draws["theirs"].std() / 20 + draws["ours"].std() / 20)
    whole = VectorQuantize(**dict(kw, orthogonal_reg_max_codes=None))
    whole.load_state_dict(ours.state_dict())
    assert abs(float(whole.train()(x, freeze_codebook=True, return_loss_breakdown=True)[3].orthogonal_reg)
               - draws["ours"].mean()) > 3 * draws["ours"].std() / 20


@pytest.mark.parametrize("heads", [1, 2])
def test_video_fmap_matches_vector_quantize_pytorch(heads):
    """accept_3d_fmap: [B, C, T, H, W] in and out, indices [B, T, H, W(, heads)], equal to theirs, and the same
    as quantizing the tokens the video flattens to (eval; a training step's losses and codebooks too)."""
    kw = dict(dim=16, codebook_size=32, heads=heads, codebook_dim=8, accept_3d_fmap=True, rotation_trick=False)
    theirs, ours = _pair(kw)
    x = torch.randn(2, 16, 3, 4, 5)
    for mode in ("eval", "train"):
        getattr(theirs, mode)(), getattr(ours, mode)()
        q_t, i_t, l_t = theirs(x)
        q_o, i_o, l_o = ours(x)
        assert q_o.shape == x.shape and i_o.shape == (2, 3, 4, 5) + ((heads,) if heads > 1 else ())
        assert torch.equal(i_o, i_t), mode
        torch.testing.assert_close(q_o, q_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"accept_3d_fmap expects \[B, C, T, H, W\]"):
        ours(torch.randn(2, 16, 4, 5))


_LAYOUTS = {"tokens": lambda d: torch.randn(2, 7, d), "channel_first": lambda d: torch.randn(2, d, 7),
            "image": lambda d: torch.randn(2, d, 5, 6), "video": lambda d: torch.randn(2, d, 3, 4, 2),
            "one_token": lambda d: torch.randn(3, d)}
_LAYOUT_KW = {"tokens": {}, "channel_first": dict(channel_last=False), "image": dict(accept_image_fmap=True),
              "video": dict(accept_3d_fmap=True), "one_token": {}}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("heads,separate", [(1, False), (2, False), (4, False), (2, True), (4, True)])
@pytest.mark.parametrize("codebook_dim", [None, 8, 16])
@pytest.mark.parametrize("cosine", [False, True])
def test_output_from_indices_is_the_forward_output(layout, heads, separate, codebook_dim, cosine):
    """get_output_from_indices(forward's indices) is forward's output (eval mode), in the input's layout,
    for every heads / layout / codebook_dim: it once gave (2, 80, 6, 4) for a [2, 64, 5, 6] image with 4
    heads sharing a 16-wide codebook, and crashed with an 8-wide one."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=64, codebook_size=32, codebook_dim=codebook_dim, heads=heads,
                           separate_codebook_per_head=separate, use_cosine_sim=cosine, **_LAYOUT_KW[layout]).eval()
    x = _LAYOUTS[layout](64)
    out, indices, _ = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(layer.get_output_from_indices(indices), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(dim=32, codebook_size=64, rotation_trick=False),
                                dict(dim=32, codebook_size=64, rotation_trick=True),
                                dict(dim=32, codebook_size=64, use_cosine_sim=True, rotation_trick=False),
                                dict(dim=32, codebook_size=64, heads=2, separate_codebook_per_head=True,
                                     codebook_dim=16, rotation_trick=False),
                                dict(dim=16, codebook_size=32, learnable_codebook=True, ema_update=False,
                                     rotation_trick=False)], ids=str)
def test_training_steps_match_vector_quantize_pytorch(kw):
    """Same state, same batches: same losses, input gradients and (EMA or learned) codebooks."""
    theirs, ours = _pair(kw)
    for step in range(3):
        x_t = torch.randn(3, 17, kw["dim"], requires_grad=True)
        x_o = x_t.detach().clone().requires_grad_()
        q_t, i_t, l_t = theirs(x_t)
        q_o, i_o, l_o = ours(x_o)
        assert torch.equal(i_o, i_t), step
        torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-7)
        w = torch.randn_like(q_t)
        ((q_t * w).sum() + l_t).backward()
        ((q_o * w).sum() + l_o).backward()
        torch.testing.assert_close(x_o.grad, x_t.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours._codebook.embed.detach(), theirs._codebook.embed.detach(),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size)
        if kw.get("learnable_codebook"):
            torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad,
                                       rtol=1e-5, atol=1e-7)
            for m in (ours, theirs):
                with torch.no_grad():
                    m._codebook.embed -= 0.5 * m._codebook.embed.grad
                m._codebook.embed.grad = None


def test_state_dict_round_trip():
    a = VectorQuantize(dim=16, codebook_size=32, codebook_dim=8, kmeans_init=True, rotation_trick=False)
    a.train()
    a(torch.randn(2, 40, 16))
    b = VectorQuantize(dim=16, codebook_size=32, codebook_dim=8, kmeans_init=True)
    assert b._codebook.needs_init
    b.load_state_dict(a.state_dict())
    assert not b._codebook.needs_init  # the Python mirror follows the loaded buffer
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(2, 9, 16)
    a.eval()
    b.eval()
    assert torch.equal(a(x)[1], b(x)[1])


@pytest.mark.parametrize("kw,err", [(dict(orthogonal_reg_weight=0.1, orthogonal_reg_max_codes=0), ValueError),
                                    (dict(orthogonal_reg_active_codes_only=True, heads=2,
                                          separate_codebook_per_head=True), ValueError),
                                    (dict(no_such_option=1), TypeError),
                                    (dict(learnable_codebook=True), ValueError),  # with the EMA default
                                    (dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False),
                                     ValueError)])
def test_unsupported_options_raise(kw, err):
    with pytest.raises(err, match="VectorQuantize"):
        VectorQuantize(dim=8, codebook_size=16, **kw)


def test_every_keyword_of_theirs_is_taken():
    import inspect
    theirs = set(inspect.signature(vqp.VectorQuantize).parameters)
    assert theirs <= set(inspect.signature(VectorQuantize).parameters)
    forward = set(inspect.signature(vqp.VectorQuantize.forward).parameters)
    assert forward <= set(inspect.signature(VectorQuantize.forward).parameters)


def test_forward_bad_keywords_raise():
    vq = VectorQuantize(dim=8, codebook_size=16)
    with pytest.raises(ValueError, match="codebook_transform_fn must return 16 codes of width 8 for each of the 6"):
        vq(torch.randn(2, 3, 8), codebook_transform_fn=lambda codes: codes)
    with pytest.raises(TypeError):
        vq(torch.randn(2, 3, 8), no_such_option=1)


def _lloyd_float64(samples, means, iters, cosine):
    """Independent Lloyd iterations in float64 (brute-force distances)."""
    s = samples.double()
    m = means.double()
    for _ in range(iters):
        if cosine:
            assign = (F.normalize(s, dim=1, eps=1e-12) @ F.normalize(m, dim=1, eps=1e-12).t()).argmax(1)
        else:
            assign = torch.cdist(s, m).argmin(1)
        counts = torch.bincount(assign, minlength=m.shape[0]).double()
        sums = torch.zeros_like(m).index_add_(0, assign, s)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        if cosine:
            new = F.normalize(new, dim=1, eps=1e-6)
        m = torch.where((counts > 0).unsqueeze(1), new, m)
    return m, counts


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k", [(300, 16), (10, 16)])
def test_kmeans_matches_float64_lloyd(metric, n, k):
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(k, 6, generator=g) * 4
    samples = (centers[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, 6, generator=g))
    torch.manual_seed(11)
    means, counts = kmeans(samples, k, num_iters=5, metric=metric)
    torch.manual_seed(11)  # the same initial draw
    sel = torch.randperm(n)[:k] if n >= k else torch.randint(0, n, (k,))
    ref_means, ref_counts = _lloyd_float64(samples, samples[sel], 5, metric == "cosine")
    torch.testing.assert_close(means.double(), ref_means, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts.double(), ref_counts)
    assert float(counts.sum()) == n


def test_kmeans_init_happens_once_in_training():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=4, rotation_trick=False)
    assert torch.count_nonzero(vq._codebook.embed) == 0
    vq.eval()
    vq(torch.randn(1, 50, 4))
    assert vq._codebook.needs_init and torch.count_nonzero(vq._codebook.embed) == 0  # eval never initialises
    vq.train()
    x = torch.randn(1, 200, 4)
    vq(x)
    assert not vq._codebook.needs_init and bool(vq._codebook.initted)
    # every code is now a data mean: each lies inside the data's bounding box
    emb = vq.codebook
    assert torch.all(emb <= x.amax((0, 1)) + 1e-5) and torch.all(emb >= x.amin((0, 1)) - 1e-5)


def test_dead_codes_are_replaced_by_batch_rows():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=16, threshold_ema_dead_code=0.5, decay=0.5, rotation_trick=False)
    with torch.no_grad():  # every code far away except code 3: only code 3 is used and stays alive
        vq._codebook.embed.fill_(100.0)
        vq._codebook.embed[0, 3] = 0.0
        vq._codebook.embed_avg.copy_(vq._codebook.embed)
        vq._codebook.cluster_size.fill_(1.0)
    x = torch.randn(1, 64, 4) * 0.1
    vq.train()
    _, idx, _ = vq(x)
    assert torch.all(idx == 3)
    cs = vq._codebook.cluster_size[0]
    # the 15 unused codes decayed to 0.5 * 1 = 0.5, not below the threshold yet
    assert torch.all(cs[torch.arange(16) != 3] == 0.5)
    vq(x)  # now 0.25 < 0.5: dead, replaced by rows of this batch, their counts reset to the threshold
    emb = vq._codebook.embed[0]
    rows = x.reshape(-1, 4)
    for k in range(16):
        if k == 3:
            continue
        assert torch.any(torch.all(rows == emb[k], dim=1)), k
        assert float(vq._codebook.cluster_size[0, k]) == 0.5
    torch.testing.assert_close(vq._codebook.embed_avg[0, torch.arange(16) != 3],
                               emb[torch.arange(16) != 3] * 0.5)


def test_freeze_codebook_keeps_everything():
    vq = VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=2, freeze_codebook=True)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.train()
    vq(torch.randn(2, 30, 8))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_language_codebook_learns_only_the_projections():
    from vqkernels.nn.frozen import minilm_word_embeddings
    table, vocab = minilm_word_embeddings()
    assert table.shape == (30522, 384) and len(vocab) == 30522
    torch.manual_seed(0)
    vq = VectorQuantize(dim=16, codebook_size=table.shape[0], frozen_codebook=table, rotation_trick=False,
                        commitment_weight=0.25)
    assert vq.codebook_dim == 384 and vq.has_projections
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    x = torch.randn(2, 32, 16)
    vq.train()
    recon = []
    for _ in range(40):
        q, idx, loss = vq(x)
        rec = F.mse_loss(q, x)
        opt.zero_grad()
        (rec + loss).backward()
        opt.step()
        recon.append(float(rec.detach()))
    assert torch.equal(vq.codebook, table)  # the language table never moves
    assert recon[-1] < 0.7 * recon[0]  # the projections learn to reconstruct through the words
    assert idx.min() >= 0 and idx.max() < 30522
    assert sum(p.numel() for p in vq.parameters()) == 2 * 16 * 384 + 384 + 16
    # the table is the caller's: not saved with the layer (a checkpoint holds the projections)
    saved = vq.state_dict()
    assert not any(k.endswith(("embed", "embed_avg")) for k in saved)
    assert max(t.numel() for t in saved.values()) <= table.shape[0]  # cluster_size at most, never the table
    again = VectorQuantize(dim=16, codebook_size=table.shape[0], frozen_codebook=table, rotation_trick=False,
                           commitment_weight=0.25).eval()
    again.load_state_dict(saved)
    torch.testing.assert_close(again(x)[0], vq.eval()(x)[0], rtol=0, atol=0)


def test_frozen_codebook_rejects_updates():
    with pytest.raises(ValueError, match="frozen_codebook"):
        VectorQuantize(dim=8, codebook_size=4, frozen_codebook=torch.randn(4, 8), ema_update=True)
    with pytest.raises(ValueError, match="frozen_codebook"):
        VectorQuantize(dim=8, codebook_size=5, frozen_codebook=torch.randn(4, 8))


COMPILE_CONFIGS = [
    dict(dim=16, codebook_size=32, kmeans_init=True, threshold_ema_dead_code=1.0),
    dict(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True, codebook_dim=8, use_cosine_sim=True),
    dict(dim=16, codebook_size=32, learnable_codebook=True, ema_update=False, threshold_ema_dead_code=1.0),
    dict(dim=16, codebook_size=32, learnable_codebook=True, ema_update=False, orthogonal_reg_weight=1.0,
         orthogonal_reg_active_codes_only=True),
]


@pytest.mark.parametrize("kw", COMPILE_CONFIGS, ids=str)
@pytest.mark.parametrize("rotation", [False, True])
def test_compiled_training_matches_eager(kw, rotation):
    from nn_helpers import assert_compiled_training_matches_eager
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 24, 16, generator=g) for _ in range(3)]
    assert_compiled_training_matches_eager(lambda: VectorQuantize(rotation_trick=rotation, **kw), batches)


def test_nan_token_gets_index_minus_one_and_leaves_the_codebook_finite():
    """A token holding a NaN: index -1, a NaN output row, a NaN loss (as any mse of it); the
    other tokens are untouched and the EMA codebook ignores the token."""
    from vqkernels.nn import ResidualVQ
    torch.manual_seed(0)
    for layer in (VectorQuantize(dim=8, codebook_size=16, rotation_trick=False),
                  ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, rotation_trick=False)):
        layer.train()
        x = torch.randn(2, 10, 8)
        x[0, 3, 2] = float("nan")
        q, idx, loss = layer(x)
        assert torch.all(idx[0, 3] == -1) and torch.all(idx[1] >= 0)
        assert torch.isnan(q[0, 3]).all() and torch.isfinite(q[1]).all()
        assert torch.isnan(loss).all()
        codebooks = layer.codebooks if isinstance(layer, ResidualVQ) else layer.codebook
        assert torch.isfinite(codebooks).all()


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 3, 8), (1, 1, 8)])
def test_empty_and_single_token_batches(shape):
    from vqkernels.nn import ResidualVQ
    for layer in (VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=1.0),
                  ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)):
        layer.train()
        x = torch.randn(*shape, requires_grad=True)
        q, idx, loss = layer(x)
        assert q.shape == x.shape and idx.shape[:2] == shape[:2]
        (q.sum() + loss.sum()).backward()
        assert torch.isfinite(layer.codebook if isinstance(layer, VectorQuantize) else layer.codebooks).all()


def test_wrong_feature_dimension_names_the_layer():
    from vqkernels.nn import ResidualVQ
    with pytest.raises(ValueError, match="VectorQuantize: expects 8 features"):
        VectorQuantize(dim=8, codebook_size=16)(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="ResidualVQ: expects 8 features"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="VectorQuantize: expects 8 features"):
        VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True)(torch.randn(2, 7, 3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_cast_to_half_precision_trains_as_theirs(dtype):
    """A layer cast with .to(bfloat16 / float16): its EMA statistics stay in that dtype (as theirs) and are updated
    through float32; indices equal theirs and outputs and codes agree to the dtype's rounding."""
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=1e-3).to(dtype).train()
    ours = VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=1e-3).to(dtype).train()
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(2, 5, 8, dtype=dtype)
        q_t, i_t, _ = theirs(x)
        q_o, i_o, _ = ours(x)
        assert torch.equal(i_o, i_t) and q_o.dtype == dtype
        tol = 4 * torch.finfo(dtype).eps  # both round the same float32 values to the dtype, in different orders
        torch.testing.assert_close(q_o, q_t, rtol=tol, atol=tol)
    assert ours._codebook.cluster_size.dtype == dtype
    torch.testing.assert_close(ours.codebook, theirs.codebook, rtol=tol, atol=tol)
    torch.testing.assert_close(ours._codebook.cluster_size, theirs._codebook.cluster_size, rtol=tol, atol=tol)
