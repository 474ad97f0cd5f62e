"""Input validation shared by the fake (meta) kernels and the reference kernels.

The C++ kernels check the same conditions with the same wording (csrc/checks.h), so
an error reads the same whichever backend serves the call.
"""

import torch

METRICS = ("l2", "cosine", "ip")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fail(op, msg):
    raise ValueError(f"vqkernels.{op}: {msg}")


def check_float(op, name, t):
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_metric(op, metric):
    if metric not in METRICS:
        _fail(op, f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def check_search(op, x, codebook, metric):
    """x [N, D] and codebook [K, D], floating, same device, K > 0, known metric."""
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if codebook.dim() != 2:
        _fail(op, f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    check_float(op, "x", x)
    check_float(op, "codebook", codebook)
    if x.device != codebook.device:
        _fail(op, f"x is on {x.device} but codebook is on {codebook.device}")
    if x.shape[1] != codebook.shape[1]:
        _fail(op, f"x has D={x.shape[1]} (shape {tuple(x.shape)}) but codebook has D={codebook.shape[1]} "
                  f"(shape {tuple(codebook.shape)})")
    if codebook.shape[0] == 0:
        _fail(op, f"codebook is empty (shape {tuple(codebook.shape)}); K must be at least 1")
    check_metric(op, metric)


def check_topk(op, x, codebook, k, metric):
    check_search(op, x, codebook, metric)
    if k < 1 or k > codebook.shape[0]:
        _fail(op, f"k must be in [1, K={codebook.shape[0]}], got k={k}")


def check_indices(op, indices, n, device):
    if indices.dtype != torch.int64:
        _fail(op, f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != n:
        _fail(op, f"indices must be 1-D of length N={n}, got shape {tuple(indices.shape)}")
    if indices.device != device:
        _fail(op, f"indices is on {indices.device} but x is on {device}")


def check_ema(op, codebook, cluster_size, embed_sum, x, indices, decay, eps):
    if codebook.dim() != 2:
        _fail(op, f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    k, d = codebook.shape
    check_float(op, "codebook", codebook)
    if x.dim() != 2 or x.shape[1] != d:
        _fail(op, f"x must be 2-D [N, D={d}], got shape {tuple(x.shape)}")
    check_float(op, "x", x)
    if cluster_size.dtype not in (torch.float32, torch.float64) or embed_sum.dtype != cluster_size.dtype:
        _fail(op, f"cluster_size and embed_sum must both be float32 or both float64, got "
                  f"{cluster_size.dtype} and {embed_sum.dtype}")
    if tuple(cluster_size.shape) != (k,):
        _fail(op, f"cluster_size must have shape [K={k}], got {tuple(cluster_size.shape)}")
    if tuple(embed_sum.shape) != (k, d):
        _fail(op, f"embed_sum must have shape [K={k}, D={d}], got {tuple(embed_sum.shape)}")
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum), ("x", x)):
        if t.device != codebook.device:
            _fail(op, f"{name} is on {t.device} but codebook is on {codebook.device}")
    check_indices(op, indices, x.shape[0], codebook.device)
    if not 0.0 <= decay <= 1.0:
        _fail(op, f"decay must be in [0, 1], got {decay}")
    if not eps >= 0.0:
        _fail(op, f"eps must be >= 0, got {eps}")


def compute_dtype(*tensors):
    """float64 if any input is float64, else float32 (half inputs accumulate in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# multiscale (VAR's multi-scale residual quantizer)

def check_multiscale(op, f_rest, codebook, pn, metric):
    """f_rest [B, C, H, W] with H, W >= 1, codebook [K, C], floating, same device, K > 0, pn two sizes >= 1."""
    if f_rest.dim() != 4:
        _fail(op, f"f_rest must be 4-D [B, C, H, W], got shape {tuple(f_rest.shape)}")
    if codebook.dim() != 2:
        _fail(op, f"codebook must be 2-D [K, C], got shape {tuple(codebook.shape)}")
    check_float(op, "f_rest", f_rest)
    check_float(op, "codebook", codebook)
    if f_rest.device != codebook.device:
        _fail(op, f"f_rest is on {f_rest.device} but codebook is on {codebook.device}")
    if f_rest.shape[1] != codebook.shape[1]:
        _fail(op, f"f_rest has C={f_rest.shape[1]} (shape {tuple(f_rest.shape)}) but codebook has "
                  f"C={codebook.shape[1]} (shape {tuple(codebook.shape)})")
    if codebook.shape[0] == 0:
        _fail(op, f"codebook is empty (shape {tuple(codebook.shape)}); K must be at least 1")
    if f_rest.shape[2] < 1 or f_rest.shape[3] < 1:
        _fail(op, f"f_rest must have H >= 1 and W >= 1, got shape {tuple(f_rest.shape)}")
    if len(pn) != 2 or pn[0] < 1 or pn[1] < 1:
        _fail(op, f"pn must be a size >= 1 or a pair of them, got {list(pn)}")
    check_metric(op, metric)


def check_multiscale_backward(op, grad_h, codebook, indices):
    if grad_h.dim() != 4:
        _fail(op, f"grad_h must be 4-D [B, C, ph, pw], got shape {tuple(grad_h.shape)}")
    if codebook.dim() != 2:
        _fail(op, f"codebook must be 2-D [K, C], got shape {tuple(codebook.shape)}")
    check_float(op, "grad_h", grad_h)
    check_float(op, "codebook", codebook)
    if grad_h.shape[1] != codebook.shape[1]:
        _fail(op, f"grad_h has C={grad_h.shape[1]} (shape {tuple(grad_h.shape)}) but codebook has "
                  f"C={codebook.shape[1]} (shape {tuple(codebook.shape)})")
    if indices.dtype != torch.int64:
        _fail(op, f"indices must be int64, got {indices.dtype}")
    want = (grad_h.shape[0], grad_h.shape[2], grad_h.shape[3])
    if tuple(indices.shape) != want:
        _fail(op, f"indices must have shape [B, ph, pw] = {want}, got {tuple(indices.shape)}")
    for name, t in (("grad_h", grad_h), ("indices", indices)):
        if t.device != codebook.device:
            _fail(op, f"{name} is on {t.device} but codebook is on {codebook.device}")
