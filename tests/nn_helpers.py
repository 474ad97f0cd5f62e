"""Helpers of the vqkernels.nn layer tests: torch.compile checks of a training step."""

import torch

from vq_helpers import bits


def _scalar(out):
    """A scalar training objective from a layer's forward output (tensors, tuples of them)."""
    if isinstance(out, torch.Tensor):
        return out.float().square().sum() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    return sum((_scalar(o) for o in out if isinstance(o, (torch.Tensor, tuple, list))),
               torch.zeros((), dtype=torch.float32))


def assert_compiled_training_matches_eager(make, inputs, atol=1e-5, rtol=1e-5):
    """Trains two copies of ``make()`` on ``inputs`` (a list of batches), one through
    ``torch.compile(fullgraph=True)`` (any graph break, e.g. a host sync, fails), the other
    eagerly: same outputs, input gradients, parameter gradients and state after every step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make()
    compiled_mod = make()
    compiled_mod.load_state_dict(eager.state_dict())
    eager.train()
    compiled_mod.train()

    def objective(mod, x):
        out = mod(x)
        return out, _scalar(out)

    compiled = torch.compile(objective, fullgraph=True)
    for step, x in enumerate(inputs):
        xe = x.detach().clone().requires_grad_()
        xc = x.detach().clone().requires_grad_()
        torch.manual_seed(step)
        out_e, loss_e = objective(eager, xe)
        torch.manual_seed(step)
        out_c, loss_c = compiled(compiled_mod, xc)
        loss_e.backward()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=rtol, msg=lambda m: f"step {step} loss: {m}")
        torch.testing.assert_close(xc.grad, xe.grad, atol=atol, rtol=rtol, msg=lambda m: f"step {step} x.grad: {m}")
        for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_mod.named_parameters()):
            if pe.grad is not None:
                torch.testing.assert_close(pc.grad, pe.grad, atol=atol, rtol=rtol,
                                           msg=lambda m: f"step {step} {name}.grad: {m}")
        for (name, be), (_, bc) in zip(eager.state_dict().items(), compiled_mod.state_dict().items()):
            torch.testing.assert_close(bc, be, atol=atol, rtol=rtol, msg=lambda m: f"step {step} {name}: {m}")


def run_residual_pair(theirs, ours, x):
    """Runs vector-quantize-pytorch's residual layer and ours on copies of ``x`` that take gradients, with
    ``return_all_codes``: ``(xa, xb, theirs' results, ours)``, the indices asserted equal."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got_t, got_o = theirs(xa, return_all_codes=True), ours(xb, return_all_codes=True)
    assert torch.equal(got_o[1], got_t[1])
    return xa, xb, got_t, got_o


def pair_with_theirs(theirs_cls, ours_cls, kwargs, seed=0):
    """vector-quantize-pytorch's module (seeded init) and ours with its state_dict loaded (strict, same keys)."""
    torch.manual_seed(seed)
    theirs = theirs_cls(**kwargs)
    ours = ours_cls(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return theirs, ours


def assert_same(a, b, what):
    """Same dtype, shape and bits."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{what} differs"
