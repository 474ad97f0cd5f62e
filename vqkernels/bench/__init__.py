"""vqkernels' benchmarks (``python -m vqkernels.bench`` runs the full CPU report).

* :mod:`~vqkernels.bench.harness`: the one timing harness (warm-up, median of repeats, budget;
  peak memory; the machine's description); torch and the standard library only;
* :mod:`~vqkernels.bench.ops`: the ops against PyTorch, faiss and vector-quantize-pytorch;
* :mod:`~vqkernels.bench.layers`: the ``vqkernels.nn`` layers' training steps against
  vector-quantize-pytorch (``python -m vqkernels.bench.layers``), and their token sweep
  (``python -m vqkernels.bench.layers --sweep``), with each layer's shell (the step with the quantizer taken
  out: the bound on any speedup);
* :mod:`~vqkernels.bench.overhead`: where a layer's training step spends its time at 1024 tokens
  (``python -m vqkernels.bench.overhead``);
* :mod:`~vqkernels.bench.var`: ``MultiScaleVQ`` against VAR's per-scale loop (``python -m vqkernels.bench.var``);
* :mod:`~vqkernels.bench.gpu`: the GPU backends (``python -m vqkernels.bench.gpu``);
* :mod:`~vqkernels.bench.plain`: the originals' quantizers in plain PyTorch (the baselines of
  ``var`` and of ``python -m models.bench``);
* :mod:`~vqkernels.bench.report`: benchmarks/RESULTS.md and README's measured tables from the JSON
  results (``python -m vqkernels.bench.report``); the standard library only.

Imports go one way: the suites use the harness and the report, which import none of them.
"""
