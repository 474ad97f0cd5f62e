"""vqkernels.nn.SimVQ and ResidualSimVQ as drop-ins for vector-quantize-pytorch 1.32.0's: the same indices, outputs, loss,
input and transform gradients and state_dict, with and without the rotation trick."""

import pytest
import torch
import vector_quantize_pytorch as vqp
from torch import nn

from nn_helpers import run_residual_pair
from vq_helpers import gen, vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import ResidualSimVQ, SimVQ

CASES = {
    "rotation": (dict(dim=16, codebook_size=64), (2, 13, 16)),
    "straight-through": (dict(dim=16, codebook_size=64, rotation_trick=False, commitment_weight=0.5), (2, 13, 16)),
    "channel-first-image": (dict(dim=8, codebook_size=32, channel_first=True), (2, 8, 3, 5)),
    "wider-frozen-table": (dict(dim=8, codebook_size=48, frozen_codebook_dim=24,
                                input_to_quantize_commit_loss_weight=0.5), (3, 7, 8)),
    "mlp-transform": (dict(dim=8, codebook_size=32,
                           codebook_transform=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))),
                      (2, 9, 8)),
}


def _pair(kw):
    torch.manual_seed(0)
    theirs = vqp.SimVQ(**kw)
    ours = SimVQ(**{**kw, **({"codebook_transform": _copy(kw["codebook_transform"])}
                             if "codebook_transform" in kw else {})})
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return theirs, ours


def _copy(module):
    import copy
    return copy.deepcopy(module)


@pytest.mark.parametrize("case", CASES)
def test_matches_vector_quantize_pytorch(case):
    kw, shape = CASES[case]
    theirs, ours = _pair(kw)
    x = torch.randn(shape, generator=gen(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_t, i_t, l_t = theirs(xa)
    q_o, i_o, l_o = ours(xb)
    assert torch.equal(i_o, i_t)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-7)
    g = torch.randn(q_t.shape, generator=gen(2))
    ((q_t * g).sum() + l_t).backward()
    ((q_o * g).sum() + l_o).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        assert pb.grad is not None and pb.grad.abs().sum() > 0, name
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ours.indices_to_codes(i_o), theirs.indices_to_codes(i_t))
    torch.testing.assert_close(ours.indices_to_codes(i_o), q_o.detach(), rtol=1e-5, atol=1e-5)


def test_training_moves_every_code_and_lowers_the_loss():
    """A few Adam steps on the transform alone lower the loss, and every code moves (the point of SimVQ)."""
    torch.manual_seed(0)
    layer = SimVQ(dim=8, codebook_size=32)
    x = torch.randn(256, 8) * 3
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    before, first = layer.codebook.detach().clone(), None
    for _ in range(60):
        _, _, loss = layer(x.unsqueeze(0))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.75 * first  # 11.0 -> 7.3 here
    assert ((layer.codebook.detach() - before).norm(dim=-1) > 0).all()


def test_wrong_feature_dim_is_an_error():
    with pytest.raises(ValueError, match="expected 8 features"):
        SimVQ(dim=8, codebook_size=4)(torch.randn(2, 3, 6))


@pytest.mark.parametrize("kw, shape", [(dict(dim=8, num_quantizers=3, codebook_size=32), (2, 9, 8)),
                                       (dict(dim=8, num_quantizers=2, codebook_size=16, channel_first=True,
                                             rotation_trick=False), (2, 8, 3, 4))], ids=["tokens", "channel-first"])
def test_residual_sim_vq_matches_vector_quantize_pytorch(kw, shape):
    """Indices, output, per-level losses, codes and gradients as theirs; quantize dropout with a fixed seed."""
    torch.manual_seed(0)
    theirs = vqp.ResidualSimVQ(**kw)
    ours = ResidualSimVQ(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(shape, generator=gen(3))
    xa, xb, (q_t, i_t, l_t, c_t), (q_o, i_o, l_o, c_o) = run_residual_pair(theirs, ours, x)
    torch.testing.assert_close(q_o, q_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(c_o, c_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.get_output_from_indices(i_o), q_o.detach(), rtol=1e-5, atol=1e-5)
    ((q_t ** 2).sum() + l_t.sum()).backward()
    ((q_o ** 2).sum() + l_o.sum()).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    dropping = dict(kw, quantize_dropout=True)
    torch.manual_seed(0)
    theirs, ours = vqp.ResidualSimVQ(**dropping).train(), ResidualSimVQ(**dropping).train()
    ours.load_state_dict(theirs.state_dict())
    for seed in range(4):
        assert torch.equal(ours(x, rand_quantize_dropout_fixed_seed=seed)[1],
                           theirs(x, rand_quantize_dropout_fixed_seed=seed)[1])
    with torch.no_grad():  # theirs drops levels in training without gradients too (its scalar layers do not)
        dropped = [(layer(x, rand_quantize_dropout_fixed_seed=1)[1] < 0).any(-1) for layer in (ours, theirs)]
    assert torch.equal(*dropped)
