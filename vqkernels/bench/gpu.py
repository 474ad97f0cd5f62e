"""GPU benchmark of the vqkernels backends (CUDA C++, Triton) against the usual PyTorch forms.

    python -m vqkernels.bench.gpu [--output FILE.md] [--save-auto FILE.json]
    python -m vqkernels.bench.gpu --smoke      # tiny shapes on the CPU (Triton interpreted): checks the script

Part 1, nearest_code (l2) for each shape (N, D, K) and dtype (bfloat16, float32): the CUDA and
Triton kernels (``torch.ops.vqkernels_cuda/_triton.nearest_code``); ``torch.cdist(x, c).argmin(1)``;
the expanded form (||x||^2 + ||c||^2 - 2 x c^T).argmin(1), plain and under torch.compile;
vector-quantize-pytorch's search (its ``cdist`` + argmax) when installed; and the floor
max(2 N K D / bf16 matmul rate (measured on 8192^3 torch.mm), N K / compare rate), where the
compare rate is an estimate of the CUDA-core work per distance (stated in the output). A baseline
whose N x K intermediates would need more than 16 GiB is skipped.

Part 2, the other GPU ops on one training-sized problem each, every backend serving them against
the pure-PyTorch reference on the same device; ``ema_update_`` also against ``index_add_ +
bincount`` (the issue's baseline) and in deterministic mode.

Timing (:class:`vqkernels.bench.harness.Timer`): CUDA events, warm-up first, median of repeats,
all in one process on the same inputs; ratios are against baselines measured in the same run. ``--save-auto`` writes the winner of each
(op, dtype) as an auto rule file for :func:`vqkernels.set_auto_table`. The short table prints last.
"""

import argparse
import json
import sys

import torch

import vqkernels
from vqkernels import _backend

from .harness import Timer

SHAPES = [(65536, 32, 16384), (65536, 8, 16384), (16384, 256, 1024), (262144, 32, 4096)]  # (N, D, K)
SMOKE_SHAPES = [(64, 8, 32), (40, 20, 16)]
DTYPES = [torch.bfloat16, torch.float32]
MAX_BYTES = 16 << 30
OPS_PER_DISTANCE = 4  # CUDA-core instructions per (row, code): score FMA, NaN guard, compare, select
FP32_LANES_PER_SM = 128
GPU_BACKENDS = _backend.GPU_BACKENDS


def expanded(x, c):
    x2 = (x * x).sum(1, keepdim=True)
    c2 = (c * c).sum(1)
    return (x2 + c2 - 2.0 * (x @ c.t())).argmin(1)


def _vqp_search():
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import cdist
    except ImportError:
        return None
    return lambda x, c: (-cdist(x.unsqueeze(0), c.unsqueeze(0))).argmax(-1)


def compare_rate():
    """Estimated distances per second the CUDA cores can score and compare."""
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 1_755_000) * 1e3  # kHz; 1.755 GHz (H100/H200 boost) if unknown
    lanes = props.multi_processor_count * FP32_LANES_PER_SM
    return lanes * clock_hz / OPS_PER_DISTANCE, lanes, clock_hz


def backends_for(op, device):
    """The accelerated backends serving ``op`` on ``device`` here (CPU smoke runs: Triton interpreted)."""
    names = GPU_BACKENDS if device == "cuda" else ("triton",)
    return [b for b in names if _backend.available(b, op, device)]


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else v


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def search_table(device, shapes, timer, winners):
    """Part 1: nearest_code per shape and dtype. Returns markdown lines and the headline ratios."""
    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        mm_rate = 2 * 8192 ** 3 / (timer(lambda: torch.mm(a, a)) * 1e-3)
        del a
        cmp_rate, lanes, clock_hz = compare_rate()
        rates = (f"bf16 matmul rate (8192^3 torch.mm): {mm_rate / 1e12:.0f} TFLOP/s; compare rate (estimate): "
                 f"{lanes} FP32 lanes x {clock_hz / 1e9:.2f} GHz / {OPS_PER_DISTANCE} instructions per distance = "
                 f"{cmp_rate / 1e12:.1f} T distances/s.")
    else:
        mm_rate, cmp_rate, rates = None, None, "CPU smoke run: no floor."
    compiled = torch.compile(expanded, dynamic=False) if device == "cuda" else None  # smoke: skip compile time
    vqp = _vqp_search()
    names = ["cuda", "triton", "cdist+argmin", "expanded", "expanded compiled", "vq-pytorch"]
    lines = [rates + f" Times in ms (median of {timer.repeats}); l2 metric.", "",
             "| N | D | K | dtype | " + " | ".join(names) + " | floor | best ours / floor | cdist / best ours |",
             "|" + "---|" * (len(names) + 7)]
    headline = {}
    for n, d, k in shapes:
        for dtype in DTYPES:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(n, d, device=device, dtype=dtype, generator=g)
            c = torch.randn(k, d, device=device, dtype=dtype, generator=g)
            fits = 3 * n * k * x.element_size() <= MAX_BYTES
            want = torch.cdist(x.double(), c.double()).argmin(1) if n * k <= 1 << 26 else None
            cells, ours = {}, {}
            for b in backends_for("nearest_code", device):
                op = getattr(getattr(torch.ops, _backend.NAMESPACES[b]), "nearest_code")
                idx = op(x, c, "l2")[0]
                if want is not None and dtype == torch.float32:
                    assert torch.equal(idx, want), f"{b} nearest_code chose other codes than float64 at {n, d, k}"
                ours[b] = cells[b] = timer(lambda: op(x, c, "l2"))
            baselines = {"cdist+argmin": lambda: torch.cdist(x, c).argmin(1), "expanded": lambda: expanded(x, c)}
            if compiled is not None:
                baselines["expanded compiled"] = lambda: compiled(x, c)
            if vqp is not None:
                baselines["vq-pytorch"] = lambda: vqp(x, c)
            for name, fn in baselines.items():
                cells[name] = timer(fn) if fits else "skipped"
                if device == "cuda":
                    torch.cuda.empty_cache()
            best = min(ours.values()) if ours else None
            if best is not None:
                winners.setdefault(("nearest_code", dtype), []).append(min(ours, key=ours.get))
            floor = max(2 * n * k * d / mm_rate, n * k / cmp_rate) * 1e3 if mm_rate else None
            vs_floor = f"{best / floor:.1f}x" if best and floor else "n/a"
            vs_cdist = (f"{cells['cdist+argmin'] / best:.1f}x" if best and isinstance(cells["cdist+argmin"], float)
                        else "n/a")
            headline[(n, d, k, dtype)] = (vs_cdist, vs_floor)
            lines.append(f"| {n} | {d} | {k} | {_dtype_name(dtype)} | "
                         + " | ".join(_fmt(cells.get(name, "-")) for name in names)
                         + f" | {_fmt(floor) if floor else 'n/a'} | {vs_floor} | {vs_cdist} |")
            print(lines[-1], flush=True)
            x = c = None  # frees the inputs before the next shape allocates (the timers held them)
    return lines, headline


def _problems(device, smoke):
    """Part 2's problems: op -> (description, args builder, dtype)."""
    n, d, k, levels = (64, 8, 32, 3) if smoke else (65536, 32, 16384, 8)
    dt = torch.bfloat16

    def gen(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    def vq():
        x, c = gen(n, d, dtype=dt), gen(k, d, dtype=dt)
        return (x, c, "l2")

    def vq_bwd():
        x, c = gen(n, d, dtype=dt), gen(k, d, dtype=dt)
        idx = torch.randint(0, k, (n,), device=device)
        one = torch.tensor(1.0, device=device)
        return (gen(n, d, dtype=dt), one, one, x, c, idx)

    def ema():
        return (gen(k, d), torch.ones(k, device=device), gen(k, d), gen(n, d),
                torch.randint(0, k, (n,), device=device), 0.99, 1e-5)

    def rq():
        return (gen(n, d, dtype=dt), gen(levels, 1024 if not smoke else 16, d, dtype=dt), -1, 1)

    def ms():
        return (gen(n // 256 or 1, d, 16, 16, dtype=dt), gen(k, d, dtype=dt), [16, 16], "l2")

    def lfq():
        return (gen(n, 16 if not smoke else 8), 10.0)

    return {"vq_quantize": (f"N={n}, D={d}, K={k}, bf16", vq),
            "vq_quantize_backward": (f"N={n}, D={d}, K={k}, bf16", vq_bwd),
            "ema_update_": (f"N={n}, D={d}, K={k}, fp32", ema),
            "residual_quantize": (f"N={n}, D={d}, {levels} levels x {1024 if not smoke else 16} codes, bf16", rq),
            "multiscale_quantize_step": (f"B={n // 256 or 1}, C={d}, 16x16 -> 16x16, K={k}, bf16", ms),
            "lfq_entropy": (f"N={n}, {16 if not smoke else 8} bits, fp32", lfq)}


def ops_table(device, timer, winners, smoke):
    """Part 2: each op per backend vs the reference on the same device (ema_update_ also vs index_add_)."""
    lines = ["| op | problem | " + " | ".join(GPU_BACKENDS) + " | reference | reference / best ours |",
             "|---|---|---|---|---|---|"]
    ema_ratio = None
    for op, (desc, build) in _problems(device, smoke).items():
        args = build()

        def call(ns, a=args):
            fresh = tuple(t.clone() if isinstance(t, torch.Tensor) and op == "ema_update_" else t for t in a)
            return lambda: getattr(getattr(torch.ops, ns), op)(*fresh)

        cells = {b: timer(call(_backend.NAMESPACES[b])) for b in backends_for(op, device)}
        ref = timer(call("vqkernels_ref"))
        best = min(cells.values()) if cells else None
        if cells:
            winners.setdefault((op, args[0].dtype), []).append(min(cells, key=cells.get))
        lines.append(f"| {op} | {desc} | " + " | ".join(_fmt(cells.get(b, "-")) for b in GPU_BACKENDS)
                     + f" | {_fmt(ref)} | {f'{ref / best:.1f}x' if best else 'n/a'} |")
        print(lines[-1], flush=True)
        if op == "ema_update_":
            cb, cs, es, x, idx, decay, eps = args
            k = cb.shape[0]

            def index_add_bincount():
                counts = torch.bincount(idx, minlength=k).float()
                sums = torch.zeros_like(es).index_add_(0, idx, x)
                cs.mul_(decay).add_(counts, alpha=1 - decay)
                es.mul_(decay).add_(sums, alpha=1 - decay)
                total = cs.sum()
                cb.copy_(es / ((cs + eps) / (total + k * eps) * total).unsqueeze(1))

            base = timer(index_add_bincount)
            extra = []
            torch.use_deterministic_algorithms(True)
            try:
                for b in backends_for(op, device):
                    extra.append(f"{b} deterministic {timer(call(_backend.NAMESPACES[b])):.3f} ms")
            finally:
                torch.use_deterministic_algorithms(False)
            ema_ratio = f"{base / best:.1f}x" if best else "n/a"
            lines.append(f"| ema_update_ baseline | index_add_ + bincount: {base:.3f} ms ({ema_ratio} slower than "
                         f"the best of ours); {', '.join(extra) or 'no accelerated backend'} | | | | |")
            print(lines[-1], flush=True)
    return lines, ema_ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the markdown report to this path")
    parser.add_argument("--save-auto", help="write the measured winners as an auto rule file (JSON)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreted)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, shapes, timer = "cpu", SMOKE_SHAPES, Timer("cpu", 0, 1)
    elif torch.cuda.is_available():
        device, shapes, timer = "cuda", SHAPES, Timer("cuda", 3, 10)
    else:
        sys.exit("vqkernels.bench.gpu needs a CUDA device (or --smoke)")
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run)"
    winners = {}
    lines = [f"## GPU backends on {card}", "", f"torch {torch.__version__}; "
             + "; ".join(f"{op}: {vqkernels.backend(op, device)}" for op in ("nearest_code", "ema_update_")), ""]
    search, headline = search_table(device, shapes, timer, winners)
    lines += search + [""]
    ops, ema_ratio = ops_table(device, timer, winners, args.smoke)
    lines += ops
    report = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)
    if args.save_auto:
        rules = [{"device": device, "op": op, "max_rows": 2 ** 62, "dtype": _dtype_name(dt),
                  "backend": max(set(w), key=w.count)} for (op, dt), w in sorted(winners.items(), key=str)]
        with open(args.save_auto, "w") as f:
            json.dump(rules, f, indent=1)
    print()
    print(report)
    print(f"Summary on {card}:")
    key = (65536, 32, 16384, torch.bfloat16)
    if key in headline:
        print(f"  nearest_code 65536x32x16384 bf16: {headline[key][0]} torch.cdist+argmin (target >= 15x), "
              f"{headline[key][1]} the floor (target <= 2x)")
    print(f"  ema_update_: {ema_ratio} index_add_ + bincount (target >= 5x)")


if __name__ == "__main__":
    main()
