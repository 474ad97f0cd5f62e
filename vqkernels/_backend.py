"""Loads the compiled extension and registers the reference kernels as the fallback.

The compiled kernels register themselves per dispatch key (CPU today) when the
extension loads. The pure-PyTorch reference is registered under
CompositeExplicitAutograd, which the dispatcher uses only for a device with no
kernel of its own: every device when the extension is missing, CUDA until the
GPU kernels exist.
"""

import warnings

import torch

from . import reference
from .schemas import SCHEMAS

try:
    from . import _C  # noqa: F401  (registers the compiled kernels)
except ImportError as exc:  # the extension was not built, or built against another torch
    _C = None
    warnings.warn(f"vqkernels: compiled kernels unavailable ({exc}); using the pure-PyTorch reference kernels",
                  RuntimeWarning, stacklevel=2)

for _name in SCHEMAS:
    torch.library.impl(f"vqkernels::{_name}", "CompositeExplicitAutograd")(getattr(reference, _name))


def compiled():
    """True when the C++ extension is loaded."""
    return _C is not None


def cpu_isa():
    """The instruction set the CPU kernels run with now: 'avx512', 'avx2' or 'portable' (None without the extension)."""
    return _C.cpu_isa() if _C is not None else None


def set_cpu_isa(isa):
    """Force the CPU kernels' instruction set ('avx512', 'avx2', 'portable', or 'auto'); returns the one in force."""
    if _C is None:
        raise RuntimeError("vqkernels: the compiled extension is not loaded")
    return _C.set_cpu_isa(isa)


def cuda_compiled():
    """True when the extension was built with its CUDA sources."""
    return _C is not None and _C.cuda_compiled()


def backend(op, device_type):
    """Which implementation serves `op` for tensors on `device_type` ('cpu', 'cuda', ...)."""
    if device_type == "cpu" and _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"vqkernels::{op}", "CPU"):
        return f"C++ ({cpu_isa()})"
    return "reference (pure PyTorch)"
