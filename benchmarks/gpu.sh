#!/usr/bin/env bash
# On a bare GPU machine (torch with CUDA already installed): builds the extension with its CUDA
# sources, runs the GPU tests, then the GPU benchmarks, and prints a short table last.
#   bash benchmarks/gpu.sh            # PYTHON=... to pick the interpreter
# Writes benchmarks/gpu_results.md (the report) and benchmarks/auto_rules.json (the measured
# winners: vqkernels.set_auto_table("benchmarks/auto_rules.json") makes "auto" use them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(readlink -f "$(command -v nvcc)")
  CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export VQK_BUILD_CUDA=1 VQK_REQUIRE_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m pip install --no-build-isolation --no-deps -q -e .
"$PY" -m vqkernels.info
T="-q -p no:cacheprovider -W ignore::DeprecationWarning"
# The kernels' own tests (those the `backend` fixture runs with the cuda or the triton backend, in each op's
# tests/test_<op>.py: marked gpu_backend), the router and the build, then every op and layer on CUDA vs the
# CPU (tests/test_cuda.py) with each GPU backend serving (auto takes only kernels listed in
# vqkernels._backend.GPU_VERIFIED).
"$PY" -m pytest tests -m gpu_backend $T || echo "GPU KERNEL TESTS FAILED (the rest follows anyway)"
"$PY" -m pytest tests/test_backends.py tests/test_build.py $T || echo "ROUTER / BUILD TESTS FAILED (the rest follows anyway)"
for b in $("$PY" -c "from vqkernels._backend import GPU_BACKENDS; print(*GPU_BACKENDS)"); do
  VQK_BACKEND=cuda:$b "$PY" -m pytest tests/test_cuda.py $T || echo "tests/test_cuda.py FAILED with $b"
done
VQK_BACKEND=cuda:cuda "$PY" -m vqkernels.bench.layers --device cuda
"$PY" -m vqkernels.bench.gpu --output benchmarks/gpu_results.md --save-auto benchmarks/auto_rules.json
