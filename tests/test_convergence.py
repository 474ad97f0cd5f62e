"""Convergence (Liger-style): a small conv autoencoder on real photo crops (skimage.data)
trains with each quantizer layer for a few hundred CPU steps; the reconstruction error falls
below a stated fraction of the data variance and at least half of the codes are used."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
CROP = 16
STEPS = 300
BATCH = 32
LATENT = 16  # channels of the 4x4 latent grid


def photo_crops(n=2048, seed=0):
    """n random 16x16 RGB crops of five photos, scaled to [-1, 1], [n, 3, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.from_numpy(getattr(skimage_data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1
              for name in PHOTOS]
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        y = int(torch.randint(0, img.shape[1] - CROP, (1,), generator=g))
        x = int(torch.randint(0, img.shape[2] - CROP, (1,), generator=g))
        crops.append(img[:, y:y + CROP, x:x + CROP])
    return torch.stack(crops)


class AutoEncoder(nn.Module):
    """16x16x3 -> 4x4xLATENT -> quantizer -> 16x16x3."""

    def __init__(self, quantize):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, LATENT, 4, 2, 1))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(LATENT, 32, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 3, 4, 2, 1))
        self.quantize = quantize

    def forward(self, x):
        z = self.encoder(x)
        zq, loss, codes = self.quantize(z)
        return self.decoder(zq), loss, codes


def _vq(**kw):
    from vqkernels.nn import VectorQuantize
    layer = VectorQuantize(dim=LATENT, accept_image_fmap=True, **kw)

    def run(z):
        q, idx, loss = layer(z)
        return q, loss, idx.reshape(-1)
    return layer, run


def _rvq(**kw):
    from vqkernels.nn import ResidualVQ
    layer = ResidualVQ(dim=LATENT, accept_image_fmap=True, **kw)

    def run(z):
        q, idx, losses = layer(z)
        return q, losses.sum(), idx[..., 0].reshape(-1)  # usage of the first level's codebook
    return layer, run


def _grouped_rvq(**kw):
    from vqkernels.nn import GroupedResidualVQ
    layer = GroupedResidualVQ(dim=LATENT, accept_image_fmap=True, **kw)

    def run(z):
        q, idx, losses = layer(z)
        return q, losses.sum(), idx[0, ..., 0].reshape(-1)
    return layer, run


def _fsq(**kw):
    from vqkernels.nn import FSQ
    layer = FSQ(dim=LATENT, **kw)

    def run(z):
        q, idx = layer(z)
        return q, q.new_zeros(()), idx.reshape(-1)
    return layer, run


def _lfq(**kw):
    from vqkernels.nn import LFQ
    layer = LFQ(dim=LATENT, **kw)

    def run(z):
        q, idx, aux = layer(z)
        return q, aux, idx.reshape(-1)
    return layer, run


def _gumbel(**kw):
    from vqkernels.nn import GumbelQuantize
    layer = GumbelQuantize(LATENT, LATENT, **kw)

    def run(z):
        q, diff, (_, _, idx) = layer(z)
        return q, diff, idx.reshape(-1)
    return layer, run


def _multiscale(**kw):
    from vqkernels.nn import MultiScaleVQ
    layer = MultiScaleVQ(Cvae=LATENT, v_patch_nums=(1, 2, 3, 4), **kw)
    layer.eini(-1)  # VAR's small uniform init

    def run(z):
        f_hat, _, loss = layer(z)
        with torch.no_grad():
            per_scale = layer.f_to_idxBl_or_fhat(z.detach(), to_fhat=False)
        return f_hat, loss, torch.cat([i.reshape(-1) for i in per_scale])  # codes used at any scale
    return layer, run


class Wrapped(nn.Module):
    def __init__(self, factory, **kw):
        super().__init__()
        self.layer, self._run = factory(**kw)

    def forward(self, z):
        return self._run(z)


# (name, factory, keywords, codebook size whose usage is counted, max recon MSE / data variance).
# The bounds are about twice what these runs reach (0.03-0.15 of the variance after 300 steps).
CASES = [
    ("VectorQuantize", _vq, dict(codebook_size=64, kmeans_init=True, threshold_ema_dead_code=1.0), 64, 0.10),
    ("VectorQuantize-cosine-factorised", _vq, dict(codebook_size=64, codebook_dim=8, use_cosine_sim=True,
                                                   threshold_ema_dead_code=1.0), 64, 0.10),
    ("ResidualVQ", _rvq, dict(num_quantizers=4, codebook_size=32, kmeans_init=True, threshold_ema_dead_code=1.0),
     32, 0.07),
    ("ResidualVQ-shared", _rvq, dict(num_quantizers=4, codebook_size=32, shared_codebook=True,
                                     threshold_ema_dead_code=1.0), 32, 0.09),
    ("GroupedResidualVQ", _grouped_rvq, dict(groups=2, num_quantizers=2, codebook_size=32,
                                             threshold_ema_dead_code=1.0), 32, 0.09),
    ("FSQ", _fsq, dict(levels=[5, 5, 5]), 125, 0.12),
    ("LFQ", _lfq, dict(codebook_size=2 ** 8, entropy_loss_weight=0.1, commitment_loss_weight=0.25), 256, 0.30),
    ("GumbelQuantize", _gumbel, dict(n_embed=64, kl_weight=5e-4), 64, 0.26),
    ("MultiScaleVQ", _multiscale, dict(vocab_size=64), 64, 0.11),
]


@pytest.fixture(scope="module")
def crops():
    return photo_crops()


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions: one thread is fastest, and the suite runs in parallel workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,factory,kw,codebook_size,max_ratio", CASES, ids=[c[0] for c in CASES])
def test_autoencoder_converges(crops, name, factory, kw, codebook_size, max_ratio):
    torch.manual_seed(0)
    model = AutoEncoder(Wrapped(factory, **kw))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(STEPS):
        x = crops[torch.randint(0, crops.shape[0], (BATCH,), generator=g)]
        recon, qloss, _ = model(x)
        loss = F.mse_loss(recon, x) + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        recon, _, codes = model(crops)
    ratio = float(F.mse_loss(recon, crops) / crops.var())
    used = int(torch.unique(codes[codes >= 0]).numel())
    assert ratio < max_ratio, f"{name}: reconstruction MSE is {ratio:.3f} of the data variance"
    assert used >= codebook_size // 2, f"{name}: only {used} of {codebook_size} codes used"
