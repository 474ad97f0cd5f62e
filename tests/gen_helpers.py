"""Helpers of the text-generator tests: a tiny generator with weights large enough that its logits
depend on the inputs, and a batch of captioned images."""

import torch

CAPTIONS = ["a red circle", "", "a blue triangle and a green ellipse", "a yellow rectangle"]


def jittered(cls, cfg, *tokenizers):
    """``cls(cfg, *tokenizers)`` in eval mode, its weights (seed 1) plus N(0, 0.2) noise: larger than the 0.02
    initialisation, so that logits depend on the inputs."""
    torch.manual_seed(1)
    m = cls(cfg, *tokenizers).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def caption_batch(b=4, seed=0, resolution=16):
    """``b`` (at most 4) random images in [-1, 1] with captions, one of them empty."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, resolution, resolution, generator=g) * 2 - 1, "caption": CAPTIONS[:b]}
