"""Benchmark of vqkernels.nn.MultiScaleVQ against VAR's per-scale loop in plain PyTorch.

    python -m vqkernels.bench_var             # B=8, 15 timed steps per method
    python -m vqkernels.bench_var --quick     # B=2, 5 timed steps

One VQ-VAE training step of the quantizer at VAR's shape (Cvae=32, vocab 4096, patch sides
1..16, H = W = 16, float32): forward, then backward of mean_vq_loss + f_hat.sum() into the
encoder output, the embedding and the Phi convolutions. Both methods share the module's
parameters and the input; each gets warm-up steps, then the two are timed alternately (so
drift on a shared machine hits both alike) and the median of each is reported with the ratio
ours / plain (below 1: ours is faster).

Two rows: wall-clock time with torch.set_num_threads(2), the headline; and the process's CPU
time with one thread, which time spent descheduled does not count: on a machine shared with
other busy processes, two-thread wall-clock times swing widely (every parallel region waits
for its second thread to be scheduled), the one-thread CPU times much less.

:func:`plain_var_quantize` is the baseline: VAR's ``VectorQuantizer2.forward`` loop as written
there (F.interpolate area and bicubic, a GEMM distance matrix and argmin, an nn.Embedding
lookup). The tests use it as the reference re-implementation of VAR.
"""

import argparse
import statistics
import time
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn.multiscale import MultiScaleVQ

THREADS = 2
WARMUP = 3
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def plain_var_quantize(f_BChw: torch.Tensor, embedding: nn.Embedding, quant_resi, v_patch_nums: Sequence[int],
                       beta: float = 0.25, using_znorm: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """VAR's per-scale quantizer loop in plain PyTorch, with VAR's arithmetic.

    ``quant_resi`` is indexed like VAR's, by the scale's position si / (SN - 1). Works in the
    embedding's dtype (VAR: float32). A side may be a pair (ph, pw), as in VAR's
    f_to_idxBl_or_fhat; the last must be (H, W). Returns ``(f_hat, mean_vq_loss, idx_Bl, hits)``: the
    straight-through f_hat, the loss, per scale the indices [B, pn * pn] and the code counts.
    """
    f = f_BChw.to(embedding.weight.dtype)
    B, C, H, W = f.shape
    f_no_grad = f.detach()
    f_rest = f_no_grad.clone()
    f_hat = torch.zeros_like(f_rest)
    mean_vq_loss = 0.0
    sn = len(v_patch_nums)
    idx_Bl, hits = [], []
    codes = embedding.weight.data
    for si, pn in enumerate(v_patch_nums):
        ph, pw = (pn, pn) if isinstance(pn, int) else pn
        rest = F.interpolate(f_rest, size=(ph, pw), mode="area") if si != sn - 1 else f_rest
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        if using_znorm:
            idx_N = torch.argmax(F.normalize(rest_NC, dim=-1) @ F.normalize(codes.T, dim=0), dim=1)
        else:
            d_no_grad = torch.sum(rest_NC.square(), dim=1, keepdim=True) + torch.sum(codes.square(), dim=1)
            d_no_grad.addmm_(rest_NC, codes.T, alpha=-2, beta=1)
            idx_N = torch.argmin(d_no_grad, dim=1)
        hits.append(idx_N.bincount(minlength=codes.shape[0]).float())
        idx_Bl.append(idx_N.view(B, ph * pw))
        h = embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
        if si != sn - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = quant_resi[si / (sn - 1)](h.contiguous())
        f_hat = f_hat + h
        f_rest -= h
        mean_vq_loss += F.mse_loss(f_hat.detach(), f).mul_(beta) + F.mse_loss(f_hat, f_no_grad)
    mean_vq_loss *= 1.0 / sn
    f_hat = (f_hat.detach() - f_no_grad).add_(f)
    return f_hat, mean_vq_loss, idx_Bl, hits


def _time_steps(methods, repeats, clock):
    """Median ms per call of each zero-argument callable, warm-up first, timed alternately."""
    for fn in methods.values():
        for _ in range(WARMUP):
            fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


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
            ms = _time_steps({"ours": ours, "plain": plain}, repeats, clock)
            rows.append(dict(name="MultiScaleVQ train step", B=batch, Cvae=32, vocab=4096, patch_nums=PATCH_NUMS,
                             H=16, threads=threads, clock=clock_name, repeats=repeats, ours_ms=ms["ours"],
                             plain_ms=ms["plain"], ratio=ms["ours"] / ms["plain"]))
    finally:
        torch.set_num_threads(old_threads)
    return rows


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
