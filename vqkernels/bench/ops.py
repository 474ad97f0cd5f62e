"""The op suite of ``python -m vqkernels.bench``: vqkernels' CPU kernels against PyTorch, faiss
and vector-quantize-pytorch (``nearest_code`` per shape, the training step, the other ops).

Everything runs in one process on the same float32 inputs with torch.set_num_threads(2). Per
shape, every method (and the fp32 matmuls that set the ceiling) gets three warm-up calls, then its
timed calls back to back, and reports the median of up to ``repeats`` calls (fewer once it has
spent ``budget`` seconds, never fewer than three): :func:`vqkernels.bench.harness.time_calls`.
Then each makes one more call to measure its peak extra memory (growth of the peak RSS). On a
shared machine absolute times drift between runs: only the ratios within one run mean something.

Baselines that would materialise an N x K float32 matrix larger than 2 GiB are skipped, and so is
any baseline whose package is not installed; the tables say which and why.

:func:`run`, :func:`run_other_ops` and :func:`targets` return JSON-ready dicts with the raw
numbers (seconds, MiB, fractions); :mod:`vqkernels.bench.report` turns them into tables.
"""

import contextlib
import ctypes
import gc
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import vqkernels
from vqkernels import reference

from . import report
from .harness import THREADS, Skip, log, peak_extra_mib, require, time_calls

SHAPES = ((4096, 32, 512), (16384, 32, 4096), (16384, 8, 8192), (4096, 256, 1024), (65536, 64, 16384))
HEADLINE = (16384, 32, 4096)
LARGEST = (65536, 64, 16384)
MATRIX_LIMIT = 2 << 30  # bytes: a baseline needing a bigger N x K float32 matrix is skipped
SQUARE = 2048  # a compute-bound fp32 matmul, reported beside the same-shape ceiling
GIB = 1 << 30


# ----------------------------------------------------------------------------- measurement

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


def _factories(table, x, codebook, quick):
    """(name -> callable of each method that set up, name -> Result of those that did not)."""
    fns, results = {}, {}
    for m in table:
        if quick and not m.quick:
            results[m.name] = Result(note="skipped (--quick)")
            continue
        try:
            fns[m.name] = m.factory(x, codebook)
        except Exception as exc:  # Skip: not installed, too big
            results[m.name] = _not_run(exc, m.name == OURS[m.metric])
    return fns, results


def measure_table(table, x, codebook, repeats, budget_s, quick=False, extra=None):
    """Results of every method in ``table`` at (x, codebook), timed one after another in one process.

    Setup (the factories) stays outside the timed region. After the timing, each method makes one
    more call to measure its peak extra memory, and its indices are checked against ours. ``extra``
    (name -> callable) is timed in the same pass; its (seconds, calls) come back second.
    """
    fns, results = _factories(table, x, codebook, quick)
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
        faiss = require("faiss")
        faiss.omp_set_num_threads(THREADS)
        index = getattr(faiss, index_type)(codebook.shape[1])
        index.add(codebook.numpy())
        xs = x.numpy()
        return lambda: torch.from_numpy(index.search(xs, 1)[1]).view(-1)
    return factory


def _vqp_module(codebook, **kwargs):
    """vector-quantize-pytorch's VectorQuantize holding our codebook."""
    vqp = require("vector_quantize_pytorch")
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


def _binary_one_hot_pair(x, codebook):
    """BinaryMapper's straight-through gradient (binary_one_hot's backward op) for 8-bit logits (x's first 8
    features, 256 codes) and the reference's, which forms the joint probabilities G."""
    logits = x[:, :8].contiguous()
    grad = torch.randn(x.shape[0], 256)
    return (lambda: torch.ops.vqkernels.binary_one_hot_backward(grad, logits),
            lambda: reference.binary_one_hot_backward(grad, logits))


# The other ops, each beside the plain PyTorch it replaces: (op, baseline, factory giving (ours, baseline)).
OTHER_OPS = (
    ("nearest_code_topk, k=8", "cdist().topk(8)",
     lambda x, c: (lambda: vqkernels.nearest_code_topk(x, c, 8), lambda: torch.cdist(x, c).topk(8, largest=False))),
    ("vq_quantize forward", "addmm argmin + gather + mse",
     lambda x, c: (lambda: vqkernels.vq_quantize(x, c), lambda: _naive_vq(x, c))),
    ("ema_update_", "bincount + index_add_ (reference)", _ema_pair),
    ("fsq_quantize, levels 8,8,8,5,5,5", "bound + round + index (reference)",
     _scalar_pairs("fsq_quantize", 6, [8, 8, 8, 5, 5, 5])),
    ("residual_fsq_quantize, 4 levels of 8,5,5,5", "the levels' loop of bound + round + index (reference)",
     _scalar_pairs("residual_fsq_quantize", 4, torch.stack([torch.tensor([8.0, 5, 5, 5]) ** -lv for lv in range(4)]),
                   [8, 5, 5, 5], True, True)),
    ("latent_quantize, levels 8,5,5,5", "each dimension's abs + argmin + gather (reference)",
     _scalar_pairs("latent_quantize", 4, torch.cat([torch.arange(8) / 8 - 0.5] + [torch.linspace(-0.5, 0.5, 5)] * 3),
                   [8, 5, 5, 5])),
    ("lfq_quantize, 16 bits", "sign + index + mse (reference)", _scalar_pairs("lfq_quantize", 16)),
    ("rotation_trick backward", "the rotation's gradient (reference)", _rotation_pair),
    ("binary_one_hot backward, 8 bits", "joint probabilities G and their gradient (reference)", _binary_one_hot_pair),
)


def run_other_ops(shape, repeats, budget):
    """{"shape", "rows": [{op, ours_s, baseline, baseline_s}]}: each other op against its baseline at `shape`."""
    x, codebook = make_inputs(*shape)
    rows = []
    with torch.no_grad():
        for op, base, factory in OTHER_OPS:
            timed = time_calls(dict(zip(("ours", "base"), factory(x, codebook))), repeats, budget)
            ours, theirs = timed["ours"][0], timed["base"][0]
            rows.append(dict(op=op, ours_s=ours, baseline=base, baseline_s=theirs))
            log(f"  {report.shape_str(shape)} {op}: {ours * 1e3:.2f} ms, {base}: {theirs * 1e3:.2f} ms")
    return dict(shape=list(shape), rows=rows)


def method(name, table=NEAREST):
    return next(m for m in table if m.name == name)


def matmul_call(a, b):
    """torch.mm(a, b, out=...) into a preallocated output; (callable, its flop)."""
    out = torch.empty(a.shape[0], b.shape[1])
    return (lambda: torch.mm(a, b, out=out)), 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


# ----------------------------------------------------------------------------- running

def _log_results(shape, results):
    for name, r in results.items():
        log(f"  {report.shape_str(shape)} {name}: " +
            (f"{r.seconds * 1e3:.2f} ms (x{r.calls})" if r.seconds is not None else r.note))


def _nearest_and_ceilings(shape, x, codebook, repeats, budget, quick):
    """The shape's run dict without its training step: NEAREST's results and both matmul rates."""
    rows = min(shape[0], MATRIX_LIMIT // (4 * shape[2]))  # fewer rows if N x K is too big
    square = torch.randn(SQUARE, SQUARE)
    mms = {"same-shape": matmul_call(x[:rows], codebook.t()), "square": matmul_call(square, square)}
    with torch.no_grad():
        nearest, timed = measure_table(NEAREST, x, codebook, repeats, budget, quick,
                                       extra={name: fn for name, (fn, _) in mms.items()})
    ceiling, square_rate = (mms[k][1] / timed[k][0] / 1e9 for k in ("same-shape", "square"))
    _log_results(shape, nearest)
    log(f"  {report.shape_str(shape)} fp32 matmul: {ceiling:.1f} GFLOP/s at this D and K, "
        f"{square_rate:.1f} GFLOP/s at {SQUARE}^3")
    return dict(shape=list(shape), nearest={k: asdict(v) for k, v in nearest.items()}, train={},
                ceiling_gflops=ceiling, ceiling_rows=rows, square_gflops=square_rate)


def _methods(table):
    return [dict(name=m.name, metric=m.metric, ours=m.name == OURS[m.metric]) for m in table]


def run(shapes, train_shapes, repeats, budget, quick=False):
    """The nearest_code section of the results: per shape NEAREST's results (seconds, calls, MiB,
    agreement with ours), the fp32 matmul rates and, at ``train_shapes``, TRAIN's; with the methods'
    metrics, so that each baseline is compared with ours at its metric."""
    torch.set_num_threads(THREADS)
    runs = []
    for shape in shapes:
        log(f"shape N={shape[0]} D={shape[1]} K={shape[2]}")
        x, codebook = make_inputs(*shape)
        sr = _nearest_and_ceilings(shape, x, codebook, repeats, budget, quick)
        if shape in train_shapes:
            with torch.enable_grad():
                train, _ = measure_table(TRAIN, x, codebook, repeats, budget)
            _log_results(shape, {f"training step, {k}": v for k, v in train.items()})
            sr["train"] = {k: asdict(v) for k, v in train.items()}
        runs.append(sr)
        del x, codebook
        gc.collect()
    return dict(methods=_methods(NEAREST), train_methods=_methods(TRAIN), headline=list(HEADLINE),
                largest=list(LARGEST), square=SQUARE, matrix_limit=MATRIX_LIMIT, runs=runs)


# ----------------------------------------------------------------------------- ISA paths

FAISS_LEVELS = {"avx512": "AVX512", "avx2": "AVX2"}  # our ISA path -> faiss.SIMDLevel_<name>
FMA_PEAK_TRIES = (5, 0.1)  # the best of 5 windows of 0.1 s: a window shared with another process reads low
FMA_PEAK_BESIDE = (3, 0.05)  # per shape, 3 windows of 0.05 s just before ours' timing and 3 just after


def isa_paths():
    """The SIMD paths of our CPU kernels this machine runs, widest first ("avx512", "avx2")."""
    if not vqkernels.compiled():
        return []
    c = vqkernels._backend._C
    return [isa for isa, has in (("avx512", c.cpu_has_avx512()), ("avx2", c.cpu_has_avx2())) if has]


@contextlib.contextmanager
def _isa(isa, faiss):
    """Our kernels on ``isa`` and faiss (when it can switch: its SIMDConfig, faiss >= 1.11 dynamic dispatch) on the
    same SIMD level for the block; yields faiss's level name, or why it could not be matched."""
    before = vqkernels.cpu_isa()
    vqkernels.set_cpu_isa(isa)
    config = getattr(faiss, "SIMDConfig", None) if faiss else None
    old = config.get_level() if config and config.has_dynamic_dispatch() else None
    try:
        if old is None:
            yield "faiss cannot switch its SIMD level (no dynamic dispatch)" if faiss else "faiss not installed"
        else:
            config.set_level(getattr(faiss, f"SIMDLevel_{FAISS_LEVELS[isa]}"))
            yield config.get_level_name()
    finally:
        vqkernels.set_cpu_isa(before)
        if old is not None:
            config.set_level(old)


def _faiss_module():
    try:
        return require("faiss")
    except Skip:
        return None


def faiss_blas(faiss):
    """The BLAS faiss-cpu calls for its sgemm (D > 32 here), and which kernels it runs on this machine: the wheel's
    own OpenBLAS picks them at load time by the CPU, whatever faiss's SIMD level. None where it cannot be read."""
    if faiss is None:
        return None
    libs = sorted((Path(faiss.__file__).resolve().parent.parent / "faiss_cpu.libs").glob("libopenblas*.so*"))
    try:
        lib = ctypes.CDLL(str(libs[0]))
        lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
        version = lib.openblas_get_config().decode().split()[1]
        return f"OpenBLAS {version}, {lib.openblas_get_corename().decode()} kernels"
    except (IndexError, OSError, AttributeError):
        return None


def _peak_beside(isa):
    """The FMA probe's GFLOP/s on ``isa`` in FMA_PEAK_BESIDE windows, for the median beside a timing."""
    tries, seconds = FMA_PEAK_BESIDE
    return [vqkernels._backend._C.fma_peak_gflops(isa, THREADS, seconds) for _ in range(tries)]


def _isa_shape(shape, faiss, repeats, budget, isa):
    x, codebook = make_inputs(*shape)
    fns = {"ours": _ours("l2")(x, codebook)}
    if faiss is not None:
        fns["faiss"] = _faiss("IndexFlatL2")(x, codebook)
    with torch.no_grad():
        # ours between two sets of probe windows: the peak of the moment it ran (this machine's speed drifts)
        probes = _peak_beside(isa)
        timed = time_calls({"ours": fns.pop("ours")}, repeats, budget)
        probes += _peak_beside(isa)
        timed.update(time_calls(fns, repeats, budget))
    if isinstance(timed["ours"], Exception):
        raise timed["ours"]
    faiss_t = timed.get("faiss")
    row = dict(shape=list(shape), ours_s=timed["ours"][0], faiss_s=None, faiss_note="faiss not installed",
               peak_beside_gflops=statistics.median(probes))
    if isinstance(faiss_t, tuple):
        row.update(faiss_s=faiss_t[0], faiss_note="")
    elif faiss_t is not None:
        row["faiss_note"] = f"failed: {type(faiss_t).__name__}"
    return row


def run_isa_paths(shapes, repeats, budget):
    """Per SIMD path of our kernels (``isa_paths``): the machine's measured fp32 FMA peak on that path
    (``_C.fma_peak_gflops``, THREADS threads) and, per shape, nearest_code (l2) forced onto the path against
    faiss's IndexFlatL2 on the same SIMD level, timed side by side in this process."""
    torch.set_num_threads(THREADS)
    faiss = _faiss_module()
    paths = []
    blas = faiss_blas(faiss)
    if blas:
        log(f"faiss's BLAS: {blas}")
    for isa in isa_paths():
        tries, seconds = FMA_PEAK_TRIES
        peak = max(vqkernels._backend._C.fma_peak_gflops(isa, THREADS, seconds) for _ in range(tries))
        log(f"ISA path {isa}: measured FMA peak {peak:.0f} GFLOP/s on {THREADS} threads")
        with _isa(isa, faiss) as level:
            rows = [_isa_shape(shape, faiss, repeats, budget, isa) for shape in shapes]
        for r in rows:
            log(f"  {report.shape_str(r['shape'])} {isa}: ours {r['ours_s'] * 1e3:.2f} ms, faiss ({level}) "
                + (f"{r['faiss_s'] * 1e3:.2f} ms" if r["faiss_s"] is not None else r["faiss_note"]))
        paths.append(dict(isa=isa, fma_peak_gflops=peak, faiss_level=level, rows=rows))
    return dict(threads=THREADS, paths=paths, faiss_blas=blas)


# ----------------------------------------------------------------------------- targets

def _matmul_fraction(sr):
    """ours' GFLOP/s over the faster fp32 matmul: the same-shape one mostly writes its N x K output,
    the SQUARE^3 one runs at the machine's fp32 rate."""
    ceiling = max(sr["ceiling_gflops"], sr["square_gflops"])
    rate = report.gflops(sr)
    return rate / ceiling if rate and ceiling else None


def targets(section):
    """Target records (the issue's goals) of a :func:`run` section; shapes it did not run say "not run"."""
    by_shape = {tuple(r["shape"]): r for r in section["runs"]}

    def at(name, shape, need, measure, **kw):
        sr = by_shape.get(shape)
        value, why = measure(sr) if sr else (None, "not run")
        return report.target(name, report.shape_str(shape), need, value, why, **kw)

    def vs(name, table="nearest"):
        return lambda sr: (report.speedup(section, sr, name, table), sr[table].get(name, {}).get("note", ""))

    rows = [at("nearest_code vs cdist().argmin", HEADLINE, 5.0, vs("cdist().argmin"))]
    rows += [at("nearest_code % of fp32 matmul GFLOP/s", s, 0.75, lambda sr: (_matmul_fraction(sr), ""), unit="%")
             for s in SHAPES if s[1] >= 32]
    rows.append(at("nearest_code peak extra memory", LARGEST, 64.0, lambda sr: (sr["nearest"]["ours"]["mib"], ""),
                   unit="MiB", compare="<="))
    rows.append(at("training step vs vector-quantize-pytorch", HEADLINE, 10.0, vs("vector-quantize-pytorch", "train")))
    return rows


FAISS_NEED = (16, 1.2, 1.3)  # vs faiss: >= 1.2x at D <= 16, >= 1.3x above
PEAK_NEED = (32, 0.85)  # >= 85% of the measured FMA peak at D >= 32


def isa_targets(section):
    """Target records of a :func:`run_isa_paths` section: per path and shape, the speedup over faiss at the same
    SIMD level, and (D >= 32) the fraction of the path's measured FMA peak."""
    rows = []
    for path in section["paths"]:
        isa = path["isa"]
        for r in path["rows"]:
            shape, d = tuple(r["shape"]), r["shape"][1]
            where = f"{report.shape_str(shape)} ({isa})"
            need = FAISS_NEED[1] if d <= FAISS_NEED[0] else FAISS_NEED[2]
            faster = r["faiss_s"] / r["ours_s"] if r["faiss_s"] is not None else None
            # the most any kernel could show: the whole measured peak against faiss's own rate
            limit = path["fma_peak_gflops"] / report.isa_gflops(r, "faiss_s") if faster is not None else None
            rows.append(report.target("nearest_code vs faiss IndexFlatL2, same SIMD level", where, need, faster,
                                      r["faiss_note"], limit=limit))
            if d >= PEAK_NEED[0]:
                rows.append(report.target("nearest_code % of the measured FMA peak", where, PEAK_NEED[1],
                                          report.isa_gflops(r) / report.peak_beside(path, r), unit="%"))
    return rows
