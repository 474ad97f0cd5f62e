"""Every op in vqkernels/schemas.py has all of its pieces: reference, fake, C++ CPU kernel, user wrapper and
autograd (forward ops), tests for every backend it has a kernel on, and a benchmark row. An op added without
one of them fails here, by name."""

import pathlib
import re

import pytest
import torch

import vqkernels
from vqkernels import _backend, fake, reference
from vqkernels.schemas import SCHEMAS

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORWARD = [op for op in SCHEMAS if not op.endswith("_backward")]


def _sources(pattern):
    return "\n".join(p.read_text() for p in sorted(ROOT.glob(pattern)) if p.name != "test_registry.py")


def _mentions(text, op):
    return re.search(rf"\b{op}\b", text) is not None


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_every_op_has_a_reference_a_fake_and_a_cpu_kernel(op):
    assert callable(getattr(reference, op, None)), f"{op}: no pure-PyTorch reference in vqkernels/reference.py"
    assert op in fake.FAKES, f"{op}: no fake kernel in vqkernels/fake.py"
    if _backend.compiled():
        assert _backend.available("cpu", op, "cpu"), f"{op}: no C++ CPU kernel (csrc/cpu)"
    assert _mentions(_sources("tests/test_*.py"), op), f"{op}: no test names it"


@pytest.mark.parametrize("op", FORWARD)
def test_every_forward_op_has_a_wrapper_autograd_and_a_benchmark_row(op):
    assert callable(getattr(vqkernels, op, None)), f"{op}: no vqkernels.{op} wrapper (vqkernels/ops.py)"
    in_place = "!" in SCHEMAS[op].split("->")[0]  # an in-place op (a mutated argument) is not differentiable
    if not in_place:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels::{op}", "Autograd"), \
            f"{op}: no autograd (vqkernels/autograd.py)"
    assert _mentions(_sources("vqkernels/bench/*.py"), op), f"{op}: no benchmark row (vqkernels/bench/*.py)"


def _backend_tests():
    """{backend: the source of every test function that runs with it}: the tests taking the `backend` fixture
    (vq_helpers.on_backends, per_backend) in the test modules that use it."""
    import importlib
    import inspect

    from vq_helpers import backend_names
    found = {}
    for path in sorted(ROOT.glob("tests/test_*.py")):
        if path.name == "test_registry.py" or "backend" not in path.read_text():
            continue
        module = importlib.import_module(path.stem)
        for name, fn in vars(module).items():
            if name.startswith("test_") and callable(fn):
                for backend in backend_names(fn):
                    found.setdefault(backend, []).append(inspect.getsource(fn))
    return found


BACKEND_TESTS = {}


def _tested_on(backend, op):
    """Whether a test running with `backend` (the `backend` fixture) names `op`."""
    if not BACKEND_TESTS:
        BACKEND_TESTS.update(_backend_tests())
    return any(_mentions(source, op) for source in BACKEND_TESTS.get(backend, ()))


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_every_gpu_kernel_has_tests(op):
    """A CUDA or Triton kernel of `op` is run by a test taking the `backend` fixture with that backend (in the
    op's tests/test_<op family>.py) and naming the op."""
    if _backend.cuda_compiled() and torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_cuda::{op}", "CUDA"):
        assert _tested_on("cuda", op), f"{op}: a CUDA kernel without a test run with backend 'cuda'"
    if op in _backend._triton_ops():
        assert _tested_on("triton", op), f"{op}: a Triton kernel without a test run with backend 'triton'"
