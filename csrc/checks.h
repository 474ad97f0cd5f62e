// Input checks shared by every backend's kernels. The wording matches vqkernels/_checks.py,
// so an error reads the same whichever backend serves the call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>

namespace vqk {

// Kernels that call ATen ops (at::mm) hold this: under torch.autocast those inner calls would
// otherwise be autocast too (to bfloat16 / float16) and no longer match the kernel's buffers.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

enum class Metric { L2, Cosine, IP };

#define VQK_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "vqkernels.", op, ": ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {  // as Python prints tuple(t.shape)
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  auto dt = t.scalar_type();
  VQK_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, name,
            " must be float32, float16, bfloat16 or float64, got ", dt);
}

inline Metric parse_metric(const char* op, c10::string_view metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  if (metric == "ip") return Metric::IP;
  VQK_CHECK(false, op, "unknown metric '", std::string(metric), "'; expected one of l2, cosine, ip");
  return Metric::L2;
}

inline Metric check_search(const char* op, const at::Tensor& x, const at::Tensor& codebook, c10::string_view metric) {
  VQK_CHECK(x.dim() == 2, op, "x must be 2-D [N, D], got shape ", shape_str(x));
  VQK_CHECK(codebook.dim() == 2, op, "codebook must be 2-D [K, D], got shape ", shape_str(codebook));
  check_float(op, "x", x);
  check_float(op, "codebook", codebook);
  VQK_CHECK(x.device() == codebook.device(), op, "x is on ", x.device(), " but codebook is on ", codebook.device());
  VQK_CHECK(x.size(1) == codebook.size(1), op, "x has D=", x.size(1), " (shape ", shape_str(x),
            ") but codebook has D=", codebook.size(1), " (shape ", shape_str(codebook), ")");
  VQK_CHECK(codebook.size(0) > 0, op, "codebook is empty (shape ", shape_str(codebook), "); K must be at least 1");
  VQK_CHECK(codebook.size(0) < (int64_t(1) << 31), op, "codebook has K=", codebook.size(0),
            " rows; at most 2**31 - 1 are supported");
  return parse_metric(op, metric);
}

inline void check_indices(const char* op, const at::Tensor& indices, int64_t n, const at::Device& device) {
  VQK_CHECK(indices.scalar_type() == at::kLong, op, "indices must be int64, got ", indices.scalar_type());
  VQK_CHECK(indices.dim() == 1 && indices.size(0) == n, op, "indices must be 1-D of length N=", n, ", got shape ",
            shape_str(indices));
  VQK_CHECK(indices.device() == device, op, "indices is on ", indices.device(), " but x is on ", device);
}

// float64 if any input is float64, else float32 (half inputs accumulate in float32).
inline at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// residual quantization (RQ-VAE)

// x [N, D] and codebooks [L, K, D] or [K, D] (shared), floating, same device, same D, K >= 1, L >= 1.
inline void check_codebooks(const char* op, const at::Tensor& x, const at::Tensor& codebooks) {
  VQK_CHECK(x.dim() == 2, op, "x must be 2-D [N, D], got shape ", shape_str(x));
  VQK_CHECK(codebooks.dim() == 2 || codebooks.dim() == 3, op,
            "codebooks must be [L, K, D] (one codebook per level) or [K, D] (shared by all levels), got shape ",
            shape_str(codebooks));
  check_float(op, "x", x);
  check_float(op, "codebooks", codebooks);
  VQK_CHECK(x.device() == codebooks.device(), op, "x is on ", x.device(), " but codebooks is on ", codebooks.device());
  VQK_CHECK(x.size(1) == codebooks.size(-1), op, "x has D=", x.size(1), " (shape ", shape_str(x),
            ") but codebooks has D=", codebooks.size(-1), " (shape ", shape_str(codebooks), ")");
  VQK_CHECK(codebooks.size(-2) > 0, op, "codebooks has no codes (shape ", shape_str(codebooks),
            "); K must be at least 1");
  VQK_CHECK(codebooks.dim() == 2 || codebooks.size(0) > 0, op, "codebooks has no levels (shape ", shape_str(codebooks),
            "); L must be at least 1");
  VQK_CHECK(codebooks.size(-2) < (int64_t(1) << 31), op, "codebooks has K=", codebooks.size(-2),
            " rows; at most 2**31 - 1 are supported");
}

// The residual_quantize arguments; returns the number of levels L.
inline int64_t check_residual(const char* op, const at::Tensor& x, const at::Tensor& codebooks, int64_t num_levels,
                              int64_t beam_size) {
  check_codebooks(op, x, codebooks);
  int64_t levels = num_levels;
  if (codebooks.dim() == 3) {
    levels = codebooks.size(0);
    VQK_CHECK(num_levels == -1 || num_levels == levels, op, "num_levels=", num_levels,
              " does not match codebooks' L=", levels, " (shape ", shape_str(codebooks), "); pass -1 or ", levels);
  } else {
    VQK_CHECK(num_levels >= 1, op, "a shared codebook [K, D] needs num_levels >= 1, got num_levels=", num_levels);
  }
  const int64_t k = codebooks.size(-2);
  VQK_CHECK(beam_size >= 1 && beam_size <= k, op, "beam_size must be in [1, K=", k, "], got beam_size=", beam_size);
  return levels;
}

// The residual_quantize_backward arguments; returns the number of levels L (indices' columns).
inline int64_t check_residual_backward(const char* op, const at::Tensor& grad_quantized,
                                       const at::Tensor& grad_commit_losses, const at::Tensor& grad_codebook_losses,
                                       const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& indices) {
  check_codebooks(op, x, codebooks);
  VQK_CHECK(indices.scalar_type() == at::kLong, op, "indices must be int64, got ", indices.scalar_type());
  VQK_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0), op, "indices must be 2-D [N=", x.size(0),
            ", L], got shape ", shape_str(indices));
  const int64_t levels = indices.size(1);
  VQK_CHECK(codebooks.dim() == 2 || levels == codebooks.size(0), op, "indices has L=", levels,
            " columns but codebooks has L=", codebooks.size(0), " (shape ", shape_str(codebooks), ")");
  VQK_CHECK(grad_quantized.sizes() == x.sizes(), op, "grad_quantized must have x's shape ", shape_str(x), ", got ",
            shape_str(grad_quantized));
  VQK_CHECK(grad_commit_losses.dim() == 1 && grad_commit_losses.size(0) == levels, op,
            "grad_commit_losses must have shape [L=", levels, "], got ", shape_str(grad_commit_losses));
  VQK_CHECK(grad_codebook_losses.dim() == 1 && grad_codebook_losses.size(0) == levels, op,
            "grad_codebook_losses must have shape [L=", levels, "], got ", shape_str(grad_codebook_losses));
  const std::pair<const char*, const at::Tensor*> others[] = {{"grad_quantized", &grad_quantized},
                                                              {"grad_commit_losses", &grad_commit_losses},
                                                              {"grad_codebook_losses", &grad_codebook_losses},
                                                              {"indices", &indices}};
  for (const auto& [name, t] : others)
    VQK_CHECK(t->device() == x.device(), op, name, " is on ", t->device(), " but x is on ", x.device());
  return levels;
}

// --- scalar quantizers: FSQ and LFQ (as vqkernels/_checks.py) ---
constexpr int64_t kFsqMaxLevel = 1000;      // beyond, the bound's 1 + 1e-3 stretch reaches past the outer level
constexpr int64_t kLfqMaxBits = 63;         // lfq_quantize: int64 indices
constexpr int64_t kLfqEntropyMaxBits = 30;  // lfq_entropy: 2**d probabilities

inline std::string list_str(at::IntArrayRef v) {  // as Python prints a list
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

inline void check_levels(const char* op, at::IntArrayRef levels) {
  VQK_CHECK(!levels.empty(), op, "levels must not be empty");
  for (int64_t lv : levels)
    VQK_CHECK(lv >= 2 && lv <= kFsqMaxLevel, op, "every level must be in [2, ", kFsqMaxLevel,
              "], got levels=", list_str(levels));
  int64_t size = 1;
  for (int64_t lv : levels) {
    VQK_CHECK(size <= std::numeric_limits<int64_t>::max() / lv, op,
              "the product of the levels must be below 2**63, got levels=", list_str(levels));
    size *= lv;
  }
}

inline void check_fsq(const char* op, const at::Tensor& z, at::IntArrayRef levels) {
  check_levels(op, levels);
  VQK_CHECK(z.dim() == 2, op, "z must be 2-D [N, d], got shape ", shape_str(z));
  check_float(op, "z", z);
  VQK_CHECK(z.size(1) == static_cast<int64_t>(levels.size()), op, "z has d=", z.size(1), " (shape ", shape_str(z),
            ") but there are ", levels.size(), " levels");
}

// latent_quantize: z [N, d] floating, d = len(levels) >= 1 counts of at least 1 value each (product below 2**63, sum
// below 2**31), values 1-D floating holding sum(levels) values, on z's device.
inline void check_latent_quantize(const char* op, const at::Tensor& z, const at::Tensor& values,
                                  at::IntArrayRef levels) {
  VQK_CHECK(!levels.empty(), op, "levels must not be empty");
  int64_t size = 1, total = 0;
  for (int64_t lv : levels) {
    VQK_CHECK(lv >= 1, op, "every level must be at least 1, got levels=", list_str(levels));
    VQK_CHECK(size <= std::numeric_limits<int64_t>::max() / lv, op,
              "the product of the levels must be below 2**63, got levels=", list_str(levels));
    size *= lv;
    total += lv;
  }
  VQK_CHECK(z.dim() == 2, op, "z must be 2-D [N, d], got shape ", shape_str(z));
  check_float(op, "z", z);
  VQK_CHECK(z.size(1) == static_cast<int64_t>(levels.size()), op, "z has d=", z.size(1), " (shape ", shape_str(z),
            ") but there are ", levels.size(), " levels");
  VQK_CHECK(total < (int64_t{1} << 31), op, "the levels must sum to fewer than 2**31 values, got ", total);
  VQK_CHECK(values.dim() == 1 && values.size(0) == total, op, "values must be 1-D holding sum(levels)=", total,
            " values, got shape ", shape_str(values));
  check_float(op, "values", values);
  VQK_CHECK(values.device() == z.device(), op, "values is on ", values.device(), " but z is on ", z.device());
}

// residual_fsq_quantize: check_fsq, and scales [num_levels, d] floating on z's device.
inline void check_residual_fsq(const char* op, const at::Tensor& z, const at::Tensor& scales, at::IntArrayRef levels) {
  check_fsq(op, z, levels);
  VQK_CHECK(scales.dim() == 2 && scales.size(1) == z.size(1), op, "scales must be 2-D [num_levels, d=", z.size(1),
            "], got shape ", shape_str(scales));
  check_float(op, "scales", scales);
  VQK_CHECK(scales.device() == z.device(), op, "scales is on ", scales.device(), " but z is on ", z.device());
}

inline void check_residual_fsq_backward(const char* op, const at::Tensor& grad_quantized, const at::Tensor& z,
                                        const at::Tensor& scales, at::IntArrayRef levels) {
  check_residual_fsq(op, z, scales, levels);
  check_float(op, "grad_quantized", grad_quantized);
  VQK_CHECK(grad_quantized.sizes() == z.sizes(), op, "grad_quantized must have z's shape ", shape_str(z), ", got ",
            shape_str(grad_quantized));
  VQK_CHECK(grad_quantized.device() == z.device(), op, "grad_quantized is on ", grad_quantized.device(),
            " but z is on ", z.device());
}

inline void check_finite(const char* op, const char* name, double value) {
  VQK_CHECK(std::isfinite(value), op, name, " must be finite, got ", value);
}

inline void check_lfq(const char* op, const at::Tensor& x, int64_t max_bits) {
  VQK_CHECK(x.dim() == 2, op, "x must be 2-D [N, d], got shape ", shape_str(x));
  check_float(op, "x", x);
  VQK_CHECK(x.size(1) >= 1 && x.size(1) <= max_bits, op, "x must have d in [1, ", max_bits,
            "] columns (bits), got shape ", shape_str(x));
}

// lfq_entropy's optional row weights: [N] floating on x's device (their values are not read).
inline void check_lfq_weights(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weights) {
  if (!weights) return;
  VQK_CHECK(weights->dim() == 1 && weights->size(0) == x.size(0), op, "weights must have shape [N=", x.size(0),
            "], got ", shape_str(*weights));
  check_float(op, "weights", *weights);
  VQK_CHECK(weights->device() == x.device(), op, "weights is on ", weights->device(), " but x is on ", x.device());
}

inline void check_lfq_entropy(const char* op, const at::Tensor& x, double inv_temperature,
                              const std::optional<at::Tensor>& weights) {
  check_lfq(op, x, kLfqEntropyMaxBits);
  check_finite(op, "inv_temperature", inv_temperature);
  check_lfq_weights(op, x, weights);
}

// Gumbel-softmax quantization and the rotation trick

inline at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  return c.scalar_type() == at::kDouble ? at::kDouble : compute_dtype(a, b);
}

// logits and gumbels [N, K], codebook [K, D], floating, one device, K >= 1, 0 < tau < inf.
inline void check_gumbel(const char* op, const at::Tensor& logits, const at::Tensor& codebook,
                         const at::Tensor& gumbels, double tau) {
  VQK_CHECK(logits.dim() == 2, op, "logits must be 2-D [N, K], got shape ", shape_str(logits));
  VQK_CHECK(codebook.dim() == 2, op, "codebook must be 2-D [K, D], got shape ", shape_str(codebook));
  VQK_CHECK(gumbels.sizes() == logits.sizes(), op, "gumbels must have logits' shape ", shape_str(logits), ", got ",
            shape_str(gumbels));
  check_float(op, "logits", logits);
  check_float(op, "codebook", codebook);
  check_float(op, "gumbels", gumbels);
  VQK_CHECK(codebook.device() == logits.device(), op, "logits is on ", logits.device(), " but codebook is on ",
            codebook.device());
  VQK_CHECK(gumbels.device() == logits.device(), op, "logits is on ", logits.device(), " but gumbels is on ",
            gumbels.device());
  VQK_CHECK(logits.size(1) == codebook.size(0), op, "logits has K=", logits.size(1), " (shape ", shape_str(logits),
            ") but codebook has K=", codebook.size(0), " (shape ", shape_str(codebook), ")");
  VQK_CHECK(codebook.size(0) > 0, op, "codebook is empty (shape ", shape_str(codebook), "); K must be at least 1");
  VQK_CHECK(tau > 0.0 && tau < std::numeric_limits<double>::infinity(), op, "tau must be positive and finite, got ",
            tau);
}

inline void check_gumbel_backward(const char* op, const at::Tensor& grad_quantized, const at::Tensor& grad_kl,
                                  const at::Tensor& logits, const at::Tensor& codebook, const at::Tensor& gumbels,
                                  const at::Tensor& indices, double tau) {
  check_gumbel(op, logits, codebook, gumbels, tau);
  const int64_t n = logits.size(0), d = codebook.size(1);
  VQK_CHECK(grad_quantized.dim() == 2 && grad_quantized.size(0) == n && grad_quantized.size(1) == d, op,
            "grad_quantized must have shape [N=", n, ", D=", d, "], got ", shape_str(grad_quantized));
  check_float(op, "grad_quantized", grad_quantized);
  VQK_CHECK(grad_kl.numel() == 1, op, "grad_kl must hold one value, got shape ", shape_str(grad_kl));
  check_indices(op, indices, n, logits.device());
}

// src and tgt [N, D] of one shape, floating, on one device.
inline void check_rotation(const char* op, const at::Tensor& src, const at::Tensor& tgt) {
  VQK_CHECK(src.dim() == 2, op, "src must be 2-D [N, D], got shape ", shape_str(src));
  VQK_CHECK(tgt.sizes() == src.sizes(), op, "tgt must have src's shape ", shape_str(src), ", got ", shape_str(tgt));
  check_float(op, "src", src);
  check_float(op, "tgt", tgt);
  VQK_CHECK(tgt.device() == src.device(), op, "src is on ", src.device(), " but tgt is on ", tgt.device());
}

inline void check_rotation_backward(const char* op, const at::Tensor& grad, const at::Tensor& src,
                                    const at::Tensor& tgt) {
  check_rotation(op, src, tgt);
  VQK_CHECK(grad.sizes() == src.sizes(), op, "grad must have src's shape ", shape_str(src), ", got ", shape_str(grad));
  check_float(op, "grad", grad);
}

// BinaryMapper's one-hot: logits [N, bits] floating with 1 <= bits <= 30, indices int64 [N] on logits' device.
constexpr int64_t kMaxOneHotBits = 30;  // 2**bits columns a row

inline void check_bit_logits(const char* op, const at::Tensor& logits) {
  VQK_CHECK(logits.dim() == 2, op, "logits must be 2-D [N, bits], got shape ", shape_str(logits));
  check_float(op, "logits", logits);
  const int64_t bits = logits.size(1);
  VQK_CHECK(bits >= 1 && bits <= kMaxOneHotBits, op, "bits (logits' last dimension) must be in [1, ", kMaxOneHotBits,
            "], got ", bits);
}

inline void check_binary_one_hot(const char* op, const at::Tensor& logits, const at::Tensor& indices) {
  check_bit_logits(op, logits);
  const int64_t n = logits.size(0);
  VQK_CHECK(indices.scalar_type() == at::kLong, op, "indices must be int64, got ", indices.scalar_type());
  VQK_CHECK(indices.dim() == 1 && indices.size(0) == n, op, "indices must be 1-D of length N=", n, ", got shape ",
            shape_str(indices));
  VQK_CHECK(indices.device() == logits.device(), op, "indices is on ", indices.device(), " but logits is on ",
            logits.device());
}

inline void check_binary_one_hot_backward(const char* op, const at::Tensor& grad_one_hot, const at::Tensor& logits) {
  check_bit_logits(op, logits);
  const int64_t n = logits.size(0), codes = int64_t(1) << logits.size(1);
  VQK_CHECK(grad_one_hot.dim() == 2 && grad_one_hot.size(0) == n && grad_one_hot.size(1) == codes, op,
            "grad_one_hot must have shape [N=", n, ", 2**bits=", codes, "], got ", shape_str(grad_one_hot));
  check_float(op, "grad_one_hot", grad_one_hot);
  VQK_CHECK(grad_one_hot.device() == logits.device(), op, "grad_one_hot is on ", grad_one_hot.device(),
            " but logits is on ", logits.device());
}

// multiscale_quantize_step (VAR's multi-scale residual quantizer): one scale's input checks.

inline Metric check_multiscale(const char* op, const at::Tensor& f_rest, const at::Tensor& codebook, at::IntArrayRef pn,
                               c10::string_view metric) {
  VQK_CHECK(f_rest.dim() == 4, op, "f_rest must be 4-D [B, C, H, W], got shape ", shape_str(f_rest));
  VQK_CHECK(codebook.dim() == 2, op, "codebook must be 2-D [K, C], got shape ", shape_str(codebook));
  check_float(op, "f_rest", f_rest);
  check_float(op, "codebook", codebook);
  VQK_CHECK(f_rest.device() == codebook.device(), op, "f_rest is on ", f_rest.device(), " but codebook is on ",
            codebook.device());
  VQK_CHECK(f_rest.size(1) == codebook.size(1), op, "f_rest has C=", f_rest.size(1), " (shape ", shape_str(f_rest),
            ") but codebook has C=", codebook.size(1), " (shape ", shape_str(codebook), ")");
  VQK_CHECK(codebook.size(0) > 0, op, "codebook is empty (shape ", shape_str(codebook), "); K must be at least 1");
  VQK_CHECK(codebook.size(0) < (int64_t(1) << 31), op, "codebook has K=", codebook.size(0),
            " rows; at most 2**31 - 1 are supported");
  VQK_CHECK(f_rest.size(2) >= 1 && f_rest.size(3) >= 1, op, "f_rest must have H >= 1 and W >= 1, got shape ",
            shape_str(f_rest));
  VQK_CHECK(pn.size() == 2 && pn[0] >= 1 && pn[1] >= 1, op, "pn must be a size >= 1 or a pair of them, got ", pn);
  return parse_metric(op, metric);
}

inline void check_multiscale_backward(const char* op, const at::Tensor& grad_h, const at::Tensor& codebook,
                                      const at::Tensor& indices) {
  VQK_CHECK(grad_h.dim() == 4, op, "grad_h must be 4-D [B, C, ph, pw], got shape ", shape_str(grad_h));
  VQK_CHECK(codebook.dim() == 2, op, "codebook must be 2-D [K, C], got shape ", shape_str(codebook));
  check_float(op, "grad_h", grad_h);
  check_float(op, "codebook", codebook);
  VQK_CHECK(grad_h.size(1) == codebook.size(1), op, "grad_h has C=", grad_h.size(1), " (shape ", shape_str(grad_h),
            ") but codebook has C=", codebook.size(1), " (shape ", shape_str(codebook), ")");
  VQK_CHECK(indices.scalar_type() == at::kLong, op, "indices must be int64, got ", indices.scalar_type());
  VQK_CHECK(indices.dim() == 3 && indices.size(0) == grad_h.size(0) && indices.size(1) == grad_h.size(2) &&
                indices.size(2) == grad_h.size(3),
            op, "indices must have shape [B, ph, pw] = (", grad_h.size(0), ", ", grad_h.size(2), ", ", grad_h.size(3),
            "), got ", shape_str(indices));
  for (const at::Tensor* t : {&grad_h, &indices})
    VQK_CHECK(t->device() == codebook.device(), op, t == &grad_h ? "grad_h" : "indices", " is on ", t->device(),
              " but codebook is on ", codebook.device());
}

}  // namespace vqk

// --- vq_quantize_backward, ema_update_ and lfq_entropy_backward: the arguments' checks of the
// CPU and CUDA kernels.
namespace vqk {

inline void check_vq_quantize_backward(const char* op, const at::Tensor& grad_quantized,
                                       const at::Tensor& grad_commit_loss, const at::Tensor& grad_codebook_loss,
                                       const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& indices) {
  check_search(op, x, codebook, "l2");
  check_indices(op, indices, x.size(0), x.device());
  VQK_CHECK(grad_quantized.sizes() == x.sizes(), op, "grad_quantized must have x's shape ", shape_str(x), ", got ",
            shape_str(grad_quantized));
  VQK_CHECK(grad_commit_loss.numel() == 1 && grad_codebook_loss.numel() == 1, op, "the loss gradients must be scalars");
}

inline void check_ema(const char* op, const at::Tensor& codebook, const at::Tensor& cluster_size,
                      const at::Tensor& embed_sum, const at::Tensor& x, const at::Tensor& indices, double decay,
                      double eps) {
  VQK_CHECK(codebook.dim() == 2, op, "codebook must be 2-D [K, D], got shape ", shape_str(codebook));
  const int64_t K = codebook.size(0), D = codebook.size(1);
  check_float(op, "codebook", codebook);
  VQK_CHECK(x.dim() == 2 && x.size(1) == D, op, "x must be 2-D [N, D=", D, "], got shape ", shape_str(x));
  check_float(op, "x", x);
  const auto st = cluster_size.scalar_type();
  VQK_CHECK((st == at::kFloat || st == at::kDouble) && embed_sum.scalar_type() == st, op,
            "cluster_size and embed_sum must both be float32 or both float64, got ", st, " and ",
            embed_sum.scalar_type());
  VQK_CHECK(cluster_size.dim() == 1 && cluster_size.size(0) == K, op, "cluster_size must have shape [K=", K, "], got ",
            shape_str(cluster_size));
  VQK_CHECK(embed_sum.dim() == 2 && embed_sum.size(0) == K && embed_sum.size(1) == D, op,
            "embed_sum must have shape [K=", K, ", D=", D, "], got ", shape_str(embed_sum));
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"cluster_size", &cluster_size}, {"embed_sum", &embed_sum}, {"x", &x}};
  for (const auto& [name, t] : others)
    VQK_CHECK(t->device() == codebook.device(), op, name, " is on ", t->device(), " but codebook is on ",
              codebook.device());
  check_indices(op, indices, x.size(0), codebook.device());
  VQK_CHECK(decay >= 0.0 && decay <= 1.0, op, "decay must be in [0, 1], got ", decay);
  VQK_CHECK(eps >= 0.0, op, "eps must be >= 0, got ", eps);
}

inline void check_lfq_entropy_backward(const char* op, const at::Tensor& grad_per_sample,
                                       const at::Tensor& grad_codebook, const at::Tensor& grad_avg_probs,
                                       const at::Tensor& x, const at::Tensor& avg_probs, double inv_temperature,
                                       const std::optional<at::Tensor>& weights) {
  check_lfq_entropy(op, x, inv_temperature, weights);
  const int64_t k = int64_t(1) << x.size(1);
  const std::pair<const char*, const at::Tensor*> args[] = {{"grad_per_sample_entropy", &grad_per_sample},
                                                            {"grad_codebook_entropy", &grad_codebook},
                                                            {"grad_avg_probs", &grad_avg_probs},
                                                            {"avg_probs", &avg_probs}};
  for (int i = 0; i < 4; ++i) {
    const auto& [name, t] = args[i];
    check_float(op, name, *t);
    if (i < 2) {
      VQK_CHECK(t->numel() == 1, op, name, " must be a scalar, got shape ", shape_str(*t));
    } else {
      VQK_CHECK(t->dim() == 1 && t->size(0) == k, op, name, " must have shape [2**d=", k, "], got ", shape_str(*t));
    }
    VQK_CHECK(t->device() == x.device(), op, name, " is on ", t->device(), " but x is on ", x.device());
  }
}

}  // namespace vqk
