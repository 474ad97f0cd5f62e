"""vqkernels.nn.gumbel.GumbelQuantize against taming-transformers' GumbelQuantize semantics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vq_helpers import gen, vqkernels  # noqa: F401  (imports vqkernels quietly)
from vqkernels.nn.gumbel import GumbelQuantize

KEYS = {"proj.weight", "proj.bias", "embed.weight"}
C, D, K = 4, 5, 10  # num_hiddens, embedding_dim, n_embed


class TamingGumbelQuantize(nn.Module):
    """taming-transformers' GumbelQuantize (taming/modules/vqvae/quantize.py, remap=None) in
    plain PyTorch, written from its semantics: a 1x1 convolution to logits, F.gumbel_softmax
    over the channels (hard in eval or when straight_through), the product with the
    embedding, kl_weight times the KL divergence of softmax(logits) to the uniform prior, and
    the index as the argmax of the sample."""

    def __init__(self, num_hiddens, embedding_dim, n_embed, straight_through=True, kl_weight=5e-4, temp_init=1.0):
        super().__init__()
        self.n_embed = n_embed
        self.straight_through = straight_through
        self.kl_weight = kl_weight
        self.temperature = temp_init
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def forward(self, z, temp=None):
        hard = self.straight_through if self.training else True
        logits = self.proj(z)
        y = F.gumbel_softmax(logits, tau=self.temperature if temp is None else temp, dim=1, hard=hard)
        z_q = torch.einsum("bkhw,kd->bdhw", y, self.embed.weight)
        q = F.softmax(logits, dim=1)
        diff = self.kl_weight * torch.sum(q * torch.log(q * self.n_embed + 1e-10), dim=1).mean()
        return z_q, diff, (None, None, y.argmax(dim=1))

    def get_codebook_entry(self, indices, shape):
        b, h, w, _ = shape
        one_hot = F.one_hot(indices.reshape(b, h, w), num_classes=self.n_embed).permute(0, 3, 1, 2).float()
        return torch.einsum("bkhw,kd->bdhw", one_hot, self.embed.weight)


def features(b=2, h=3, w=4, seed=0):
    return torch.randn(b, C, h, w, generator=gen(seed)) * 3


def seeded(fn, seed, *args, **kwargs):
    """fn(*args, **kwargs) right after torch.manual_seed(seed), the global generator restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def run(module, z, seed, call=None, **kwargs):
    """Forward (through `call`, default the module) under torch.manual_seed(seed), backward of
    z_q * G + diff; returns the outputs and the gradients."""
    module.zero_grad()
    z = z.clone().requires_grad_()
    z_q, diff, (_, _, ind) = seeded(module if call is None else call, seed, z, **kwargs)
    g = torch.randn(z_q.shape, generator=gen(seed + 1))
    ((z_q * g).sum() + diff).backward()
    return {"z_q": z_q.detach(), "diff": diff.detach(), "ind": ind, "z.grad": z.grad,
            **{f"{name}.grad": p.grad.clone() for name, p in module.named_parameters()}}


def assert_results_close(got, want, rtol=1e-5):
    assert set(got) == set(want)
    assert torch.equal(got["ind"], want["ind"]), "indices differ"
    for name in got:
        if name != "ind":
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * float(want[name].abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_state_dict_keys_match_taming():
    ours, taming = GumbelQuantize(C, D, K), TamingGumbelQuantize(C, D, K)
    assert set(ours.state_dict()) == set(taming.state_dict()) == KEYS
    for key, value in taming.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


@pytest.mark.parametrize("mode", ["train-hard", "train-soft", "eval"])
@pytest.mark.parametrize("temp", [None, 0.4])
def test_taming_state_dict_loads_and_matches(mode, temp):
    """A taming-style state_dict loads (strict); with the same seed the noise is the same, so
    z_q, diff, the indices and every gradient match taming's computation (up to rounding:
    taming's hard value is 1 - y + y, its products einsum's)."""
    torch.manual_seed(1)
    taming = TamingGumbelQuantize(C, D, K, straight_through=mode != "train-soft", kl_weight=0.3, temp_init=0.8)
    ours = GumbelQuantize(C, D, K, straight_through=mode != "train-soft", kl_weight=0.3, temp_init=0.8)
    ours.load_state_dict(taming.state_dict())
    for m in (ours, taming):
        m.train(mode != "eval")
    z = features()
    assert_results_close(run(ours, z, 7, temp=temp), run(taming, z, 7, temp=temp))


def test_state_dict_round_trip():
    torch.manual_seed(2)
    first = GumbelQuantize(C, D, K, kl_weight=0.1)
    second = GumbelQuantize(C, D, K, kl_weight=0.1)
    assert not torch.equal(first.embed.weight, second.embed.weight)
    second.load_state_dict(first.state_dict())
    z = features(seed=3)
    a, b = run(first, z, 11), run(second, z, 11)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_return_conventions():
    """taming's: (z_q, diff, (None, None, ind)), plus the logits with return_logits;
    (z_q, diff, ind) without use_vqinterface; shapes [B, D, H, W], scalar, [B, H, W] int64."""
    torch.manual_seed(4)
    module = GumbelQuantize(C, D, K).eval()
    z = features(b=3, h=2, w=5)
    z_q, diff, (a, b, ind) = seeded(module, 5, z)
    assert a is None and b is None
    assert z_q.shape == (3, D, 2, 5) and diff.shape == () and ind.shape == (3, 2, 5) and ind.dtype == torch.int64
    *_, logits = seeded(module, 5, z, return_logits=True)
    torch.testing.assert_close(logits, module.proj(z))
    module.use_vqinterface = False
    z_q2, diff2, ind2 = seeded(module, 5, z)
    assert torch.equal(z_q2, z_q) and torch.equal(diff2, diff) and torch.equal(ind2, ind)


def test_eval_is_hard_codebook_rows():
    """In eval, z_q is exactly the chosen embedding rows (channels first)."""
    torch.manual_seed(5)
    module = GumbelQuantize(C, D, K, straight_through=False).eval()
    z_q, _, (_, _, ind) = seeded(module, 6, features(seed=6))
    assert torch.equal(z_q, module.embed.weight[ind].permute(0, 3, 1, 2))


def test_get_codebook_entry():
    torch.manual_seed(7)
    ours, taming = GumbelQuantize(C, D, K), TamingGumbelQuantize(C, D, K)
    ours.load_state_dict(taming.state_dict())
    indices = torch.randint(0, K, (2 * 3 * 4,), generator=gen(8))
    got = ours.get_codebook_entry(indices, (2, 3, 4, D))
    assert got.shape == (2, D, 3, 4)
    torch.testing.assert_close(got, taming.get_codebook_entry(indices, (2, 3, 4, D)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"23 indices for shape \(2, 3, 4, 5\), which needs B\*H\*W = 24"):
        ours.get_codebook_entry(indices[:23], (2, 3, 4, D))


def test_remap_is_unsupported():
    with pytest.raises(ValueError, match=r"remap .* is not supported"):
        GumbelQuantize(C, D, K, remap="used_indices.npy")


@pytest.mark.parametrize("straight_through", [True, False])
def test_compiled_training_step(straight_through):
    """torch.compile(fullgraph=True) of the training forward and backward gives eager's
    results (inductor's random numbers fall back to torch's, so the noise is the same)."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    module = GumbelQuantize(C, D, K, straight_through=straight_through, kl_weight=0.2).train()
    compiled = torch.compile(module, fullgraph=True)
    z = features(seed=10)
    with torch._inductor.config.patch(fallback_random=True):
        got = run(module, z, 12, call=compiled)
    assert_results_close(got, run(module, z, 12))
    torch._dynamo.reset()


def test_bfloat16_module():
    """A bfloat16 module trains: z_q in bfloat16 (the codebook's rows, exactly, in eval),
    diff in float32 (the kernels compute half inputs in float32), gradients in bfloat16."""
    torch.manual_seed(13)
    module = GumbelQuantize(C, D, K, kl_weight=0.5).to(torch.bfloat16)
    z = features(seed=14).to(torch.bfloat16).requires_grad_()
    z_q, diff, (_, _, ind) = seeded(module, 15, z)
    assert z_q.dtype == torch.bfloat16 and diff.dtype == torch.float32 and ind.dtype == torch.int64
    (z_q.float().square().sum() + diff).backward()
    assert module.proj.weight.grad.dtype == torch.bfloat16 and bool(module.embed.weight.grad.any())
    module.eval()
    z_q, _, (_, _, ind) = seeded(module, 16, z)
    assert torch.equal(z_q, module.embed.weight[ind].permute(0, 3, 1, 2))
