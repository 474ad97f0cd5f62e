"""Where a layer's training step spends its time at 1024 tokens: the per-call overhead profile (issue 15).

    python -m vqkernels.bench.overhead            # prints the tables (under a minute)

Two parts, measured in one process; times in microseconds:

* :func:`profile_steps`: one training step (forward + backward, as :func:`vqkernels.bench.layers._step`)
  of ``VectorQuantize`` and ``FSQ`` (the layer table's configurations) at 1 x 1024 tokens, on THREADS
  torch threads and on one. PROFILED_STEPS rounds of one step without the profiler and one under its
  own ``torch.profiler``, alternating so that both see the same load: the median unprofiled wall time
  (and vector-quantize-pytorch's step, for scale), and the profiled step of median wall time split by
  the self time of its recorded events: our kernels (``vqkernels_cpu::`` and the other backends'
  namespaces), the public ops (``vqkernels::``: the Python autograd kernel that
  ``torch.library.register_autograd`` installs, the C++ router, the dispatch to the backend), aten
  ops, the other events (autograd nodes, whose self time holds the Python of our backward formulas),
  and the rest of the profiled wall time (the layers' Python, the autograd engine, the profiler's own
  cost). Also counted: its events and allocations (``aten::empty*``).
* :func:`micro`: fixed costs, each the median over rounds of back-to-back calls (rows compared with
  each other run their rounds in turn): any torch op's floor (``torch.add`` of 8 x 8), the backend op
  ``torch.ops.vqkernels_cpu.nearest_code`` on 8 x 8 inputs and 16 codes, the same call through the
  router (below autograd: the C++ router alone; as called: plus the Python autograd kernel that
  ``torch.library.register_autograd`` installs), through the Python wrapper ``vqkernels.nearest_code``,
  allocations (``torch.empty`` / ``torch.zeros`` of the step's sizes), and OpenMP (the backend op on 1
  and on THREADS threads, tiny and 1024 x 64 x 1024).

:mod:`vqkernels.bench.report` renders the results (the ``overhead`` key of the JSON) as a RESULTS.md section.
"""

import statistics
import time

import torch

from ..schemas import BACKEND_NAMESPACES
from . import layers, report
from .harness import THREADS, WARMUP, log, time_calls

TOKENS = 1024
STEP_CASES = ("VectorQuantize", "FSQ")  # layers.CASES by name
PROFILED_STEPS = 30
KERNEL_PREFIXES = tuple(ns + "::" for ns in BACKEND_NAMESPACES + ("vqkernels_triton",))
ROUTER_PREFIX = "vqkernels::"
ALLOCATIONS = ("aten::empty", "aten::empty_strided")
ROUND_S = 0.01  # seconds of calls a round of a microbenchmark, about
ROUNDS = 15
MICRO_BUDGET_S = 1.5  # a microbenchmark stops after this much (at least 3 rounds)


def _case(name):
    return next(c for c in layers.CASES if c.name == name)


def _category(key):
    if key.startswith(KERNEL_PREFIXES):
        return "kernels_s"
    if key.startswith(ROUTER_PREFIX):
        return "router_s"
    return "aten_s" if key.startswith("aten::") else "other_s"


def _profile_one(step):
    """One step under torch.profiler: (its wall seconds, {category: self seconds}, events, allocations)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    split = dict(kernels_s=0.0, router_s=0.0, aten_s=0.0, other_s=0.0)
    events = allocations = 0
    for e in prof.key_averages():
        split[_category(e.key)] += e.self_cpu_time_total / 1e6
        events += e.count
        allocations += e.count if e.key in ALLOCATIONS else 0
    return wall, split, events, allocations


def _alternating(step, steps):
    """``steps`` rounds of one step without the profiler, then one under its own torch.profiler (so that both
    see the same load on a shared machine): (the median unprofiled wall seconds, the profiled step of median
    wall time: a typical one, whose split adds up, as (wall seconds, {category: self seconds}, events,
    allocations))."""
    walls, runs = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        runs.append(_profile_one(step))
    runs.sort(key=lambda run: run[0])
    return statistics.median(walls), runs[len(runs) // 2]


def _with_threads(threads, fn, *args, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(old)


def _step_row(name, threads, repeats, budget):
    case = _case(name)
    ours, theirs, x, forward = case.build(1, TOKENS)  # one sample of TOKENS tokens
    step = layers._step(ours, x, "cpu", forward)
    for _ in range(WARMUP):
        step()
    wall, (profiled, split, events, allocations) = _alternating(step, PROFILED_STEPS)
    theirs_s = None
    if theirs is not None:
        timed = time_calls({"theirs": layers._step(theirs, x, "cpu", forward)}, repeats, budget)["theirs"]
        theirs_s = None if isinstance(timed, Exception) else timed[0]
    return dict(name=name, detail=f"{case.detail}, 1 x {TOKENS} tokens", threads=threads, wall_s=wall,
                theirs_s=theirs_s, profiled_s=profiled, **split, events=events, allocations=allocations)


def profile_steps(repeats=20, budget=1.0, threads=(THREADS, 1), log=log):
    """The training step of each STEP_CASES layer at TOKENS tokens on each count of ``threads``, split as the
    module's docstring says: a list of {name, detail, threads, wall_s, theirs_s, profiled_s, kernels_s,
    router_s, aten_s, other_s, events, allocations} (seconds, counts a step)."""
    rows = []
    for name in STEP_CASES:
        for n in threads:
            row = _with_threads(n, _step_row, name, n, repeats, budget)
            rows.append(row)
            log(f"  {name}, {n} thread(s): step {row['wall_s'] * 1e6:.0f} us, profiled {row['profiled_s'] * 1e6:.0f} us "
                f"(our kernels {row['kernels_s'] * 1e6:.0f} us)")
    return rows


def _calls_a_round(fn):
    """Warms ``fn`` up; the number of calls that take about ROUND_S seconds, from one timed call."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    return max(1, min(10000, int(ROUND_S / max(time.perf_counter() - t0, 1e-7))))


def per_call(fns, rounds=ROUNDS, budget=MICRO_BUDGET_S):
    """Median seconds a call of each ``(fn, threads)`` in ``fns``: rounds that run each in turn (on its count of
    torch threads) for a batch of back-to-back calls (about ROUND_S seconds), so that the methods compared see
    the same load; the median of its rounds' per-call times. Fewer rounds once ``budget`` seconds are spent
    (never fewer than 3)."""
    calls = [_with_threads(n, _calls_a_round, fn) for fn, n in fns]
    times, spent = [[] for _ in fns], 0.0
    while len(times[0]) < rounds and not (spent >= budget and len(times[0]) >= 3):
        for (fn, n), count, ts in zip(fns, calls, times):
            ts.append(_with_threads(n, _round, fn, count))
            spent += ts[-1] * count
    return [statistics.median(ts) for ts in times]


def _round(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _below_autograd(fn):
    def call():
        with torch._C._AutoDispatchBelowAutograd():
            return fn()
    return call


def _micro_groups():
    """Groups of rows timed together (rounds in turn): [[(key, what, callable, threads, the key of the row it is
    compared with or None)]]."""
    import vqkernels
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(8, 8, generator=g), torch.randn(16, 8, generator=g)
    xg = x.clone().requires_grad_()
    xb, cb = torch.randn(TOKENS, 64, generator=g), torch.randn(1024, 64, generator=g)
    backend, router = torch.ops.vqkernels_cpu.nearest_code, torch.ops.vqkernels.nearest_code
    tiny, big = "8 x 8 rows, 16 codes", f"{TOKENS} x 64 rows, 1024 codes"
    calls = [
        ("add", "torch.add(x, x), 8 x 8: any torch op's floor from Python", lambda: torch.add(x, x), THREADS, None),
        ("backend", f"backend op torch.ops.vqkernels_cpu.nearest_code, {tiny}", lambda: backend(x, c, "l2"), THREADS,
         None),
        ("router_below", "the router op torch.ops.vqkernels.nearest_code, same call, below autograd: the C++ router",
         _below_autograd(lambda: router(x, c, "l2")), THREADS, "backend"),
        ("router", "the router op as called: plus the Python autograd kernel of torch.library.register_autograd",
         lambda: router(x, c, "l2"), THREADS, "router_below"),
        ("router_grad", "the router op, x requiring grad: plus recording the autograd node",
         lambda: router(xg, c, "l2"), THREADS, "router"),
        ("wrapper", "the Python wrapper vqkernels.nearest_code, same call", lambda: vqkernels.nearest_code(x, c),
         THREADS, "router"),
    ]
    allocations = [
        ("empty6", "torch.empty([1024, 6]) float32", lambda: torch.empty(TOKENS, 6), THREADS, None),
        ("empty", "torch.empty([1024, 64]) float32", lambda: torch.empty(TOKENS, 64), THREADS, None),
        ("empty_i64", "torch.empty([1024]) int64", lambda: torch.empty(TOKENS, dtype=torch.int64), THREADS, None),
        ("zeros", "torch.zeros([1024, 64]) float32: allocation and fill", lambda: torch.zeros(TOKENS, 64), THREADS,
         "empty"),
    ]
    openmp = [[(f"omp_{size}_1", f"backend op nearest_code, {words}, 1 thread", fn, 1, None),
               (f"omp_{size}", f"backend op nearest_code, {words}, {THREADS} threads", fn, THREADS, f"omp_{size}_1")]
              for size, words, fn in (("tiny", tiny, lambda: backend(x, c, "l2")),
                                      ("big", big, lambda: backend(xb, cb, "l2")))]
    return [calls, allocations] + openmp


def micro(log=log):
    """The fixed costs: a list of {key, what, threads, seconds, vs} (vs: the key of the row it is compared with)."""
    rows = []
    for group in _micro_groups():
        times = per_call([(fn, threads) for _, _, fn, threads, _ in group])
        for (key, what, _, threads, vs), seconds in zip(group, times):
            rows.append(dict(key=key, what=what, threads=threads, seconds=seconds, vs=vs))
            log(f"  {what}: {seconds * 1e6:.2f} us")
    return rows


def run(log=log):
    """The ``overhead`` entry of the JSON results: {tokens, threads, profiled_steps, steps, micro}."""
    log(f"per-call overhead at {TOKENS} tokens: training steps")
    steps = profile_steps(log=log)
    log("per-call overhead: fixed costs")
    return dict(tokens=TOKENS, threads=THREADS, profiled_steps=PROFILED_STEPS, steps=steps, micro=micro(log))


def main(argv=None):
    import argparse

    import vqkernels

    p = argparse.ArgumentParser(prog="python -m vqkernels.bench.overhead", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    results = run()
    print(f"\n(CPU, {THREADS} threads; vqkernels serves the CPU with: {vqkernels.backend('vq_quantize', 'cpu')}; "
          f"{time.perf_counter() - start:.0f} s)\n")
    print("\n\n".join(report.overhead_section(results)))


if __name__ == "__main__":
    main()
