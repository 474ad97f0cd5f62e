"""The benchmarks' one timing harness: timing, peak memory, the machine's description.

Imports torch and the standard library only (nothing of vqkernels), so every suite times its
methods the same way and this module can be read, and tested, on its own:

* :func:`time_calls`: one method after another, ``warmup`` untimed calls, then the median of up to
  ``repeats`` timed calls, stopping early once a ``budget`` of seconds is spent (the ops and layer
  suites);
* :func:`time_alternating`: the methods' calls interleaved, on a chosen clock (wall or process CPU
  time), so that drift on a shared machine hits each alike (the VAR suite);
* :class:`Timer`: CUDA events on a GPU, ``perf_counter`` on the CPU (the GPU suite);
* :func:`peak_extra_mib`: peak RSS growth during one call; :func:`peak_mib` adds the CUDA
  allocator's peak growth;
* :func:`machine_info`: CPU model and SIMD flags, cores and torch threads, python / torch and
  package versions, and what the caller passes (which kernels serve, the ISA path).
"""

import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import torch

THREADS = 2  # torch threads of the CPU suites
WARMUP = 3  # untimed calls first: caches, thread pools, lazy initialisation, torch.compile
MIN_REPEATS = 3
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl")


class Skip(Exception):
    """A method that cannot run here; its message replaces the time in the tables."""


def require(module):
    """``import module``, or Skip("not installed")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skip("not installed") from None


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing

def _timed_calls(fn, repeats, budget_s):
    """Seconds of each timed call: until ``repeats`` calls, or ``budget_s`` spent after MIN_REPEATS of them."""
    ts = []
    while len(ts) < repeats and not (sum(ts) >= budget_s and len(ts) >= min(MIN_REPEATS, repeats)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def time_calls(fns, repeats, budget_s=2.0, warmup=WARMUP):
    """Median seconds per call of each zero-argument callable in ``fns`` (name -> callable).

    One method at a time: ``warmup`` untimed calls, then its timed calls (time.perf_counter)
    back to back, until ``repeats`` calls or until they have spent ``budget_s`` seconds and
    there were MIN_REPEATS of them (``repeats`` if fewer). Methods are not interleaved: faiss
    and torch each bring their own OpenMP runtime, whose worker threads keep spinning for a
    while after a parallel region and would slow whichever library runs next. Returns
    name -> (median seconds, calls), or name -> the exception its warm-up raised.
    """
    out = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as exc:  # reported by the caller; the other methods go on
            out[name] = exc
            continue
        ts = _timed_calls(fn, repeats, budget_s)
        out[name] = (statistics.median(ts), len(ts))
        time.sleep(0.05)  # let this library's OpenMP threads go idle before the next one
    return out


def time_alternating(methods, repeats, clock=time.perf_counter, warmup=WARMUP):
    """Median ms per call of each zero-argument callable: ``warmup`` calls of each first, then
    ``repeats`` rounds that call each method once, timed with ``clock`` (perf_counter: wall
    clock; process_time: the process's CPU time)."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


class Timer:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on the CPU (smoke runs)."""

    def __init__(self, device, warmup, repeats):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def _once(self, fn):
        if self.device != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        return statistics.median([self._once(fn) for _ in range(self.repeats)])


# ----------------------------------------------------------------------------- memory

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _trim_heap():
    """Give freed heap memory back to the OS, so that reusing it still shows up as RSS growth."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_extra_mib(fn):
    """(peak RSS growth in MiB during one call of ``fn()``, its result); the growth is None without /proc."""
    gc.collect()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_kib("VmRSS")
    except OSError:
        return None, fn()
    out = fn()
    return (_status_kib("VmHWM") - base) / 1024.0, out


def peak_mib(fn, device):
    """Peak extra memory of one call of ``fn()``: RSS growth on the CPU, allocator peak growth on CUDA."""
    if device == "cpu":
        return peak_extra_mib(fn)[0]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------- the machine

def version(dist):
    """The installed version of distribution ``dist``, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo():
    """(the first processor's "model name" with its family / model / stepping numbers, its "flags" set) of
    /proc/cpuinfo; (None, empty) without it. The numbers tell CPU generations apart where the name does not
    (a VM may show only "AMD EPYC")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor only
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None, set()
    model = fields.get("model name")
    numbers = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    if model and numbers:
        model = f"{model} ({numbers})"
    return model, set(fields.get("flags", "").split())


def machine_info(packages=(), **facts):
    """The machine as a JSON-ready dict: CPU model, its SIMD flags among SIMD_FLAGS, cores, torch
    threads, python / torch versions, the versions of ``packages`` (distribution names), the
    date, and the caller's ``facts`` (values, or callables called here), e.g. which kernels
    serve and vqkernels.cpu_isa()."""
    model, flags = _cpuinfo()
    info = {
        "cpu": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "simd": " ".join(f for f in SIMD_FLAGS if f in flags) or "unknown",
    }
    info.update({k: v() if callable(v) else v for k, v in facts.items()})
    info.update(python=platform.python_version(), torch=torch.__version__,
                packages={dist: version(dist) for dist in packages},
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    return info
