// Input checks shared by every backend's kernels. The wording matches vqkernels/_checks.py,
// so an error reads the same whichever backend serves the call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace vqk {

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

}  // namespace vqk

// Gumbel-softmax quantization and the rotation trick
#include <limits>

namespace vqk {

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
  VQK_CHECK(grad.sizes() == src.sizes(), op, "grad must have src's shape ", shape_str(src), ", got ",
            shape_str(grad));
  check_float(op, "grad", grad);
}

}  // namespace vqk
