"""Benchmark of vqkernels.nn.MultiScaleVQ against VAR's per-scale loop in plain PyTorch.

    python -m vqkernels.bench.var             # B=8, 15 timed steps per method
    python -m vqkernels.bench.var --quick     # B=2, 5 timed steps

One VQ-VAE training step of the quantizer at VAR's shape (Cvae=32, vocab 4096, patch sides
1..16, H = W = 16, float32): forward, then backward of mean_vq_loss + f_hat.sum() into the
encoder output, the embedding and the Phi convolutions. Both methods share the module's
parameters and the input; each gets warm-up steps, then the two are timed alternately (so
drift on a shared machine hits both alike: :func:`vqkernels.bench.harness.time_alternating`) and
the median of each is reported with the ratio ours / plain (below 1: ours is faster).

Two rows: wall-clock time with torch.set_num_threads(2), the headline; and the process's CPU
time with one thread, which time spent descheduled does not count: on a machine shared with
other busy processes, two-thread wall-clock times swing widely (every parallel region waits
for its second thread to be scheduled), the one-thread CPU times much less.

The baseline is :func:`vqkernels.bench.plain.plain_var_quantize`: VAR's ``VectorQuantizer2.forward``
loop as written there (F.interpolate area and bicubic, a GEMM distance matrix and argmin, an
nn.Embedding lookup).
"""

import argparse
import time
from typing import List

import torch

from ..nn.multiscale import MultiScaleVQ
from . import report
from .harness import THREADS, time_alternating
from .plain import plain_var_quantize

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def run(repeats: int = 15, quick: bool = False) -> List[dict]:
    """Time one training step of MultiScaleVQ and of plain_var_quantize: one dict per timing mode."""
    batch = 2 if quick else 8
    torch.manual_seed(0)
    vq = MultiScaleVQ(4096, 32, v_patch_nums=PATCH_NUMS).train()
    f = torch.randn(batch, 32, 16, 16, requires_grad=True)
    params = [f, *vq.parameters()]

    def clear():
        for p in params:
            p.grad = None

    def ours():
        clear()
        f_hat, _, loss = vq(f)
        (loss + f_hat.sum()).backward()

    def plain():
        clear()
        f_hat, loss, _, _ = plain_var_quantize(f, vq.embedding, vq.quant_resi, PATCH_NUMS, vq.beta)
        (loss + f_hat.sum()).backward()

    rows = []
    old_threads = torch.get_num_threads()
    try:
        for threads, clock, clock_name in ((THREADS, time.perf_counter, "wall"), (1, time.process_time, "cpu")):
            torch.set_num_threads(threads)
            ms = time_alternating({"ours": ours, "plain": plain}, repeats, clock)
            rows.append(dict(name="MultiScaleVQ train step", B=batch, Cvae=32, vocab=4096, patch_nums=PATCH_NUMS,
                             H=16, threads=threads, clock=clock_name, repeats=repeats, ours_ms=ms["ours"],
                             plain_ms=ms["plain"], ratio=ms["ours"] / ms["plain"]))
    finally:
        torch.set_num_threads(old_threads)
    return rows


def target(rows):
    """The target record of :func:`run`'s first (two-thread, wall-clock) row: ours >= 2x the plain loop."""
    wall = rows[0]
    return report.target("VAR quantizer training step vs the plain per-scale loop",
                         f"B={wall['B']}, {wall['threads']} threads, wall clock", 2.0, wall["plain_ms"] / wall["ours_ms"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=2 and 5 timed steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 15, quick 5)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    for row in run(repeats, args.quick):
        print(f"{row['name']}: B={row['B']} Cvae={row['Cvae']} vocab={row['vocab']} H=W={row['H']} "
              f"threads={row['threads']} ({row['clock']} time): ours {row['ours_ms']:.2f} ms, plain PyTorch "
              f"{row['plain_ms']:.2f} ms, ratio ours/plain {row['ratio']:.3f} ({1 / row['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
