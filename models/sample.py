"""``python -m models.sample``: samples a trained generator and writes a grid.

    python -m models.sample SYSTEM --ckpt DIR [--class N ... | --prompt TEXT ...] [--scene MAP]
        [--n 16] [--seed S] [--temperature T]
        [--top-k K] [--top-p P] [--cfg W] [--cfg-schedule constant|linear] [--steps S]
        [--mask-schedule cosine|arccos|linear] [--no-cache] [--columns C] [--device cpu|cuda]
        [--ids FILE] --out grid.png

DIR is a generator run folder (``python -m models.train SYSTEM --stage generator ...``); its newest
checkpoint and the tokenizer its config names are loaded. ``--class`` gives one class id for all
samples or one per sample (default for a class-conditional generator: 0, 1, 2, ... cycling). A
text-conditioned generator takes ``--prompt``: one caption for all samples or one per sample (none,
or "": the unconditional sample; a caption longer than the model's text length is truncated with a
warning); Make-A-Scene also takes ``--scene``, a scene map: a single-channel PNG (or ``.npy``) whose
pixel values are the scene tokenizer's class ids (0: background). The same from Python:
``models.load(SYSTEM, DIR).sample(n, labels, prompt=..., scene=..., seed=..., ...)`` returns the images
and the token ids (see :meth:`models.generator.Generator.sample` and :mod:`models.sampling` for
what each option means). ``--ids`` also saves the token ids (``torch.save``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, read_run_config
from .eval import image_grid, resolve_device, save_png
from .generator import GENERATORS
from .sampling import CFG_SCHEDULES, MASK_SCHEDULES


def read_scene(path: str) -> torch.Tensor:
    """A scene map file as int64 [H, W] class ids: a single-channel PNG (grey or palette: the pixel
    values are the ids) or a 2-d ``.npy`` array."""
    if path.endswith(".npy"):
        array = np.load(path)
    else:
        from PIL import Image
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"scene map {path}: a {im.mode} image; give a single-channel PNG whose pixel "
                                 "values are class ids (grey or palette mode)")
            array = np.array(im)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(f"scene map {path}: expected a 2-d array of integer class ids, got shape "
                         f"{tuple(array.shape)} of {array.dtype}")
    return torch.from_numpy(array.astype("int64"))


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m models.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("system", help="a generator system: " + ", ".join(GENERATORS))
    p.add_argument("--ckpt", required=True, help="the generator's run folder")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="N",
                   help="class id(s): one for all samples or one per sample")
    p.add_argument("--prompt", nargs="+", default=None, metavar="TEXT",
                   help="text-conditioned generators: one caption for all samples or one per sample")
    p.add_argument("--scene", default=None, metavar="MAP",
                   help="make_a_scene: a single-channel PNG or .npy of class ids (the scene tokenizer's classes)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1: off")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight w: uncond + w * (cond - uncond) (default: no guidance)")
    p.add_argument("--cfg-schedule", default="constant", choices=CFG_SCHEDULES,
                   help="constant w, or linear: 1 + (w - 1) * progress (VAR's ramp)")
    p.add_argument("--steps", type=int, default=None, help="parallel decoding steps (maskgit)")
    p.add_argument("--mask-schedule", default="cosine", choices=MASK_SCHEDULES, help="maskgit's mask schedule")
    p.add_argument("--no-cache", action="store_true", help="recompute every prefix (no kv-cache): same samples, slower")
    p.add_argument("--columns", type=int, default=8, help="grid columns")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ids", default=None, help="also save the token ids to this file (torch.save)")
    p.add_argument("--out", required=True, help="the grid's PNG path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        if args.system not in GENERATORS:
            raise ValueError(f"system {args.system!r} has no generator; generators: {', '.join(GENERATORS)}")
        saved = read_run_config(args.ckpt)
        if saved.get("stage", "tokenizer") != "generator":
            raise ValueError(f"{args.ckpt} holds a {saved.get('stage', 'tokenizer')} run of system "
                             f"{saved.get('system')!r}: sampling needs a generator run (--stage generator)")
        device = resolve_device(args.device)
        model = load_model(args.system, args.ckpt, device=device)
        t0 = time.perf_counter()
        scene = read_scene(args.scene) if args.scene else None
        prompt = None if args.prompt is None else args.prompt[0] if len(args.prompt) == 1 else args.prompt
        out = model.sample(args.n, args.classes, prompt=prompt, scene=scene, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, cfg=args.cfg, cfg_schedule=args.cfg_schedule, steps=args.steps,
                           mask_schedule=args.mask_schedule, use_cache=not args.no_cache)
        elapsed = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_png(image_grid(out.images, args.columns), args.out)
    if args.ids:
        Path(args.ids).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ids": out.ids, "labels": out.labels, "seed": args.seed}, args.ids)
    labels = "" if out.labels is None else f" of classes {sorted(set(out.labels.tolist()))}"
    if out.prompts is not None:
        labels = f" of {len(set(out.prompts))} prompt(s)"
    print(f"{args.n} samples{labels} in {elapsed:.2f} s ({args.n / elapsed:.1f} images/s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
