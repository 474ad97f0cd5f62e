"""vqkernels.bench.report: RESULTS.md and README's measured tables come from the JSON results alone,
the same every time; README's committed blocks are what the committed results give; the timing
harness and the report import nothing of vqkernels, and the benchmark modules import no circle."""

import ast
import copy
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from vqkernels.bench import ops, report

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "vqkernels" / "bench"


def _result(ms, mib=None, agree=None, note=""):
    return dict(seconds=None if ms is None else ms / 1e3, calls=0 if ms is None else 5, mib=mib, agree=agree,
                note=note)


def _results():
    """Results as ``python -m vqkernels.bench`` writes them: one shape, every section, made-up numbers."""
    methods = [dict(name="ours", metric="l2", ours=True), dict(name="cdist().argmin", metric="l2", ours=False),
               dict(name="faiss IndexFlatL2", metric="l2", ours=False),
               dict(name="vector-quantize-pytorch", metric="l2", ours=False),
               dict(name="ours ip", metric="ip", ours=True), dict(name="faiss IndexFlatIP", metric="ip", ours=False)]
    run = dict(shape=[4096, 32, 512], ceiling_gflops=200.0, ceiling_rows=4096, square_gflops=250.0,
               nearest={"ours": _result(0.5, 0.1), "cdist().argmin": _result(2.0, 9.5, 1.0),
                        "faiss IndexFlatL2": _result(0.6, 0.1, 1.0),
                        "vector-quantize-pytorch": _result(None, note="skipped (needs 4 GiB)"),
                        "ours ip": _result(0.4, 0.1), "faiss IndexFlatIP": _result(1.2, 8.0, 0.5)},
               train={"ours": _result(1.0, 2.0), "vector-quantize-pytorch": _result(40.0, 1600.0)})
    return dict(
        schema=1, command="python -m vqkernels.bench --shapes 4096x32x512", elapsed_s=12.4,
        settings=dict(threads=2, warmup=3, min_repeats=3, repeats=50, budget_s=2.0, quick=False),
        machine=dict(cpu="Some CPU", cores=2, torch_threads=2, simd="avx2 fma", kernels="C++ (avx2) [auto]",
                     cpu_isa="avx2", python="3.11.7", torch="2.14.1",
                     packages={"faiss-cpu": "1.15.1", "vector-quantize-pytorch": "1.32.0"},
                     date="2026-01-01T00:00:00+00:00"),
        targets=[report.target("nearest_code vs faiss IndexFlatL2", "4096x32x512", 1.3, 1.2),
                 report.target("nearest_code vs cdist().argmin", "16384x32x4096", 5.0, None, "not run"),
                 report.target("nearest_code % of fp32 matmul GFLOP/s", "4096x32x512", 0.75, 2.0, unit="%"),
                 report.target("nearest_code peak extra memory", "4096x32x512", 64.0, 0.1, unit="MiB",
                               compare="<=")],
        layer_targets=[report.target("LFQ 2^16 peak memory vs vector-quantize-pytorch", "16 bits, 4 x 256 tokens",
                                     0.1, 0.004, unit="%", compare="<")],
        nearest_code=dict(methods=methods, train_methods=methods[:1] + methods[3:4], headline=[4096, 32, 512],
                          largest=[4096, 32, 512], square=2048, matrix_limit=2 << 30, runs=[run]),
        other_ops=dict(shape=[4096, 32, 512], rows=[dict(op="ema_update_", ours_s=1e-4,
                                                         baseline="bincount + index_add_ (reference)",
                                                         baseline_s=5e-4)]),
        layers=[dict(name="FSQ", detail="levels 8,8,8,5,5,5 (64000 codes), 16 x 1024 tokens", ours_s=2e-4,
                     theirs_s=5e-4, theirs_note="", ours_mib=1.3, theirs_mib=3.2),
                dict(name="LFQ 2^16", detail="16 bits, 4 x 256 tokens", ours_s=4.6e-3, theirs_s=None,
                     theirs_note="not run (needs > 6 GiB)", ours_mib=7.1, theirs_mib=None),
                dict(name="NewLayer", detail="dim 8, 2 x 16 tokens", ours_s=1.5, theirs_s=3.0, theirs_note="",
                     ours_mib=1.0, theirs_mib=2.0)],
        var=[dict(name="MultiScaleVQ train step", B=8, Cvae=32, vocab=4096, patch_nums=[1, 2, 16], H=16, threads=2,
                  clock="wall", repeats=15, ours_ms=14.2, plain_ms=34.9, ratio=14.2 / 34.9)],
        layer_sweep=_sweep(), overhead=_overhead(), plot="nearest_code.png")


def _sweep():
    """A token sweep as vqkernels.bench.layers.run_sweep returns it: FSQ at both sizes, LFQ 2^16 without theirs
    at the larger one, VectorQuantize at the smaller one only; FSQ's shell at 1024 tokens bounds any speedup
    below 5x."""
    def run(name, detail, seq, tokens, ours_ms, theirs_ms, shell_ms, note=""):
        return dict(name=name, detail=detail, seq=seq, tokens=tokens, batch=tokens // seq, ours_s=ours_ms / 1e3,
                    theirs_s=None if theirs_ms is None else theirs_ms / 1e3, theirs_note=note,
                    shell_s=shell_ms / 1e3)
    return dict(tokens=[1024, 16384], target=5.0, runs=[
        run("FSQ", "levels 8,8,8,5,5,5", 1024, 1024, 0.08, 0.17, 0.04),
        run("FSQ", "levels 8,8,8,5,5,5", 1024, 16384, 0.5, 3.0, 0.1),
        run("LFQ 2^16", "16 bits", 256, 1024, 4.0, 400.0, 0.03),
        run("LFQ 2^16", "16 bits", 256, 16384, 60.0, None, 0.2, "not run (needs > 6 GiB)"),
        run("VectorQuantize", "dim 64, 1024 codes", 256, 1024, 1.2, 12.0, 0.03)])


def _overhead():
    """An overhead profile as vqkernels.bench.overhead.run returns it (seconds)."""
    step = dict(name="FSQ", detail="levels 8,8,8,5,5,5, 1 x 1024 tokens", threads=2, wall_s=80e-6, theirs_s=170e-6,
                profiled_s=150e-6, kernels_s=12e-6, router_s=9e-6, aten_s=30e-6, other_s=36e-6, events=60,
                allocations=8)
    micro = [dict(key="backend", what="backend op", threads=2, seconds=2.25e-6, vs=None),
             dict(key="router", what="router op", threads=2, seconds=4.75e-6, vs="backend"),
             dict(key="empty", what="torch.empty([1024, 64]) float32", threads=2, seconds=0.5e-6, vs=None)]
    return dict(tokens=1024, threads=2, profiled_steps=20, steps=[step, dict(step, threads=1, wall_s=70e-6)],
                micro=micro)


def test_the_markdown_comes_from_the_json_alone_and_the_same_every_time():
    results = _results()
    text = report.render(results)
    assert text == report.render(json.loads(json.dumps(results))) == report.render(copy.deepcopy(results))
    assert "Generated by `python -m vqkernels.bench --shapes 4096x32x512` in 12 s. float32" in text
    for line in [
        "| faiss-cpu / vector-quantize-pytorch | 1.15.1 / 1.32.0 |",
        "| nearest_code vs faiss IndexFlatL2 | 4096x32x512 | >= 1.30x | 1.20x | FAIL |",
        "| nearest_code vs cdist().argmin | 16384x32x4096 | >= 5.00x | not run | n/a |",
        "| nearest_code % of fp32 matmul GFLOP/s | 4096x32x512 | >= 75% | 200% | PASS |",
        "| nearest_code peak extra memory | 4096x32x512 | <= 64.0 MiB | 0.1 MiB | PASS |",
        "| LFQ 2^16 peak memory vs vector-quantize-pytorch | 16 bits, 4 x 256 tokens | < 10% | 0.4% | PASS |",
        "| 4096x32x512 | 0.50 | 2.00 | 0.60 | skipped (needs 4 GiB) | 0.40 | 1.20 |",
        "| 4096x32x512 | 4.00x | 1.20x | - | 3.00x |",  # the ip baseline against ours ip
        "| 4096x32x512 | 268.4 | 335.5 | 200.0 | 4096 | 134% | 250.0 | 107% |",
        "| 4096x32x512 | 100.00 | 100.00 | - | 50.00 |",
        "| 4096x32x512 | 1.00 | 40.00 | 40.00x | 2.0 | 1600.0 |",
        "| ema_update_ | 0.10 | bincount + index_add_ (reference) | 0.50 | 5.00x |",
        "| LFQ 2^16 | 16 bits, 4 x 256 tokens | 4.6 | not run (needs > 6 GiB) | - | 7.1 | - |",
        "| MultiScaleVQ (2 threads, wall time) | VAR: B=8, Cvae 32, vocab 4096, patch sides 1..16; baseline VAR's "
        "plain loop | 14.2 | 34.9 (plain loop) | 2.46x | - | - |",
        "![speedup of nearest_code over each baseline](nearest_code.png)",
    ]:
        assert line in text.splitlines(), line


def test_a_measure_rounded_onto_its_bar_gets_one_more_digit():
    assert report.target_row(report.target("t", "w", 0.85, 0.846, unit="%"))[3:] == ["84.6%", "FAIL"]
    assert report.target_row(report.target("t", "w", 0.85, 0.853, unit="%"))[3:] == ["85.3%", "PASS"]
    assert report.target_row(report.target("t", "w", 1.3, 1.298))[3:] == ["1.298x", "FAIL"]
    assert report.target_row(report.target("t", "w", 0.85, 0.86, unit="%"))[3:] == ["86%", "PASS"]


def test_a_need_above_the_limit_fails_as_such():
    """limit: what the measure would read at the whole peak; a need above it is beyond any kernel."""
    assert report.target_row(report.target("t", "w", 1.3, 1.04, limit=1.19))[3:] == ["1.04x", "FAIL (limit 1.19x)"]
    assert report.target_row(report.target("t", "w", 1.3, 1.25, limit=1.35))[3:] == ["1.25x", "FAIL"]
    assert report.target_row(report.target("t", "w", 1.3, 1.5, limit=1.6))[3:] == ["1.50x", "PASS"]


def test_the_isa_targets_carry_the_limit_of_faiss_rate():
    n, d, k = 1024, 256, 1024
    flop = 2.0 * n * d * k
    section = dict(threads=2, faiss_blas="OpenBLAS 0.3.15, Haswell kernels", paths=[dict(
        isa="avx2", fma_peak_gflops=100.0, faiss_level="AVX2",
        rows=[dict(shape=[n, d, k], ours_s=flop / 90e9, faiss_s=flop / 80e9, faiss_note="")])])
    speed, peak = ops.isa_targets(section)
    assert speed["value"] == pytest.approx(90 / 80) and speed["limit"] == pytest.approx(100 / 80)
    assert report.target_row(speed)[4] == "FAIL (limit 1.25x)"
    assert peak["value"] == pytest.approx(0.9) and report.target_row(peak)[4] == "PASS"
    text = "\n".join(report.isa_section(section))
    assert "OpenBLAS 0.3.15, Haswell kernels" in text and "| 90% | 80% | - | - |" in text
    # measured beside ours, the probe's rate of that moment is the peak the target reads; the limit keeps the best
    section["paths"][0]["rows"][0]["peak_beside_gflops"] = 95.0
    speed, peak = ops.isa_targets(section)
    assert speed["limit"] == pytest.approx(100 / 80) and peak["value"] == pytest.approx(90 / 95)
    assert "| 90% | 80% | 95 | 95% |" in "\n".join(report.isa_section(section))


def test_the_token_sweep_and_the_overhead_profile_render_from_the_json():
    lines = report.render(_results()).splitlines()
    for line in [
        "## Quantizer layers at 1024 and 16 x 1024 tokens",
        "| layer | configuration | ours (1024) | vector-quantize-pytorch (1024) | speedup (1024) | shell (1024) "
        "| bound (1024) | >= 5x (1024) | ours (16 x 1024) | vector-quantize-pytorch (16 x 1024) | speedup (16 x 1024) "
        "| shell (16 x 1024) | bound (16 x 1024) | >= 5x (16 x 1024) |",
        "| FSQ | levels 8,8,8,5,5,5; 1024 tokens a sample | 0.08 | 0.17 | 2.12x | 0.040 | 4.25x | no (bound) "
        "| 0.50 | 3.00 | 6.00x | 0.100 | 30.00x | yes |",
        "| LFQ 2^16 | 16 bits; 256 tokens a sample | 4.00 | 400.00 | 100.00x | 0.030 | 13333.33x | yes | 60.00 "
        "| not run (needs > 6 GiB) | - | 0.200 | - | - |",
        "| VectorQuantize | dim 64, 1024 codes; 256 tokens a sample | 1.20 | 12.00 | 10.00x | 0.030 | 400.00x | yes "
        "| - | - | - | - | - | - |",
        "## Per-call overhead at 1024 tokens",
        "|  | FSQ, 2 threads (us) | FSQ, 1 thread (us) |",
        "| step, wall time (no profiler) | 80.0 | 70.0 |",
        "| our kernels: self time of vqkernels_cpu:: ops in the profiled step (% of the step) | 12.0 (15%) "
        "| 12.0 (17%) |",
        "| the profiler's own cost: profiled minus unprofiled step | 70.0 | 80.0 |",
        "| profiled: the rest (the layer's Python, the autograd engine, much of the profiler's cost) | 63.0 (42%) "
        "| 63.0 (42%) |",
        "| allocations a step (aten::empty, aten::empty_strided); ~ us at the cost of torch.empty([1024, 64]) float32 "
        "| 8 (~4 us) | 8 (~4 us) |",
        "| 2 | router op | 2 | 4.75 | +2.50 (vs 1) |",
    ]:
        assert line in lines, line
    quick = _results()
    quick["layer_sweep"]["tokens"] = [1024]
    text = report.render(quick)
    assert "## Quantizer layers at 1024 tokens" in text and "(16 x 1024)" not in text
    old = _results()
    del old["layer_sweep"], old["overhead"]  # results written before the sweep: no such sections
    assert "tokens a sample" not in report.render(old) and "Per-call overhead" not in report.render(old)


def test_the_sweep_times_each_case_at_each_size():
    pytest.importorskip("vector_quantize_pytorch")
    from vqkernels.bench import layers
    fsq = dataclasses.replace(next(c for c in layers.CASES if c.name == "FSQ"), seq=32)
    sweep = layers.run_sweep(1, 0.0, cases=[fsq], tokens=(64, 128), log=lambda msg: None)
    assert sweep["tokens"] == [64, 128] and sweep["target"] == layers.SWEEP_TARGET
    assert [(r["tokens"], r["batch"], r["seq"]) for r in sweep["runs"]] == [(64, 2, 32), (128, 4, 32)]
    assert all(r["ours_s"] > 0 and r["theirs_s"] > 0 and r["shell_s"] > 0 and r["theirs_note"] == ""
               for r in sweep["runs"])
    assert layers.run_sweep(1, 0.0, quick=True, cases=[fsq], tokens=(64, 128), log=lambda msg: None)["tokens"] == [64]
    assert "| FSQ |" in report.sweep_table(sweep)


def test_the_shell_is_the_layer_without_its_quantizer():
    """The shell applies copies of the layer's own dense maps (linear maps in and out, HierarchicalVQ's phi once a
    level; the identity without any), reading a channel-first input as the layer does."""
    from vqkernels import nn
    from vqkernels.bench import layers
    x = torch.randn(2, 5, 64)
    rfsq = nn.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=64)
    shell = layers.Shell(rfsq, channel_first=False)
    torch.testing.assert_close(shell(x), rfsq.project_out(rfsq.project_in(x)))
    assert shell.maps[0] is not rfsq.project_in  # copies: timing the shell leaves the layer's state alone
    assert layers.Shell(nn.FSQ([8, 5, 5]), channel_first=False)(x) is x
    lq = nn.LatentQuantize(levels=[8, 5, 5, 5], dim=64)
    cf = x.transpose(1, 2)  # [b, dim, n]
    torch.testing.assert_close(layers.Shell(lq, channel_first=True)(cf),
                               lq.project_out(lq.project_in(x)).transpose(1, 2))
    coder = dict(encoder=torch.nn.Linear(32, 10), decoder=torch.nn.Linear(10, 32))
    evo = nn.EvoLFQ(**coder, dim=10, codebook_size=2 ** 10)
    assert [m.in_features for m in layers.Shell(evo, channel_first=False).maps] == [32, 10]
    hvq = nn.HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2, 4), accept_image_fmap=True)
    fmap = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(layers.Shell(hvq, channel_first=True)(fmap), 3 * hvq.phi_shared(fmap))
    assert {c.name for c in layers.CASES if c.channel_first} == {"LatentQuantize", "HierarchicalVQ"}
    drawn = []
    layers.Shell(nn.FSQ([8, 5, 5]), channel_first=False, draws=drawn.append)(x)
    layers.Shell(lq, channel_first=True, draws=drawn.append)(cf)
    assert drawn == [10, 10]  # the tokens of either layout
    fsp = next(c for c in layers.CASES if c.name == "FSP")
    assert [t.shape for t in fsp.draws(7)] == [(7, 4), (7, 4)]  # FSP's two draws of every projected value
    mapper = next(c for c in layers.CASES if c.name == "BinaryMapper")
    assert mapper.draws(7).shape == (7, 8)  # a bit of every logit
    logits = torch.randn(2, 5, 8, requires_grad=True)
    wide = layers.Shell(nn.BinaryMapper(bits=8), channel_first=False, out_features=mapper.out_features)(logits)
    assert wide.shape == (2, 5, 256) and not wide.detach().any()  # the one-hot's width, fresh
    (wide * torch.arange(256.0)).sum().backward()  # its backward reads the whole gradient
    assert torch.equal(logits.grad, torch.full((2, 5, 8), float(sum(range(256)))))


def test_the_layer_table_measures_the_batches_it_did():
    from vqkernels.bench import layers
    full = {c.name: (c.batch, c.seq) for c in layers.CASES}
    assert full["VectorQuantize"] == (16, 256) and full["ResidualVQ separate"] == (8, 512)
    assert full["LFQ 2^16"] == (4, 256) and full["HierarchicalVQ"] == (8, 256) and full["LatentQuantize"] == (16, 1024)
    assert full["ResidualVQ QINCo"] == (2, 256) and full["FSQ"] == (16, 1024)
    assert all(1024 % c.seq == 0 for c in layers.CASES)  # every size of the sweep is a whole batch
    assert {c.name: c.batch_for(True) for c in layers.CASES}["ResidualVQ QINCo"] == 1


def test_the_overhead_profile_splits_a_step_by_event_names():
    import vqkernels
    if not vqkernels.compiled():
        pytest.skip("the compiled extension is not loaded")
    import torch

    from vqkernels.bench import overhead
    x, c = torch.randn(8, 8, requires_grad=True), torch.randn(16, 8)

    def step():
        torch.ops.vqkernels.nearest_code(x, c, "l2")[1].sum().backward()

    step()
    wall, (profiled, split, events, allocations) = overhead._alternating(step, 3)
    assert wall > 0 and profiled > 0 and split["kernels_s"] > 0 and split["router_s"] > 0 and events >= 3
    assert overhead._category("vqkernels_cpu::vq_quantize") == "kernels_s"
    assert overhead._category("vqkernels::vq_quantize") == "router_s"
    assert overhead._category("aten::fill_") == "aten_s" and overhead._category("AddBackward0") == "other_s"
    threads = torch.get_num_threads()
    assert all(t > 0 for t in overhead.per_call([(lambda: None, 1), (lambda: None, 2)], rounds=3))
    assert torch.get_num_threads() == threads


def test_readme_blocks_are_rewritten_between_their_markers():
    blocks = report.readme_blocks(_results())
    assert blocks["nearest_code"].splitlines()[2:] == [
        "| 4096x32x512 | 0.50 ms | 4.0x | 1.20x | (needs 4 GiB) | 268 (250) |"]
    layers = blocks["layers"].splitlines()
    assert layers[2:] == [
        "| `LFQ` 2^16 codes | 4 x 256 tokens | 4.6 ms, 7.1 MiB | not run (needs > 6 GiB) | - |",
        "| `FSQ` | levels 8,8,8,5,5,5, 16 x 1024 tokens | 0.20 ms | 0.50 ms | 2.5x |",
        "| NewLayer | dim 8, 2 x 16 tokens | 1.5 s | 3.0 s | 2.0x |",
        "| `MultiScaleVQ` (VAR) | B=8, Cvae 32, vocab 4096, sides 1..16 | 14.2 ms | VAR's plain loop: 34.9 ms | 2.5x |"]
    notes = " ".join(blocks["nearest_code_notes"].split())
    assert notes.startswith("- Extra memory of `nearest_code` at 4096x32x512: 0.1 MiB (the N x K form needs 0 GiB).")
    assert "40.0x vector-quantize-pytorch's `VectorQuantize`" in notes and "(40.0 ms, 1.6 GiB)" in notes
    readme = "".join(f"intro\n\n<!-- bench:{name} -->\nold\nrows\n<!-- /bench:{name} -->\n\nafter\n" for name in blocks)
    new = report.update_readme(readme, blocks)
    assert "old" not in new and new.count("intro\n") == new.count("after\n") == len(blocks)
    assert report.update_readme(new, blocks) == new
    for name, body in blocks.items():
        assert f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->\n" in new
    with pytest.raises(ValueError, match="bench:layers"):
        report.update_readme(readme.replace("bench:layers", "bench:other"), blocks)


def test_the_report_cli_keeps_the_hand_written_gpu_section(tmp_path):
    results = _results()
    report.save(results, tmp_path / "r.json")
    (tmp_path / "r.md").write_text("# old\n\nold numbers\n\n" + report.GPU_HEADING + "\n\nby hand\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:nearest_code -->\n<!-- /bench:nearest_code -->\n\n"
                      "<!-- bench:nearest_code_notes -->\n<!-- /bench:nearest_code_notes -->\n\n"
                      "<!-- bench:layers -->\n<!-- /bench:layers -->\n")
    argv = ["--json", str(tmp_path / "r.json"), "--readme", str(readme)]
    assert report.main(argv + ["--check"]) == 1
    assert report.main(argv) == 0 and report.main(argv + ["--check"]) == 0
    text = (tmp_path / "r.md").read_text()
    assert text == report.render(results) + "\n" + report.GPU_HEADING + "\n\nby hand\n"
    assert report.readme_blocks(results)["layers"] in readme.read_text()


def test_readme_and_results_md_are_what_the_committed_results_give():
    if not report.DEFAULT_JSON.exists():
        pytest.skip("no committed benchmarks/results.json yet (python -m vqkernels.bench writes it)")
    results = report.load(report.DEFAULT_JSON)
    for path, text in report.outputs(results, report.DEFAULT_OUTPUT, report.DEFAULT_README).items():
        assert path.read_text() == text, f"{path} is not what {report.DEFAULT_JSON} gives: " \
                                         "python -m vqkernels.bench.report"


def _imported_by_itself(name):
    """The modules loading vqkernels/bench/<name>.py on its own (not as part of the package) imports."""
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('standalone', {str(BENCH / (name + '.py'))!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.split()


def test_the_harness_imports_torch_and_the_standard_library_only():
    modules = _imported_by_itself("harness")
    assert "torch" in modules and not [m for m in modules if m.split(".")[0] == "vqkernels"]


def test_the_report_imports_the_standard_library_only():
    modules = _imported_by_itself("report")
    assert not [m for m in modules if m.split(".")[0] in ("vqkernels", "torch", "numpy")]


def _package_imports(path):
    """The vqkernels.bench modules that ``path`` imports (``from . import x``, ``from .x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_the_benchmark_modules_import_no_circle():
    graph = {p.stem: _package_imports(p) for p in BENCH.glob("*.py")}
    assert graph["harness"] == graph["report"] == set()
    done, active = set(), []

    def visit(module):
        assert module not in active, f"import circle: {' -> '.join(active + [module])}"
        if module in done:
            return
        active.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)
