"""Held-out evaluation of a trained tokenizer or generator, and the suite's judges of generated digits
and of generated shapes.

``python -m models.eval SYSTEM --ckpt DIR [--data NAME|PATH] [--batch-size B] [--device cpu|cuda]
[--max-images N]`` loads the run folder DIR's newest checkpoint (or DIR itself when it is a
checkpoint folder). For a generator run it prints :func:`evaluate_generator`'s held-out cross-entropy
and, on ``digits`` (class generators) or ``shapes`` (text generators), the judge's scores; for a
tokenizer it reconstructs the held-out split of the run's data set (or of ``--data``), prints a table
and writes ``<DIR>/eval.json``:

- PSNR and SSIM of ``to_rgb`` pictures in [0, 1] (per image, then the mean; :mod:`models.metrics`),
- codebook usage, perplexity and dead codes per level over the whole held-out set,
- tokens per image per level, and bits per image (tokens per image times log2 K, summed over levels),
- encode and decode throughput (images/s, eval mode, no autograd).

The digits judge (:func:`digits_judge`): a small CNN trained here, deterministically, on the ``digits``
training split (97.8% held-out accuracy at 32 x 32; it refuses to judge below 95%), cached under
``~/.cache/vqkernels``. :func:`judge_generator` asks a 10-class generator for samples of every class
and reports the share classified as the requested class (overall and per class) and a "classifier
FID": the Frechet distance between Gaussians fitted to the judge's 64-d features of the samples and
of the held-out digits.

The shapes judge (:func:`shapes_judge`, :class:`ShapesJudge`): a small U-Net segmenting each pixel into
background / rectangle / round / triangle, trained here (deterministically, about a minute on one CPU
thread, cached like the digits judge) on the ``shapes`` training scenes and their scene maps; objects
are the connected pixels of one palette colour (colour read from the pixels: the nearest colour of
``data._PALETTE``), each takes its pixels' majority kind, and round ones are circles or ellipses by
their elongation. At 32 x 32 on the 2000 held-out scenes it accepts 99.9% of the real captions
(:meth:`ShapesJudge.caption_match`), rejects 100% of captions whose first object has another colour or
kind (and every caption on pixel noise or smooth random colour fields), and segments with mean IoU 0.88 (background, rectangle and triangle >= 0.98; circle and ellipse
about 0.7, the limit of the data: about 30% of skimage's ellipses are round within 10%, and the
judge calls those circles). It refuses to judge below 90%. :func:`judge_text_generator` asks a
text-conditioned generator for samples of held-out captions (and scene maps, for Make-A-Scene) and
reports the caption-match rate (per kind and colour of the first object), the classifier FID on the
judge's 48-d features, the scene maps' mean IoU, the caption match of the tokenizer's own
reconstructions (the ceiling), and for a generator that captions (UniCode) its exact-match rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import vqkernels

from .checkpoint import WEIGHTS, latest_checkpoint, load_model, read_run_config
from .config import DataConfig, from_dict
from .data import _PALETTE, build_dataset, collate, describe
from .metrics import CodebookStats, bits_per_image, psnr, ssim, to_unit


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    """The batch's tensors on ``device`` (lists such as captions as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def level_indices(ids, sizes: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """What ``encode`` returned as ``{level: ids}``: a tuple with one tensor per level of
    ``codebook_sizes()``, in that order, or (residual quantizers) one tensor with the levels stacked
    on its last dimension."""
    parts = tuple(ids) if isinstance(ids, (tuple, list)) else (ids,)
    if len(parts) == 1 and len(sizes) > 1 and parts[0].shape[-1] == len(sizes):
        parts = parts[0].unbind(-1)
    if len(parts) != len(sizes):
        raise ValueError(f"encode returned {len(parts)} tensor(s) for {len(sizes)} codebook level(s) "
                         f"{list(sizes)}: a model's encode gives one id tensor per codebook_sizes() level, in order "
                         "(or one with the levels stacked on its last dimension)")
    return dict(zip(sizes, parts))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 64, device="cpu", max_images: int = 0) -> Dict[str, Any]:
    """PSNR, SSIM, codebook statistics, bits per image and throughput of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    sizes = model.codebook_sizes()
    stats = CodebookStats(sizes, device)
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    scores = {"psnr": [], "ssim": []}
    bits, tokens, enc_time, dec_time = None, {}, 0.0, 0.0
    try:
        for start in range(0, n, batch_size):
            batch = to_device(collate([dataset[i] for i in range(start, min(n, start + batch_size))]), device)
            x = model.inputs(batch)
            _sync(device)
            t0 = time.perf_counter()
            ids = model.encode(x)
            _sync(device)
            t1 = time.perf_counter()
            y = model.decode(ids)
            _sync(device)
            enc_time, dec_time = enc_time + t1 - t0, dec_time + time.perf_counter() - t1
            a, b = to_unit(model.to_rgb(x)), to_unit(model.to_rgb(y))
            scores["psnr"].append(psnr(a, b).cpu())
            scores["ssim"].append(ssim(a, b).cpu())
            if sizes:
                levels = level_indices(ids, sizes)
                stats.update(levels)
                bits = bits_per_image(levels, sizes)
                tokens = {k: levels[k][0].numel() for k in sizes}
    finally:
        model.train(was_training)
    return {"images": n, "psnr": torch.cat(scores["psnr"]).mean().item(),
            "ssim": torch.cat(scores["ssim"]).mean().item(), "bits_per_image": bits, "tokens_per_image": tokens,
            "codebooks": stats.summary(), "encode_images_per_s": n / max(enc_time, 1e-9),
            "decode_images_per_s": n / max(dec_time, 1e-9)}


def format_summary(result: Dict[str, Any]) -> str:
    """A small text table of :func:`evaluate`'s result."""
    lines = [f"held-out images  {result['images']}",
             f"PSNR             {result['psnr']:.2f} dB",
             f"SSIM             {result['ssim']:.4f}"]
    if result["bits_per_image"] is not None:
        lines.append(f"bits per image   {result['bits_per_image']:.0f}")
    lines.append(f"encode           {result['encode_images_per_s']:.1f} images/s")
    lines.append(f"decode           {result['decode_images_per_s']:.1f} images/s")
    if result["codebooks"]:
        lines.append(f"{'level':<16} {'K':>7} {'usage':>7} {'perplexity':>11} {'dead':>7}")
        for level, s in result["codebooks"].items():
            lines.append(f"{level:<16} {s['codes']:>7} {s['usage']:>7.1%} {s['perplexity']:>11.1f} {s['dead']:>7}")
    return "\n".join(lines)


@torch.no_grad()
def reconstruction_grid(model, dataset, count: int, device="cpu", columns: int = 8) -> np.ndarray:
    """The first ``count`` images of ``dataset`` and their reconstructions as one uint8 HWC picture:
    rows of originals, each above the row of its reconstructions."""
    was_training = model.training
    model.eval()
    try:
        batch = to_device(collate([dataset[i] for i in range(min(count, len(dataset)))]), device)
        x = model.inputs(batch)
        pics = [to_unit(model.to_rgb(x)), to_unit(model.to_rgb(model.reconstruct(x)))]
    finally:
        model.train(was_training)
    n, _, h, w = pics[0].shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = torch.ones(rows * 2, columns, 3, h, w)
    for i in range(n):
        canvas[2 * (i // columns), i % columns] = pics[0][i].cpu()
        canvas[2 * (i // columns) + 1, i % columns] = pics[1][i].cpu()
    grid = canvas.permute(0, 3, 1, 4, 2).reshape(rows * 2 * h, columns * w, 3)
    return (grid * 255).round().to(torch.uint8).numpy()


def save_png(picture: np.ndarray, path):
    """Writes a uint8 HWC picture as PNG (through a temporary file and a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(picture).save(tmp, format="PNG")
    tmp.replace(path)


# ---------------------------------------------------------------- generators and their judge

JUDGE_VERSION = 1
JUDGE_MIN_ACCURACY = 0.95


class DigitsJudge(nn.Module):
    """The suite's judge of generated digits: a small CNN (three 3x3 conv layers, a 64-d feature layer,
    10 logits) over the grey 32x32 image (inputs of any side are resized bilinearly)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(64 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """64-d features of images [B, 3, H, W] in [-1, 1]."""
        x = images.float().mean(1, keepdim=True)
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self.features(self.convs(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


@functools.lru_cache(maxsize=4)
def _judge_sets(resolution: int):
    """The digits training and held-out splits at ``resolution``, each collated in one batch (read-only)."""
    cfg = DataConfig(name="digits", hflip=False)
    return [collate([d[i] for i in range(len(d))]) for d in
            (build_dataset(cfg, resolution, split) for split in ("train", "holdout"))]


def _shift(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1/8 of the side (the judge's augmentation)."""
    side = images.shape[-1]
    m = max(side // 8, 1)
    dx, dy = (int(v) for v in torch.randint(-m, m + 1, (2,), generator=g))
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def digits_judge(resolution: int = 32, seed: int = 0, cache_dir: Optional[str] = None) -> Tuple[DigitsJudge, float]:
    """The judge and its held-out accuracy, trained on the ``digits`` training split at ``resolution``
    (deterministic for a seed: 30 epochs of Adam, batch 64, random shifts) and cached in ``cache_dir``
    (default ``$VQK_CACHE`` or ``~/.cache/vqkernels``). Raises RuntimeError below 95% held-out accuracy."""
    root = Path(cache_dir or os.environ.get("VQK_CACHE", Path.home() / ".cache" / "vqkernels"))
    path = root / f"digits-judge-v{JUDGE_VERSION}-r{resolution}-s{seed}.safetensors"
    judge = DigitsJudge()
    train, holdout = _judge_sets(resolution)
    if path.is_file():
        judge.load_state_dict(load_file(str(path)))
    else:
        with torch.random.fork_rng(), torch.enable_grad():  # also when called under no_grad (judge_generator)
            torch.manual_seed(seed)
            judge = DigitsJudge()
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
            n = train["label"].numel()
            for _ in range(30):
                for idx in torch.randperm(n, generator=g).split(64):
                    loss = F.cross_entropy(judge(_shift(train["image"][idx], g)), train["label"][idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(judge.state_dict(), str(tmp))
        tmp.replace(path)
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (judge(holdout["image"]).argmax(1) == holdout["label"]).float().mean().item()
    if accuracy < JUDGE_MIN_ACCURACY:
        raise RuntimeError(f"the digits judge reaches only {accuracy:.1%} held-out accuracy (< 95%)")
    return judge, accuracy


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to feature rows ``a`` and ``b`` ([N, D] each)."""
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * 1e-6  # dead (always-zero) ReLU features make the covariances singular
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def judge_generator(generator, n_per_class: int = 20, seed: int = 0, batch_size: int = 100,
                    **sample_kwargs) -> Dict[str, Any]:
    """Asks a class-conditional ``digits`` generator for ``n_per_class`` samples of each class and scores
    them with :func:`digits_judge`: ``accuracy`` (share classified as the requested class), ``per_class``
    accuracies, ``fid`` (Frechet distance of the judge's features, samples vs the held-out images),
    ``judge_accuracy`` (the judge's own held-out accuracy) and ``samples_per_s``."""
    if generator.num_classes != 10:
        raise ValueError(f"judge_generator: the digits judge needs a 10-class generator, not {generator.num_classes}")
    device = next(generator.parameters()).device
    judge, judge_accuracy = digits_judge(generator.tokenizer.cfg.resolution)
    judge = judge.to(device)
    labels = torch.arange(10, device=device).repeat_interleave(n_per_class)
    predictions, features, elapsed = [], [], 0.0
    for i, chunk in enumerate(labels.split(batch_size)):
        _sync(device)
        t0 = time.perf_counter()
        images = generator.sample(chunk.numel(), chunk, seed=seed + i, **sample_kwargs).images
        _sync(device)
        elapsed += time.perf_counter() - t0
        predictions.append(judge(images).argmax(1))
        features.append(judge.embed(images))
    predictions = torch.cat(predictions)
    correct = (predictions == labels).float().view(10, n_per_class).mean(1)
    _, holdout = _judge_sets(generator.tokenizer.cfg.resolution)
    real = judge.embed(holdout["image"].to(device))
    return {"accuracy": correct.mean().item(), "per_class": correct.tolist(), "min_class_accuracy": correct.min().item(),
            "fid": frechet_distance(torch.cat(features), real), "judge_accuracy": judge_accuracy,
            "samples": labels.numel(), "samples_per_s": labels.numel() / max(elapsed, 1e-9)}


# ---------------------------------------------------------------- the judge of shapes and captions

SHAPES_JUDGE_VERSION = 1
SHAPES_JUDGE_MIN_ACCURACY = 0.9
SHAPES_JUDGE_MIN_RESOLUTION = 32   # text generators are judged on shapes at 32 pixels or more
SHAPES_JUDGE_IMAGES = 4000      # training scenes (the first of the shapes training split)
SHAPES_JUDGE_EPOCHS = 5
ROUND_ELONGATION = 1.1          # a round object is a circle when sqrt(largest / smallest second moment) is below
MATCH_FRACTION = 0.01           # caption_match: share of the image the named object must cover (10 pixels at 32)
MIN_BACKGROUND = 0.4            # caption_match: share of the image that must be background (white ground)
_BACKGROUND, _RECTANGLE, _CIRCLE, _TRIANGLE, _ELLIPSE = range(5)   # data.py's scene classes
_ROUND = 2                      # the net's classes: 0 background, 1 rectangle, 2 round (circle or ellipse), 3 triangle
_NET_CLASS = torch.tensor([0, 1, 2, 3, 2])   # scene class -> net class
_KINDS = ("rectangle", "circle", "triangle", "ellipse")   # data._SHAPE_KINDS, scene classes 1..4
_OBJECT = re.compile(r"^\s*an? (\w+) (\w+)\b")


def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class ShapesJudge(nn.Module):
    """The suite's judge of ``shapes`` images: what is where, in which colour.

    A small U-Net (widths 16 / 32 / 48 / 48 at sides R, R/2, R/4, R/8; the bottleneck adds its global
    mean, so every pixel sees the whole scene) labels each pixel background, rectangle, round or
    triangle; it never reads colour (trained on colour-channel permutations). Colour is read from the
    pixels: each pixel's nearest colour of ``data._PALETTE``. An object is a set of 8-connected
    non-background pixels of one colour (a scene's shapes have distinct colours); it takes the kind most
    of its pixels have, and a round object is split by geometry: a circle when the square root of its
    pixel coordinates' covariance eigenvalue ratio is below :data:`ROUND_ELONGATION` (1.1), an ellipse
    otherwise. (skimage's ellipses draw both radii independently, so some are round: no judge tells those
    from circles, and the rule says what this one does.) :meth:`segment` gives data.py's scene classes
    (0 background, 1 rectangle, 2 circle, 3 triangle, 4 ellipse) per pixel.
    """

    def __init__(self, resolution: int = 32):
        super().__init__()
        if resolution < 16 or resolution % 8:
            raise ValueError(f"the shapes judge needs a resolution >= 16 divisible by 8, got {resolution}")
        self.resolution = resolution
        self.down = nn.ModuleList([_conv(3, 16), nn.Sequential(_conv(16, 32), _conv(32, 32)),
                                   nn.Sequential(_conv(32, 48), _conv(48, 48), _conv(48, 48)),
                                   nn.Sequential(_conv(48, 48), _conv(48, 48))])
        self.up = nn.ModuleList([_conv(96, 48), _conv(80, 32), _conv(48, 16)])
        self.head = nn.Conv2d(16, 4, 1)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def _features(self, images: torch.Tensor):
        skips, x = [], self._inputs(images)
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        return skips[:-1], x + x.mean((2, 3), keepdim=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """48-d features of images [B, 3, H, W] in [-1, 1]: the bottleneck's global mean."""
        return self._features(images)[1].mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, 4, R, R] of background, rectangle, round, triangle."""
        skips, x = self._features(images)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
        return self.head(x)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Scene classes int64 [B, R, R] (0 background, 1 rectangle, 2 circle, 3 triangle, 4 ellipse)."""
        return label_objects(self(images).argmax(1), palette_colours(self._inputs(images)))

    @torch.no_grad()
    def caption_match(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """bool [B]: whether each image shows its caption's first-named (largest) object. The rule: the
        pixels segmented as the named kind (:meth:`segment`; "ellipse" also accepts circle pixels: a circle
        is an ellipse, and skimage's ellipses are often round) whose nearest palette colour is the named
        one hold a 4-connected piece of at least ``MATCH_FRACTION`` of the image (10 pixels at 32 x 32;
        the smallest first-named object of the held-out scenes has 30), and at least ``MIN_BACKGROUND``
        (40%) of the image is segmented background: figures on a white ground. (Held-out scenes are at
        least 47% background, smooth random colour fields at most about 16%: without that condition a
        field of random colours matches a third of the captions; with it none, nor does pixel noise.)"""
        if len(captions) != images.shape[0]:
            raise ValueError(f"caption_match: {len(captions)} captions for {images.shape[0]} images")
        x = self._inputs(images)
        return self.match_segments(self.segment(x), palette_colours(x), captions)

    def match_segments(self, segments: torch.Tensor, colours: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """:meth:`caption_match` of images already segmented (``segments`` and ``colours`` [B, R, R])."""
        colour, kind = (torch.tensor(v, device=segments.device) for v in zip(*(first_object(c) for c in captions)))
        kind, colour = kind[:, None, None], colour[:, None, None]
        shape_ok = (segments == kind) | ((kind == _ELLIPSE) & (segments == _CIRCLE))
        pieces = torch.tensor([_largest_piece(m) for m in (shape_ok & (colours == colour)).cpu().numpy()],
                              device=segments.device)
        ground = (segments == _BACKGROUND).flatten(1).float().mean(1)
        return (pieces >= max(1, round(MATCH_FRACTION * segments[0].numel()))) & (ground >= MIN_BACKGROUND)


def _largest_piece(named: np.ndarray) -> int:
    """Pixels of the largest 4-connected piece of a bool map (0 when it is empty)."""
    labels, count = scipy.ndimage.label(named)
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


def _palette() -> Tuple[List[str], torch.Tensor]:
    """The names and [-1, 1] RGB values [6, 3] of data.py's shape colours."""
    return list(_PALETTE), torch.tensor(list(_PALETTE.values()), dtype=torch.float32) / 127.5 - 1.0


def palette_colours(images: torch.Tensor) -> torch.Tensor:
    """The nearest colour of the palette (index into ``data._PALETTE``) of every pixel: int64 [B, H, W]."""
    palette = _palette()[1].to(images.device)
    pixels = images.float().permute(0, 2, 3, 1).reshape(-1, 3)
    return vqkernels.nearest_code(pixels, palette)[0].view(images.shape[0], *images.shape[2:])


def label_objects(classes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Scene classes [B, H, W] from the net's classes [B, H, W] and the pixels' palette colours: an object
    is a set of 8-connected non-background pixels of one palette colour; it takes the class most of its
    pixels have, and a round object is a circle when sqrt(largest / smallest eigenvalue of its pixel
    coordinates' covariance) < :data:`ROUND_ELONGATION`, an ellipse otherwise."""
    net = classes.cpu().numpy()
    colours = colours.cpu().numpy()
    out = np.zeros_like(net)
    rows, cols = np.indices(net.shape[1:], dtype=np.float64)
    for b in range(net.shape[0]):
        fore = net[b] != _BACKGROUND
        for c in np.unique(colours[b][fore]):
            labels, count = scipy.ndimage.label(fore & (colours[b] == c), structure=np.ones((3, 3)))
            for k in range(1, count + 1):
                obj = labels == k
                kind = int(np.bincount(net[b][obj], minlength=4)[1:].argmax()) + 1
                if kind == _ROUND:
                    ev = np.linalg.eigvalsh(np.cov(np.stack([rows[obj], cols[obj]]))) if obj.sum() > 2 else (0, 1)
                    kind = _CIRCLE if ev[0] > 0 and math.sqrt(ev[1] / ev[0]) < ROUND_ELONGATION else _ELLIPSE
                out[b][obj] = kind
    return torch.from_numpy(out).to(classes.device)


def first_object(caption: str) -> Tuple[int, int]:
    """(palette index, scene class 1..4) of the first object a ``shapes`` caption names ("a red circle ...")."""
    m = _OBJECT.match(caption)
    if not m or m[1] not in _PALETTE or m[2] not in _KINDS:
        raise ValueError(f"caption {caption!r} does not start with a shapes object 'a|an COLOUR KIND' (colours: "
                         f"{', '.join(_PALETTE)}; kinds: {', '.join(_KINDS)})")
    return list(_PALETTE).index(m[1]), _KINDS.index(m[2]) + 1


def altered_captions(captions: Sequence[str]) -> List[str]:
    """Two wrong first objects per caption: its colour replaced by the next palette colour the caption does
    not name, and its kind by the next kind (rectangle -> circle -> triangle -> ellipse -> rectangle)."""
    names = list(_PALETTE)
    out = []
    for caption in captions:
        colour, kind = first_object(caption)
        named = set(re.findall(r"\b(" + "|".join(names) + r")\b", caption))
        other = next(names[(colour + j) % len(names)] for j in range(1, len(names))
                     if names[(colour + j) % len(names)] not in named)
        rest = caption[_OBJECT.match(caption).end():]
        out += [f"{'an' if other[0] in 'aeiou' else 'a'} {other} {_KINDS[kind - 1]}{rest}",
                f"{'an' if names[colour][0] in 'aeiou' else 'a'} {names[colour]} {_KINDS[kind % 4]}{rest}"]
    return out


def mean_iou(predicted: torch.Tensor, target: torch.Tensor, classes: int = 5) -> Tuple[float, List[float]]:
    """Mean IoU over the classes present in either map (and each class's IoU, NaN when absent) of class maps
    [B, H, W], intersections and unions summed over the batch; ``target`` is resized (nearest) to
    ``predicted``'s side when they differ."""
    target = target.to(predicted.device)
    if target.shape[-2:] != predicted.shape[-2:]:
        target = F.interpolate(target[:, None].float(), size=predicted.shape[-2:], mode="nearest")[:, 0].long()
    ious = []
    for c in range(classes):
        union = ((predicted == c) | (target == c)).sum().item()
        ious.append(((predicted == c) & (target == c)).sum().item() / union if union else float("nan"))
    present = [v for v in ious if not math.isnan(v)]
    return sum(present) / len(present), ious


@functools.lru_cache(maxsize=4)
def _shapes_set(resolution: int, split: str):
    """The shapes judge's training scenes (the first of the training split) or the held-out split at
    ``resolution``, collated in one batch (read-only)."""
    data = build_dataset(DataConfig(name="shapes", hflip=False), resolution, split)
    n = min(SHAPES_JUDGE_IMAGES, len(data)) if split == "train" else len(data)
    return collate([data[i] for i in range(n)])


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What a tokenizer does to a picture, roughly: a third of the batches blurred (a 3x3 box) and a third
    brought to half the side and back (bilinear), then a colour offset per image and channel (up to 0.1)
    and Gaussian noise (sigma up to 0.1)."""
    kind = int(torch.randint(3, (), generator=g))
    if kind == 1:
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    elif kind == 2:
        side = x.shape[-1]
        x = F.interpolate(F.interpolate(x, size=side // 2, mode="bilinear", antialias=True), size=side,
                          mode="bilinear")
    x = x + 0.1 * (2 * torch.rand(x.shape[0], 3, 1, 1, generator=g) - 1)
    return x + 0.1 * torch.rand((), generator=g) * torch.randn(x.shape, generator=g)


def _train_shapes_judge(resolution: int, seed: int) -> ShapesJudge:
    """Adam with a one-cycle schedule, batch 32; augmented by colour-channel permutations (the net does not
    read colour), horizontal flips and :func:`_degrade`."""
    train = _shapes_set(resolution, "train")
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        judge = ShapesJudge(resolution)
        g = torch.Generator().manual_seed(seed)
        n = train["image"].shape[0]
        opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=SHAPES_JUDGE_EPOCHS * (n // 32))
        target = _NET_CLASS[train["scene"]]
        for _ in range(SHAPES_JUDGE_EPOCHS):
            for idx in torch.randperm(n, generator=g)[:n // 32 * 32].split(32):
                x, y = train["image"][idx][:, torch.randperm(3, generator=g)], target[idx]
                if torch.rand((), generator=g) < 0.5:
                    x, y = x.flip(-1), y.flip(-1)
                x = _degrade(x, g)
                loss = F.cross_entropy(judge(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    return judge


@functools.lru_cache(maxsize=4)
def _shapes_judge_state(resolution: int, seed: int, cache_dir: Optional[str]):
    root = Path(cache_dir or os.environ.get("VQK_CACHE", Path.home() / ".cache" / "vqkernels"))
    path = root / f"shapes-judge-v{SHAPES_JUDGE_VERSION}-r{resolution}-s{seed}.safetensors"
    judge = ShapesJudge(resolution)
    if path.is_file():
        judge.load_state_dict(load_file(str(path)))
    else:
        judge = _train_shapes_judge(resolution, seed)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(judge.state_dict(), str(tmp))
        tmp.replace(path)
    judge.eval().requires_grad_(False)
    holdout = _shapes_set(resolution, "holdout")
    with torch.no_grad():
        captions = holdout["caption"]
        segments, colours = judge.segment(holdout["image"]), palette_colours(holdout["image"])
        accuracy = judge.match_segments(segments, colours, captions).float().mean().item()
        wrong = judge.match_segments(segments.repeat_interleave(2, 0), colours.repeat_interleave(2, 0),
                                     altered_captions(captions))
        iou, per_class = mean_iou(segments, holdout["scene"])
    scores = {"accuracy": accuracy, "rejection": 1.0 - wrong.float().mean().item(), "iou": iou,
              "per_class_iou": per_class, "images": len(captions)}
    return judge.state_dict(), scores


def shapes_judge(resolution: int = 32, seed: int = 0, cache_dir: Optional[str] = None
                 ) -> Tuple[ShapesJudge, Dict[str, Any]]:
    """The shapes judge and its scores on the held-out ``shapes`` split (2000 scenes at the default 20000):
    ``accuracy`` (share of real images whose real caption :meth:`ShapesJudge.caption_match` accepts),
    ``rejection`` (share of :func:`altered_captions`, wrong colour or wrong kind, it refuses), ``iou`` (mean
    IoU of its segmentation with the real scene maps; ``per_class_iou``). Trained deterministically for a
    seed on the first 4000 training scenes (5 epochs, well under a minute on one CPU thread) and cached in
    ``cache_dir`` (default ``$VQK_CACHE`` or ``~/.cache/vqkernels``). Raises RuntimeError below 90% accuracy."""
    state, scores = _shapes_judge_state(resolution, seed, cache_dir)
    judge = ShapesJudge(resolution)
    judge.load_state_dict(state)
    judge.eval().requires_grad_(False)
    if scores["accuracy"] < SHAPES_JUDGE_MIN_ACCURACY:
        raise RuntimeError(f"the shapes judge accepts only {scores['accuracy']:.1%} of the held-out images' own "
                           f"captions (< {SHAPES_JUDGE_MIN_ACCURACY:.0%})")
    return judge, dict(scores)


def reads_scene(generator) -> bool:
    """Whether a generator samples from a scene map too (it overrides ``sampling_condition``: Make-A-Scene)."""
    from .generator import Generator
    return type(generator).sampling_condition is not Generator.sampling_condition


def judgeable(generator, data_name: str) -> bool:
    """Whether the suite has a judge for ``generator`` trained on data set ``data_name``: a 10-class
    generator on ``digits`` (:func:`judge_generator`), a text-conditioned one on ``shapes``
    (:func:`judge_text_generator`) at ``SHAPES_JUDGE_MIN_RESOLUTION`` pixels or more (below it the judge
    cannot tell the shapes apart reliably: 87% of real 16-pixel captions)."""
    if generator.conditioning == "text":
        return data_name == "shapes" and generator.tokenizer.cfg.resolution >= SHAPES_JUDGE_MIN_RESOLUTION
    return data_name == "digits" and generator.num_classes == 10


def _groups(captions: Sequence[str], matched: Sequence[bool]) -> Dict[str, Dict[str, float]]:
    """Caption-match rates grouped by the first object's kind and by its colour."""
    names = list(_PALETTE)
    out: Dict[str, Dict[str, float]] = {"kind": {}, "colour": {}}
    keys = (("kind", lambda c: _KINDS[first_object(c)[1] - 1]), ("colour", lambda c: names[first_object(c)[0]]))
    for group, key in keys:
        hits: Dict[str, List[bool]] = {}
        for caption, ok in zip(captions, matched):
            hits.setdefault(key(caption), []).append(bool(ok))
        out[group] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return out


def _plain(caption: str) -> str:
    """A caption compared for captioning's exact match: lower case, single spaces, none before punctuation
    (WordPiece decoding writes "circle , a")."""
    return re.sub(r" ([,.;:!?])", r"\1", " ".join(caption.lower().split()))


@torch.no_grad()
def judge_text_generator(generator, captions: Sequence[str], scenes: Optional[torch.Tensor] = None,
                         per_caption: int = 1, images: Optional[torch.Tensor] = None, seed: int = 0,
                         batch_size: int = 100, **sample_kwargs) -> Dict[str, Any]:
    """Asks a text-conditioned ``shapes`` generator for ``per_caption`` samples of each caption (with its
    scene map of ``scenes`` [N, H, W] too, for a generator that reads scene maps) and scores them with
    :func:`shapes_judge`: ``caption_match`` (share of samples showing their caption's first object,
    :meth:`ShapesJudge.caption_match`), ``per_kind`` and ``per_colour`` rates with the lowest group
    (``min_group``, ``min_group_match``), ``fid`` (Frechet distance of the judge's 48-d features, samples vs
    the held-out shapes), with ``scenes`` ``scene_iou`` (mean IoU of the judge's segmentation of the samples
    with the given maps; ``scene_per_class_iou``), given the real ``images`` of the captions
    ``tokenizer_caption_match`` (the caption match of the tokenizer's reconstructions of them: what the
    generator can reach at best) and, for a generator with a ``caption(images)`` method (UniCode; a list
    of strings), ``caption_exact`` (share of its captions equal to the real ones, case and spacing
    aside; ``caption_examples``: the first [real, generated] pairs), the judge's own held-out
    ``judge_accuracy``, ``judge_rejection``, ``judge_iou``, and ``samples_per_s``."""
    if generator.conditioning != "text":
        raise ValueError(f"judge_text_generator: {type(generator).__name__} is not text-conditioned")
    if not captions:
        raise ValueError("judge_text_generator: no captions")
    if scenes is not None and scenes.shape[0] != len(captions):
        raise ValueError(f"judge_text_generator: {scenes.shape[0]} scene maps for {len(captions)} captions")
    for c in captions:
        first_object(c)
    device = next(generator.parameters()).device
    judge, own = shapes_judge(generator.tokenizer.cfg.resolution)
    judge = judge.to(device)
    prompts = [c for c in captions for _ in range(per_caption)]
    maps = None if scenes is None else scenes.to(device).repeat_interleave(per_caption, 0)
    matched, features, segments, elapsed = [], [], [], 0.0
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        extra = {} if maps is None else {"scene": maps[start:start + batch_size]}
        _sync(device)
        t0 = time.perf_counter()
        out = generator.sample(len(chunk), prompt=chunk, seed=seed + i, **extra, **sample_kwargs).images
        _sync(device)
        elapsed += time.perf_counter() - t0
        segmented = judge.segment(out)
        matched.append(judge.match_segments(segmented, palette_colours(judge._inputs(out)), chunk).cpu())
        features.append(judge.embed(out))
        if maps is not None:
            segments.append(segmented)
    matched = torch.cat(matched)
    groups = _groups(prompts, matched.tolist())
    lowest = min(((k, v) for g in groups.values() for k, v in g.items()), key=lambda kv: kv[1])
    holdout = _shapes_set(generator.tokenizer.cfg.resolution, "holdout")
    result = {"caption_match": matched.float().mean().item(), "per_kind": groups["kind"],
              "per_colour": groups["colour"], "min_group": lowest[0], "min_group_match": lowest[1],
              "fid": frechet_distance(torch.cat(features), judge.embed(holdout["image"].to(device))),
              "judge_accuracy": own["accuracy"], "judge_rejection": own["rejection"], "judge_iou": own["iou"],
              "samples": len(prompts), "samples_per_s": len(prompts) / max(elapsed, 1e-9)}
    if maps is not None:
        result["scene_iou"], result["scene_per_class_iou"] = mean_iou(torch.cat(segments), maps)
    if images is not None:  # the ceiling: the judge on the tokenizer's reconstructions of the real images
        tok = generator.tokenizer
        recon = [tok.to_rgb(tok.reconstruct(tok.inputs({"image": chunk}))) for chunk in images.to(device).split(batch_size)]
        result["tokenizer_caption_match"] = judge.caption_match(torch.cat(recon), list(captions)).float().mean().item()
    if images is not None and callable(getattr(generator, "caption", None)):
        texts = [t for chunk in images.to(device).split(batch_size) for t in generator.caption(chunk)]
        if len(texts) != len(captions):
            raise ValueError(f"{type(generator).__name__}.caption gave {len(texts)} captions for {len(captions)} images")
        result["caption_exact"] = sum(_plain(a) == _plain(b) for a, b in zip(texts, captions)) / len(captions)
        result["caption_examples"] = [[b, a] for a, b in zip(texts[:4], captions[:4])]
    return result


@torch.no_grad()
def sample_grid(generator, per_class: int = 8, seed: int = 0, prompts: Sequence[str] = ("",),
                **sample_kwargs) -> np.ndarray:
    """A uint8 HWC picture of samples: one row per class (``per_class`` columns), for a text-conditioned
    generator one row per prompt of ``prompts``, or for an unconditional generator ``per_class`` rows of 8."""
    if generator.conditioning == "text":
        texts = [t for t in prompts for _ in range(per_class)]
        out = generator.sample(len(texts), prompt=texts, seed=seed, **sample_kwargs)
        return image_grid(out.images, per_class)
    if generator.num_classes:
        labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
        columns = per_class
        out = generator.sample(labels.numel(), labels, seed=seed, **sample_kwargs)
    else:
        columns = 8
        out = generator.sample(per_class * columns, seed=seed, **sample_kwargs)
    return image_grid(out.images, columns)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """A uint8 HWC picture of images [n, 3, H, W] in [-1, 1], ``columns`` per row (white fill)."""
    pics = to_unit(images).cpu()
    n, _, h, w = pics.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    canvas = torch.ones(rows * columns, 3, h, w)
    canvas[:n] = pics
    out = canvas.view(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, 3)
    return (out * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def evaluate_generator(generator, dataset, batch_size: int = 64, device="cpu", max_images: int = 0,
                       judge: bool = False, judge_per_class: int = 20, **sample_kwargs) -> Dict[str, Any]:
    """A generator's held-out cross-entropy (``nll``: nats per token, and ``bits_per_token``; the training
    step's ``logs["nll"]``, the image tokens' alone where the loss also weighs text, as DALL-E's) on the
    codes of ``dataset``'s images with their labels or captions, and with ``judge`` the judge's scores under
    ``judge_`` (samples drawn with ``sample_kwargs``): for a 10-class ``digits`` model
    :func:`judge_generator`'s (``judge_per_class`` samples per class), for a text-conditioned ``shapes``
    model :func:`judge_text_generator`'s, one sample for each caption of the first ``10 * judge_per_class``
    held-out images (with their scene maps for a generator that reads them, and their images for one that
    captions)."""
    was_training = generator.training
    generator.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("evaluate_generator: the data set is empty")
    total = 0.0
    try:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            batch = to_device(collate([dataset[i] for i in idx]), device)
            total += generator.training_step(batch, 0).logs["nll"].item() * len(idx)
        result = {"images": n, "nll": total / n, "bits_per_token": total / n / math.log(2)}
        if judge and generator.conditioning == "text":
            held = collate([dataset[i] for i in range(min(len(dataset), 10 * judge_per_class))])
            scenes = held["scene"] if reads_scene(generator) else None
            scores = judge_text_generator(generator, held["caption"], scenes, images=held["image"],
                                          batch_size=batch_size, **sample_kwargs)
            result.update({f"judge_{k}": v for k, v in scores.items()})
        elif judge:
            result.update({f"judge_{k}": v for k, v in judge_generator(generator, judge_per_class, **sample_kwargs).items()})
    finally:
        generator.train(was_training)
    return result


def format_generator_summary(result: Dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_generator`'s result."""
    lines = [f"held-out images  {result['images']}",
             f"cross-entropy    {result['nll']:.4f} nats/token ({result['bits_per_token']:.3f} bits)"]
    if "judge_caption_match" in result:
        lines.append(f"caption match    {result['judge_caption_match']:.1%} of {result['judge_samples']} samples "
                     f"(lowest group {result['judge_min_group']} {result['judge_min_group_match']:.1%}; judge "
                     f"{result['judge_judge_accuracy']:.1%} on held-out shapes, rejects "
                     f"{result['judge_judge_rejection']:.1%} of wrong captions, mean IoU {result['judge_judge_iou']:.3f})")
        if "judge_tokenizer_caption_match" in result:
            lines.append(f"tokenizer        {result['judge_tokenizer_caption_match']:.1%} caption match of its "
                         "reconstructions of the held-out images (the ceiling)")
        if "judge_scene_iou" in result:
            lines.append(f"scene map IoU    {result['judge_scene_iou']:.3f} (judge's segmentation of the samples "
                         "vs the given maps)")
        if "judge_caption_exact" in result:
            lines.append(f"captioning       {result['judge_caption_exact']:.1%} exact match on held-out images")
    elif "judge_accuracy" in result:
        lines.append(f"class accuracy   {result['judge_accuracy']:.1%} (lowest class {result['judge_min_class_accuracy']:.1%};"
                     f" judge {result['judge_judge_accuracy']:.1%} on held-out digits)")
    if "judge_fid" in result:
        lines += [f"classifier FID   {result['judge_fid']:.2f}",
                  f"sampling         {result['judge_samples_per_s']:.1f} images/s"]
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m models.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("system")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--data", help="data set name or image folder (default: the run's); its held-out split is used")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N held-out images")
    p.add_argument("--judge-per-class", type=int, default=20,
                   help="generators on digits: samples per class for the judge; text generators on shapes: "
                        "10x this many held-out captions, one sample each (0: no judging)")
    p.add_argument("--temperature", type=float, default=1.0, help="generators: the judge's sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="generators: the judge's top-k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="generators: the judge's top-p (1: off)")
    p.add_argument("--cfg", type=float, default=None, help="generators: the judge's guidance weight (default: none)")
    p.add_argument("--json", default=None, help="where to write the result (default: eval.json in --ckpt)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    target = Path(args.ckpt)
    try:
        device = resolve_device(args.device)
        if (target / WEIGHTS).is_file():
            run_dir, ckpt = target.parent.parent, target
        else:
            run_dir, ckpt = target, latest_checkpoint(target)
        model = load_model(args.system, run_dir, device=device, checkpoint=ckpt)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    saved = read_run_config(run_dir)
    generator = saved.get("stage", "tokenizer") == "generator"
    config_cls = type(model.cfg)
    run = from_dict(saved, config_cls)
    data_cfg = dataclasses.replace(run.data, name=args.data) if args.data else run.data
    if generator:
        holdout = build_dataset(data_cfg, model.tokenizer.cfg.resolution, "holdout")
        judge = judgeable(model, data_cfg.name) and args.judge_per_class > 0
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg=args.cfg)
        result = evaluate_generator(model, holdout, args.batch_size, device, args.max_images, judge=judge,
                                    judge_per_class=args.judge_per_class, **sampling)
        result["sampling"] = sampling
    else:
        holdout = build_dataset(data_cfg, run.model.resolution, "holdout")
        result = evaluate(model, holdout, args.batch_size, device, args.max_images)
    result = {"system": args.system, "checkpoint": str(ckpt), "data": describe(data_cfg), **result}
    print(f"{args.system}  {ckpt}  {result['data']} (held-out split)")
    print(format_generator_summary(result) if generator else format_summary(result))
    with open(args.json or target / "eval.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return 0


def resolve_device(name) -> torch.device:
    """``cpu``, ``cuda`` (an error without a GPU) or None (cuda when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: use cpu or cuda")
    return device


if __name__ == "__main__":
    sys.exit(main())
