"""Builds vqkernels._C: the C++ CPU kernels, plus the CUDA sources when a toolkit is found.

VQK_BUILD_CUDA=0 skips the CUDA sources, =1 requires them, unset builds them when a GPU is
visible, torch has CUDA and a toolkit is found. A failed build of the extension is a warning (the package
then runs on its pure-PyTorch reference kernels) unless VQK_REQUIRE_EXTENSION=1 or
VQK_BUILD_CUDA=1, as the project's own scripts and CI set. The toolkit root comes from CUDA_HOME / CUDA_PATH if set,
else from the nvcc on PATH (following a wrapper script to the real binary), else the
conventional /usr/local/cuda*; it must hold include/cuda_runtime.h and lib64/libcudart.so.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and any(
        os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib"))


def _nvcc_roots():
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    real = os.path.realpath(nvcc)
    yield os.path.dirname(os.path.dirname(real))
    try:  # a small wrapper script: find the real nvcc it runs
        with open(real, "rb") as f:
            head = f.read(4096).decode("utf-8", "ignore")
    except OSError:
        return
    for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc", head):
        yield m.group(1)


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *_nvcc_roots(), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if _is_toolkit(c)), None)


build_cuda_env = os.environ.get("VQK_BUILD_CUDA", "").strip()
cuda_home = find_cuda_home() if build_cuda_env != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it to the real root first.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# Unset: compile the CUDA sources only when a GPU is visible (they take minutes on a small machine
# and nothing built from them runs without one); CI sets VQK_BUILD_CUDA=1 to keep the compile check.
wanted = build_cuda_env == "1" or (build_cuda_env == "" and torch.cuda.is_available())
build_cuda = wanted and torch.version.cuda is not None and cuda_home is not None
if build_cuda_env == "1" and not build_cuda:
    raise RuntimeError(f"VQK_BUILD_CUDA=1 but cannot build CUDA sources: torch.version.cuda={torch.version.cuda}, "
                       f"toolkit root found: {cuda_home} (set CUDA_HOME to a root with include/cuda_runtime.h)")

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp", "-DVQK_WITH_CUDA=%d" % int(build_cuda)]
if build_cuda:
    ext = CUDAExtension(
        "vqkernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("vqkernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

require_extension = os.environ.get("VQK_REQUIRE_EXTENSION") == "1" or build_cuda_env == "1"


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, extension):
        try:
            super().build_extension(extension)
        except Exception as exc:  # noqa: BLE001  (any compiler or linker failure)
            if require_extension:
                raise
            print(f"WARNING: vqkernels: the C++ extension failed to build ({exc}); "
                  "the pure-PyTorch reference kernels will serve every op", file=sys.stderr)


setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
