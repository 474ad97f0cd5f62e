"""Backend choice of torch.ops.vqkernels.<op>: VQK_BACKEND, set_backend / use_backend, auto rules,
the router (csrc/dispatch.cpp), and every backend serving the public op (opcheck included).

Which kernel served a call is read from the profiler: the router's forward call shows up as the
backend's own op (vqkernels_cpu::, vqkernels_ref::, vqkernels_triton::, vqkernels_cuda::).
Triton runs on CPU tensors here through the interpreter (tests/conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vq_helpers import assert_outputs_close, op_samples, opcheck, run_op, vqkernels

from vqkernels import _backend
from vqkernels.schemas import SCHEMAS

pytestmark = pytest.mark.skipif(not vqkernels.compiled(), reason="the router lives in the compiled extension")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()


def served_by(op, args):
    """The backend namespaces whose `op` ran during one call of torch.ops.vqkernels.<op>."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_op(op, args)
    names = {e.name for e in prof.events()}
    return {ns for ns in _backend.NAMESPACES.values() if f"{ns}::{op}" in names}


@pytest.fixture(autouse=True)
def restore_settings():
    saved = dict(_backend._settings)
    yield
    _backend.set_auto_table(None)
    _backend._settings.update(saved)
    _backend._push(list(saved))


def cpu_backends():
    names = ["cpu", "reference"]
    if _backend.triton_interpreted() and _backend.available("triton", "nearest_code", "cpu"):
        names.append("triton")
    return names


def test_default_is_auto_with_the_cpu_kernels_on_cpu():
    for op in SCHEMAS:
        assert vqkernels.get_backend(op, "cpu") == "auto"
        assert _backend.routes(op, "cpu")[-1][2] == "cpu"
    args = op_samples()["nearest_code"]
    assert served_by("nearest_code", args) == {"vqkernels_cpu"}
    assert vqkernels.backend("nearest_code", "cpu").startswith("C++")


def test_cpu_label_names_the_isa_only_for_ops_with_isa_paths():
    assert _backend.CPU_ISA_OPS < set(SCHEMAS)
    if not vqkernels.compiled():
        pytest.skip("no compiled extension")
    isa = vqkernels.cpu_isa()
    assert vqkernels.backend("nearest_code", "cpu") == f"C++ ({isa}) [auto]"
    assert vqkernels.backend("latent_quantize", "cpu") == "C++ (portable) [auto]"
    assert vqkernels.backend("ema_update_", "cpu") == "C++ (portable) [auto]"


@pytest.mark.parametrize("backend", cpu_backends())
def test_use_backend_routes_every_op_it_serves(backend):
    samples = op_samples()
    with vqkernels.use_backend(backend, device="cpu"):
        for op, args in samples.items():
            want = _backend.NAMESPACES[backend] if _backend.available(backend, op, "cpu") else "vqkernels_cpu"
            assert served_by(op, args) == {want}, op
    for op, args in samples.items():  # restored on exit
        assert served_by(op, args) == {"vqkernels_cpu"}, op


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpu"])
def test_backend_outputs_match_the_cpu_kernels(backend):
    samples = op_samples()
    want = {op: run_op(op, args) for op, args in samples.items()}
    with vqkernels.use_backend(backend, device="cpu"):
        for op, args in samples.items():
            assert_outputs_close(run_op(op, args), want[op])


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpu"])
def test_opcheck_of_the_public_op_on_each_backend(backend):
    samples = op_samples()
    with vqkernels.use_backend(backend, device="cpu"):
        for op, args in samples.items():
            if not _backend.available(backend, op, "cpu"):
                continue
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            opcheck(op, args)


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_backend_rejects_bad_inputs(backend):
    """Each backend validates its own inputs: the router forwards calls unchecked."""
    samples = op_samples()
    x, c, _ = samples["nearest_code"]
    cb, cs, es, xe, idx, decay, eps = samples["ema_update_"]
    with vqkernels.use_backend(backend, device="cpu"):
        with pytest.raises(ValueError, match="x must be float32, float16, bfloat16 or float64"):
            torch.ops.vqkernels.nearest_code(x.int(), c)
        with pytest.raises(ValueError, match="k must be in"):
            torch.ops.vqkernels.nearest_code_topk(x, c, c.shape[0] + 1)
        with pytest.raises(ValueError, match="but codebook has D="):
            torch.ops.vqkernels.vq_quantize(x[:, :2], c)
        with pytest.raises(ValueError, match="indices must be in"):
            torch.ops.vqkernels.ema_update_(cb.clone(), cs.clone(), es.clone(), xe, idx + c.shape[0], decay, eps)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "cpu"])
def test_training_gradients_through_another_backend(backend):
    x = op_samples()["vq_quantize"][0].clone().requires_grad_()
    c = op_samples()["vq_quantize"][1].clone().requires_grad_()

    def grads():
        q, _, commit, cb = vqkernels.vq_quantize(x, c)
        (q.square().sum() + commit + 0.5 * cb).backward()
        out = (x.grad.clone(), c.grad.clone())
        x.grad = c.grad = None
        return out

    want = grads()
    with vqkernels.use_backend(backend, device="cpu"):
        assert_outputs_close(grads(), want)


def float32_backends():
    """The backends without float64 kernels that can serve CPU tensors here, as (name, device)."""
    return [(b, "cpu") for b in cpu_backends() if torch.float64 not in _backend.REGISTRY[b].dtypes]


def gpu_float32_backends():
    return [(b, "cuda") for b in _backend.GPU_BACKENDS if GPU and _backend.available(b, "nearest_code", "cuda")]


@pytest.mark.parametrize("backend, device", float32_backends() + gpu_float32_backends())
def test_float64_calls_go_to_the_reference_and_the_backend_op_refuses_them(backend, device):
    """The router sends a call with any float64 tensor argument (not only the first) to the reference when the
    chosen backend has no float64 kernels; the backend's own op refuses float64 with a clear error."""
    x, c, _ = op_samples(device)["nearest_code"]
    samples = dict(op_samples(device, torch.float64), mixed_nearest_code=(x, c.double(), "l2"))
    with vqkernels.use_backend(backend, device=device):
        for name, args in samples.items():
            op = name.removeprefix("mixed_")
            if not _backend.available(backend, op, device):
                continue
            assert served_by(op, args) == {"vqkernels_ref"}, name
            with vqkernels.use_backend("reference", ops=op, device=device):
                want = run_op(op, args)
            assert_outputs_close(run_op(op, args), want)
            with pytest.raises(ValueError, match="no float64 kernel"):
                getattr(getattr(torch.ops, _backend.NAMESPACES[backend]), op)(*_fresh(args))


def test_float64_calls_stay_on_a_backend_with_float64_kernels():
    assert torch.float64 in _backend.REGISTRY["cpu"].dtypes
    assert served_by("nearest_code", op_samples("cpu", torch.float64)["nearest_code"]) == {"vqkernels_cpu"}


def _fresh(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with vqkernels.use_backend("reference"):
            assert vqkernels.get_backend("nearest_code", "cpu") == "reference"
            raise RuntimeError("boom")
    assert vqkernels.get_backend("nearest_code", "cpu") == "auto"
    assert served_by("nearest_code", op_samples()["nearest_code"]) == {"vqkernels_cpu"}


def test_per_op_setting_leaves_the_others():
    vqkernels.set_backend("reference", ops=["vq_quantize"], device="cpu")
    samples = op_samples()
    assert served_by("vq_quantize", samples["vq_quantize"]) == {"vqkernels_ref"}
    assert served_by("nearest_code", samples["nearest_code"]) == {"vqkernels_cpu"}
    assert vqkernels.get_backend("vq_quantize", "cuda") == "auto"


def test_choice_is_made_at_run_time_under_torch_compile():
    x, c, _ = op_samples()["nearest_code"]
    f = torch.compile(lambda a, b: torch.ops.vqkernels.nearest_code(a, b)[1] * 2, fullgraph=True)
    want = f(x, c)
    with vqkernels.use_backend("reference", device="cpu"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = f(x, c)
    assert "vqkernels_ref::nearest_code" in {e.name for e in prof.events()}
    torch.testing.assert_close(got, want)


def test_auto_table_rules_by_rows_and_dtype(tmp_path):
    x, c, _ = op_samples()["nearest_code"]
    vqkernels.set_auto_table({("cpu", "nearest_code"): [(8, None, "reference")]})
    assert served_by("nearest_code", (x[:8], c, "l2")) == {"vqkernels_ref"}
    assert served_by("nearest_code", (x[:9], c, "l2")) == {"vqkernels_cpu"}
    assert "rows <= 8" in vqkernels.backend("nearest_code", "cpu")
    path = tmp_path / "auto.json"
    path.write_text(json.dumps([{"device": "cpu", "op": "nearest_code", "max_rows": 2 ** 40,
                                 "dtype": "float64", "backend": "reference"}]))
    vqkernels.set_auto_table(str(path))
    assert served_by("nearest_code", (x, c, "l2")) == {"vqkernels_cpu"}
    assert served_by("nearest_code", (x.double(), c.double(), "l2")) == {"vqkernels_ref"}
    # a fixed setting overrides the auto rules; back to auto brings them back
    vqkernels.set_backend("cpp", ops="nearest_code")
    assert served_by("nearest_code", (x.double(), c.double(), "l2")) == {"vqkernels_cpu"}
    vqkernels.set_backend("auto", ops="nearest_code")
    assert served_by("nearest_code", (x.double(), c.double(), "l2")) == {"vqkernels_ref"}
    vqkernels.set_auto_table(None)
    assert served_by("nearest_code", (x.double(), c.double(), "l2")) == {"vqkernels_cpu"}


@pytest.mark.skipif(not vqkernels.cuda_compiled(), reason="no CUDA kernels built")
def test_auto_on_cuda_takes_only_gpu_verified_kernels(monkeypatch):
    assert _backend.routes("nearest_code", "cuda")[-1][2] == (
        "cuda" if ("cuda", "nearest_code") in _backend.GPU_VERIFIED else "reference")
    monkeypatch.setattr(_backend, "GPU_VERIFIED", frozenset({("cuda", "nearest_code")}))
    assert _backend.routes("nearest_code", "cuda") == [(2 ** 63 - 1, None, "cuda")]
    monkeypatch.setattr(_backend, "GPU_VERIFIED", frozenset())
    assert _backend.routes("nearest_code", "cuda") == [(2 ** 63 - 1, None, "reference")]
    # a measured table is an explicit choice: its rules apply as given
    vqkernels.set_auto_table({("cuda", "nearest_code"): [(2 ** 20, None, "cuda")]})
    assert _backend.routes("nearest_code", "cuda")[0] == (2 ** 20, None, "cuda")


def test_auto_rules_naming_an_unavailable_backend_are_skipped():
    vqkernels.set_auto_table({("cuda", "fsq_quantize"): [(2 ** 40, None, "triton")]})
    assert _backend.routes("fsq_quantize", "cuda")[0][2] != "triton"


@pytest.mark.parametrize("call, match", [
    (lambda: vqkernels.set_backend("tpu"), "unknown backend 'tpu'"),
    (lambda: vqkernels.set_backend("reference", ops=["nearest"]), "unknown op"),
    (lambda: vqkernels.set_backend("reference", device="mps"), "device must be one of"),
    (lambda: vqkernels.set_backend("cuda", device="cpu"), "serves CUDA tensors only"),
    (lambda: vqkernels.set_backend("cpu", device="cuda"), "serves CPU tensors only"),
    (lambda: vqkernels.set_backend("triton", ops=["gumbel_quantize"], device="cpu"), "does not serve gumbel"),
    (lambda: vqkernels.set_auto_table({("cpu", "nearest_code"): [(4, None, "fast")]}), "bad auto rule"),
])
def test_bad_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    assert all(v == "auto" for v in _backend._settings.values())


def run_with_env(value, code):
    env = dict(os.environ, VQK_BACKEND=value, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value, want", [
    ("reference", {"nearest_code": "reference", "fsq_quantize": "reference"}),
    ("cpu:vq_quantize=reference", {"vq_quantize": "reference", "nearest_code": "auto"}),
    ("reference, cpu:nearest_code=cpp", {"nearest_code": "cpu", "vq_quantize": "reference"}),
    ("vq_quantize=reference", {"vq_quantize": "reference", "nearest_code": "auto"}),
])
def test_vqk_backend_values(value, want):
    _backend._apply_env(value)
    assert {op: vqkernels.get_backend(op, "cpu") for op in want} == want


def test_vqk_backend_is_read_at_import():
    r = run_with_env("cpu:vq_quantize=reference", "import vqkernels; print(vqkernels.get_backend('vq_quantize', 'cpu'))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "reference"
    r = run_with_env("cpu:nearest_code=fastest", "import vqkernels")
    assert r.returncode != 0 and "VQK_BACKEND='cpu:nearest_code=fastest'" in r.stderr
    assert "unknown backend 'fastest'" in r.stderr


def test_info_shows_the_backend_of_every_op():
    from vqkernels import info
    vqkernels.set_backend("reference", ops="lfq_entropy", device="cpu")
    _, columns, table = info.report()
    rows = dict(table)
    assert columns == ["cpu", "cuda", "GPU kernels available"] and set(rows) == set(SCHEMAS)
    for op, row in rows.items():
        want = [b + ("" if (b, op) in _backend.GPU_VERIFIED else "*") for b in ("cuda", "triton")
                if _backend.available(b, op, "cuda")]
        assert row[2] == (", ".join(want) or "none")
    assert rows["nearest_code"][0].startswith("C++") and rows["nearest_code"][0].endswith("[auto]")
    assert rows["lfq_entropy"][0] == "reference (pure PyTorch)"


# --- on a GPU: every backend that serves an op on CUDA tensors against the float64 reference on the CPU ---

def gpu_backends():
    return [b for b in ("cuda", "triton") if GPU and any(_backend.available(b, op, "cuda") for op in SCHEMAS)]


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_the_reference(backend, dtype):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} serves no op here")
    samples = op_samples("cuda", dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with vqkernels.use_backend(backend, device="cuda"):
        for op, args in samples.items():
            if not _backend.available(backend, op, "cuda"):
                continue
            assert served_by(op, args) == {_backend.NAMESPACES[backend]}, op
            want = run_op(op, tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
            with vqkernels.use_backend("reference", ops=[op], device="cpu"):
                assert_outputs_close(run_op(op, args), want, **tol)
            opcheck(op, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_mode_is_bitwise_reproducible(backend):
    if backend not in gpu_backends():
        pytest.skip(f"{backend} serves no op here")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(20000, 16, device="cuda", generator=g)
    c = torch.randn(64, 16, device="cuda", generator=g)
    idx = torch.randint(0, 64, (20000,), device="cuda", generator=g)
    torch.use_deterministic_algorithms(True)
    try:
        with vqkernels.use_backend(backend, device="cuda"):
            runs = []
            for _ in range(2):
                state = (c.clone(), torch.ones(64, device="cuda"), c.clone())
                vqkernels.ema_update_(*state, x, idx, 0.99, 1e-5)
                gx, gc = torch.ops.vqkernels.vq_quantize_backward(x, torch.tensor(1.0, device="cuda"),
                                                                  torch.tensor(1.0, device="cuda"), x, c, idx)
                runs.append((*state, gx, gc))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_backend_names_read_as_their_namespaces_and_cpp_is_an_alias(tmp_path):
    """Backends are named as their namespaces (cpu, cuda, triton, reference); the earlier "cpp" still works
    everywhere a name is read (set_backend, use_backend, VQK_BACKEND, auto tables) and reads back as "cpu"."""
    assert {b: _backend.NAMESPACES[b] for b in ("cpu", "cuda", "triton", "reference")} == {
        b: "vqkernels_ref" if b == "reference" else f"vqkernels_{b}" for b in ("cpu", "cuda", "triton", "reference")}
    try:
        with vqkernels.use_backend("cpp", ops="vq_quantize"):
            assert vqkernels.get_backend("vq_quantize", "cpu") == "cpu"
        vqkernels.set_auto_table({("cpu", "nearest_code"): [(2 ** 40, None, "cpp")]})
        assert _backend.routes("nearest_code", "cpu")[0][2] == "cpu"
        with pytest.raises(ValueError, match="unknown backend 'c\\+\\+'"):
            vqkernels.set_backend("c++")
    finally:
        vqkernels.set_auto_table(None)
        vqkernels.set_backend("auto")
