"""Loads the compiled extension and chooses which backend serves each op on each device.

Backends (each registers its kernels in its own op namespace, same schemas):

    "cpu"        C++ CPU kernels (csrc/cpu), CPU tensors            vqkernels_cpu
                 ("cpp" is accepted as another name for it)
    "cuda"       CUDA C++ kernels (csrc/cuda), CUDA tensors         vqkernels_cuda
    "triton"     Triton kernels (vqkernels/triton), CUDA tensors    vqkernels_triton
                 (and CPU tensors when TRITON_INTERPRET=1: slow, for tests)
    "reference"  the pure-PyTorch reference, any device             vqkernels_ref
    "auto"       per op, device, dtype and row count: the fastest measured backend
                 (vqkernels.set_auto_table), else the first available of
                 cuda > triton > reference (CUDA tensors; only GPU kernels that have passed
                 their tests on a GPU, GPU_VERIFIED) and cpu > reference (CPU tensors)

``torch.ops.vqkernels.<op>`` on CPU and CUDA tensors runs a router kernel (csrc/dispatch.cpp)
that forwards each call to the backend chosen here; the choice is made inside the op at run
time, so it applies under torch.compile as well. The pure-PyTorch reference is also the
CompositeExplicitAutograd kernel of every ``vqkernels::<op>``: it serves other devices, and
every device when the extension is missing (no router then; every setting but "reference"
and "auto" is refused).

Settings are process-wide: ``VQK_BACKEND`` at import, then :func:`set_backend` and the
context manager :func:`use_backend`.
"""

import contextlib
import importlib
import json
import os
import warnings
from dataclasses import dataclass

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
    for _ns in ("vqkernels", "vqkernels_ref"):
        torch.library.impl(f"{_ns}::{_name}", "CompositeExplicitAutograd")(getattr(reference, _name))


_HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One backend: its name (as its op namespace reads), namespace, the devices whose tensors it serves
    (``devices()``: Triton also serves CPU tensors under TRITON_INTERPRET=1), the devices where "auto" may pick
    it, whether its kernels are GPU kernels (those serve "auto" only once verified on a GPU, GPU_VERIFIED), the
    name ``python -m vqkernels.info`` prints, and the floating dtypes its kernels compute in. A call with a
    float64 tensor argument, routed to a backend without float64 kernels, is served by the reference instead (the
    router does this, csrc/dispatch.cpp; the backend's own ops refuse float64)."""
    name: str
    namespace: str
    serves: tuple
    auto: tuple
    gpu: bool
    title: str
    dtypes: tuple = _HALF_AND_SINGLE + (torch.float64,)

    def devices(self):
        return self.serves + (("cpu",) if self.name == "triton" and triton_interpreted() else ())

    def why_not(self, op, device):
        """Why this backend cannot serve ``op`` on ``device`` tensors in this process, or None when it can."""
        if self.name == "reference":
            return None
        if _C is None:
            return "the compiled extension is not loaded"
        if device not in self.devices():
            if self.name == "triton" and device == "cpu":
                return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
            return f"it serves {' and '.join(d.upper() for d in self.devices())} tensors only"
        if self.name == "cuda" and not cuda_compiled():
            return "the extension was built without its CUDA sources"
        if self.name == "triton":
            ops = _triton_ops()
            if op not in ops:
                return _triton_state.get("error") or f"vqkernels.triton has no kernel for {op}"
            return None
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{self.namespace}::{op}", device.upper()):
            return f"{self.namespace} has no {device.upper()} kernel for {op}"
        return None


# Every backend, in "auto"'s order of preference on each device. Everything else that lists backends (the
# router settings, info, bench.gpu, the build test, benchmarks/gpu.sh) reads this table.
REGISTRY = {b.name: b for b in (
    Backend("cpu", "vqkernels_cpu", ("cpu",), ("cpu",), False, "C++"),
    Backend("cuda", "vqkernels_cuda", ("cuda",), ("cuda",), True, "CUDA C++", _HALF_AND_SINGLE),
    Backend("triton", "vqkernels_triton", ("cuda",), ("cuda",), True, "Triton", _HALF_AND_SINGLE),
    Backend("reference", "vqkernels_ref", ("cpu", "cuda"), ("cpu", "cuda"), False, "reference (pure PyTorch)"),
)}
BACKENDS = ("auto", *REGISTRY)
ALIASES = {"cpp": "cpu"}  # earlier names of backends, still accepted
DEVICES = ("cpu", "cuda")
NAMESPACES = {name: b.namespace for name, b in REGISTRY.items()}
GPU_BACKENDS = tuple(name for name, b in REGISTRY.items() if b.gpu)
_AUTO_PREFERENCE = {dev: tuple(name for name, b in REGISTRY.items() if dev in b.auto) for dev in DEVICES}
# (backend, op) pairs whose GPU kernels have passed the GPU tests on real hardware
# (benchmarks/gpu.sh). Without a measured auto table, "auto" serves CUDA tensors only with
# these (else the reference): kernels never run on a GPU serve only when chosen explicitly.
# The CUDA and Triton kernels were written and checked without a GPU (compiled for sm_80 /
# sm_90; Triton run through its interpreter): none is listed yet.
GPU_VERIFIED = frozenset()
_DTYPE_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double"}
_ALL_ROWS = 2 ** 63 - 1


def canonical(backend):
    """A backend's name as it reads now ("cpp" -> "cpu"); ValueError for an unknown one."""
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"vqkernels: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


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


def triton_interpreted():
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_triton_state = {}


def _triton_ops():
    """The ops vqkernels.triton serves (imports it on first use); empty when Triton is unavailable."""
    if "ops" not in _triton_state:
        try:
            importlib.import_module("vqkernels.triton")
        except ImportError as exc:
            _triton_state["error"] = str(exc)
            _triton_state["ops"] = frozenset()
        else:
            _triton_state["ops"] = frozenset(op for op in SCHEMAS if hasattr(torch.ops.vqkernels_triton, op))
    return _triton_state["ops"]


def available(backend, op, device):
    """Whether ``backend`` can serve ``op`` on ``device`` ('cpu' or 'cuda') in this process."""
    if backend not in REGISTRY:
        raise ValueError(f"vqkernels: unknown backend {backend!r}; expected one of {BACKENDS}")
    return REGISTRY[backend].why_not(op, device) is None


# (device, op) -> the configured backend name; "auto" until set otherwise.
_settings = {(dev, op): "auto" for dev in DEVICES for op in SCHEMAS}
# (device, op) -> measured auto rules: [(max_rows, dtype or None, backend)], first match wins.
_auto_table = {}


def _auto_candidate(backend, op, device):
    if device == "cpu" or backend == "reference":
        return available(backend, op, device)
    # GPU kernels: only verified ones; Triton only where a GPU is present (no pointless import).
    if (backend, op) not in GPU_VERIFIED or (backend == "triton" and not torch.cuda.is_available()):
        return False
    return available(backend, op, device)


def _auto_rules(device, op):
    fallback = next(b for b in _AUTO_PREFERENCE[device] if _auto_candidate(b, op, device))
    measured = [(rows, dt, b) for rows, dt, b in _auto_table.get((device, op), ()) if available(b, op, device)]
    return measured + [(_ALL_ROWS, None, fallback)]


def routes(op, device):
    """The rules serving ``op`` on ``device`` now: [(max_rows, dtype or None, backend)], first match wins."""
    setting = _settings[(device, op)]
    return _auto_rules(device, op) if setting == "auto" else [(_ALL_ROWS, None, setting)]


def _push(keys):
    if _C is None:
        return
    for device, op in keys:
        rules = [(rows, _DTYPE_NAMES[dt] if dt is not None else "", NAMESPACES[b], torch.float64 in REGISTRY[b].dtypes)
                 for rows, dt, b in routes(op, device)]
        _C.set_route(device, op, rules)


def _check_ops(ops):
    if ops is None:
        return list(SCHEMAS)
    ops = [ops] if isinstance(ops, str) else list(ops)
    unknown = [op for op in ops if op not in SCHEMAS]
    if unknown:
        raise ValueError(f"vqkernels: unknown op(s) {unknown}; ops are {sorted(SCHEMAS)}")
    return ops


def _devices_for(backend, device):
    if device is not None:
        if device not in DEVICES:
            raise ValueError(f"vqkernels: device must be one of {DEVICES}, got {device!r}")
        if backend in REGISTRY and device not in REGISTRY[backend].devices() and backend != "triton":
            raise ValueError(f"vqkernels: backend {backend!r} serves "
                             f"{' and '.join(d.upper() for d in REGISTRY[backend].devices())} tensors only, not {device}")
        return [device]
    return list(REGISTRY[backend].devices()) if backend in REGISTRY else list(DEVICES)


def set_backend(backend, ops=None, device=None):
    """Choose the backend serving ``ops`` (default: every op it implements) on ``device``.

    ``backend``: "auto", "cuda", "cpu" ("cpp" too), "triton" or "reference" (see the module docstring).
    ``device``: "cpu" or "cuda"; default: the devices the backend serves ("triton": CUDA, and
    the CPU too under TRITON_INTERPRET=1; "reference" and "auto": both). With ``ops=None`` the
    ops the backend does not implement keep their setting; naming such an op raises ValueError.
    Process-wide; :func:`use_backend` restores the previous settings on exit.
    """
    backend = canonical(backend)
    explicit = ops is not None
    ops = _check_ops(ops)
    devices = _devices_for(backend, device)
    if backend not in ("auto", "reference") and _C is None:
        raise ValueError(f"vqkernels: backend {backend!r} needs the compiled extension, which is not loaded")
    chosen = []
    for dev in devices:
        for op in ops:
            if backend == "auto" or available(backend, op, dev):
                chosen.append((dev, op))
            elif explicit:
                raise ValueError(f"vqkernels: backend {backend!r} does not serve {op} on {dev} tensors here"
                                 + _why_unavailable(backend, op, dev))
    if not chosen:
        raise ValueError(f"vqkernels: backend {backend!r} serves no op on {devices} here"
                         + _why_unavailable(backend, ops[0], devices[0]))
    for key in chosen:
        _settings[key] = backend
    _push(chosen)


def _why_unavailable(backend, op, device):
    why = REGISTRY[backend].why_not(op, device)
    return f" ({why})" if why else ""


def get_backend(op, device):
    """The configured backend of ``op`` on ``device`` ("auto" unless set otherwise)."""
    _check_ops(op)
    return _settings[(device, op)]


@contextlib.contextmanager
def use_backend(backend, ops=None, device=None):
    """``with vqkernels.use_backend("triton"): ...``: :func:`set_backend` for the block, then restores."""
    saved = dict(_settings)
    try:
        set_backend(backend, ops, device)
        yield
    finally:
        changed = [key for key, value in saved.items() if _settings[key] != value]
        _settings.update(saved)
        _push(changed)


def set_auto_table(table):
    """Install measured auto rules: ``{(device, op): [(max_rows, dtype or None, backend), ...]}``
    or the path of a JSON file holding ``[{"device", "op", "max_rows", "dtype", "backend"}, ...]``
    (``python -m vqkernels.bench.gpu --save-auto FILE`` writes one). Replaces the previous table;
    ``None`` clears it. Rules naming a backend unavailable here are skipped."""
    if isinstance(table, (str, os.PathLike)):
        with open(table) as f:
            entries = json.load(f)
        parsed = {}
        for e in entries:
            dt = getattr(torch, e["dtype"]) if e.get("dtype") else None
            parsed.setdefault((e["device"], e["op"]), []).append((int(e["max_rows"]), dt, e["backend"]))
        table = parsed
    table = {key: [(rows, dt, ALIASES.get(b, b)) for rows, dt, b in rules] for key, rules in (table or {}).items()}
    for (device, op), rules in table.items():
        _check_ops(op)
        _devices_for("auto", device)
        for _, dt, b in rules:
            if b not in NAMESPACES or (dt is not None and dt not in _DTYPE_NAMES):
                raise ValueError(f"vqkernels: bad auto rule for {op} on {device}: backend {b!r}, dtype {dt}")
    _auto_table.clear()
    _auto_table.update({key: list(rules) for key, rules in table.items()})
    _push(list(_settings))




# The ops whose C++ CPU kernels pick SIMD code by the active ISA (vqkernels.set_cpu_isa) for float32: the searches
# (csrc/cpu/search.h), the FSQ kernels, the fixed-order products and softmax rows of lfq_entropy and
# gumbel_quantize, and the two backwards with per-ISA bodies. Every other CPU kernel is one body for any ISA, the
# portable path (vectorised as far as the compiler could for the build's baseline).
CPU_ISA_OPS = frozenset({
    "nearest_code", "nearest_code_topk", "vq_quantize", "residual_quantize", "multiscale_quantize_step",
    "fsq_quantize", "fsq_quantize_backward", "residual_fsq_quantize", "residual_fsq_quantize_backward",
    "lfq_entropy", "gumbel_quantize", "gumbel_quantize_backward", "rotation_trick_backward",
    "binary_one_hot_backward",
})


def backend(op, device_type):
    """Which implementation serves ``op`` for tensors on ``device_type`` ('cpu', 'cuda', ...) now:
    the rules in force, "[auto]" when chosen automatically (``python -m vqkernels.info``). The C++
    CPU kernels name their path: the active ISA for the ops in CPU_ISA_OPS, "portable" for the others."""
    if device_type not in DEVICES:
        return REGISTRY["reference"].title

    def name(b):
        if b != "cpu":
            return REGISTRY[b].title
        return f"{REGISTRY[b].title} ({cpu_isa() if op in CPU_ISA_OPS else 'portable'})"
    text = ", ".join(name(b) if rows == _ALL_ROWS and dt is None else
                     f"{name(b)} (rows <= {rows}{', ' + str(dt).replace('torch.', '') if dt else ''})"
                     for rows, dt, b in routes(op, device_type))
    return f"{text} [auto]" if _settings[(device_type, op)] == "auto" else text


def _apply_env(value):
    """VQK_BACKEND: a backend name, or comma-separated items ``backend``, ``op=backend``,
    ``device:backend`` or ``device:op=backend``, applied in order."""
    for item in filter(None, (part.strip() for part in value.split(","))):
        device, _, rest = item.rpartition(":")
        op, _, name = rest.rpartition("=")
        try:
            set_backend(name, ops=op or None, device=device or None)
        except ValueError as exc:
            raise ValueError(f"VQK_BACKEND={value!r}: {exc}") from None


if _C is not None:
    _C.install_routers(list(SCHEMAS))
    _push(list(_settings))
if os.environ.get("VQK_BACKEND"):
    _apply_env(os.environ["VQK_BACKEND"])
