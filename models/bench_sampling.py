"""``python -m models.bench_sampling``: how fast each decoding scheme samples the same token count.

    python -m models.bench_sampling [--dim 256] [--depth 6] [--heads 8] [--batch 8] [--repeats 3]
        [--threads 2] [--device cpu|cuda] [--dtype float32|bfloat16] [--results models/RESULTS.md]

One process, one width and depth for every transformer, random weights (speed does not depend on
training), class-conditional, 256 tokens in the final 16 x 16 code map, ``generate`` only (the
tokenizer's decode is left out, it is the same for all):

- raster autoregressive (taming's GPT, :mod:`models.gpt`) with the kv-cache: 256 one-token steps;
- the same without the cache (every step recomputes the whole prefix: the same tokens);
- MaskGIT (:mod:`models.maskgit`), 8 parallel steps over the 256 tokens;
- VAR (:mod:`models.var`) next-scale prediction over VAR's scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
  (680 tokens in 10 steps, the last scale being the 16 x 16 map), with its kv-cache, and without it.

Each row is the median of ``repeats`` timed runs after one warm-up, with its speedup over raster
sampling with the cache measured in the same run. Writes the ``<!-- sampling:start -->`` section of
``models/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .gpt import GPT, GPTConfig
from .maskgit import MaskGIT, MaskGITConfig
from .sampling import SamplingConfig
from .var import VAR, VARConfig
from .var_vqvae import VarVQVAE, VarVQVAEConfig
from .vqgan import VQGAN, PRESETS as VQGAN_PRESETS
from .zoo import RESULTS, machine, write_section

START, END = "<!-- sampling:start -->", "<!-- sampling:end -->"
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def build(dim: int, depth: int, heads: int, device, dtype) -> Dict[str, torch.nn.Module]:
    """The generators, all ``dim`` wide and ``depth`` deep, on tokenizers giving a 16 x 16 final map."""
    torch.manual_seed(0)
    vqgan_cfg = VQGAN_PRESETS["tiny"].model
    vqgan = VQGAN(type(vqgan_cfg)(**{**vqgan_cfg.__dict__, "resolution": 64}))
    var_tok = VarVQVAE(VarVQVAEConfig(resolution=64, v_patch_nums=VAR_SCALES))
    models = {"raster": GPT(GPTConfig(dim=dim, depth=depth, heads=heads), vqgan),
              "maskgit": MaskGIT(MaskGITConfig(dim=dim, depth=depth, heads=heads, dropout=0.0), vqgan),
              "var": VAR(VARConfig(embed_dim=dim, depth=depth, num_heads=heads), var_tok)}
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


def _timed(fn: Callable[[], object], repeats: int, device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def measure(models: Dict[str, torch.nn.Module], batch: int, repeats: int, device) -> List[Dict]:
    labels = torch.arange(batch, device=device) % 10

    def run(name: str, **kw):
        params = SamplingConfig(**kw).check()
        with torch.no_grad():
            return models[name].generate(batch, labels, params, torch.Generator(device).manual_seed(0))
    rows = [("raster AR, kv-cache", "raster", 256, 256, {}),
            ("raster AR, no cache", "raster", 256, 256, {"use_cache": False}),
            ("MaskGIT, 8 steps", "maskgit", 256, 8, {"steps": 8}),
            ("VAR next-scale, kv-cache", "var", sum(p * p for p in VAR_SCALES), len(VAR_SCALES), {}),
            ("VAR next-scale, no cache", "var", sum(p * p for p in VAR_SCALES), len(VAR_SCALES), {"use_cache": False})]
    out = []
    for label, name, tokens, steps, kw in rows:
        seconds = _timed(lambda: run(name, **kw), repeats, device)
        out.append({"scheme": label, "tokens": tokens, "steps": steps, "seconds": seconds})
        print(f"{label:<28} {seconds * 1000:9.1f} ms", flush=True)
    base = out[0]["seconds"]
    for row in out:
        row["speedup"] = base / row["seconds"]
    return out


def render(rows: List[Dict], args, device, params: int) -> str:
    lines = [START, "", "## Sampling speed: raster, MaskGIT and VAR at the same width, depth and token count", "",
             f"`python -m models.bench_sampling` on {machine()}, device {device}, {args.dtype}: transformers "
             f"{args.dim} wide, {args.depth} deep, {args.heads} heads"
             + f" ({params / 1e6:.1f}M parameters in the raster model's blocks)"
             + f", random weights, class-conditional batch of {args.batch}, a final 16 x 16 code map; token "
             f"generation only (no tokenizer decode); median of {args.repeats} runs after a warm-up; speedups "
             "over raster sampling with the kv-cache in the same run.", "",
             "| scheme | tokens generated | forward steps | seconds per batch | speedup vs raster + kv-cache |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['tokens']} | {r['steps']} | {r['seconds']:.3f} | {r['speedup']:.2f}x |")
    cache = rows[1]["seconds"] / rows[0]["seconds"]
    var_cache = rows[4]["seconds"] / rows[3]["seconds"]
    lines += ["", f"The kv-cache makes raster sampling {cache:.1f}x faster at 256 tokens (target >= 5x) and VAR "
              f"{var_cache:.1f}x; VAR's next-scale sampling is {rows[3]['speedup']:.1f}x faster than raster sampling "
              f"with the cache (VAR reports about 20x on GPUs), MaskGIT with 8 steps {rows[2]['speedup']:.1f}x.",
              "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.bench_sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--results", default=str(RESULTS), help="markdown file whose sampling section is rewritten ('' none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build(args.dim, args.depth, args.heads, device, getattr(torch, args.dtype))
    rows = measure(models, args.batch, args.repeats, device)
    text = render(rows, args, device, sum(p.numel() for p in models["raster"].transformer.parameters()))
    print(text)
    if args.results:
        write_section(text, Path(args.results), START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
