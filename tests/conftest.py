"""Fixtures of the vqkernels tests (plain helper functions live in vq_helpers.py)."""

import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter, which must be on
# before triton is first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vq_helpers import (BACKEND_DEVICES, GPU, Backend, backend_params, forced_cpu_isa, require_triton,  # noqa: E402
                        vqkernels)

# With the extension loaded, the CPU kernels run with either instruction set; without
# it the reference serves the CPU and there is a single, do-nothing parameter.
ISA_PARAMS = ["avx512", "avx2", "portable"] if vqkernels.compiled() else ["reference"]


@pytest.fixture(params=ISA_PARAMS)
def isa(request):
    """Runs the test with the CPU kernels forced to one instruction set, then restores 'auto'."""
    wanted = request.param
    if wanted == "reference":
        yield wanted
        return
    with forced_cpu_isa(wanted):
        assert vqkernels.cpu_isa() == wanted
        yield wanted


@pytest.fixture(params=backend_params())
def backend(request):
    """Runs the test with one backend serving every op it implements on its device (vqkernels.use_backend),
    then restores the settings; gives the test a vq_helpers.Backend (name, device). Parametrised with
    vq_helpers.DEFAULT_BACKENDS, or what the test names (vq_helpers.on_backends, per_backend)."""
    name = request.param
    device = BACKEND_DEVICES[name]
    if device == "cuda" and not GPU:
        pytest.skip("needs a CUDA device")
    if name == "cuda" and not vqkernels.cuda_compiled():
        pytest.skip("the extension was built without its CUDA sources")
    if name == "triton":
        require_triton()
    if name != "reference" and not vqkernels.compiled():
        pytest.skip(f"backend {name!r} needs the compiled extension (and its router), which is not loaded")
    with vqkernels.use_backend(name, device=device):
        yield Backend(name, device)


# ---------------------------------------------------------------- the model suite's generator tests

@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory):
    """A tiny vqvae tokenizer (16x16 images, 4x4 codes of 16) trained for two steps on digits."""
    from models.train import Trainer, build_run_config
    out = tmp_path_factory.mktemp("tok")
    sets = ["model.resolution=16", "model.hidden=8", "model.res_channels=4", "model.num_res_blocks=1",
            "model.embed_dim=4", "model.codebook_size=16", "data.hflip=false", "train.judge_per_class=0"]
    run = build_run_config("vqvae", None, None, sets, data="digits", steps=2, batch_size=8)
    Trainer(run, out, progress=False).fit()
    return out
