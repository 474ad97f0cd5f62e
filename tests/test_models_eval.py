"""models.metrics / models.eval: PSNR and SSIM against scikit-image, codebook usage / perplexity /
dead codes and bits per image against hand counts, evaluate() over several batches, grids."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.config import DataConfig
from models.data import ImageDataset
from models.eval import evaluate, format_summary, level_indices, reconstruction_grid
from models.metrics import CodebookStats, bits_per_image, codebook_summary, psnr, ssim, to_unit
from models.tokenizer import Tokenizer

torch.set_num_threads(1)


def _pairs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[0] = a[0].flip(-1)  # one pair far apart, one near
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 3, 32, 24), (2, 1, 11, 13)])
def test_psnr_and_ssim_match_skimage(shape):
    a, b = _pairs(shape, torch.float64)
    want_psnr = [peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=1) for x, y in zip(a, b)]
    want_ssim = [structural_similarity(x.numpy(), y.numpy(), gaussian_weights=True, data_range=1, channel_axis=0)
                 for x, y in zip(a, b)]
    np.testing.assert_allclose(psnr(a, b).numpy(), want_psnr, rtol=1e-12)
    np.testing.assert_allclose(ssim(a, b).numpy(), want_ssim, rtol=1e-10, atol=1e-12)
    a32, b32 = a.float(), b.float()
    np.testing.assert_allclose(ssim(a32, b32).numpy(), want_ssim, atol=2e-5)
    np.testing.assert_allclose(psnr(a32, b32).numpy(), want_psnr, rtol=1e-5)


def test_psnr_of_identical_images_is_capped_and_ssim_is_one():
    a, _ = _pairs((2, 3, 16, 16), torch.float32)
    assert psnr(a, a).tolist() == pytest.approx([100.0, 100.0])
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(a[..., :10, :10], a[..., :10, :10])
    assert to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_codebook_statistics_by_hand():
    stats = CodebookStats({"a": 4, "b": 2})
    stats.update({"a": torch.tensor([[0, 0], [1, -1]]), "b": torch.tensor([1, 1, 1])})
    stats.update({"a": torch.tensor([0, 2]), "b": torch.tensor([1])})
    got = stats.summary()
    p = torch.tensor([3, 1, 1]) / 5
    assert got["a"] == {"codes": 4, "usage": 0.75, "perplexity": pytest.approx(math.exp(-(p * p.log()).sum().item())),
                        "dead": 1, "tokens": 5}
    assert got["b"] == {"codes": 2, "usage": 0.5, "perplexity": pytest.approx(1.0), "dead": 1, "tokens": 4}
    uniform = codebook_summary(torch.full((8,), 5))
    assert uniform["perplexity"] == pytest.approx(8.0) and uniform["usage"] == 1.0 and uniform["dead"] == 0
    stats.reset()
    assert stats.summary()["a"]["tokens"] == 0 and stats.summary()["a"]["perplexity"] == 0.0


def test_bits_per_image_by_hand():
    ids = {"top": torch.zeros(5, 4, 4, dtype=torch.int64), "bottom": torch.zeros(5, 3, dtype=torch.int64)}
    assert bits_per_image(ids, {"top": 16, "bottom": 512}) == 16 * 4 + 3 * 9


class Pictures(ImageDataset):
    def __init__(self, n):
        super().__init__(DataConfig(), 16, "holdout", hflip=False)
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i].clone(), "label": -1, "caption": ""}


class TwoLevels(Tokenizer):
    """Codes: the sign pattern of 2x2 pixel blocks of channel 0 ("fine", K 4: two pixels a code) and
    the image's mean brightness bucket ("coarse", K 8). Decoding shifts the remembered input by 0.1
    (the codes are not enough to rebuild it; what matters here is that the metrics see a known output)."""

    def __init__(self):
        super().__init__(None)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        self._x = x
        fine = (x[:, 0, :2, :4] > 0).long().reshape(x.shape[0], 4, 2)
        fine = fine[..., 0] * 2 + fine[..., 1]
        coarse = ((x.mean((1, 2, 3)) + 1) * 4).long().clamp(0, 7).unsqueeze(1)
        return fine, coarse

    def decode(self, indices):
        return (self._x + 0.1).clamp(-1, 1)

    def codebook_sizes(self):
        return {"fine": 4, "coarse": 8}


def test_evaluate_over_several_batches():
    data, model = Pictures(7), TwoLevels()
    res = evaluate(model.train(), data, batch_size=3, max_images=6)
    assert model.training, "evaluate restores the model's mode"
    x = to_unit(data.images[:6])
    y = to_unit((data.images[:6] + 0.1).clamp(-1, 1))
    want_psnr = np.mean([peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1) for a, b in zip(x, y)])
    want_ssim = np.mean([structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, data_range=1,
                                               channel_axis=0) for a, b in zip(x, y)])
    assert res["images"] == 6
    assert res["psnr"] == pytest.approx(want_psnr, rel=1e-5) and res["ssim"] == pytest.approx(want_ssim, abs=1e-5)
    assert res["bits_per_image"] == 4 * 2 + 1 * 3
    fine, coarse = model.encode(data.images[:6])
    for level, ids, k in (("fine", fine, 4), ("coarse", coarse, 8)):
        counts = torch.bincount(ids.flatten(), minlength=k)
        assert res["codebooks"][level]["tokens"] == ids.numel()
        assert res["codebooks"][level]["usage"] == (counts > 0).float().mean().item()
        assert res["codebooks"][level]["dead"] == int((counts == 0).sum())
    assert res["encode_images_per_s"] > 0 and res["decode_images_per_s"] > 0
    table = format_summary(res)
    assert "PSNR" in table and "fine" in table and "coarse" in table and "bits per image   11" in table


def test_encode_output_must_match_the_codebook_levels():
    with pytest.raises(ValueError, match=r"encode returned 1 tensor\(s\) for 2 codebook level\(s\)"):
        level_indices(torch.zeros(2, 3), {"a": 4, "b": 4})
    ids = level_indices((torch.zeros(1), torch.ones(1)), {"a": 4, "b": 4})
    assert list(ids) == ["a", "b"] and ids["b"].item() == 1
    stacked = torch.arange(2 * 5 * 3).reshape(2, 5, 3)  # residual levels on the last dimension
    ids = level_indices(stacked, {"l0": 8, "l1": 8, "l2": 8})
    assert [ids[k].shape for k in ids] == [(2, 5)] * 3 and torch.equal(ids["l2"], stacked[..., 2])
    assert bits_per_image(ids, {"l0": 8, "l1": 8, "l2": 8}) == 5 * 3 * 3


def test_grid_puts_reconstructions_under_their_originals():
    data, model = Pictures(3), TwoLevels()
    grid = reconstruction_grid(model, data, count=3, columns=2)
    assert grid.shape == (4 * 16, 2 * 16, 3) and grid.dtype == np.uint8
    orig = (to_unit(data.images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rec = (to_unit((data.images + 0.1).clamp(-1, 1)) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(grid[:16, 16:], orig[1])
    np.testing.assert_array_equal(grid[16:32, 16:], rec[1])
    np.testing.assert_array_equal(grid[32:48, :16], orig[2])
    np.testing.assert_array_equal(grid[48:, :16], rec[2])
    assert (grid[32:, 16:] == 255).all()  # the empty slot is white
