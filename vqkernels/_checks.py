"""Input validation shared by the fake (meta) kernels and the reference kernels.

The C++ kernels check the same conditions with the same wording (csrc/checks.h), so
an error reads the same whichever backend serves the call.
"""

import math

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


def check_vq_quantize_backward(op, grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices):
    """The conditions and messages of csrc/checks.h's check_vq_quantize_backward."""
    check_search(op, x, codebook, "l2")
    check_indices(op, indices, x.shape[0], x.device)
    if grad_quantized.shape != x.shape:
        _fail(op, f"grad_quantized must have x's shape {tuple(x.shape)}, got {tuple(grad_quantized.shape)}")
    if grad_commit_loss.numel() != 1 or grad_codebook_loss.numel() != 1:
        _fail(op, "the loss gradients must be scalars")


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


# residual quantization (RQ-VAE)


def _check_codebooks(op, x, codebooks):
    """x [N, D] and codebooks [L, K, D] or [K, D] (shared), floating, same device, same D, K >= 1."""
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if codebooks.dim() not in (2, 3):
        _fail(op, f"codebooks must be [L, K, D] (one codebook per level) or [K, D] (shared by all levels), "
                  f"got shape {tuple(codebooks.shape)}")
    check_float(op, "x", x)
    check_float(op, "codebooks", codebooks)
    if x.device != codebooks.device:
        _fail(op, f"x is on {x.device} but codebooks is on {codebooks.device}")
    if x.shape[1] != codebooks.shape[-1]:
        _fail(op, f"x has D={x.shape[1]} (shape {tuple(x.shape)}) but codebooks has D={codebooks.shape[-1]} "
                  f"(shape {tuple(codebooks.shape)})")
    if codebooks.shape[-2] == 0:
        _fail(op, f"codebooks has no codes (shape {tuple(codebooks.shape)}); K must be at least 1")
    if codebooks.dim() == 3 and codebooks.shape[0] == 0:
        _fail(op, f"codebooks has no levels (shape {tuple(codebooks.shape)}); L must be at least 1")


def check_residual(op, x, codebooks, num_levels, beam_size):
    """The residual_quantize arguments; returns the number of levels L."""
    _check_codebooks(op, x, codebooks)
    if codebooks.dim() == 3:
        levels = codebooks.shape[0]
        if num_levels not in (-1, levels):
            _fail(op, f"num_levels={num_levels} does not match codebooks' L={levels} "
                      f"(shape {tuple(codebooks.shape)}); pass -1 or {levels}")
    else:
        if num_levels < 1:
            _fail(op, f"a shared codebook [K, D] needs num_levels >= 1, got num_levels={num_levels}")
        levels = num_levels
    k = codebooks.shape[-2]
    if beam_size < 1 or beam_size > k:
        _fail(op, f"beam_size must be in [1, K={k}], got beam_size={beam_size}")
    return levels


def check_residual_backward(op, grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices):
    """The residual_quantize_backward arguments; returns the number of levels L (indices' columns)."""
    _check_codebooks(op, x, codebooks)
    if indices.dtype != torch.int64:
        _fail(op, f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        _fail(op, f"indices must be 2-D [N={x.shape[0]}, L], got shape {tuple(indices.shape)}")
    levels = indices.shape[1]
    if codebooks.dim() == 3 and levels != codebooks.shape[0]:
        _fail(op, f"indices has L={levels} columns but codebooks has L={codebooks.shape[0]} "
                  f"(shape {tuple(codebooks.shape)})")
    if tuple(grad_quantized.shape) != tuple(x.shape):
        _fail(op, f"grad_quantized must have x's shape {tuple(x.shape)}, got {tuple(grad_quantized.shape)}")
    for name, g in (("grad_commit_losses", grad_commit_losses), ("grad_codebook_losses", grad_codebook_losses)):
        if tuple(g.shape) != (levels,):
            _fail(op, f"{name} must have shape [L={levels}], got {tuple(g.shape)}")
    for name, t in (("grad_quantized", grad_quantized), ("grad_commit_losses", grad_commit_losses),
                    ("grad_codebook_losses", grad_codebook_losses), ("indices", indices)):
        if t.device != x.device:
            _fail(op, f"{name} is on {t.device} but x is on {x.device}")
    return levels


# --- scalar quantizers: FSQ and LFQ ---
# FSQ levels: above 1000 the bound's eps = 1e-3 stretch reaches past the outermost level,
# so the rounding could produce L + 1 values.
FSQ_MAX_LEVEL = 1000
LFQ_MAX_BITS = 63  # lfq_quantize: indices are int64
LFQ_ENTROPY_MAX_BITS = 30  # lfq_entropy: avg_probs has 2**d entries


def check_levels(op, levels):
    """At least one level, every level in [2, FSQ_MAX_LEVEL], product below 2**63."""
    if len(levels) == 0:
        _fail(op, "levels must not be empty")
    if any(not 2 <= lv <= FSQ_MAX_LEVEL for lv in levels):
        _fail(op, f"every level must be in [2, {FSQ_MAX_LEVEL}], got levels={list(levels)}")
    size = 1
    for lv in levels:
        size *= lv
    if size >= 2 ** 63:
        _fail(op, f"the product of the levels must be below 2**63, got levels={list(levels)}")


def check_fsq(op, z, levels):
    """z [N, d] floating with d == len(levels), and valid levels."""
    check_levels(op, levels)
    if z.dim() != 2:
        _fail(op, f"z must be 2-D [N, d], got shape {tuple(z.shape)}")
    check_float(op, "z", z)
    if z.shape[1] != len(levels):
        _fail(op, f"z has d={z.shape[1]} (shape {tuple(z.shape)}) but there are {len(levels)} levels")


def check_residual_fsq(op, z, scales, levels):
    """check_fsq, and scales [num_levels, d] floating on z's device."""
    check_fsq(op, z, levels)
    if scales.dim() != 2 or scales.shape[1] != z.shape[1]:
        _fail(op, f"scales must be 2-D [num_levels, d={z.shape[1]}], got shape {tuple(scales.shape)}")
    check_float(op, "scales", scales)
    if scales.device != z.device:
        _fail(op, f"scales is on {scales.device} but z is on {z.device}")


def check_residual_fsq_backward(op, grad_quantized, z, scales, levels):
    check_residual_fsq(op, z, scales, levels)
    check_float(op, "grad_quantized", grad_quantized)
    if grad_quantized.shape != z.shape:
        _fail(op, f"grad_quantized must have z's shape {tuple(z.shape)}, got {tuple(grad_quantized.shape)}")
    if grad_quantized.device != z.device:
        _fail(op, f"grad_quantized is on {grad_quantized.device} but z is on {z.device}")


def check_latent_quantize(op, z, values, levels):
    """z [N, d] floating with d == len(levels) >= 1, every level >= 1 (product below 2**63, sum below 2**31), values
    1-D floating holding sum(levels) values on z's device."""
    if len(levels) == 0:
        _fail(op, "levels must not be empty")
    if any(lv < 1 for lv in levels):
        _fail(op, f"every level must be at least 1, got levels={list(levels)}")
    if math.prod(levels) >= 2 ** 63:
        _fail(op, f"the product of the levels must be below 2**63, got levels={list(levels)}")
    if z.dim() != 2:
        _fail(op, f"z must be 2-D [N, d], got shape {tuple(z.shape)}")
    check_float(op, "z", z)
    if z.shape[1] != len(levels):
        _fail(op, f"z has d={z.shape[1]} (shape {tuple(z.shape)}) but there are {len(levels)} levels")
    if sum(levels) >= 2 ** 31:
        _fail(op, f"the levels must sum to fewer than 2**31 values, got {sum(levels)}")
    if values.dim() != 1 or values.shape[0] != sum(levels):
        _fail(op, f"values must be 1-D holding sum(levels)={sum(levels)} values, got shape {tuple(values.shape)}")
    check_float(op, "values", values)
    if values.device != z.device:
        _fail(op, f"values is on {values.device} but z is on {z.device}")


def check_fsq_backward(op, grad_codes, z, levels):
    check_fsq(op, z, levels)
    check_float(op, "grad_codes", grad_codes)
    if grad_codes.shape != z.shape:
        _fail(op, f"grad_codes must have z's shape {tuple(z.shape)}, got {tuple(grad_codes.shape)}")
    if grad_codes.device != z.device:
        _fail(op, f"grad_codes is on {grad_codes.device} but z is on {z.device}")


def check_finite(op, name, value):
    if not math.isfinite(value):
        _fail(op, f"{name} must be finite, got {value}")


def check_lfq(op, x, max_bits):
    """x [N, d] floating with 1 <= d <= max_bits."""
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [N, d], got shape {tuple(x.shape)}")
    check_float(op, "x", x)
    if not 1 <= x.shape[1] <= max_bits:
        _fail(op, f"x must have d in [1, {max_bits}] columns (bits), got shape {tuple(x.shape)}")


def check_lfq_weights(op, x, weights):
    """lfq_entropy's optional row weights: [N] floating on x's device (their values are not read)."""
    if weights is None:
        return
    if weights.dim() != 1 or weights.shape[0] != x.shape[0]:
        _fail(op, f"weights must have shape [N={x.shape[0]}], got {tuple(weights.shape)}")
    check_float(op, "weights", weights)
    if weights.device != x.device:
        _fail(op, f"weights is on {weights.device} but x is on {x.device}")


def check_lfq_entropy(op, x, inv_temperature, weights):
    check_lfq(op, x, LFQ_ENTROPY_MAX_BITS)
    check_finite(op, "inv_temperature", inv_temperature)
    check_lfq_weights(op, x, weights)


def check_lfq_entropy_backward(op, grad_per_sample, grad_codebook, grad_avg_probs, x, avg_probs, inv_temperature,
                               weights):
    check_lfq_entropy(op, x, inv_temperature, weights)
    k = 2 ** x.shape[1]
    for name, t, shape in (("grad_per_sample_entropy", grad_per_sample, None),
                           ("grad_codebook_entropy", grad_codebook, None),
                           ("grad_avg_probs", grad_avg_probs, (k,)), ("avg_probs", avg_probs, (k,))):
        check_float(op, name, t)
        if shape is None and t.numel() != 1:
            _fail(op, f"{name} must be a scalar, got shape {tuple(t.shape)}")
        if shape is not None and tuple(t.shape) != shape:
            _fail(op, f"{name} must have shape [2**d={k}], got {tuple(t.shape)}")
        if t.device != x.device:
            _fail(op, f"{name} is on {t.device} but x is on {x.device}")


# Gumbel-softmax quantization and the rotation trick


def check_gumbel(op, logits, codebook, gumbels, tau):
    """logits and gumbels [N, K], codebook [K, D], floating, one device, K >= 1, 0 < tau < inf."""
    if logits.dim() != 2:
        _fail(op, f"logits must be 2-D [N, K], got shape {tuple(logits.shape)}")
    if codebook.dim() != 2:
        _fail(op, f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    if gumbels.shape != logits.shape:
        _fail(op, f"gumbels must have logits' shape {tuple(logits.shape)}, got {tuple(gumbels.shape)}")
    check_float(op, "logits", logits)
    check_float(op, "codebook", codebook)
    check_float(op, "gumbels", gumbels)
    for name, t in (("codebook", codebook), ("gumbels", gumbels)):
        if t.device != logits.device:
            _fail(op, f"logits is on {logits.device} but {name} is on {t.device}")
    if logits.shape[1] != codebook.shape[0]:
        _fail(op, f"logits has K={logits.shape[1]} (shape {tuple(logits.shape)}) but codebook has "
                  f"K={codebook.shape[0]} (shape {tuple(codebook.shape)})")
    if codebook.shape[0] == 0:
        _fail(op, f"codebook is empty (shape {tuple(codebook.shape)}); K must be at least 1")
    if not 0.0 < tau < float("inf"):
        _fail(op, f"tau must be positive and finite, got {tau}")


def check_gumbel_backward(op, grad_quantized, grad_kl, logits, codebook, gumbels, indices, tau):
    check_gumbel(op, logits, codebook, gumbels, tau)
    n, d = logits.shape[0], codebook.shape[1]
    if tuple(grad_quantized.shape) != (n, d):
        _fail(op, f"grad_quantized must have shape [N={n}, D={d}], got {tuple(grad_quantized.shape)}")
    check_float(op, "grad_quantized", grad_quantized)
    if grad_kl.numel() != 1:
        _fail(op, f"grad_kl must hold one value, got shape {tuple(grad_kl.shape)}")
    check_indices(op, indices, n, logits.device)


def check_rotation(op, src, tgt):
    """src and tgt [N, D] of one shape, floating, on one device."""
    if src.dim() != 2:
        _fail(op, f"src must be 2-D [N, D], got shape {tuple(src.shape)}")
    if tgt.shape != src.shape:
        _fail(op, f"tgt must have src's shape {tuple(src.shape)}, got {tuple(tgt.shape)}")
    check_float(op, "src", src)
    check_float(op, "tgt", tgt)
    if tgt.device != src.device:
        _fail(op, f"src is on {src.device} but tgt is on {tgt.device}")


def check_rotation_backward(op, grad, src, tgt):
    check_rotation(op, src, tgt)
    if grad.shape != src.shape:
        _fail(op, f"grad must have src's shape {tuple(src.shape)}, got {tuple(grad.shape)}")
    check_float(op, "grad", grad)


# BinaryMapper's one-hot
MAX_ONE_HOT_BITS = 30  # 2**bits columns a row


def _check_bit_logits(op, logits):
    if logits.dim() != 2:
        _fail(op, f"logits must be 2-D [N, bits], got shape {tuple(logits.shape)}")
    check_float(op, "logits", logits)
    if not 1 <= logits.shape[1] <= MAX_ONE_HOT_BITS:
        _fail(op, f"bits (logits' last dimension) must be in [1, {MAX_ONE_HOT_BITS}], got {logits.shape[1]}")


def check_binary_one_hot(op, logits, indices):
    """logits [N, bits] floating, 1 <= bits <= 30; indices int64 [N] on logits' device (their range is the kernels'
    check: it reads values)."""
    _check_bit_logits(op, logits)
    if indices.dtype != torch.int64:
        _fail(op, f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != logits.shape[0]:
        _fail(op, f"indices must be 1-D of length N={logits.shape[0]}, got shape {tuple(indices.shape)}")
    if indices.device != logits.device:
        _fail(op, f"indices is on {indices.device} but logits is on {logits.device}")


def check_binary_one_hot_backward(op, grad_one_hot, logits):
    _check_bit_logits(op, logits)
    n, codes = logits.shape[0], 1 << logits.shape[1]
    if grad_one_hot.dim() != 2 or tuple(grad_one_hot.shape) != (n, codes):
        _fail(op, f"grad_one_hot must have shape [N={n}, 2**bits={codes}], got {tuple(grad_one_hot.shape)}")
    check_float(op, "grad_one_hot", grad_one_hot)
    if grad_one_hot.device != logits.device:
        _fail(op, f"grad_one_hot is on {grad_one_hot.device} but logits is on {logits.device}")


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
