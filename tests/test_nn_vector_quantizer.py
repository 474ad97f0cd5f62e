"""vqkernels.nn.VectorQuantizer against taming-transformers' VectorQuantizer2 semantics
(taming/modules/vqvae/quantize.py, remap=None), written out below from its formulas."""

import pytest
import torch
from torch import nn

from vq_helpers import gen, vqkernels  # noqa: F401  (imports vqkernels quietly)
from vqkernels.nn import VectorQuantizer

K, C = 24, 6


class TamingVectorQuantizer2(nn.Module):
    """VectorQuantizer2's forward: squared distances ||z||^2 + ||e||^2 - 2 z.e, argmin, the embedding
    rows, the loss mean((sg(z_q) - z)^2) + beta mean((z_q - sg(z))^2) (legacy) or with beta on the
    first term (legacy=False), the straight-through z + sg(z_q - z), channels first again."""

    def __init__(self, n_e, e_dim, beta, legacy=True, sane_index_shape=False):
        super().__init__()
        self.e_dim, self.beta, self.legacy, self.sane = e_dim, beta, legacy, sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        w = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()
        idx = d.argmin(1)
        z_q = self.embedding(idx).view(z.shape)
        commit, codebook = ((z_q.detach() - z) ** 2).mean(), ((z_q - z.detach()) ** 2).mean()
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
        if self.sane:
            idx = idx.view(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)


def _pair(legacy, sane=False, beta=0.25):
    ref = TamingVectorQuantizer2(K, C, beta, legacy, sane)
    ours = VectorQuantizer(K, C, beta, legacy=legacy, sane_index_shape=sane)
    with torch.no_grad():
        ref.embedding.weight.copy_(torch.randn(K, C, generator=gen(0)))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _features(seed=1, shape=(2, C, 5, 7)):
    return torch.randn(*shape, generator=gen(seed))


def test_state_dict_and_init_are_taming_s():
    q = VectorQuantizer(K, C, 0.25)
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == {"embedding.weight": (K, C)}
    w = q.embedding.weight
    assert w.abs().max() <= 1.0 / K and w.std() > 0.25 / K  # uniform(-1/K, 1/K)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane", [False, True])
def test_forward_matches_taming(legacy, sane):
    ref, ours = _pair(legacy, sane)
    z = _features()
    zq_r, loss_r, (p, e, idx_r) = ref(z)
    zq_o, loss_o, (p_o, e_o, idx_o) = ours(z)
    assert p_o is None and e_o is None
    assert idx_o.dtype == torch.int64 and idx_o.shape == idx_r.shape  # flat [B*H*W], or [B, H, W] with sane
    torch.testing.assert_close(idx_o, idx_r, rtol=0, atol=0)
    assert zq_o.shape == zq_r.shape
    # our z_q is the codebook row itself; taming's z + (z_q - z) differs from it by rounding only
    torch.testing.assert_close(zq_o, ours.embedding.weight[idx_o.reshape(-1)].view(2, 5, 7, C).permute(0, 3, 1, 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(zq_o, zq_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_o, loss_r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_puts_beta_on_the_codebook_term(legacy):
    _, ours = _pair(legacy, beta=0.3)
    z = _features()
    _, loss, (_, _, idx) = ours(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, C)
    mse = ((rows - ours.embedding.weight[idx]) ** 2).mean()
    # the two terms have the same value; only their weights and gradients differ
    torch.testing.assert_close(loss, mse * 1.3, rtol=1e-6, atol=0)
    z = z.requires_grad_()
    _, loss, _ = ours(z)
    ours.zero_grad()
    loss.backward()
    commit_weight, codebook_weight = (1.0, 0.3) if legacy else (0.3, 1.0)
    diff = (rows - ours.embedding.weight[idx]).detach()
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, C), commit_weight * 2 * diff / diff.numel())
    expected = torch.zeros(K, C).index_add_(0, idx, -codebook_weight * 2 * diff / diff.numel())
    torch.testing.assert_close(ours.embedding.weight.grad, expected)


@pytest.mark.parametrize("legacy", [True, False])
def test_gradients_to_z_and_embedding_match_taming(legacy):
    ref, ours = _pair(legacy)
    g = torch.randn(2, C, 5, 7, generator=gen(2))
    grads = []
    for q in (ref, ours):
        z = _features().requires_grad_()
        z_q, loss, _ = q(z)
        ((z_q * g).sum() + 3.0 * loss).backward()
        grads.append((z.grad, q.embedding.weight.grad))
    (gz_r, ge_r), (gz_o, ge_o) = grads
    torch.testing.assert_close(gz_o, gz_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ge_o, ge_r, rtol=1e-5, atol=1e-7)
    # straight-through: z_q's gradient reaches z unchanged, and the codebook learns only from the loss
    assert ge_o[torch.isin(torch.arange(K), ours(_features())[2][2], invert=True)].abs().max() == 0


def test_get_codebook_entry_is_taming_s():
    _, ours = _pair(True)
    idx = torch.randint(0, K, (2 * 3 * 4,), generator=gen(3))
    w = ours.embedding.weight
    torch.testing.assert_close(ours.get_codebook_entry(idx, (2, 3, 4, C)), w[idx].view(2, 3, 4, C).permute(0, 3, 1, 2))
    torch.testing.assert_close(ours.get_codebook_entry(idx, None), w[idx])


def test_a_nan_position_gets_index_minus_one():
    _, ours = _pair(True)
    z = _features()
    z[1, :, 2, 3] = float("nan")
    z_q, _, (_, _, idx) = ours(z)
    flat = idx.view(2, 5, 7)
    assert flat[1, 2, 3] == -1 and torch.isnan(z_q[1, :, 2, 3]).all()
    assert (flat >= 0).sum() == 2 * 5 * 7 - 1


def test_unsupported_arguments_raise():
    with pytest.raises(ValueError, match="remap"):
        VectorQuantizer(K, C, 0.25, remap="used.npy")
    q = VectorQuantizer(K, C, 0.25)
    with pytest.raises(ValueError, match="interface compatibility"):
        q(_features(), temp=0.5)
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        q(torch.randn(2, C + 1, 3, 3))
