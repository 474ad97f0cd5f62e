"""The benchmark report: benchmarks/RESULTS.md and README's measured tables, generated from the JSON
results that ``python -m vqkernels.bench`` writes (benchmarks/results.json).

    python -m vqkernels.bench.report                  # RESULTS.md and README's blocks from results.json
    python -m vqkernels.bench.report --no-readme      # RESULTS.md only
    python -m vqkernels.bench.report --check          # exit 1 if either differs from what the JSON gives
    python -m vqkernels.bench.report --json /tmp/q.json --output /tmp/q.md --no-readme

Nothing is measured here, and every number comes from the JSON (the standard library only;
matplotlib for the plot). The results hold raw numbers (seconds, MiB, fractions); every rounding,
ratio and PASS / FAIL is decided here. README.md's generated blocks sit between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` lines; the text around them is written by hand. RESULTS.md's section from
"## On a GPU" on is written by hand too (from benchmarks/gpu.sh on a lent GPU machine) and is carried
over when the file is rewritten.
"""

import argparse
import json
import operator
import re
import sys
import textwrap
from pathlib import Path

GIB_MIB = 1024
_REPO = Path(__file__).resolve().parents[2]
_BASE = _REPO if (_REPO / "benchmarks").is_dir() else Path.cwd()
DEFAULT_JSON = _BASE / "benchmarks" / "results.json"
DEFAULT_OUTPUT = _BASE / "benchmarks" / "RESULTS.md"
DEFAULT_README = _BASE / "README.md"
PLOT_NAME = "nearest_code.png"
GPU_HEADING = "## On a GPU"
COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


# ----------------------------------------------------------------------------- numbers

def shape_str(shape):
    return "x".join(str(v) for v in shape)


def ratio(v):
    return f"{v:.2f}x" if v is not None else "-"


def _ms(r):
    return f"{r['seconds'] * 1e3:.2f}" if r.get("seconds") is not None else r.get("note", "")


def _mib(r):
    return f"{r['mib']:.1f}" if r.get("mib") is not None else ("n/a" if r.get("seconds") is not None else "-")


def _agree(r):
    return f"{100 * r['agree']:.2f}" if r.get("agree") is not None else "-"


def _fmt(v):
    return f"{v:.1f}" if v else "-"


def _pct(v, of):
    return f"{100 * v / of:.0f}%" if v and of else "-"


def _fmt_mib(v):
    return "-" if v is None else f"{v:.1f}"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def speedup(section, run, name, table="nearest"):
    """t(baseline ``name``) / t(ours at the baseline's metric) in one shape's ``run``, or None."""
    methods = section["methods" if table == "nearest" else "train_methods"]
    metric = next(m["metric"] for m in methods if m["name"] == name)
    ours = next(m["name"] for m in methods if m["ours"] and m["metric"] == metric)
    base, own = run[table].get(name), run[table].get(ours)
    if base is None or own is None or base["seconds"] is None or own["seconds"] is None:
        return None
    return base["seconds"] / own["seconds"]


def isa_gflops(row, key="ours_s"):
    """Equivalent GFLOP/s 2 N K D / t of ours (``key`` "faiss_s": of faiss) in one row of an ISA path."""
    n, d, k = row["shape"]
    return 2.0 * n * k * d / row[key] / 1e9


def peak_beside(path, row):
    """The FMA peak measured beside one row's timing of ours (the median of the probe windows just before and just
    after it); the path's peak where the row has none (reports written before it was measured)."""
    return row.get("peak_beside_gflops", path["fma_peak_gflops"])


def gflops(run, name="ours"):
    """Equivalent GFLOP/s 2 N K D / t of method ``name`` in one shape's ``run``, or None."""
    n, d, k = run["shape"]
    r = run["nearest"].get(name)
    return None if r is None or r["seconds"] is None else 2.0 * n * k * d / r["seconds"] / 1e9


# ----------------------------------------------------------------------------- targets

def target(name, where, need, value, why="", unit="x", compare=">=", limit=None):
    """A target record: ``value`` (None: not measured, ``why``) against ``need``; unit "x" (a ratio),
    "%" (a fraction shown in percent) or "MiB"; compare ">=", "<=" or "<". ``limit``: the most the value could
    read on this machine (a speedup at the whole measured FMA peak); a need above it fails as "FAIL (limit)"."""
    return dict(target=name, where=where, need=need, value=value, why=why, unit=unit, compare=compare, limit=limit)


def _in_unit(v, unit, finer=False):
    """v in its unit; ``finer``: one more digit."""
    if unit == "%":
        return f"{100 * v:.{int(finer) + (0 if 100 * v >= 10 else 1)}f}%"
    if unit == "MiB":
        return f"{v:.{1 + int(finer)}f} MiB"
    return f"{v:.3f}x" if finer else ratio(v)


def target_row(t):
    """[target, where, needed, measured, PASS / FAIL / n/a] of a target record."""
    needed = f"{t['compare']} {_in_unit(t['need'], t['unit'])}"
    if t["value"] is None:
        return [t["target"], t["where"], needed, t["why"] or "not measured", "n/a"]
    passed = COMPARE[t["compare"]](t["value"], t["need"])
    measured = _in_unit(t["value"], t["unit"])
    if measured == _in_unit(t["need"], t["unit"]):  # rounded onto the bar: one more digit says which side
        measured = _in_unit(t["value"], t["unit"], finer=True)
    limit = t.get("limit")
    beyond = limit is not None and not COMPARE[t["compare"]](limit, t["need"])
    result = "PASS" if passed else f"FAIL (limit {_in_unit(limit, t['unit'])})" if beyond else "FAIL"
    return [t["target"], t["where"], needed, measured, result]


def targets_table(records, where="N x D x K"):
    return md_table(["target", where, "needed", "measured", "result"], [target_row(t) for t in records])


# ----------------------------------------------------------------------------- RESULTS.md

def _per_shape(section, names, cell, table="nearest"):
    """A shapes x methods table of the runs that have ``table``; cell(run, name) gives one entry."""
    rows = [[shape_str(r["shape"])] + [cell(r, n) for n in names] for r in section["runs"] if r[table]]
    return md_table(["N x D x K"] + list(names), rows)


def baselines(section):
    return [m["name"] for m in section["methods"] if not m["ours"]]


def _header(results):
    s, nc = results["settings"], results["nearest_code"]
    return (f"Generated by `{results['command']}` in {results['elapsed_s']:.0f} s. float32, one process, same "
            f"inputs (randn), torch.set_num_threads({s['threads']}). Per shape every method gets {s['warmup']} "
            "warm-up calls, then its timed calls back to back (methods one after another, with a pause between "
            "them so that one library's idle OpenMP threads do not slow the next); each reports the median of up "
            f"to {s['repeats']} calls (fewer once it has spent {s['budget_s']:g} s, never fewer than "
            f"{s['min_repeats']}). Absolute times drift on a shared machine: compare ratios within one run. "
            f"Baselines that would hold an N x K float32 matrix over {nc['matrix_limit'] >> 30} GiB are skipped.")


def machine_rows(m):
    isa = m["cpu_isa"] or "none (extension not built: pure-PyTorch reference)"
    return [["CPU", m["cpu"]],
            ["cores (os.cpu_count) / torch threads", f"{m['cores']} / {m['torch_threads']}"],
            ["CPU SIMD flags", m["simd"]],
            ["vqkernels kernels", m["kernels"]],
            ["vqkernels.cpu_isa()", isa],
            ["python / torch", f"{m['python']} / {m['torch']}"],
            [" / ".join(m["packages"]), " / ".join(m["packages"].values())],
            ["date", m["date"]]]


def _throughput(nc):
    sq = nc["square"]
    rows = [[shape_str(r["shape"]), _fmt(gflops(r)), _fmt(gflops(r, "ours ip")), _fmt(r["ceiling_gflops"]),
             r["ceiling_rows"], _pct(gflops(r), r["ceiling_gflops"]), _fmt(r["square_gflops"]),
             _pct(gflops(r), r["square_gflops"])] for r in nc["runs"]]
    return md_table(["N x D x K", "ours GFLOP/s", "ours ip GFLOP/s", "matmul GFLOP/s", "rows", "ours % of matmul",
                     f"{sq}^3 matmul GFLOP/s", f"ours % of {sq}^3"], rows)


def _train_cell(nc):
    def cell(r, col):
        if col == "speedup":
            return ratio(speedup(nc, r, "vector-quantize-pytorch", "train"))
        if col.endswith(" MiB"):
            return _mib(r["train"][col[:-4]])
        return _ms(r["train"][col])
    return cell


def nearest_sections(nc):
    """The nearest_code and training-step sections of RESULTS.md."""
    names, base = [m["name"] for m in nc["methods"]], baselines(nc)
    train = [m["name"] for m in nc["train_methods"]]
    return [
        "## nearest_code: median ms",
        _per_shape(nc, names, lambda r, n: _ms(r["nearest"][n])),
        "## nearest_code: speedup of ours over each baseline (baseline time / our time; ip baselines vs ours ip)",
        _per_shape(nc, base, lambda r, n: ratio(speedup(nc, r, n))),
        "## nearest_code: throughput vs the fp32 matmul ceiling",
        "Equivalent GFLOP/s = 2·N·K·D / t. Two fp32 matmuls measured in the same run: torch.mm(x, C^T, out=...) "
        "at the same D and K, with `rows` rows of x (fewer than N when N x K is over the limit), which at small D "
        f"is bound by writing its N x K output, and the compute-bound {nc['square']}^3 torch.mm. The target uses "
        "the faster of the two.",
        _throughput(nc),
        "## nearest_code: peak extra memory of one call (MiB, growth of peak RSS; includes the outputs)",
        _per_shape(nc, names, lambda r, n: _mib(r["nearest"][n])),
        "## nearest_code: rows whose index equals ours (%)",
        _per_shape(nc, base, lambda r, n: _agree(r["nearest"][n])),
        "## Training step: median ms",
        "ours: vq_quantize forward, backward of quantized.mean() + 0.25 * commit_loss, ema_update_(decay=0.99). "
        "vector-quantize-pytorch: VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25) "
        "in train mode, forward (its EMA update included) and backward of quantized.mean() + loss.",
        _per_shape(nc, train + ["speedup", "ours MiB", "vector-quantize-pytorch MiB"], _train_cell(nc), "train"),
    ]


def isa_section(section):
    """RESULTS.md's section on the SIMD paths of nearest_code: per path, ours against faiss on the same level and
    against the path's measured FMA peak."""
    rows = []
    for path in section["paths"]:
        peak = path["fma_peak_gflops"]
        for r in path["rows"]:
            has_faiss = r["faiss_s"] is not None
            faiss = f"{r['faiss_s'] * 1e3:.2f}" if has_faiss else r["faiss_note"]
            faster = r["faiss_s"] / r["ours_s"] if has_faiss else None
            faiss_pct = _pct(isa_gflops(r, "faiss_s"), peak) if has_faiss else "-"
            beside = r.get("peak_beside_gflops")
            rows.append([path["isa"], shape_str(r["shape"]), f"{r['ours_s'] * 1e3:.2f}", faiss, ratio(faster),
                         _fmt(isa_gflops(r)), f"{peak:.0f}", _pct(isa_gflops(r), peak), faiss_pct,
                         f"{beside:.0f}" if beside else "-", _pct(isa_gflops(r), beside)])
    levels = "; ".join(f"{p['isa']}: {p['faiss_level']}" for p in section["paths"])
    blas = section.get("faiss_blas")
    blas = (f"its BLAS ({blas}) picks its own kernels by the CPU at load time, whatever the faiss level"
            if blas else "the BLAS keeps its own instruction set whatever the faiss level")
    return ["## nearest_code on each SIMD path: against faiss at the same level and the measured FMA peak",
            "Our kernels forced onto each path (vqkernels.set_cpu_isa), faiss-cpu's IndexFlatL2 set to the same "
            f"SIMD level (faiss.SIMDConfig; {levels}), timed side by side, {section['threads']} threads. faiss "
            f"runs its fused search kernels up to D = 32 here and a BLAS sgemm above; {blas}. FMA peak: "
            "independent FMA chains on the path's widest vectors, all threads, the best of five 0.1 s windows "
            "(vqkernels._C.fma_peak_gflops) before the path's shapes; equivalent GFLOP/s = 2·N·K·D / t. The peak "
            "beside: the median of the probe's three 0.05 s windows just before ours' timing of the shape and "
            "three just after, the machine's rate at the moment ours ran (a shared machine's speed drifts "
            "between moments); the FMA-peak target reads ours against it (against the best peak in a run that did not "
            "measure it: \"-\"). A speedup over faiss cannot exceed "
            "the (best) peak over faiss's own rate: where that limit is below the need, the target reads "
            "\"FAIL (limit)\".",
            md_table(["path", "N x D x K", "ours ms", "faiss ms", "speedup", "ours GFLOP/s", "FMA peak GFLOP/s",
                      "ours % of peak", "faiss % of peak", "peak beside GFLOP/s", "ours % of peak beside"],
                     rows)]


def other_ops_section(other):
    rows = [[r["op"], f"{r['ours_s'] * 1e3:.2f}", r["baseline"], f"{r['baseline_s'] * 1e3:.2f}",
             ratio(r["baseline_s"] / r["ours_s"])] for r in other["rows"]]
    return [f"## Other ops at {shape_str(other['shape'])}: median ms",
            md_table(["op", "ours", "plain PyTorch", "its ms", "speedup"], rows)]


def layer_row(r):
    """[layer, configuration, ours ms, theirs ms (or why not), speedup, ours MiB, theirs MiB] of a layer result."""
    theirs = r["theirs_note"] if r["theirs_s"] is None else f"{r['theirs_s'] * 1e3:.1f}"
    faster = None if r["theirs_s"] is None else r["theirs_s"] / r["ours_s"]
    return [r["name"], r["detail"], f"{r['ours_s'] * 1e3:.1f}", theirs, ratio(faster), _fmt_mib(r["ours_mib"]),
            _fmt_mib(r["theirs_mib"])]


def _var_sides(r):
    return f"{min(r['patch_nums'])}..{max(r['patch_nums'])}"


def var_row(r):
    """The layers table's row of a VAR timing (vqkernels.bench.var.run)."""
    threads = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
    return [f"MultiScaleVQ ({threads}, {r['clock']} time)",
            f"VAR: B={r['B']}, Cvae {r['Cvae']}, vocab {r['vocab']}, patch sides {_var_sides(r)}; baseline VAR's "
            "plain loop", f"{r['ours_ms']:.1f}", f"{r['plain_ms']:.1f} (plain loop)", ratio(r["plain_ms"] / r["ours_ms"]),
            "-", "-"]


LAYER_HEADERS = ["layer", "configuration", "ours", "vector-quantize-pytorch", "speedup", "ours MiB",
                 "vector-quantize-pytorch MiB"]


def layers_table(layers, var=()):
    return md_table(LAYER_HEADERS, [layer_row(r) for r in layers] + [var_row(r) for r in var])


def layers_section(results):
    return ["## Quantizer layers: one training step, median ms",
            "Forward (codebook update included), backward of quantized.mean() plus the layer's losses; "
            "ours (vqkernels.nn) against vector-quantize-pytorch's layer of the same keywords (defaults "
            "otherwise, rotation trick included), ours loading its state_dict; same input. Memory: peak RSS "
            "growth of one step. MultiScaleVQ rows: against VAR's VectorQuantizer2 loop in plain PyTorch "
            "(vqkernels/bench/var.py), forward and backward of mean_vq_loss + f_hat.sum(), the median of "
            "alternating steps; the one-thread row counts process CPU time.",
            layers_table(results["layers"], results.get("var", ()))]


def tokens_str(n):
    """1024 -> "1024", 16384 -> "16 x 1024"."""
    return f"{n // 1024} x 1024" if n > 1024 and n % 1024 == 0 else str(n)


def sweep_title(sweep):
    return f"Quantizer layers at {' and '.join(tokens_str(n) for n in sweep['tokens'])} tokens"


def _sweep_cells(r, need):
    """[ours ms, theirs ms (or why not), speedup, shell ms, theirs / shell, whether >= need] of one sweep run
    (None: not measured). Below the need, "no (bound)" when even the shell's bound is below it."""
    if r is None:
        return ["-"] * 6
    faster = None if r["theirs_s"] is None else r["theirs_s"] / r["ours_s"]
    shell = r.get("shell_s")
    bound = None if r["theirs_s"] is None or shell is None else r["theirs_s"] / shell
    theirs = r["theirs_note"] if r["theirs_s"] is None else f"{r['theirs_s'] * 1e3:.2f}"
    if faster is None:
        met = "-"
    elif faster >= need:
        met = "yes"
    else:
        met = "no (bound)" if bound is not None and bound < need else "no"
    return [f"{r['ours_s'] * 1e3:.2f}", theirs, ratio(faster), "-" if shell is None else f"{shell * 1e3:.3f}",
            ratio(bound), met]


def sweep_table(sweep):
    """One row a layer: its configuration, then at each size of the sweep ours / theirs ms, the speedup, the
    layer's shell ms, theirs over the shell (the bound on any speedup) and whether ours meets the target."""
    need, sizes = sweep["target"], sweep["tokens"]
    headers = ["layer", "configuration"]
    for n in sizes:
        t = tokens_str(n)
        headers += [f"ours ({t})", f"vector-quantize-pytorch ({t})", f"speedup ({t})", f"shell ({t})",
                    f"bound ({t})", f">= {need:g}x ({t})"]
    by_layer = {}
    for r in sweep["runs"]:
        by_layer.setdefault(r["name"], {})[r["tokens"]] = r
    rows = []
    for name, runs in by_layer.items():
        first = next(iter(runs.values()))
        rows.append([name, f"{first['detail']}; {first['seq']} tokens a sample"]
                    + [c for n in sizes for c in _sweep_cells(runs.get(n), need)])
    return md_table(headers, rows)


def sweep_section(sweep):
    sizes = " and ".join(tokens_str(n) for n in sweep["tokens"])
    return [f"## {sweep_title(sweep)}",
            f"The layers of the table above, each timed at {sizes} tokens a step (batch = tokens / tokens a "
            "sample), same step, same timing, time only; median ms. The shell is the same step with the quantizer "
            "taken out (vqkernels/bench/layers.py, `Shell`: the layer's own dense maps, its linear maps in and out "
            "or HierarchicalVQ's per-level convolutions, else the identity, and the random numbers a layer draws from "
            "theirs' stream: FSP's perturbations, the sampled codes' Gumbel noise, BinaryMapper's bits; a layer whose "
            "output is wider than its input, BinaryMapper's one-hot, ends in a fresh output of that width whose "
            "gradient is read once); its time is the least any implementation of the layer could take here, so "
            "vector-quantize-pytorch's time over it, the bound, is the most any quantizer could gain. The last "
            f"column of each size says whether ours is at least {sweep['target']:g}x vector-quantize-pytorch's "
            f"step; \"no (bound)\" where the bound itself is below {sweep['target']:g}x.",
            sweep_table(sweep)]


def _us(seconds):
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _rest(r):
    return r["profiled_s"] - r["kernels_s"] - r["router_s"] - r["aten_s"] - r["other_s"]


# (label, key of a profiled step row or a function of it, the key it is a share of or None)
OVERHEAD_ROWS = (
    ("step, wall time (no profiler)", "wall_s", None),
    ("vector-quantize-pytorch's step, wall time (for scale)", "theirs_s", None),
    ("our kernels: self time of vqkernels_cpu:: ops in the profiled step (% of the step)", "kernels_s", "wall_s"),
    ("everything else: step minus our kernels (% of the step)", lambda r: r["wall_s"] - r["kernels_s"], "wall_s"),
    ("step under torch.profiler, wall time", "profiled_s", None),
    ("the profiler's own cost: profiled minus unprofiled step", lambda r: r["profiled_s"] - r["wall_s"], None),
    ("profiled: public ops vqkernels::, self time (their Python autograd kernel, the router, dispatch; % of the "
     "profiled step)", "router_s", "profiled_s"),
    ("profiled: other aten ops, self time", "aten_s", "profiled_s"),
    ("profiled: autograd nodes and other events, self time (holds our backward formulas' Python)", "other_s",
     "profiled_s"),
    ("profiled: the rest (the layer's Python, the autograd engine, much of the profiler's cost)", _rest,
     "profiled_s"),
)


def _overhead_cell(r, key, of):
    v = key(r) if callable(key) else r[key]
    return _us(v) + (f" ({100 * v / r[of]:.0f}%)" if of and v is not None else "")


def _micro_by_key(micro):
    return {r["key"]: r for r in micro}


def overhead_steps_table(steps, micro=()):
    """The profiled steps, one column each; allocations also priced at torch.empty([1024, 64])'s measured cost."""
    headers = [""] + [f"{r['name']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''} (us)" for r in steps]
    rows = [[label] + [_overhead_cell(r, key, of) for r in steps] for label, key, of in OVERHEAD_ROWS]
    empty = _micro_by_key(micro).get("empty")
    label = "allocations a step (aten::empty, aten::empty_strided)"
    if empty:
        label += f"; ~ us at the cost of {empty['what']}"

    def priced(n):
        return f"{n:.0f}" + (f" (~{n * empty['seconds'] * 1e6:.0f} us)" if empty else "")
    rows += [["profiled events a step"] + [f"{r['events']:.0f}" for r in steps],
             [label] + [priced(r["allocations"]) for r in steps]]
    return md_table(headers, rows)


def overhead_micro_table(micro):
    """The fixed costs: each row numbered; a row compared with another gives the difference and that row's number."""
    number = {r["key"]: i for i, r in enumerate(micro, 1)}
    by_key = _micro_by_key(micro)
    rows = []
    for i, r in enumerate(micro, 1):
        base = by_key.get(r["vs"])
        extra = "-" if base is None else f"{(r['seconds'] - base['seconds']) * 1e6:+.2f} (vs {number[r['vs']]})"
        rows.append([i, r["what"], r["threads"], f"{r['seconds'] * 1e6:.2f}", extra])
    return md_table(["#", "call", "threads", "us a call", "difference (us)"], rows)


def overhead_section(overhead):
    steps = overhead["steps"]
    configs = "; ".join(dict.fromkeys(f"{r['name']}: {r['detail']}" for r in steps))
    return [f"## Per-call overhead at {tokens_str(overhead['tokens'])} tokens",
            f"One training step as in the layer table ({configs}), microseconds. {overhead['profiled_steps']} "
            "rounds of one step without the profiler and one under its own torch.profiler, alternating: the "
            "median unprofiled wall time; of the profiled steps the one of median wall time, split by the self "
            "time of its recorded events (a kernel's self time includes its OpenMP waits). The "
            "profiler adds a cost to every event, which shows in the profiled step's wall time and lands mostly "
            "in the profiled rest. (python -m vqkernels.bench.overhead)",
            overhead_steps_table(steps, overhead["micro"]),
            "Fixed costs, each the median over rounds of back-to-back calls in the same process (a row and the "
            "row it is compared with run their rounds in turn); a difference is from the row numbered.",
            overhead_micro_table(overhead["micro"])]


def render(results):
    """RESULTS.md (up to its hand-written GPU section) from the results."""
    layers = "layers" in results
    parts = ["# vqkernels benchmarks", _header(results),
             "## Machine", md_table(["", ""], machine_rows(results["machine"])),
             "## Targets", targets_table(results["targets"])]
    if layers:
        parts += ["## Targets of the quantizer layers", targets_table(results["layer_targets"], "configuration")]
    parts += nearest_sections(results["nearest_code"])
    if results.get("isa_paths"):
        parts += isa_section(results["isa_paths"])
    if results.get("other_ops"):
        parts += other_ops_section(results["other_ops"])
    if layers:
        parts += layers_section(results)
    if results.get("layer_sweep"):
        parts += sweep_section(results["layer_sweep"])
    if results.get("overhead"):
        parts += overhead_section(results["overhead"])
    if results.get("plot"):
        parts += ["## Plot", f"![speedup of nearest_code over each baseline]({results['plot']})"]
    return "\n\n".join(parts) + "\n"


def kept_gpu_section(path):
    """The hand-written GPU section of the markdown at ``path`` ("" if none), carried over on rewrites."""
    try:
        old = Path(path).read_text()
    except OSError:
        return ""
    at = old.find("\n" + GPU_HEADING)
    return "" if at < 0 else old[at:]


# ----------------------------------------------------------------------------- README's blocks

def _short(v):
    """2 decimals under 1, 1 decimal under 100, none above: README's times and ratios."""
    return f"{v:.2f}" if v < 1 else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def _time(seconds):
    return f"{_short(seconds * 1e3)} ms" if seconds < 1 else f"{seconds:.1f} s"


def _size(mib):
    if mib < 100:
        return f"{mib:.1f} MiB"
    return f"{mib:.0f} MiB" if mib < GIB_MIB else f"{mib / GIB_MIB:.1f} GiB"


def _times(v):
    return "-" if v is None else f"{_short(v)}x"


# (row of the results' layers, README's layer cell, its configuration cell: None for the measured one,
# "{tokens}" standing for the measured batch, e.g. "16 x 256 tokens"; whether the time cells also give the
# memory). Rows not listed follow, as measured.
README_LAYERS = (
    ("VectorQuantize", "`VectorQuantize`", None, False),
    ("VectorQuantize masked", "`VectorQuantize` masked", "same, `lens` (half the sequences half padded)", False),
    ("VectorQuantize top-4", "`VectorQuantize` top-4", "same, `topk=4`", False),
    ("VectorQuantize sampled", "`VectorQuantize` sampled", "same, `stochastic_sample_codes`", False),
    ("ResidualVQ separate", "`ResidualVQ`", None, False),
    ("ResidualVQ shared", "`ResidualVQ` shared codebook", "same", False),
    ("ResidualVQ QINCo", "`ResidualVQ` QINCo",
     "`implicit_neural_codebook`, 3 levels x 256 codes, dim 32, {tokens}", True),
    ("LFQ 2^14", "`LFQ` 2^14 codes", "{tokens}", True),
    ("LFQ 2^16", "`LFQ` 2^16 codes", "{tokens}", True),
    ("FSQ", "`FSQ`", "levels 8,8,8,5,5,5, {tokens}", False),
    ("ResidualFSQ", "`ResidualFSQ`", None, False),
    ("ResidualLFQ", "`ResidualLFQ`", None, False),
    ("SimVQ", "`SimVQ`", None, False),
    ("ResidualSimVQ", "`ResidualSimVQ`", None, False),
    ("HierarchicalVQ", "`HierarchicalVQ`", "5 scales 1..16, 1024 codes, dim 64, 16 x 16 maps, {tokens}", False),
    ("LatentQuantize", "`LatentQuantize`", "levels 8,5,5,5, dim 64, {tokens}", False),
    ("FSP", "`FSP`", None, False),
    ("BinaryMapper", "`BinaryMapper`", "8 bits, {tokens}", False),
    ("EvoLFQ", "`EvoLFQ`", "linear coder 32 <-> 10, 2^10 codes, {tokens}", False),
)


def _time_cell(seconds, mib, memory):
    return _time(seconds) + (f", {_size(mib)}" if memory and mib is not None else "")


def _readme_layer(r, label, config, memory):
    config = (config or r["detail"]).replace("{tokens}", r["detail"].rsplit(", ", 1)[-1])
    ours = _time_cell(r["ours_s"], r["ours_mib"], memory)
    if r["theirs_s"] is None:
        return [label, config, ours, r["theirs_note"], "-"]
    theirs = _time_cell(r["theirs_s"], r["theirs_mib"], memory)
    return [label, config, ours, theirs, _times(r["theirs_s"] / r["ours_s"])]


def readme_layers(results):
    """README's layer table: README_LAYERS' rows, the other measured layers, VAR's wall-clock row."""
    by_name = {r["name"]: r for r in results["layers"]}
    spec = [s for s in README_LAYERS if s[0] in by_name]
    spec += [(name, name, None, False) for name in by_name if name not in {s[0] for s in README_LAYERS}]
    rows = [_readme_layer(by_name[name], *rest) for name, *rest in spec]
    for r in results.get("var", ())[:1]:  # the first: two threads, wall clock
        rows.append(["`MultiScaleVQ` (VAR)", f"B={r['B']}, Cvae {r['Cvae']}, vocab {r['vocab']}, sides {_var_sides(r)}",
                     _time(r["ours_ms"] / 1e3), f"VAR's plain loop: {_time(r['plain_ms'] / 1e3)}",
                     _times(r["plain_ms"] / r["ours_ms"])])
    return _readme_table(["layer", "configuration", "ours", "vector-quantize-pytorch", "speedup"], rows)


def _readme_table(headers, rows):
    """A table in README's style: "| --- |" separators."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _vs(nc, r, name, fmt=_times):
    """A README cell: our speedup over ``name``, or why it did not run ("(needs 4 GiB)")."""
    v = speedup(nc, r, name)
    return fmt(v) if v is not None else r["nearest"][name]["note"].removeprefix("skipped ") or "-"


def readme_nearest(results):
    nc = results["nearest_code"]
    rows = [[shape_str(r["shape"]), _time(r["nearest"]["ours"]["seconds"]), _vs(nc, r, "cdist().argmin"),
             _vs(nc, r, "faiss IndexFlatL2", ratio), _vs(nc, r, "vector-quantize-pytorch"),
             f"{gflops(r):.0f} ({r['square_gflops']:.0f})"] for r in nc["runs"]]
    return _readme_table(["N x D x K", "ours", "vs `cdist().argmin`", "vs faiss `IndexFlatL2`",
                          "vs vector-quantize-pytorch", f"GFLOP/s ({nc['square']}³ fp32 matmul)"], rows)


# Each other op's words in README's bullet ({} is its speedup); order as measured.
README_OTHER_OPS = {
    "nearest_code_topk, k=8": "`nearest_code_topk` (k = 8) {} `cdist().topk`",
    "vq_quantize forward": "`vq_quantize` forward {} the addmm argmin + gather + mse it replaces",
    "ema_update_": "`ema_update_` {} bincount + index_add_",
    "fsq_quantize, levels 8,8,8,5,5,5": "`fsq_quantize` (x's first 6 columns) {} its PyTorch reference",
    "residual_fsq_quantize, 4 levels of 8,5,5,5": "`residual_fsq_quantize` (first 4 columns, 4 levels) {} its PyTorch "
                                                  "reference",
    "latent_quantize, levels 8,5,5,5": "`latent_quantize` (first 4 columns) {} its PyTorch reference",
    "lfq_quantize, 16 bits": "`lfq_quantize` (first 16 columns) {} its PyTorch reference",
    "rotation_trick backward": "the rotation trick's backward {}",
    "binary_one_hot backward, 8 bits": "`binary_one_hot`'s backward (8 bits) {} its PyTorch reference",
}


def _bullet(text):
    return textwrap.fill(text, width=100, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)


def _run_at(nc, key):
    return next((r for r in nc["runs"] if r["shape"] == nc[key]), None)


def _memory_note(nc):
    big = _run_at(nc, "largest")
    if big is None or big["nearest"]["ours"]["mib"] is None:
        return None
    n, _, k = big["shape"]
    return (f"Extra memory of `nearest_code` at {shape_str(big['shape'])}: {big['nearest']['ours']['mib']:.1f} MiB "
            f"(the N x K form needs {n * k * 4 / 2 ** 30:.0f} GiB).")


def _train_note(nc):
    head = _run_at(nc, "headline")
    theirs = head["train"].get("vector-quantize-pytorch") if head else None
    if theirs is None or theirs["seconds"] is None:
        return None
    return (f"Training step (`vq_quantize` forward + backward + `ema_update_`) at {shape_str(head['shape'])}: "
            f"{_time(head['train']['ours']['seconds'])}, {_times(speedup(nc, head, 'vector-quantize-pytorch', 'train'))} "
            f"vector-quantize-pytorch's `VectorQuantize` training forward + backward ({_time(theirs['seconds'])}, "
            f"{_size(theirs['mib'])}).")


def _other_note(other):
    if not other:
        return None
    words = [README_OTHER_OPS.get(r["op"], r["op"] + " {} " + r["baseline"]).replace(
        "{}", _times(r["baseline_s"] / r["ours_s"])) for r in other["rows"]]
    return f"At {shape_str(other['shape'])}: " + ", ".join(words) + "."


def readme_notes(results):
    """README's bullets under the nearest_code table: memory at the largest shape, the training step and
    the other ops at the headline shape (each only when measured)."""
    nc = results["nearest_code"]
    notes = [_memory_note(nc), _train_note(nc), _other_note(results.get("other_ops"))]
    return "\n".join(_bullet(t) for t in notes if t)


def readme_blocks(results):
    """name -> the text of README's ``<!-- bench:name -->`` block."""
    blocks = {"nearest_code": readme_nearest(results), "nearest_code_notes": readme_notes(results)}
    if "layers" in results:
        blocks["layers"] = readme_layers(results)
    return blocks


def update_readme(text, blocks):
    """``text`` with each named block's lines replaced; ValueError if a block's markers are missing."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(^<!-- bench:{re.escape(name)} -->\n).*?(^<!-- /bench:{re.escape(name)} -->$)",
                             re.S | re.M)
        if not pattern.search(text):
            raise ValueError(f"README: no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


# ----------------------------------------------------------------------------- plot

def plot(results, path):
    """Grouped bars: speedup of ours over each baseline per shape, log scale. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    nc = results["nearest_code"]
    names, runs = baselines(nc), nc["runs"]
    metric = {m["name"]: m["metric"] for m in nc["methods"]}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, r in enumerate(runs):
            pos, s = j + (i - (len(names) - 1) / 2) * width, speedup(nc, r, name)
            if s:
                xs.append(pos)
                ys.append(s)
            else:  # skipped, not installed or failed
                ax.text(pos, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
        ax.bar(xs, ys, width, label=name + (" (vs ours ip)" if metric[name] == "ip" else ""))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [shape_str(r["shape"]) for r in runs])
    ax.set_xlabel("N x D x K (float32)")
    ax.set_ylabel("speedup of vqkernels.nearest_code (x)")
    ax.set_title(f"nearest_code vs baselines, {results['settings']['threads']} threads "
                 f"({results['machine']['kernels']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- files and CLI

def load(path):
    return json.loads(Path(path).read_text())


def save(results, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


def markdown_for(json_path):
    """The markdown that goes with a results file: RESULTS.md for the default one, else X.md for X.json."""
    return DEFAULT_OUTPUT if Path(json_path) == DEFAULT_JSON else Path(json_path).with_suffix(".md")


def outputs(results, output=None, readme=None):
    """path -> new text: given ``output``, the markdown (its GPU section kept); given ``readme``, the README."""
    out = {} if output is None else {Path(output): render(results) + kept_gpu_section(output)}
    if readme is not None:
        out[Path(readme)] = update_readme(Path(readme).read_text(), readme_blocks(results))
    return out


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m vqkernels.bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results to read (default {DEFAULT_JSON})")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown to write (default {DEFAULT_OUTPUT} for the default results, else X.md for X.json)")
    p.add_argument("--readme", type=Path, default=DEFAULT_README, help=f"README to update (default {DEFAULT_README})")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--plot", action="store_true", help="also redraw the plot the results name (needs matplotlib)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from the JSON's")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    if not args.json.exists():
        sys.exit(f"{args.json}: no results yet (python -m vqkernels.bench writes them)")
    results = load(args.json)
    output = args.output or markdown_for(args.json)
    files = outputs(results, output, None if args.no_readme else args.readme)
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path}: differs from what {args.json} gives", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path}", file=sys.stderr)
    if args.plot and results.get("plot") and not plot(results, output.parent / results["plot"]):
        print("plot skipped: matplotlib not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
