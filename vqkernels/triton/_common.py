"""What every Triton launcher of vqkernels shares: its op definition (the one schema of schemas.py, the
one fake of fake.py), the device rule (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), the
launch-on-device guard, and block sizing."""

import contextlib
import os

import torch
import triton

from .. import _checks, fake
from ..schemas import SCHEMAS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import time too
NAMESPACE = "vqkernels_triton"
_LIB = torch.library.Library(NAMESPACE, "DEF")  # kept for the life of the process (it holds the definitions)


def triton_op(name):
    """Defines ``vqkernels_triton::<name>`` with the op's schema from schemas.py and its fake from fake.py, and
    registers the decorated launcher as its kernel for CUDA tensors and for CPU tensors (the interpreter, under
    TRITON_INTERPRET=1). The kernels compute in float32: a call with a float64 tensor is refused (through
    ``torch.ops.vqkernels.<name>`` the router serves it with the reference). The kernel is opaque to
    torch.compile, as a torch.library.custom_op's is (Triton's own triton_op fails fake-tensor checks in the
    interpreter). Returns the op."""
    def register(launcher):
        def kernel(*args):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
                _checks._fail(f"{name} (Triton)", "no float64 kernel (the Triton kernels compute in float32); "
                                                  f"torch.ops.vqkernels.{name} serves float64 with the reference")
            return launcher(*args)

        _LIB.define(SCHEMAS[name])
        for key in ("CUDA", "CPU"):
            _LIB.impl(name, kernel, key)
        torch.library.register_fake(f"{NAMESPACE}::{name}")(fake.FAKES[name])
        return getattr(torch.ops.vqkernels_triton, name)
    return register


def check_device(op, t):
    """A ValueError unless ``t`` is a CUDA tensor (or any tensor under TRITON_INTERPRET=1)."""
    if t.device.type != "cuda" and not INTERPRET:
        _checks._fail(op, f"inputs are on {t.device}; the Triton kernel needs CUDA tensors "
                          "(or TRITON_INTERPRET=1 for CPU tensors)")


def on_device(t):
    """Launches on ``t``'s GPU (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def block(n, lo, hi):
    """A power-of-two block size covering n, clipped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))
