"""``python -m vqkernels.info``: build facts, CPU capabilities, and which backend serves each op.

The table shows, per op and device, what serves a call now: "C++ (isa)", "CUDA C++", "Triton" or
"reference (pure PyTorch)"; a C++ CPU kernel names the active ISA where it has SIMD code per ISA and
"portable" where it is one body for every ISA (vqkernels._backend.CPU_ISA_OPS); "[auto]" marks the
automatic choice (vqkernels.set_backend changes it), and measured auto rules show their row bound and
dtype. The last column lists the GPU kernels
built for each op; "*" marks those not yet verified on a GPU, which "auto" does not pick.
"""

import importlib.util
import os
import platform

import torch

from . import _backend
from .schemas import SCHEMAS


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report():
    """The facts as (key, value) rows and the op x device backend table."""
    C = _backend._C
    cuda_built = _backend.cuda_compiled()
    facts = [
        ("vqkernels", __import__("vqkernels").__version__),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("compiled extension", "loaded" if C is not None else "missing: pure-PyTorch reference kernels serve every op"),
        ("CPU", f"{_cpu_model()}, {torch.get_num_threads()} threads"),
        ("CPU AVX2+FMA / AVX-512F", " / ".join(("yes" if f() else "no") for f in (C.cpu_has_avx2, C.cpu_has_avx512))
         if C is not None else "unknown"),
        ("CPU kernels ISA", _backend.cpu_isa() or "n/a"),
        ("CUDA sources compiled", "yes (CUDA runtime %d)" % C.cuda_runtime_version() if cuda_built else "no"),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
    ]
    if cuda_built and torch.cuda.is_available():
        facts.append(("CUDA probe kernel", C.cuda_selftest()))
    triton = importlib.util.find_spec("triton")
    facts.append(("Triton", "not installed" if triton is None else
                  __import__("triton").__version__ + (" (interpreter: CPU tensors)" if _backend.triton_interpreted()
                                                      else "")))
    facts.append(("VQK_BACKEND", os.environ.get("VQK_BACKEND") or "unset (auto)"))
    devices = list(_backend.DEVICES)
    columns = devices + ["GPU kernels available"]
    table = [(op, [_backend.backend(op, dev) for dev in devices]
              + [", ".join(b + ("" if (b, op) in _backend.GPU_VERIFIED else "*") for b in _backend.GPU_BACKENDS
                           if _backend.available(b, op, "cuda")) or "none"])
             for op in SCHEMAS]
    return facts, columns, table


def main():
    facts, columns, table = report()
    width = max(len(k) for k, _ in facts)
    for key, value in facts:
        print(f"{key:<{width}}  {value}")
    print()
    opw = max(len(op) for op, _ in table)
    colw = max(len(b) for _, row in table for b in row)
    print(f"{'op':<{opw}}  " + "  ".join(f"{d:<{colw}}" for d in columns))
    for op, row in table:
        print(f"{op:<{opw}}  " + "  ".join(f"{b:<{colw}}" for b in row))
    if any("*" in row[-1] for _, row in table):
        print("\n* not yet verified on a GPU: serves only when chosen (vqkernels.set_backend, VQK_BACKEND) "
              "or by a measured auto table")


if __name__ == "__main__":
    main()
