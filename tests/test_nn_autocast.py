"""Every layer trains under torch.autocast (CPU, bfloat16): finite outputs and input gradients.

The kernels that call ATen ops inside (the GEMMs of lfq_entropy and gumbel_quantize) must not
have those calls autocast under them."""

import pytest
import torch

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels import nn as vqnn

LAYERS = {
    "VectorQuantize": (lambda: vqnn.VectorQuantize(dim=16, codebook_size=32, codebook_dim=8), (2, 9, 16)),
    "ResidualVQ": (lambda: vqnn.ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, codebook_dim=8), (2, 9, 16)),
    "FSQ": (lambda: vqnn.FSQ(levels=[5, 5, 5], dim=16), (2, 9, 16)),
    "LFQ": (lambda: vqnn.LFQ(dim=16, codebook_size=2 ** 8), (2, 9, 16)),
    "GumbelQuantize": (lambda: vqnn.GumbelQuantize(16, 8, 32), (2, 16, 4, 4)),
    "MultiScaleVQ": (lambda: vqnn.MultiScaleVQ(32, 8, v_patch_nums=(1, 2, 4)), (2, 8, 4, 4)),
}


def _first_float(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", list(LAYERS))
def test_training_step_under_cpu_autocast(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().train()
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    q = _first_float(out)
    assert torch.isfinite(q.float()).all()
    q.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
