// vqkernels_cuda::lfq_entropy and its backward: the at:: binding of csrc/cuda/lfq.cu.
//
// reference.lfq_entropy in float32 (float64 goes to the reference): the factor kernel gives
// A [N, 2**(d/2)], B [N, 2**(d - d/2)] and the rows' bit entropies; avg = (A^T B) / N is one
// at::mm (then the division, as the reference orders it); the two scalars are fixed-order
// double sums. Backward: G = d loss / d avg / N elementwise, dA = B G^T and dB = A G as two
// at::mm, then one kernel per row folds them onto the bit logits. The GEMMs run in float32 with
// autocast excluded (NoAutocastGuard), as the CPU kernels. Row weights, if given, go to the
// kernels as float32 and N becomes their total, which stays on the device (lfq_weight_total): every
// division by it is a device op, so a weighted call never reads anything back to the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/lfq.h"

namespace vqk {
namespace cuda {
namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The row weights as float32 on the device and their guarded total (a device scalar), or nothing.
struct RowWeights {
  at::Tensor w, total;

  RowWeights(const char* op, const std::optional<at::Tensor>& weights, int64_t n, cudaStream_t stream) {
    if (!weights) return;
    w = weights->to(at::kFloat).contiguous();
    total = at::empty({}, w.options());
    const at::Tensor scratch = at::empty({lfq_sums_scratch()}, w.options().dtype(at::kDouble));
    check_launch(op, lfq_weight_total(w.const_data_ptr<float>(), n, scratch.data_ptr<double>(), total.data_ptr<float>(),
                                      stream));
  }

  const float* data() const { return w.defined() ? w.const_data_ptr<float>() : nullptr; }
  const float* total_data() const { return total.defined() ? total.const_data_ptr<float>() : nullptr; }
};

Tensor3 lfq_entropy(const at::Tensor& x, double inv_temperature, const std::optional<at::Tensor>& weights) {
  const NoAutocastGuard no_autocast;
  const char* op = "lfq_entropy";
  check_lfq_entropy(op, x, inv_temperature, weights);
  check_no_float64(op, {&x});
  if (weights) check_no_float64(op, {&*weights});
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), d = x.size(1), da = d / 2, db = d - da;
  const auto f32 = x.options().dtype(at::kFloat);
  if (n == 0) return {at::zeros({}, f32), at::zeros({}, f32), at::zeros({int64_t(1) << d}, f32)};
  const RowWeights rw(op, weights, n, stream);
  at::Tensor a = at::empty({n, int64_t(1) << da}, f32), b = at::empty({n, int64_t(1) << db}, f32);
  at::Tensor row_entropy = at::empty({n}, f32);
  check_launch(op, lfq_factors(x.const_data_ptr(), elem_type(x), x.stride(0), x.stride(1), n, d,
                               static_cast<float>(4.0 * inv_temperature), rw.data(), a.data_ptr<float>(),
                               b.data_ptr<float>(), row_entropy.data_ptr<float>(), stream));
  at::Tensor avg = at::mm(a.t(), b);
  if (weights)
    avg.div_(rw.total);
  else
    avg.div_(n);
  avg = avg.reshape({-1});
  at::Tensor scratch = at::empty({lfq_sums_scratch()}, x.options().dtype(at::kDouble));
  at::Tensor per_sample = at::empty({}, f32), codebook = at::empty({}, f32);
  check_launch(op, lfq_entropy_sums(row_entropy.const_data_ptr<float>(), n, avg.const_data_ptr<float>(), avg.numel(),
                                    rw.total_data(), scratch.data_ptr<double>(), per_sample.data_ptr<float>(),
                                    codebook.data_ptr<float>(), stream));
  return {per_sample, codebook, avg};
}

at::Tensor lfq_entropy_backward(const at::Tensor& grad_per_sample, const at::Tensor& grad_codebook,
                                const at::Tensor& grad_avg_probs, const at::Tensor& x, const at::Tensor& avg_probs,
                                double inv_temperature, const std::optional<at::Tensor>& weights) {
  const NoAutocastGuard no_autocast;
  const char* op = "lfq_entropy_backward";
  check_lfq_entropy_backward(op, grad_per_sample, grad_codebook, grad_avg_probs, x, avg_probs, inv_temperature,
                             weights);
  check_no_float64(op, {&grad_per_sample, &grad_codebook, &grad_avg_probs, &x, &avg_probs});
  if (weights) check_no_float64(op, {&*weights});
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), d = x.size(1), da = d / 2, db = d - da;
  at::Tensor grad = at::empty({n, d}, x.options());
  if (n == 0) return grad;
  const auto f32 = x.options().dtype(at::kFloat);
  // Everything in float32 as the reference's dt: the scalars and avg / grad_avg_probs converted.
  const at::Tensor gps = grad_per_sample.reshape({}).to(at::kFloat).contiguous();
  const at::Tensor gcb = grad_codebook.reshape({}).to(at::kFloat).contiguous();
  const at::Tensor avg = avg_probs.to(at::kFloat).contiguous(), gavg = grad_avg_probs.to(at::kFloat).contiguous();
  const RowWeights rw(op, weights, n, stream);
  at::Tensor g = at::empty({int64_t(1) << da, int64_t(1) << db}, f32);
  check_launch(op, lfq_grad_avg(avg.const_data_ptr<float>(), gavg.const_data_ptr<float>(), gcb.const_data_ptr<float>(),
                                g.numel(), rw.total_data(), n, g.data_ptr<float>(), stream));
  at::Tensor a = at::empty({n, int64_t(1) << da}, f32), b = at::empty({n, int64_t(1) << db}, f32);
  const float scale = static_cast<float>(4.0 * inv_temperature);
  check_launch(op, lfq_factors(x.const_data_ptr(), elem_type(x), x.stride(0), x.stride(1), n, d, scale, rw.data(),
                               a.data_ptr<float>(), b.data_ptr<float>(), nullptr, stream));
  const at::Tensor ga = at::mm(b, g.t()).contiguous(), gb = at::mm(a, g).contiguous();  // d loss / dA, d loss / dB
  check_launch(op, lfq_backward_rows(x.const_data_ptr(), elem_type(x), x.stride(0), x.stride(1), n, d, scale, rw.data(),
                                     rw.total_data(), a.const_data_ptr<float>(), ga.const_data_ptr<float>(),
                                     b.const_data_ptr<float>(), gb.const_data_ptr<float>(), gps.const_data_ptr<float>(),
                                     grad.data_ptr(), stream));
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) {
  m.impl("lfq_entropy", &vqk::cuda::lfq_entropy);
  m.impl("lfq_entropy_backward", &vqk::cuda::lfq_entropy_backward);
}
