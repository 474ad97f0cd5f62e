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


# ---------------------------------------------------------------------------------------
# the Triton kernels: imported only on demand, one schema with the public ops, compiled for sm_90

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _child_env(interpret):
    """This process's environment for a child Python that imports this checkout's vqkernels (without
    TRITON_INTERPRET unless ``interpret``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or interpret}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


@needs_triton
def test_import_vqkernels_does_not_import_triton():
    code = "import sys, vqkernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env(True))


@needs_triton
@pytest.mark.parametrize("name", sorted(GPU_OPS))
def test_triton_op_schema_matches_vqkernels(name):
    """The vqkernels_triton op takes exactly the vqkernels op's arguments (names, types, defaults) and returns
    as many tensors: a boxed call can be forwarded unchanged."""
    import vqkernels.triton as vqt
    mine = getattr(torch.ops.vqkernels_triton, name).default._schema
    spec = getattr(torch.ops.vqkernels, name).default._schema
    assert [(a.name, str(a.type), a.default_value) for a in mine.arguments] == \
        [(a.name, str(a.type), a.default_value) for a in spec.arguments]
    assert len(mine.returns) == len(spec.returns)
    assert callable(getattr(vqt, name)) and name in vqt.__all__


# One script, one interpreter (each takes seconds to import triton): the kernels of every op family.
TRITON_AOT_COMPILE = '''
# nearest_code
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton
fn = sys.modules["vqkernels.triton.nearest_code"]._nearest_code_kernel.fn
ints = ("N", "K", "D", "sxn", "sxd", "scn", "scd")
for dtype, metric in (("fp32", 0), ("bf16", 2)):
    sig = dict(x_ptr="*" + dtype, c_ptr="*" + dtype, add_ptr="*fp32", scale_ptr="*fp32", idx_ptr="*i64",
               dist_ptr="*fp32", **{a: "i32" for a in ints})
    const = dict(METRIC=metric, IEEE=dtype == "fp32", UPCAST=False, EPS=1e-12, BLOCK_N=128, BLOCK_K=128, BLOCK_D=32)
    sig.update({a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"]
    assert ("wgmma" in ptx) == (dtype == "bf16"), dtype  # bf16 on tensor cores; fp32 IEEE never on TF32 ones

# nearest_code_topk, vq_quantize (+ backward), the scatters, ema_update_
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton  # noqa: F401
mods = {m: sys.modules["vqkernels.triton." + m] for m in ("nearest_code_topk", "vq_quantize", "scatter", "ema_update")}


def ptx_of(kernel, types, const, num_warps=4):
    """PTX of kernel for sm_90: pointer/float argument types from types, other arguments i32."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    sig.update({a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    options = dict(num_warps=num_warps, num_stages=2)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def search(dt, **more):
    return dict(x_ptr="*" + dt, c_ptr="*" + dt, add_ptr="*fp32", scale_ptr="*fp32", idx_ptr="*i64", **more)


for dt, metric in (("fp32", 0), ("bf16", 2)):
    const = dict(METRIC=metric, IEEE=dt == "fp32", UPCAST=False, EPS=1e-12, KP=16, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32)
    ptx = ptx_of(mods["nearest_code_topk"]._topk_kernel, search(dt, dist_ptr="*fp32"), const)
    assert ("wgmma" in ptx) == (dt == "bf16"), dt
const = dict(METRIC=1, IEEE=True, UPCAST=False, EPS=1e-12, BLOCK_N=128, BLOCK_K=128, BLOCK_D=32)
ptx = ptx_of(mods["vq_quantize"]._vq_quantize_kernel, search("fp32", q_ptr="*fp16", err_ptr="*fp32"), const, 8)
assert "mma" not in ptx
for atomic in (False, True):
    types = dict(gq_ptr="*bf16", x_ptr="*fp16", c_ptr="*fp32", idx_ptr="*i64", coef_ptr="*fp32", gx_ptr="*fp16",
                 gc_ptr="*fp32")
    ptx = ptx_of(mods["vq_quantize"]._vq_backward_kernel, types, dict(ATOMIC=atomic, BLOCK_N=32, BLOCK_D=64))
    assert ("atom" in ptx) == atomic
types = dict(src_ptr="*fp16", order_ptr="*i64", starts_ptr="*i64", sub_ptr="*fp32", coef_ptr="*fp32", out_ptr="*fp32")
ptx = ptx_of(mods["scatter"]._segment_sum_kernel, types, dict(HAS_SUB=True, HAS_COEF=True, BLOCK_R=16, BLOCK_D=64))
assert "atom" not in ptx
e = mods["ema_update"]
types = dict(x_ptr="*bf16", idx_ptr="*i64", counts_ptr="*i32", sums_ptr="*fp32")
assert "atom" in ptx_of(e._ema_accumulate_kernel, types, dict(BLOCK_N=32, BLOCK_D=64))
types = dict(cs_ptr="*fp32", counts_ptr="*i64", total_ptr="*fp32", decay="fp32", one_minus_decay="fp32")
ptx_of(e._ema_stats_kernel, types, dict(BLOCK=1024))
types = dict(cb_ptr="*bf16", cs_ptr="*fp32", es_ptr="*fp32", sums_ptr="*fp32", total_ptr="*fp32", decay="fp32",
             one_minus_decay="fp32", eps="fp32", k_eps="fp32")
ptx_of(e._ema_finalize_kernel, types, dict(BLOCK_K=32, BLOCK_D=64))

# residual_quantize, multiscale_quantize_step, lfq_entropy (+ backwards)
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vqkernels.triton
m = sys.modules
common, rq = m["vqkernels.triton.scatter"], m["vqkernels.triton.residual_quantize"]
ms, lf = m["vqkernels.triton.multiscale"], m["vqkernels.triton.lfq"]
I, F = "i32", "fp32"
KERNELS = [
    (common._scatter_atomic_kernel, ["*fp32", "*i64", "*bf16"] + [I] * 10, dict(BLOCK_N=32, BLOCK_D=64), True),
    (common._scatter_sorted_kernel, ["*fp32", "*i64", "*i64", "*fp16"] + [I] * 8, dict(BLOCK_D=64), True),
    (rq._residual_step_kernel, ["*fp32"] * 3 + ["*i64", "*fp64"] + [I] * 3, dict(BLOCK_N=32, BLOCK_D=64), False),
    (rq._residual_grad_kernel, ["*fp32"] * 4 + ["*i64"] + ["*fp32"] * 2 + [I] * 4, dict(BLOCK_N=32, BLOCK_D=64), False),
    (ms._area_kernel, ["*bf16", "*bf16"] + [I] * 12, dict(BLOCK_R=32, BLOCK_C=64), True),
    (ms._gather_nchw_kernel, ["*fp16", "*i64", "*fp16"] + [I] * 5, dict(BLOCK_R=32, BLOCK_C=64), True),
    (lf._code_probs_kernel, ["*fp16", "*fp32", "*fp32"] + [I] * 5 + [F],
     dict(BLOCK_N=32, BLOCK_A=64, HAS_W=False, SCALE=False), True),
    (lf._code_probs_kernel, ["*fp16", "*fp32", "*fp32"] + [I] * 5 + [F],
     dict(BLOCK_N=32, BLOCK_A=64, HAS_W=True, SCALE=True), True),
    (lf._entropy_rows_kernel, ["*bf16", "*fp32", "*fp32"] + [I] * 4 + [F], dict(BLOCK_N=32, BLOCK_D=32, HAS_W=False),
     True),
    (lf._entropy_rows_kernel, ["*bf16", "*fp32", "*fp32"] + [I] * 4 + [F], dict(BLOCK_N=32, BLOCK_D=32, HAS_W=True),
     True),
    (lf._matmul_kernel, ["*fp32"] * 3 + [I] * 11, dict(BLOCK_M=64, BLOCK_NC=64, BLOCK_K=32), True),
    (lf._logit_grad_kernel, ["*fp32"] * 6 + [I] * 6 + [F], dict(BLOCK_N=32, BLOCK_A=64, KB=16, HAS_W=False), True),
    (lf._logit_grad_kernel, ["*fp32"] * 6 + [I] * 6 + [F], dict(BLOCK_N=32, BLOCK_A=64, KB=16, HAS_W=True), True),
]
for fn, types, const, fusion in KERNELS:
    names = [a for a in fn.arg_names if a not in const]
    assert len(names) == len(types), (fn.__name__, names)
    sig = dict(zip(names, types), **{a: "constexpr" for a in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, num_stages=2, enable_fp_fusion=fusion)).asm["ptx"]
    assert "mma" not in ptx, fn.__name__  # float32 GEMMs in IEEE float32, never on TF32 tensor cores
    if not fusion:
        assert "fma.rn.f32" not in ptx, fn.__name__  # rounded as the reference: no fused multiply-add
'''


@needs_triton
def test_triton_kernels_compile_for_sm90():
    """Every Triton kernel compiles (not interpreted) for an H100/H200 without a GPU, catching errors the
    interpreter lets through: float32 searches and GEMMs never on TF32 tensor cores, bf16 searches on wgmma,
    float atomics only in the fast scatter paths, no FMA where the reference rounds."""
    r = subprocess.run([sys.executable, "-c", TRITON_AOT_COMPILE], env=_child_env(False), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
