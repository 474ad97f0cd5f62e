"""Held-out evaluation of a trained tokenizer.

``python -m models.eval SYSTEM --ckpt DIR [--data NAME|PATH] [--batch-size B] [--device cpu|cuda]
[--max-images N]`` loads the run folder DIR's newest checkpoint (or DIR itself when it is a
checkpoint folder), reconstructs the held-out split of the run's data set (or of ``--data``), prints
a table and writes ``<DIR>/eval.json``:

- PSNR and SSIM of ``to_rgb`` pictures in [0, 1] (per image, then the mean; :mod:`models.metrics`),
- codebook usage, perplexity and dead codes per level over the whole held-out set,
- tokens per image per level, and bits per image (tokens per image times log2 K, summed over levels),
- encode and decode throughput (images/s, eval mode, no autograd).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from PIL import Image

from . import system
from .checkpoint import WEIGHTS, latest_checkpoint, load_model, read_run_config
from .config import from_dict
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


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m models.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("system")
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--data", help="data set name or image folder (default: the run's); its held-out split is used")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N held-out images")
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
    run = from_dict(read_run_config(run_dir), system(args.system).Model.config_cls)
    data_cfg = dataclasses.replace(run.data, name=args.data) if args.data else run.data
    holdout = build_dataset(data_cfg, run.model.resolution, "holdout")
    result = evaluate(model, holdout, args.batch_size, device, args.max_images)
    result = {"system": args.system, "checkpoint": str(ckpt), "data": describe(data_cfg), **result}
    print(f"{args.system}  {ckpt}  {result['data']} (held-out split)")
    print(format_summary(result))
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
