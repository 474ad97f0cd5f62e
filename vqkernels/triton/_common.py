"""What every Triton launcher of vqkernels shares: the device rule (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), the launch-on-device guard, and block sizing."""

import contextlib
import os

import torch
import triton

from .. import _checks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import time too


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
