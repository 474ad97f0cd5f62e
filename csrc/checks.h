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

// multiscale_quantize_step (VAR's multi-scale residual quantizer): one scale's input checks.
namespace vqk {

inline Metric check_multiscale(const char* op, const at::Tensor& f_rest, const at::Tensor& codebook,
                               at::IntArrayRef pn, c10::string_view metric) {
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
