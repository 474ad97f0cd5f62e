"""GPU benchmark of vqkernels.triton.nearest_code against the usual PyTorch forms.

    python benchmarks/triton_nearest_code.py [--output results.md]

For each shape (N, D, K) and dtype (bfloat16, float32) it times, with CUDA events (warm-up,
then the median of repeats): the Triton kernel; torch.cdist(x, c).argmin(1); the expanded form
(||x||^2 + ||c||^2 - 2 x @ c.T).argmin(1) in the input dtype, plain and under torch.compile; and
torch.mm of the same [N, D] x [D, K] in bfloat16. The floor is
max(2 N K D / bf16 matmul rate (measured on 8192^3), N K / compare rate), where the compare
rate is an estimate of the CUDA-core work per distance (stated in the output). A baseline whose
N x K intermediates would need more than 16 GiB is skipped. Needs CUDA; about 2 minutes on an
H100/H200 (Triton autotuning and torch.compile included).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(65536, 32, 16384), (65536, 8, 16384), (16384, 256, 1024), (262144, 32, 4096)]  # (N, D, K)
DTYPES = [torch.bfloat16, torch.float32]
MAX_BYTES = 16 << 30
OPS_PER_DISTANCE = 4  # CUDA-core instructions per (row, code): score FMA, NaN guard, compare, select
FP32_LANES_PER_SM = 128
WARMUP, REPEATS = 3, 10


def time_ms(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def expanded(x, c):
    x2 = (x * x).sum(1, keepdim=True)
    c2 = (c * c).sum(1)
    return (x2 + c2 - 2.0 * (x @ c.t())).argmin(1)


def compare_rate():
    """Estimated distances per second the CUDA cores can score and compare."""
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 1_755_000) * 1e3  # kHz; 1.755 GHz (H100/H200 boost) if unknown
    lanes = props.multi_processor_count * FP32_LANES_PER_SM
    return lanes * clock_hz / OPS_PER_DISTANCE, lanes, clock_hz


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the markdown table to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_nearest_code.py needs a CUDA device")
    import vqkernels.triton as vqt

    name = torch.cuda.get_device_name(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_rate = 2 * 8192 ** 3 / (time_ms(lambda: torch.mm(a, a)) * 1e-3)
    del a
    cmp_rate, lanes, clock_hz = compare_rate()
    compiled = torch.compile(expanded, dynamic=False)
    lines = [f"## vqkernels.triton.nearest_code on {name}", "",
             f"bf16 matmul rate (8192^3 torch.mm): {mm_rate / 1e12:.0f} TFLOP/s; compare rate (estimate): "
             f"{lanes} FP32 lanes x {clock_hz / 1e9:.2f} GHz / {OPS_PER_DISTANCE} instructions per distance = "
             f"{cmp_rate / 1e12:.1f} T distances/s. Times in ms (median of {REPEATS}); l2 metric.", "",
             "| N | D | K | dtype | triton | cdist+argmin | expanded | expanded compiled | bf16 mm | floor | "
             "triton / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, d, k in SHAPES:
        for dtype in DTYPES:
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(n, d, device="cuda", dtype=dtype, generator=g)
            c = torch.randn(k, d, device="cuda", dtype=dtype, generator=g)
            fits = 3 * n * k * x.element_size() <= MAX_BYTES

            def run(fn, ok=True):
                if not ok:
                    return "skipped"
                ms = time_ms(fn)
                torch.cuda.empty_cache()
                return ms

            ours = run(lambda: vqt.nearest_code(x, c))
            cdist = run(lambda: torch.cdist(x, c).argmin(1), fits)
            plain = run(lambda: expanded(x, c), fits)
            comp = run(lambda: compiled(x, c), fits)
            xb, cb = x.bfloat16(), c.bfloat16()
            mm = run(lambda: torch.mm(xb, cb.t()), n * k * 2 <= MAX_BYTES)
            floor = max(2 * n * k * d / mm_rate, n * k / cmp_rate) * 1e3
            cells = [f"{v:.3f}" if isinstance(v, float) else v for v in (ours, cdist, plain, comp, mm)]
            lines.append(f"| {n} | {d} | {k} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells)
                         + f" | {floor:.3f} | {ours / floor:.1f}x |")
            print(lines[-1], flush=True)
            del x, c, xb, cb
            torch.cuda.empty_cache()
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
