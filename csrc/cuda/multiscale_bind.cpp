// vqkernels_cuda::multiscale_quantize_step and its backward: the at:: binding of
// csrc/cuda/multiscale.cu (float64 goes to the reference).
//
// Forward: reference.multiscale_quantize_step takes F.interpolate(f_rest.contiguous(),
// mode="area"), which is at::adaptive_avg_pool2d itself (its 1 x 1 case, the mean over H, W,
// included): called here the same way, bitwise the reference's values on this device. The
// cells, channels last, are searched with vqkernels_cuda::nearest_code (f_rest's dtype, as the
// reference passes them), and the lookup kernel writes h in NCHW.
// Backward: grad_h's cells [B * ph * pw, C] (a view where the layout allows) scatter-added onto
// their codes in float32 (csrc/cuda/scatter.h: atomics, or sorted in deterministic mode).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/multiscale.h"
#include "cuda/scatter.h"

namespace vqk {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> multiscale_quantize_step(const at::Tensor& f_rest, const at::Tensor& codebook,
                                                            at::IntArrayRef pn, c10::string_view metric) {
  const char* op = "multiscale_quantize_step";
  check_multiscale(op, f_rest, codebook, pn, metric);
  check_no_float64(op, {&f_rest, &codebook});
  const c10::cuda::CUDAGuard guard(f_rest.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = f_rest.size(0), C = f_rest.size(1), ph = pn[0], pw = pn[1], n = B * ph * pw;
  at::Tensor h = at::empty({B, C, ph, pw}, codebook.options());
  if (n == 0 || C == 0) {  // C == 0: every code is at distance 0 and the first wins (as the CPU kernel)
    return {at::zeros({B, ph, pw}, f_rest.options().dtype(at::kLong)), h};
  }
  const at::Tensor pooled = at::adaptive_avg_pool2d(f_rest.contiguous(), {ph, pw});
  const at::Tensor rows = pooled.permute({0, 2, 3, 1}).reshape({n, C}).contiguous();
  const at::Tensor idx =
      call_op("vqkernels_cuda::nearest_code", {rows, codebook, std::string(metric)})[0].toTensor().contiguous();
  check_launch(op,
               multiscale_lookup(codebook.const_data_ptr(), elem_type(codebook), codebook.stride(0), codebook.stride(1),
                                 codebook.size(0), idx.const_data_ptr<int64_t>(), B, C, ph * pw, h.data_ptr(), stream));
  return {idx.view({B, ph, pw}), h};
}

at::Tensor multiscale_quantize_step_backward(const at::Tensor& grad_h, const at::Tensor& codebook,
                                             const at::Tensor& indices) {
  const char* op = "multiscale_quantize_step_backward";
  check_multiscale_backward(op, grad_h, codebook, indices);
  check_no_float64(op, {&grad_h, &codebook});
  const c10::cuda::CUDAGuard guard(codebook.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = codebook.size(0), C = codebook.size(1), n = indices.numel();
  at::Tensor grad = at::zeros({K, C}, codebook.options().dtype(at::kFloat));
  if (n == 0 || C == 0) return grad.to(codebook.scalar_type());
  const at::Tensor cells = grad_h.permute({0, 2, 3, 1}).reshape({n, C});  // row r = (b * ph + y) * pw + x
  const at::Tensor idx = indices.reshape({n}).contiguous();
  if (at::globalContext().deterministicAlgorithms()) {
    const auto [order, offsets] = sort_by_code(idx, K);
    check_launch(op, scatter_rows_sorted(cells.const_data_ptr(), elem_type(cells), cells.stride(0), cells.stride(1),
                                         order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), K, C,
                                         nullptr, grad.data_ptr<float>(), C, stream));
  } else {
    check_launch(op, scatter_rows_atomic(cells.const_data_ptr(), elem_type(cells), cells.stride(0), cells.stride(1),
                                         idx.const_data_ptr<int64_t>(), n, K, C, nullptr, grad.data_ptr<float>(), C,
                                         nullptr, nullptr, stream));
  }
  return grad.to(codebook.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) {
  m.impl("multiscale_quantize_step", &vqk::cuda::multiscale_quantize_step);
  m.impl("multiscale_quantize_step_backward", &vqk::cuda::multiscale_quantize_step_backward);
}
