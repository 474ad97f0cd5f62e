"""vqkernels.nn.RandomProjectionQuantizer as a drop-in for vector-quantize-pytorch 1.32.0's: the same targets
and cross-entropy loss from the same state, one or several codebooks; nothing trains."""

import pytest
import torch
import vector_quantize_pytorch as vqp

from vq_helpers import gen, vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import RandomProjectionQuantizer


@pytest.mark.parametrize("kw", [dict(dim=24, codebook_size=64, codebook_dim=16),
                                dict(dim=24, codebook_size=32, codebook_dim=8, num_codebooks=3),
                                dict(dim=12, codebook_size=16, codebook_dim=8, norm=False)], ids=str)
def test_matches_vector_quantize_pytorch(kw):
    torch.manual_seed(0)
    theirs = vqp.RandomProjectionQuantizer(**kw)
    ours = RandomProjectionQuantizer(**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.train()  # the inner quantizer runs in eval mode regardless, as there
    x = torch.randn(2, 11, kw["dim"], generator=gen(1))
    targets = ours(x)
    assert torch.equal(targets, theirs(x))
    assert targets.shape == (2, 11) + ((kw["num_codebooks"],) if kw.get("num_codebooks", 1) > 1 else ())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    labels = torch.randint(0, kw["codebook_size"], targets.shape, generator=gen(2))
    labels[0, 0] = -1  # ignored
    torch.testing.assert_close(ours(x, indices=labels), theirs(x, indices=labels), rtol=1e-5, atol=1e-6)
    # the codes it chose are the likeliest under its own logits: the loss of its targets is the lowest
    assert ours(x, indices=targets) < ours(x, indices=labels)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
