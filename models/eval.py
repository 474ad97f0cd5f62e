"""Held-out evaluation of a trained tokenizer or generator, and the suite's judge of generated digits.

``python -m models.eval SYSTEM --ckpt DIR [--data NAME|PATH] [--batch-size B] [--device cpu|cuda]
[--max-images N]`` loads the run folder DIR's newest checkpoint (or DIR itself when it is a
checkpoint folder). For a generator run it prints :func:`evaluate_generator`'s held-out cross-entropy
and, on ``digits``, the judge's scores; for a tokenizer it reconstructs the held-out split of the
run's data set (or of ``--data``), prints a table and writes ``<DIR>/eval.json``:

- PSNR and SSIM of ``to_rgb`` pictures in [0, 1] (per image, then the mean; :mod:`models.metrics`),
- codebook usage, perplexity and dead codes per level over the whole held-out set,
- tokens per image per level, and bits per image (tokens per image times log2 K, summed over levels),
- encode and decode throughput (images/s, eval mode, no autograd).

The judge (:func:`digits_judge`): a small CNN trained here, deterministically, on the ``digits``
training split (97.8% held-out accuracy at 32 x 32; it refuses to judge below 95%), cached under
``~/.cache/vqkernels``. :func:`judge_generator` asks a 10-class generator for samples of every class
and reports the share classified as the requested class (overall and per class) and a "classifier
FID": the Frechet distance between Gaussians fitted to the judge's 64-d features of the samples and
of the held-out digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import WEIGHTS, latest_checkpoint, load_model, read_run_config
from .config import DataConfig, from_dict
from .data import build_dataset, collate, describe
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
    """A generator's held-out cross-entropy (``nll``: nats per token, and ``bits_per_token``) on the
    codes of ``dataset``'s images with their labels, and with ``judge`` (a 10-class ``digits`` model)
    :func:`judge_generator`'s scores under ``judge_`` (samples drawn with ``sample_kwargs``)."""
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
            total += generator.training_step(batch, 0).loss.item() * len(idx)
        result = {"images": n, "nll": total / n, "bits_per_token": total / n / math.log(2)}
        if judge:
            result.update({f"judge_{k}": v for k, v in judge_generator(generator, judge_per_class, **sample_kwargs).items()})
    finally:
        generator.train(was_training)
    return result


def format_generator_summary(result: Dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_generator`'s result."""
    lines = [f"held-out images  {result['images']}",
             f"cross-entropy    {result['nll']:.4f} nats/token ({result['bits_per_token']:.3f} bits)"]
    if "judge_accuracy" in result:
        lines += [f"class accuracy   {result['judge_accuracy']:.1%} (lowest class {result['judge_min_class_accuracy']:.1%};"
                  f" judge {result['judge_judge_accuracy']:.1%} on held-out digits)",
                  f"classifier FID   {result['judge_fid']:.2f}",
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
                   help="generators on digits: samples per class for the judge (0: no judging)")
    p.add_argument("--temperature", type=float, default=1.0, help="generators: the judge's sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="generators: the judge's top-k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="generators: the judge's top-p (1: off)")
    p.add_argument("--cfg", type=float, default=None, help="generators: the judge's guidance weight (default: none)")
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
        judge = data_cfg.name == "digits" and model.num_classes == 10 and args.judge_per_class > 0
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
    with open(target / "eval.json", "w", encoding="utf-8") as f:
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
