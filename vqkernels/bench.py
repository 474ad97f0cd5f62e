"""Benchmarks of the vqkernels CPU kernels against PyTorch, faiss and vector-quantize-pytorch.

    python -m vqkernels.bench                 # every shape; writes benchmarks/RESULTS.md and nearest_code.png
    python -m vqkernels.bench --quick         # the two smallest shapes, prints only (< 2 minutes)
    python -m vqkernels.bench --shapes 16384x32x4096 --output /tmp/r.md

Everything runs in one process on the same float32 inputs with torch.set_num_threads(2). Per
shape, every method (and the fp32 matmuls that set the ceiling) gets three warm-up calls, then its
timed calls back to back, and reports the median of up to ``--repeats`` calls (fewer once it has
spent ``--budget`` seconds, never fewer than three). Then each makes one more call to measure its peak extra memory (growth of
the peak RSS). On a shared machine absolute times drift between runs: only the ratios within one
run mean something.

Baselines that would materialise an N x K float32 matrix larger than 2 GiB are skipped, and so is
any baseline whose package is not installed; the tables say which and why.
"""

import argparse
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import vqkernels
from vqkernels import reference

THREADS = 2
SHAPES = ((4096, 32, 512), (16384, 32, 4096), (16384, 8, 8192), (4096, 256, 1024), (65536, 64, 16384))
HEADLINE = (16384, 32, 4096)
LARGEST = (65536, 64, 16384)
MATRIX_LIMIT = 2 << 30  # bytes: a baseline needing a bigger N x K float32 matrix is skipped
MIN_REPEATS = 3
WARMUP = 3  # untimed calls first: caches, thread pools, lazy initialisation, torch.compile
SQUARE = 2048  # a compute-bound fp32 matmul, reported beside the same-shape ceiling
GIB = 1 << 30
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = (_REPO if (_REPO / "benchmarks").is_dir() else Path.cwd()) / "benchmarks" / "RESULTS.md"
PLOT_NAME = "nearest_code.png"


class Skip(Exception):
    """A method that cannot run here; its message replaces the time in the tables."""


# ----------------------------------------------------------------------------- measurement

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
        ts = []
        while len(ts) < repeats and not (sum(ts) >= budget_s and len(ts) >= min(MIN_REPEATS, repeats)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = (statistics.median(ts), len(ts))
        time.sleep(0.05)  # let this library's OpenMP threads go idle before the next one
    return out


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


@dataclass
class Result:
    seconds: Optional[float] = None
    calls: int = 0
    mib: Optional[float] = None
    agree: Optional[float] = None  # fraction of rows whose index matches ours
    note: str = ""  # why there is no time


def _not_run(exc, own):
    """The Result of a method that could not run; our own kernels' errors propagate."""
    if isinstance(exc, Skip):
        return Result(note=str(exc))
    if own:
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0][:80]
    return Result(note=f"failed: {type(exc).__name__}: {first}")


def measure_table(table, x, codebook, repeats, budget_s, quick=False, extra=None):
    """Results of every method in ``table`` at (x, codebook), timed one after another in one process.

    Setup (the factories) stays outside the timed region. After the timing, each method makes one
    more call to measure its peak extra memory, and its indices are checked against ours. ``extra``
    (name -> callable) is timed in the same pass; its (seconds, calls) come back second.
    """
    results, fns = {}, {}
    for m in table:
        if quick and not m.quick:
            results[m.name] = Result(note="skipped (--quick)")
            continue
        try:
            fns[m.name] = m.factory(x, codebook)
        except Exception as exc:  # Skip: not installed, too big
            results[m.name] = _not_run(exc, m.name == OURS[m.metric])
    timed = time_calls({**fns, **(extra or {})}, repeats, budget_s)
    refs = {}
    for m in table:  # ours first for each metric, so refs holds its indices for the others
        if m.name not in fns:
            continue
        own = m.name == OURS[m.metric]
        if isinstance(timed[m.name], Exception):
            results[m.name] = _not_run(timed[m.name], own)
            continue
        mib, out = peak_extra_mib(fns[m.name])
        ref = refs.setdefault(m.metric, out) if own else refs.get(m.metric)
        agree = (out == ref).double().mean().item() if ref is not None and out.shape == ref.shape else None
        results[m.name] = Result(*timed[m.name], mib, None if own else agree)
        del out
    return {m.name: results[m.name] for m in table}, {name: timed[name] for name in extra or {}}


# ----------------------------------------------------------------------------- methods
# A factory takes (x [N, D], codebook [K, D]) and returns a zero-argument callable giving int64
# indices [N]; it may raise Skip. Whatever it does before returning is untimed setup.

def make_inputs(n, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def _need_matrix(x, codebook):
    need = x.shape[0] * codebook.shape[0] * 4
    if need > MATRIX_LIMIT:
        raise Skip(f"skipped (needs {need / GIB:.0f} GiB)")


def _import(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skip("not installed") from None


def expanded_argmin(x, codebook):
    """argmin over ||x||^2 - 2 x C^T + ||c||^2, the N x K matrix built by one addmm."""
    d = torch.addmm((codebook * codebook).sum(1), x, codebook.t(), alpha=-2.0)
    return d.add_((x * x).sum(1, keepdim=True)).argmin(1)


def cdist_argmin(x, codebook):
    return torch.cdist(x, codebook).argmin(1)


def _ours(metric):
    def factory(x, codebook):
        return lambda: vqkernels.nearest_code(x, codebook, metric)[0]
    return factory


def _dense(fn):
    def factory(x, codebook):
        _need_matrix(x, codebook)
        return lambda: fn(x, codebook)
    return factory


def _compiled(x, codebook):
    _need_matrix(x, codebook)
    fn = torch.compile(expanded_argmin, dynamic=False)  # compiled by the warm-up call
    return lambda: fn(x, codebook)


def _faiss(index_type):
    def factory(x, codebook):
        faiss = _import("faiss")
        faiss.omp_set_num_threads(THREADS)
        index = getattr(faiss, index_type)(codebook.shape[1])
        index.add(codebook.numpy())
        xs = x.numpy()
        return lambda: torch.from_numpy(index.search(xs, 1)[1]).view(-1)
    return factory


def _vqp_module(codebook, **kwargs):
    """vector-quantize-pytorch's VectorQuantize holding our codebook."""
    vqp = _import("vector_quantize_pytorch")
    vq = vqp.VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0], **kwargs)
    with torch.no_grad():
        vq._codebook.embed.copy_(codebook.unsqueeze(0))
        vq._codebook.embed_avg.copy_(codebook.unsqueeze(0))
    return vq


def _vqp_eval(x, codebook):
    _need_matrix(x, codebook)
    vq = _vqp_module(codebook).eval()
    xb = x.unsqueeze(0)

    def call():
        with torch.no_grad():
            return vq(xb)[1].view(-1)
    return call


def _train_ours(x0, codebook):
    """vq_quantize forward, backward of a loss on quantized and commit_loss, then ema_update_."""
    codebook = codebook.clone()
    cluster_size = torch.ones(codebook.shape[0])
    embed_sum = codebook.clone()
    x = x0.clone().requires_grad_()

    def step():
        x.grad = None
        quantized, indices, commit_loss, _ = vqkernels.vq_quantize(x, codebook)
        (quantized.mean() + 0.25 * commit_loss).backward()
        vqkernels.ema_update_(codebook, cluster_size, embed_sum, x.detach(), indices, decay=0.99)
        return indices
    return step


def _train_vqp(x0, codebook):
    """VectorQuantize in train mode: forward (EMA update inside) and backward of the same loss."""
    _need_matrix(x0, codebook)
    vq = _vqp_module(codebook, decay=0.99, commitment_weight=0.25).train()
    x = x0.unsqueeze(0).clone().requires_grad_()

    def step():
        x.grad = None
        quantized, indices, loss = vq(x)
        (quantized.mean() + loss).backward()
        return indices.view(-1)
    return step


@dataclass(frozen=True)
class Method:
    name: str
    metric: str  # the search it does; compared with OURS[metric]
    factory: Callable
    quick: bool = True  # runs under --quick


# Ours comes first for each metric: the others' indices are checked against it.
NEAREST = (
    Method("ours", "l2", _ours("l2")),
    Method("cdist().argmin", "l2", _dense(cdist_argmin)),
    Method("addmm expanded", "l2", _dense(expanded_argmin)),
    Method("torch.compile expanded", "l2", _compiled, quick=False),
    Method("faiss IndexFlatL2", "l2", _faiss("IndexFlatL2")),
    Method("vector-quantize-pytorch", "l2", _vqp_eval),
    Method("ours ip", "ip", _ours("ip")),
    Method("faiss IndexFlatIP", "ip", _faiss("IndexFlatIP")),
)
OURS = {"l2": "ours", "ip": "ours ip"}
TRAIN = (
    Method("ours", "l2", _train_ours),
    Method("vector-quantize-pytorch", "l2", _train_vqp),
)


def _naive_vq(x, codebook):
    """What vq_quantize replaces: the expanded-form argmin, a gather and the mean squared error."""
    indices = expanded_argmin(x, codebook)
    quantized = codebook[indices]
    return quantized, indices, (x - quantized).pow(2).mean()


def _ema_pair(x, codebook):
    """ema_update_ and the same update written with bincount + index_add_ (vqkernels.reference)."""
    indices = vqkernels.nearest_code(x, codebook)[0]
    states = [[codebook.clone(), torch.ones(codebook.shape[0]), codebook.clone()] for _ in range(2)]
    return (lambda: vqkernels.ema_update_(*states[0], x, indices, 0.99, 1e-5),
            lambda: reference.ema_update_(*states[1], x, indices, 0.99, 1e-5))


def _scalar_pairs(op, width, *args):
    """A scalar quantizer op on the first ``width`` features of x, and the reference (plain PyTorch) form."""
    def factory(x, codebook):
        z = x[:, :width].contiguous()
        return (lambda: getattr(vqkernels, op)(z, *args), lambda: getattr(reference, op)(z, *args))
    return factory


def _rotation_pair(x, codebook):
    """The rotation trick's gradient (its backward op) and the reference's, for x and its nearest codes."""
    q = codebook[vqkernels.nearest_code(x, codebook)[0]]
    grad = torch.randn_like(x)
    return (lambda: torch.ops.vqkernels.rotation_trick_backward(grad, x, q),
            lambda: reference.rotation_trick_backward(grad, x, q))


# The other ops, each beside the plain PyTorch it replaces: (op, baseline, factory giving (ours, baseline)).
OTHER_OPS = (
    ("nearest_code_topk, k=8", "cdist().topk(8)",
     lambda x, c: (lambda: vqkernels.nearest_code_topk(x, c, 8), lambda: torch.cdist(x, c).topk(8, largest=False))),
    ("vq_quantize forward", "addmm argmin + gather + mse",
     lambda x, c: (lambda: vqkernels.vq_quantize(x, c), lambda: _naive_vq(x, c))),
    ("ema_update_", "bincount + index_add_ (reference)", _ema_pair),
    ("fsq_quantize, levels 8,8,8,5,5,5", "bound + round + index (reference)",
     _scalar_pairs("fsq_quantize", 6, [8, 8, 8, 5, 5, 5])),
    ("lfq_quantize, 16 bits", "sign + index + mse (reference)", _scalar_pairs("lfq_quantize", 16)),
    ("rotation_trick backward", "the rotation's gradient (reference)", _rotation_pair),
)


def run_other_ops(shape, args):
    """Rows (op, ours ms, baseline, baseline ms, speedup) at `shape`."""
    x, codebook = make_inputs(*shape)
    rows = []
    with torch.no_grad():
        for op, base, factory in OTHER_OPS:
            timed = time_calls(dict(zip(("ours", "base"), factory(x, codebook))), args.repeats, args.budget)
            ours, theirs = timed["ours"][0], timed["base"][0]
            rows.append([op, f"{ours * 1e3:.2f}", base, f"{theirs * 1e3:.2f}", _ratio(theirs / ours)])
            _log(f"  {_shape_str(shape)} {op}: {ours * 1e3:.2f} ms, {base}: {theirs * 1e3:.2f} ms")
    return rows


def method(name, table=NEAREST):
    return next(m for m in table if m.name == name)


def matmul_call(a, b):
    """torch.mm(a, b, out=...) into a preallocated output; (callable, its flop)."""
    out = torch.empty(a.shape[0], b.shape[1])
    return (lambda: torch.mm(a, b, out=out)), 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


# ----------------------------------------------------------------------------- running

@dataclass
class ShapeRun:
    shape: tuple
    nearest: dict  # method name -> Result
    train: dict  # method name -> Result (empty when no training step ran)
    ceiling_gflops: float = 0.0  # torch.mm at this D and K
    ceiling_rows: int = 0  # the rows of x it used
    square_gflops: float = 0.0  # torch.mm at SQUARE^3

    def speedup(self, name, table="nearest"):
        """t(baseline) / t(ours at the baseline's metric), or None."""
        results = getattr(self, table)
        base = results.get(name)
        ours = results.get(OURS[method(name, NEAREST if table == "nearest" else TRAIN).metric])
        if base is None or ours is None or base.seconds is None or ours.seconds is None:
            return None
        return base.seconds / ours.seconds

    def gflops(self, name="ours"):
        n, d, k = self.shape
        r = self.nearest.get(name)
        return None if r is None or r.seconds is None else 2.0 * n * k * d / r.seconds / 1e9


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _log_results(shape, results):
    for name, r in results.items():
        _log(f"  {_shape_str(shape)} {name}: " +
             (f"{r.seconds * 1e3:.2f} ms (x{r.calls})" if r.seconds is not None else r.note))


def run(shapes, train_shapes, args):
    torch.set_num_threads(THREADS)
    runs = []
    for shape in shapes:
        _log(f"shape N={shape[0]} D={shape[1]} K={shape[2]}")
        x, codebook = make_inputs(*shape)
        sr = ShapeRun(shape, {}, {})
        sr.ceiling_rows = min(shape[0], MATRIX_LIMIT // (4 * shape[2]))  # fewer rows if N x K is too big
        square = torch.randn(SQUARE, SQUARE)
        mms = {"same-shape": matmul_call(x[:sr.ceiling_rows], codebook.t()), "square": matmul_call(square, square)}
        with torch.no_grad():
            sr.nearest, timed = measure_table(NEAREST, x, codebook, args.repeats, args.budget, args.quick,
                                              extra={name: fn for name, (fn, _) in mms.items()})
        sr.ceiling_gflops, sr.square_gflops = (mms[k][1] / timed[k][0] / 1e9 for k in ("same-shape", "square"))
        del mms, square
        _log_results(shape, sr.nearest)
        _log(f"  {_shape_str(shape)} fp32 matmul: {sr.ceiling_gflops:.1f} GFLOP/s at this D and K, "
             f"{sr.square_gflops:.1f} GFLOP/s at {SQUARE}^3")
        if shape in train_shapes:
            with torch.enable_grad():
                sr.train, _ = measure_table(TRAIN, x, codebook, args.repeats, args.budget)
            _log_results(shape, {f"training step, {k}": v for k, v in sr.train.items()})
        runs.append(sr)
        del x, codebook
        gc.collect()
    return runs


# ----------------------------------------------------------------------------- reporting

def _shape_str(shape):
    return "x".join(str(v) for v in shape)


def _ms(r):
    return f"{r.seconds * 1e3:.2f}" if r.seconds is not None else r.note


def _ratio(v):
    return f"{v:.2f}x" if v is not None else "-"


def _mib(r):
    return f"{r.mib:.1f}" if r.mib is not None else ("n/a" if r.seconds is not None else "-")


def _agree(r):
    return f"{100 * r.agree:.2f}" if r.agree is not None else "-"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _per_shape(runs, names, cell, table="nearest"):
    """A shapes x methods table; cell(run, name) gives one entry."""
    rows = [[_shape_str(r.shape)] + [cell(r, n) for n in names] for r in runs if getattr(r, table)]
    return md_table(["N x D x K"] + list(names), rows)


def _baselines(table=NEAREST):
    return [m.name for m in table if m.name != OURS[m.metric]]


def evaluate_targets(runs):
    """Rows (target, shape, needed, measured, PASS/FAIL/n/a) for the issue's goals."""
    by_shape = {r.shape: r for r in runs}
    rows = []

    def add(target, shape, need, value, why="", *, fmt, at_most=False):
        if shape not in by_shape:
            measured, verdict = "not run", "n/a"
        elif value is None:
            measured, verdict = why or "not measured", "n/a"
        else:
            measured, verdict = fmt(value), "PASS" if (value <= need if at_most else value >= need) else "FAIL"
        rows.append([target, _shape_str(shape), ("<= " if at_most else ">= ") + fmt(need), measured, verdict])

    def vs(shape, name, table="nearest"):
        """(speedup of ours over `name`, why it is missing) at `shape`."""
        sr = by_shape.get(shape)
        if sr is None:
            return None, ""
        return sr.speedup(name, table), getattr(sr, table).get(name, Result()).note

    for shape in SHAPES:
        add("nearest_code vs faiss IndexFlatL2", shape, 1.3 if shape[1] >= 32 else 1.0,
            *vs(shape, "faiss IndexFlatL2"), fmt=_ratio)
    add("nearest_code vs cdist().argmin", HEADLINE, 5.0, *vs(HEADLINE, "cdist().argmin"), fmt=_ratio)
    for shape in SHAPES:
        sr = by_shape.get(shape)
        if shape[1] >= 32:
            # The stricter ceiling: the same-shape matmul mostly writes its N x K output, the
            # 2048^3 one runs at the machine's fp32 rate.
            ceiling = max(sr.ceiling_gflops, sr.square_gflops) if sr else 0.0
            frac = sr.gflops() / ceiling if sr and sr.gflops() and ceiling else None
            add("nearest_code % of fp32 matmul GFLOP/s", shape, 0.75, frac, fmt=lambda v: f"{100 * v:.0f}%")
    sr = by_shape.get(LARGEST)
    add("nearest_code peak extra memory", LARGEST, 64.0, sr.nearest["ours"].mib if sr else None,
        fmt=lambda v: f"{v:.1f} MiB", at_most=True)
    add("training step vs vector-quantize-pytorch", HEADLINE, 10.0,
        *vs(HEADLINE, "vector-quantize-pytorch", "train"), fmt=_ratio)
    return rows


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl") if f in flags) or "unknown"
    isa = vqkernels.cpu_isa() if vqkernels.compiled() else None
    return [
        ["CPU", model],
        ["cores (os.cpu_count) / torch threads", f"{os.cpu_count()} / {torch.get_num_threads()}"],
        ["CPU SIMD flags", simd],
        ["vqkernels kernels", vqkernels.backend("nearest_code", "cpu")],
        ["vqkernels.cpu_isa()", isa if isa else "none (extension not built: pure-PyTorch reference)"],
        ["python / torch", f"{platform.python_version()} / {torch.__version__}"],
        ["faiss-cpu / vector-quantize-pytorch", f"{_version('faiss-cpu')} / {_version('vector-quantize-pytorch')}"],
        ["date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")],
    ]


def render(runs, args, elapsed, plot_rel=None, other=None, layers=None):
    names = [m.name for m in NEAREST]
    baselines = _baselines()
    train_names = [m.name for m in TRAIN]
    parts = [
        "# vqkernels benchmarks",
        f"Generated by `{' '.join(['python -m vqkernels.bench'] + args.argv)}` in {elapsed:.0f} s. "
        f"float32, one process, same inputs (randn), torch.set_num_threads({THREADS}). Per shape every method "
        f"gets {WARMUP} warm-up calls, then its timed calls back to back (methods one after another, with a pause "
        f"between them so that one library's idle OpenMP threads do not slow the next); each reports the median of up to "
        f"{args.repeats} calls (fewer once it has spent {args.budget:g} s, never fewer than {MIN_REPEATS}). "
        f"Absolute times drift on a shared machine: compare ratios within one run. "
        f"Baselines that would hold an N x K float32 matrix over {MATRIX_LIMIT // GIB} GiB are skipped.",
        "## Machine",
        md_table(["", ""], machine_info()),
        "## Targets",
        md_table(["target", "N x D x K", "needed", "measured", "result"], evaluate_targets(runs)),
        *(["## Targets of the quantizer layers",
           md_table(["target", "configuration", "needed", "measured", "result"], layers[1])] if layers else []),
        "## nearest_code: median ms",
        _per_shape(runs, names, lambda r, n: _ms(r.nearest[n])),
        "## nearest_code: speedup of ours over each baseline (baseline time / our time; ip baselines vs ours ip)",
        _per_shape(runs, baselines, lambda r, n: _ratio(r.speedup(n))),
        "## nearest_code: throughput vs the fp32 matmul ceiling",
        "Equivalent GFLOP/s = 2·N·K·D / t. Two fp32 matmuls measured in the same run: torch.mm(x, C^T, out=...) "
        "at the same D and K, with `rows` rows of x (fewer than N when N x K is over the limit), which at small D "
        f"is bound by writing its N x K output, and the compute-bound {SQUARE}^3 torch.mm. The target uses the "
        "faster of the two.",
        md_table(["N x D x K", "ours GFLOP/s", "ours ip GFLOP/s", "matmul GFLOP/s", "rows", "ours % of matmul",
                  f"{SQUARE}^3 matmul GFLOP/s", f"ours % of {SQUARE}^3"],
                 [[_shape_str(r.shape), _fmt(r.gflops()), _fmt(r.gflops("ours ip")), _fmt(r.ceiling_gflops),
                   r.ceiling_rows, _pct(r.gflops(), r.ceiling_gflops), _fmt(r.square_gflops),
                   _pct(r.gflops(), r.square_gflops)] for r in runs]),
        "## nearest_code: peak extra memory of one call (MiB, growth of peak RSS; includes the outputs)",
        _per_shape(runs, names, lambda r, n: _mib(r.nearest[n])),
        "## nearest_code: rows whose index equals ours (%)",
        _per_shape(runs, baselines, lambda r, n: _agree(r.nearest[n])),
        "## Training step: median ms",
        "ours: vq_quantize forward, backward of quantized.mean() + 0.25 * commit_loss, ema_update_(decay=0.99). "
        "vector-quantize-pytorch: VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25) "
        "in train mode, forward (its EMA update included) and backward of quantized.mean() + loss.",
        _per_shape(runs, train_names + ["speedup", "ours MiB", "vector-quantize-pytorch MiB"],
                   _train_cell, table="train"),
    ]
    if other:
        shape, rows = other
        parts += [f"## Other ops at {_shape_str(shape)}: median ms",
                  md_table(["op", "ours", "plain PyTorch", "its ms", "speedup"], rows)]
    if layers:
        parts += ["## Quantizer layers: one training step, median ms",
                  "Forward (codebook update included), backward of quantized.mean() plus the layer's losses; "
                  "ours (vqkernels.nn) against vector-quantize-pytorch's layer of the same keywords (defaults "
                  "otherwise, rotation trick included), ours loading its state_dict; same input. Memory: peak RSS "
                  "growth of one step. MultiScaleVQ rows: against VAR's VectorQuantizer2 loop in plain PyTorch "
                  "(vqkernels/bench_var.py), forward and backward of mean_vq_loss + f_hat.sum(), the median of "
                  "alternating steps; the one-thread row counts process CPU time.",
                  md_table(["layer", "configuration", "ours", "vector-quantize-pytorch", "speedup", "ours MiB",
                            "vector-quantize-pytorch MiB"], layers[0])]
    if plot_rel:
        parts += ["## Plot", f"![speedup of nearest_code over each baseline]({plot_rel})"]
    return "\n\n".join(parts) + "\n"


GPU_HEADING = "## On a GPU"


def _kept_gpu_section(path):
    """The report's GPU section (recorded by hand from benchmarks/gpu.sh on a lent GPU machine),
    carried over when this CPU benchmark rewrites the file."""
    try:
        old = path.read_text()
    except OSError:
        return ""
    at = old.find("\n" + GPU_HEADING)
    return "" if at < 0 else old[at:]


def _fmt(v):
    return f"{v:.1f}" if v else "-"


def _pct(v, of):
    return f"{100 * v / of:.0f}%" if v and of else "-"


def _train_cell(r, col):
    if col == "speedup":
        return _ratio(r.speedup("vector-quantize-pytorch", "train"))
    if col.endswith(" MiB"):
        return _mib(r.train[col[:-4]])
    return _ms(r.train[col])


def plot(runs, path):
    """Grouped bars: speedup of ours over each baseline per shape, log scale. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    baselines = _baselines()
    width = 0.8 / len(baselines)
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, name in enumerate(baselines):
        xs, ys = [], []
        for j, r in enumerate(runs):
            pos, s = j + (i - (len(baselines) - 1) / 2) * width, r.speedup(name)
            if s:
                xs.append(pos)
                ys.append(s)
            else:  # skipped, not installed or failed
                ax.text(pos, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
        ax.bar(xs, ys, width, label=name + (" (vs ours ip)" if method(name).metric == "ip" else ""))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [_shape_str(r.shape) for r in runs])
    ax.set_xlabel("N x D x K (float32)")
    ax.set_ylabel("speedup of vqkernels.nearest_code (x)")
    ax.set_title(f"nearest_code vs baselines, {THREADS} threads ({vqkernels.backend('nearest_code', 'cpu')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI

def _parse_shape(text):
    try:
        n, d, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxDxK, e.g. 16384x32x4096") from None
    return n, d, k


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vqkernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the two smallest shapes, fewer repeats, no torch.compile, training step at the smallest "
                        "shape only; writes no file unless --output is given")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown report to write (default {DEFAULT_OUTPUT}, none with --quick); the plot goes "
                        f"beside it as {PLOT_NAME}")
    p.add_argument("--plot", type=Path, default=None, help="where to write the PNG plot instead")
    p.add_argument("--repeats", type=int, default=None, help="most timed calls per method (default 50, quick 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per method after which it stops early (default 2, quick 0.5)")
    p.add_argument("--shapes", type=_parse_shape, nargs="+", default=None, metavar="NxDxK",
                   help="shapes to run instead of the standard ones")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 50
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = sorted(SHAPES, key=lambda s: s[0] * s[1] * s[2])[:2]
    else:
        shapes = list(SHAPES)
    train_shapes = set(shapes[:1]) if args.quick else set(shapes)
    output = args.output if args.output is not None else (None if args.quick else DEFAULT_OUTPUT)
    plot_path = args.plot if args.plot is not None else (output.with_name(PLOT_NAME) if output else None)

    _log(f"vqkernels.bench: kernels {vqkernels.backend('nearest_code', 'cpu')}, {THREADS} threads")
    start = time.perf_counter()
    runs = run(shapes, train_shapes, args)
    other_shape = shapes[0] if args.quick or HEADLINE not in shapes else HEADLINE
    _log(f"other ops at {_shape_str(other_shape)}")
    other = (other_shape, run_other_ops(other_shape, args))
    _log("quantizer layers: one training step each")
    from . import bench_layers, bench_var
    layers = bench_layers.run(args.repeats, args.budget, quick=args.quick, log=_log)
    _log("VAR multi-scale quantizer vs its plain per-scale loop")
    var_rows = bench_var.run(repeats=min(args.repeats, 15), quick=args.quick)
    for r in var_rows:
        speedup = r["plain_ms"] / r["ours_ms"]
        _log(f"  {r['threads']} thread(s), {r['clock']}: ours {r['ours_ms']:.1f} ms, plain {r['plain_ms']:.1f} ms")
        layers[0].append([f"MultiScaleVQ ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['clock']} time)",
                          f"VAR: B={r['B']}, Cvae 32, vocab 4096, patch sides 1..16; baseline VAR's plain loop",
                          f"{r['ours_ms']:.1f}", f"{r['plain_ms']:.1f} (plain loop)", _ratio(speedup), "-", "-"])
    wall = var_rows[0]
    wall_speedup = wall["plain_ms"] / wall["ours_ms"]
    layers[1].append(["VAR quantizer training step vs the plain per-scale loop",
                      f"B={wall['B']}, {wall['threads']} threads, wall clock", ">= 2x", _ratio(wall_speedup),
                      "PASS" if wall_speedup >= 2.0 else "FAIL"])
    elapsed = time.perf_counter() - start

    plot_rel = None
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        if plot(runs, plot_path):
            plot_rel = os.path.relpath(plot_path, output.parent if output else Path.cwd())
        else:
            _log("plot skipped: matplotlib not installed")
    text = render(runs, args, elapsed, plot_rel, other, layers)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        text += _kept_gpu_section(output)
        output.write_text(text)
        _log(f"wrote {output}" + (f" and {plot_path}" if plot_rel else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
