"""``python -m vqkernels.bench``: the full CPU benchmark, written as JSON results from which
:mod:`vqkernels.bench.report` generates the markdown report, the plot and README's measured tables.

    python -m vqkernels.bench                 # every shape; writes benchmarks/results.json, benchmarks/RESULTS.md,
                                              # benchmarks/nearest_code.png and README.md's measured tables
    python -m vqkernels.bench --quick         # the two smallest shapes, prints only (< 2 minutes)
    python -m vqkernels.bench --shapes 16384x32x4096 --output /tmp/r.md    # and /tmp/r.json, /tmp/nearest_code.png

The suites, in one process: the ops (:mod:`vqkernels.bench.ops`, whose docstring says how each
method is timed), the quantizer layers (:mod:`vqkernels.bench.layers`) and VAR's multi-scale
quantizer (:mod:`vqkernels.bench.var`), the layers' token sweep (:func:`vqkernels.bench.layers.run_sweep`)
and the per-call overhead profile (:mod:`vqkernels.bench.overhead`). ``python -m vqkernels.bench.report``
regenerates the markdown and README's tables from the JSON without measuring anything.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import vqkernels

from . import layers, ops, overhead, report, var
from .harness import MIN_REPEATS, THREADS, WARMUP, log, machine_info


def _parse_shape(text):
    try:
        n, d, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxDxK, e.g. 16384x32x4096") from None
    return n, d, k


def _parser():
    p = argparse.ArgumentParser(prog="python -m vqkernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the two smallest shapes, fewer repeats, no torch.compile, training step at the smallest "
                        "shape only; writes no file unless --output or --json is given")
    p.add_argument("--output", type=Path, default=None,
                   help=f"markdown report to write (default {report.DEFAULT_OUTPUT}, none with --quick); the JSON "
                        f"results go beside it (X.json; {report.DEFAULT_JSON.name} for the default) and the plot as "
                        f"{report.PLOT_NAME}")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON results instead")
    p.add_argument("--plot", type=Path, default=None, help="where to write the PNG plot instead")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"README whose measured tables to rewrite (default {report.DEFAULT_README} when writing the "
                        "default report, none otherwise)")
    p.add_argument("--repeats", type=int, default=None, help="most timed calls per method (default 50, quick 10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per method after which it stops early (default 2, quick 0.5)")
    p.add_argument("--shapes", type=_parse_shape, nargs="+", default=None, metavar="NxDxK",
                   help="shapes to run instead of the standard ones")
    return p


def parse_args(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 50
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _shapes(args):
    """(the shapes to run, those that also run the training step)."""
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = sorted(ops.SHAPES, key=lambda s: s[0] * s[1] * s[2])[:2]
    else:
        shapes = list(ops.SHAPES)
    return shapes, set(shapes[:1]) if args.quick else set(shapes)


def _paths(args):
    """(markdown, JSON, plot, README) to write; None for each one not written."""
    default = args.output is None and not args.quick
    output = report.DEFAULT_OUTPUT if default else args.output
    json_path = args.json or (output and (report.DEFAULT_JSON if default else output.with_suffix(".json")))
    plot = args.plot or (output and output.with_name(report.PLOT_NAME))
    readme = args.readme or (report.DEFAULT_README if default else None)
    return output, json_path, plot, readme


def _layer_suites(args):
    """(layer results, their targets, VAR's rows, the token sweep): the layers, MultiScaleVQ against VAR's loop,
    then every layer at 1024 and 16 x 1024 tokens (quick: 1024)."""
    log("quantizer layers: one training step each")
    results, targets = layers.run(args.repeats, args.budget, quick=args.quick)
    log("VAR multi-scale quantizer vs its plain per-scale loop")
    var_rows = var.run(repeats=min(args.repeats, 15), quick=args.quick)
    for r in var_rows:
        log(f"  {r['threads']} thread(s), {r['clock']}: ours {r['ours_ms']:.1f} ms, plain {r['plain_ms']:.1f} ms")
    log("quantizer layers: token sweep")
    sweep = layers.run_sweep(args.repeats, args.budget, quick=args.quick)
    return results, targets + [var.target(var_rows)], var_rows, sweep


def measure(args):
    """Every suite; the results as a JSON-ready dict (raw numbers: seconds, MiB, fractions)."""
    shapes, train_shapes = _shapes(args)
    start = time.perf_counter()
    nc = ops.run(shapes, train_shapes, args.repeats, args.budget, args.quick)
    log("nearest_code on each SIMD path, against faiss at the same level")
    isa = ops.run_isa_paths(shapes, args.repeats, args.budget)
    other_shape = shapes[0] if args.quick or ops.HEADLINE not in shapes else ops.HEADLINE
    log(f"other ops at {report.shape_str(other_shape)}")
    other = ops.run_other_ops(other_shape, args.repeats, args.budget)
    layer_results, layer_targets, var_rows, sweep = _layer_suites(args)
    over = overhead.run()
    return dict(
        schema=1, command=" ".join(["python -m vqkernels.bench"] + args.argv),
        elapsed_s=time.perf_counter() - start,
        settings=dict(threads=THREADS, warmup=WARMUP, min_repeats=MIN_REPEATS, repeats=args.repeats,
                      budget_s=args.budget, quick=args.quick),
        machine=machine_info(packages=("faiss-cpu", "vector-quantize-pytorch"),
                             kernels=vqkernels.backend("nearest_code", "cpu"),
                             cpu_isa=vqkernels.cpu_isa() if vqkernels.compiled() else None),
        targets=ops.targets(nc) + ops.isa_targets(isa), layer_targets=layer_targets, nearest_code=nc,
        isa_paths=isa, other_ops=other, layers=layer_results, var=var_rows, layer_sweep=sweep, overhead=over,
        plot=None)


def _plot(results, plot_path, output):
    """Draws the plot; records its path relative to the markdown in ``results``."""
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    if report.plot(results, plot_path):
        results["plot"] = os.path.relpath(plot_path, output.parent if output else Path.cwd())
    else:
        log("plot skipped: matplotlib not installed")


def main(argv=None):
    args = parse_args(argv)
    output, json_path, plot_path, readme = _paths(args)
    log(f"vqkernels.bench: kernels {vqkernels.backend('nearest_code', 'cpu')}, {THREADS} threads")
    results = measure(args)
    if plot_path is not None:
        _plot(results, plot_path, output)
    print(report.render(results))
    if json_path is not None:
        report.save(results, json_path)
        log(f"wrote {json_path}")
    for path, text in report.outputs(results, output, readme).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
