"""pytest-benchmark versions of the headline comparisons (the full report is `python -m vqkernels.bench`).

    pytest benchmarks --benchmark-only

Not part of the test suite (`pytest tests`). The methods come from vqkernels.bench.ops, so both time
the same code; a baseline whose package is missing is skipped.
"""

import pytest
import torch

from vqkernels.bench import ops
from vqkernels.bench.harness import THREADS, Skip
from vqkernels.bench.report import shape_str

pytest.importorskip("pytest_benchmark")

SHAPES = [ops.HEADLINE]


@pytest.fixture(scope="module", params=SHAPES, ids=shape_str)
def inputs(request):
    torch.set_num_threads(THREADS)
    return request.param, ops.make_inputs(*request.param)


def _bench(benchmark, table, name, inputs, group):
    shape, (x, codebook) = inputs
    try:
        fn = ops.method(name, table).factory(x, codebook)
    except Skip as exc:
        pytest.skip(f"{name}: {exc}")
    benchmark.group = f"{group} {shape_str(shape)}"
    fn()  # warm-up: faiss and torch.compile set themselves up on the first call
    benchmark(fn)


@pytest.mark.parametrize("name", ["ours", "cdist().argmin", "faiss IndexFlatL2"], ids=["ours", "cdist", "faiss"])
def test_nearest_code(benchmark, inputs, name):
    with torch.no_grad():
        _bench(benchmark, ops.NEAREST, name, inputs, "nearest_code")


@pytest.mark.parametrize("name", ["ours", "vector-quantize-pytorch"], ids=["ours", "vqpytorch"])
def test_training_step(benchmark, inputs, name):
    _bench(benchmark, ops.TRAIN, name, inputs, "training step")
