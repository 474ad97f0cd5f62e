"""The build: the compiled extension is loaded, and its CUDA half holds kernels for the
architectures it was built for whenever torch has CUDA and a toolkit is present."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from vq_helpers import vqkernels

from vqkernels.schemas import SCHEMAS


def _toolkit_present():
    """A CUDA toolkit as setup.py looks for one (CUDA_HOME, CUDA_PATH, /usr/local/cuda*)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *glob.glob("/usr/local/cuda*")]
    return any(r and os.path.isfile(os.path.join(r, "include", "cuda_runtime.h")) for r in roots)


@pytest.mark.skipif(os.environ.get("VQK_ALLOW_REFERENCE") == "1", reason="reference-only run requested")
def test_extension_loaded():
    assert vqkernels.compiled(), "vqkernels._C did not load: the ops run on the reference kernels"
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    expected = "avx512" if {"avx512f", "avx2", "fma"} <= flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
    try:
        assert vqkernels.set_cpu_isa("auto") == expected, "'auto' must pick the best ISA this CPU has"
    finally:
        vqkernels.set_cpu_isa("auto")


@pytest.mark.skipif(not vqkernels.compiled(), reason="needs the compiled extension")
def test_fma_peak_probe_counts_the_vector_width():
    """The FMA probe the benchmark holds nearest_code to: positive, and a path with wider vectors measures more
    (the same FMA count per instruction, twice or more the lanes; a loose factor: the machine may be shared)."""
    from vqkernels import _backend
    c = _backend._C
    scalar = max(c.fma_peak_gflops("portable", 1, 0.02) for _ in range(3))
    assert scalar > 0
    if c.cpu_has_avx2():
        assert max(c.fma_peak_gflops("avx2", 1, 0.02) for _ in range(3)) > 2 * scalar
    with pytest.raises(ValueError, match="unknown ISA"):
        c.fma_peak_gflops("sse9", 1, 0.01)
    with pytest.raises(ValueError, match="threads"):
        c.fma_peak_gflops("portable", 0, 0.01)


def test_cuda_sources_built_for_arch_list():
    if not vqkernels.compiled() or torch.version.cuda is None or not _toolkit_present():
        pytest.skip("no CUDA torch or no CUDA toolkit here: the CUDA sources are not expected")
    if os.environ.get("VQK_BUILD_CUDA") != "1" and not torch.cuda.is_available():
        pytest.skip("the CUDA sources are compiled only with a visible GPU or VQK_BUILD_CUDA=1 (as CI sets)")
    assert vqkernels.cuda_compiled()
    cuobjdump = glob.glob(os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin),
                                       "backends", "nvidia", "bin", "cuobjdump")) if importlib.util.find_spec(
        "triton") else []
    if not cuobjdump:
        pytest.skip("no cuobjdump (the triton wheel ships one) to list the device code")
    so = vqkernels._backend._C.__file__
    listing = subprocess.run([cuobjdump[0], "--list-elf", so], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump[0], "--dump-resource-usage", so], capture_output=True, text=True,
                           check=True).stdout
    kernels = {}  # arch -> the (mangled) names of the kernels compiled for it
    arch = None
    for line in usage.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m and arch:
            kernels.setdefault(arch, set()).add(m.group(1))
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    for arch in wanted.replace(",", ";").split(";"):
        sm = "sm_" + arch.strip().split("+")[0].replace(".", "")
        assert sm in listing, f"no {sm} device code in {so}:\n{listing}"
        names = " ".join(kernels.get(sm, ()))
        for family, kernel in CUDA_KERNELS.items():
            assert kernel in names, f"no {family} kernel ({kernel}) for {sm} in {so}"


# One kernel of each CUDA op family (csrc/cuda/<family>.cu), looked for in every architecture's code.
CUDA_KERNELS = {"nearest_code": "nearest_kernel", "nearest_code_topk": "topk_kernel",
                "vq_quantize": "gather_loss_kernel", "scatter (codebook gradients, EMA sums)": "scatter_sorted_kernel",
                "ema_update_": "cluster_size_kernel", "residual_quantize": "level_forward_kernel",
                "multiscale_quantize_step": "lookup_kernel", "lfq_entropy": "factors_kernel"}
# The ops with GPU kernels (CUDA and Triton): issue 4's list, with the backwards it names or implies.
GPU_OPS = {"nearest_code", "nearest_code_topk", "vq_quantize", "vq_quantize_backward", "ema_update_",
           "residual_quantize", "residual_quantize_backward", "multiscale_quantize_step",
           "multiscale_quantize_step_backward", "lfq_entropy", "lfq_entropy_backward"}


def test_cuda_kernel_registered_for_every_gpu_op():
    if not vqkernels.cuda_compiled():
        pytest.skip("the extension was built without its CUDA sources")
    have = {op for op in SCHEMAS if torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_cuda::{op}", "CUDA")}
    assert have == GPU_OPS
    B = vqkernels._backend
    for op in GPU_OPS:  # auto takes them only once verified on a GPU; choosing them routes there
        assert B.routes(op, "cuda")[-1][2] == ("cuda" if ("cuda", op) in B.GPU_VERIFIED else "reference")
    with vqkernels.use_backend("cuda"):
        assert all(B.routes(op, "cuda") == [(2 ** 63 - 1, None, "cuda")] for op in GPU_OPS)


def test_triton_launcher_for_every_gpu_op():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import vqkernels.triton as vqt
    have = {op for op in SCHEMAS if hasattr(torch.ops.vqkernels_triton, op)}
    assert have == GPU_OPS
    assert all(callable(getattr(vqt, op)) for op in GPU_OPS)


def test_import_without_extension_falls_back_to_reference():
    """Where the extension cannot load, the package still imports with a one-line warning
    saying why, and every op runs on the pure-PyTorch reference."""
    code = """
import sys, warnings
sys.modules["vqkernels._C"] = None  # what a missing or broken build looks like to the import
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vqkernels
import torch
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "\\n" not in messages[0] and "reference" in messages[0], messages
assert not vqkernels.compiled() and vqkernels.backend("nearest_code", "cpu").startswith("reference")
x, c = torch.randn(20, 5), torch.randn(7, 5)
idx, dist = vqkernels.nearest_code(x, c)
assert torch.equal(idx, torch.cdist(x.double(), c.double()).argmin(1))
assert vqkernels.nearest_code_topk(x, c, 3)[0].shape == (20, 3)
x.requires_grad_()
q, i, commit, cb = vqkernels.vq_quantize(x, c)
(q.sum() + commit).backward()
assert x.grad is not None
cs, es, cbk = torch.zeros(7), torch.zeros(7, 5), c.clone()
vqkernels.ema_update_(cbk, cs, es, x.detach(), i, 0.9, 1e-5)
assert float(cs.sum()) > 0
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
