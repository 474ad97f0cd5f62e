// ATen binding of the CUDA vq_quantize and vq_quantize_backward (vqkernels_cuda namespace).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/vq_quantize.h"

namespace vqk {
namespace cuda {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Search (vqkernels_cuda::nearest_code), then the lookup and the loss in one elementwise kernel.
Quad vq_quantize(const at::Tensor& x, const at::Tensor& codebook, c10::string_view metric) {
  const char* op = "vq_quantize";
  check_search(op, x, codebook, metric);
  check_no_float64(op, {&x, &codebook});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const auto loss_opts = x.options().dtype(at::kFloat);
  at::Tensor quantized = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) {  // d == 0: every code is at distance 0 and the first wins
    return {quantized, at::zeros({n}, x.options().dtype(at::kLong)), at::zeros({}, loss_opts),
            at::zeros({}, loss_opts)};
  }
  static const auto search = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("vqkernels_cuda::nearest_code", "")
                                 .typed<Pair(const at::Tensor&, const at::Tensor&, c10::string_view)>();
  at::Tensor indices = std::get<0>(search.call(x, codebook, metric));
  const at::Tensor xs = x.contiguous(), cb = codebook.contiguous();
  at::Tensor partials = at::empty({vq_partial_count(n * d)}, loss_opts);
  at::Tensor commit_loss = at::empty({}, loss_opts), codebook_loss = at::empty({}, loss_opts);
  check_launch(op, vq_gather_loss(elem_type(xs), elem_type(cb), xs.const_data_ptr(), cb.const_data_ptr(),
                                  indices.const_data_ptr<int64_t>(), n, k, d, quantized.data_ptr(),
                                  partials.data_ptr<float>(), commit_loss.data_ptr<float>(),
                                  codebook_loss.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {quantized, indices, commit_loss, codebook_loss};
}

// grad_x elementwise; grad_codebook by float atomics, or, under
// torch.use_deterministic_algorithms, by per-code sums over the stably sorted indices.
Pair vq_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_commit_loss,
                          const at::Tensor& grad_codebook_loss, const at::Tensor& x, const at::Tensor& codebook,
                          const at::Tensor& indices) {
  const char* op = "vq_quantize_backward";
  check_vq_quantize_backward(op, grad_quantized, grad_commit_loss, grad_codebook_loss, x, codebook, indices);
  check_no_float64(op, {&grad_quantized, &grad_commit_loss, &grad_codebook_loss, &x, &codebook});
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const at::Tensor xs = x.contiguous(), cb = codebook.contiguous(), idx = indices.contiguous();
  // grad_quantized in x's type, else float32 (the reference's first step converts it to float32).
  const at::Tensor g =
      (grad_quantized.scalar_type() == x.scalar_type() ? grad_quantized : grad_quantized.to(at::kFloat)).contiguous();
  const at::Tensor gc = grad_commit_loss.to(x.device(), at::kFloat).contiguous();
  const at::Tensor gb = grad_codebook_loss.to(x.device(), at::kFloat).contiguous();
  at::Tensor grad_x = at::empty({n, d}, x.options());
  at::Tensor grad_codebook = at::zeros({k, d}, codebook.options().dtype(at::kFloat));
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  check_launch(op, vq_backward(elem_type(g), elem_type(xs), elem_type(cb), g.const_data_ptr(),
                               gc.const_data_ptr<float>(), gb.const_data_ptr<float>(), xs.const_data_ptr(),
                               cb.const_data_ptr(), idx.const_data_ptr<int64_t>(), n, k, d, grad_x.data_ptr(),
                               grad_codebook.data_ptr<float>(), !deterministic, stream));
  if (deterministic && n > 0 && d > 0) {
    // Rows grouped by code, in increasing row order within a code (stable sort); -1 sorts first
    // and lies outside every code's [offsets[c], offsets[c + 1]).
    const auto [perm, offsets] = sort_by_code(idx, k);
    check_launch(op, vq_codebook_grad_sorted(elem_type(xs), elem_type(cb), gb.const_data_ptr<float>(),
                                             xs.const_data_ptr(), cb.const_data_ptr(), perm.const_data_ptr<int64_t>(),
                                             offsets.const_data_ptr<int64_t>(), n, k, d,
                                             grad_codebook.data_ptr<float>(), stream));
  }
  return {grad_x, grad_codebook.to(codebook.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) {
  m.impl("vq_quantize", &vqk::cuda::vq_quantize);
  m.impl("vq_quantize_backward", &vqk::cuda::vq_quantize_backward);
}
