// vqkernels_cuda::residual_quantize and its backward: the at:: binding of
// csrc/cuda/residual_quantize.cu (greedy levels; beam search and float64 go to the reference).
//
// Forward, per level l: vqkernels_cuda::nearest_code(r_l, codebook_l) on the float32 residual
// (reference.residual_quantize searches x.to(float32) - q_0 - ... the same way), then one
// kernel gathers the chosen codes, writes the indices' column, updates r and the running
// quantized sum and the level's per-block loss partials; the last level writes quantized.
// Backward: the residuals are recomputed level by level (as reference._residual_path), grad_x
// gains commit_l * r_{l+1} and the level's codebook gains codebook_l * r_{l+1} per chosen code
// (csrc/cuda/scatter.h: atomics, or rows sorted by code in deterministic mode).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/residual_quantize.h"
#include "cuda/scatter.h"

namespace vqk {
namespace cuda {
namespace {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Level l's codebook [K, D]: its slice of [L, K, D], or the shared [K, D] itself.
at::Tensor level_codebook(const at::Tensor& codebooks, int64_t l) {
  return codebooks.dim() == 3 ? codebooks.select(0, l) : codebooks;
}

Tensor4 residual_quantize(const at::Tensor& x, const at::Tensor& codebooks, int64_t num_levels, int64_t beam_size) {
  const char* op = "residual_quantize";
  const int64_t levels = check_residual(op, x, codebooks, num_levels, beam_size);
  check_no_float64(op, {&x, &codebooks});
  if (beam_size > 1) {  // beam search: the reference serves it
    const auto out = call_op("vqkernels_ref::residual_quantize", {x, codebooks, num_levels, beam_size});
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor(), out[3].toTensor()};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), D = x.size(1), K = codebooks.size(-2);
  const auto loss_opts = x.options().dtype(at::kFloat);
  at::Tensor quantized = at::empty({n, D}, x.options());
  at::Tensor indices = at::empty({n, levels}, x.options().dtype(at::kLong));
  if (n == 0 || D == 0) {
    indices.zero_();  // D == 0: every code is at distance 0 and the first wins (as the CPU kernel)
    return {quantized, indices, at::zeros({levels}, loss_opts), at::zeros({levels}, loss_opts)};
  }
  at::Tensor res = at::empty({n, D}, loss_opts);
  res.copy_(x);  // r_0 = x.to(float32)
  at::Tensor qsum = at::zeros({n, D}, loss_opts);
  const int64_t blocks = rq_loss_blocks(n);
  at::Tensor partial = at::empty({levels, blocks}, x.options().dtype(at::kDouble));
  for (int64_t l = 0; l < levels; ++l) {
    const at::Tensor cb = level_codebook(codebooks, l);
    const at::Tensor idx =
        call_op("vqkernels_cuda::nearest_code", {res, cb, std::string("l2")})[0].toTensor().contiguous();
    const bool last = l == levels - 1;
    check_launch(op, rq_level_forward(res.data_ptr<float>(), qsum.data_ptr<float>(), n, D, cb.const_data_ptr(),
                                      elem_type(cb), cb.stride(0), cb.stride(1), K, idx.const_data_ptr<int64_t>(),
                                      indices.data_ptr<int64_t>(), levels, l, partial.data_ptr<double>() + l * blocks,
                                      last ? quantized.data_ptr() : nullptr, elem_type(x), stream));
  }
  at::Tensor commit = at::empty({levels}, loss_opts), codebook = at::empty({levels}, loss_opts);
  check_launch(op, rq_losses(partial.const_data_ptr<double>(), levels, blocks, static_cast<double>(n * D),
                             commit.data_ptr<float>(), codebook.data_ptr<float>(), stream));
  return {quantized, indices, commit, codebook};
}

std::tuple<at::Tensor, at::Tensor> residual_quantize_backward(const at::Tensor& grad_quantized,
                                                              const at::Tensor& grad_commit_losses,
                                                              const at::Tensor& grad_codebook_losses,
                                                              const at::Tensor& x, const at::Tensor& codebooks,
                                                              const at::Tensor& indices) {
  const char* op = "residual_quantize_backward";
  const int64_t levels =
      check_residual_backward(op, grad_quantized, grad_commit_losses, grad_codebook_losses, x, codebooks, indices);
  check_no_float64(op, {&grad_quantized, &grad_commit_losses, &grad_codebook_losses, &x, &codebooks});
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), D = x.size(1), K = codebooks.size(-2);
  const at::Tensor idx = indices.t().contiguous();  // [L, N]: each level's indices contiguous
  // As the CPU kernel: one small reduction and one scalar copy.
  VQK_CHECK(!at::logical_or(idx < -1, idx >= K).any().item<bool>(), op, "indices must be in [-1, K=", K,
            "), got values outside it");
  const auto f32 = x.options().dtype(at::kFloat);
  // The coefficients in float32 as the reference forms them: commit_l * scale, -codebook_l * scale.
  const double scale = 2.0 / static_cast<double>(std::max<int64_t>(n * D, 1));
  const at::Tensor commit_coef = (grad_commit_losses.to(at::kFloat) * scale).contiguous();
  const at::Tensor codebook_coef = (-grad_codebook_losses.to(at::kFloat) * scale).contiguous();
  at::Tensor gx = at::empty({n, D}, f32);
  gx.copy_(grad_quantized);
  at::Tensor gcb = at::zeros(codebooks.sizes(), f32);
  if (n == 0 || D == 0) return {gx.to(x.scalar_type()), gcb.to(codebooks.scalar_type())};
  at::Tensor res = at::empty({n, D}, f32);
  res.copy_(x);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor order, offsets;  // per level: rows sorted stably by code, and each code's first position
  if (deterministic) std::tie(order, offsets) = sort_by_code(idx, K);
  for (int64_t l = 0; l < levels; ++l) {
    const at::Tensor cb = level_codebook(codebooks, l);
    const int64_t* il = idx.const_data_ptr<int64_t>() + l * n;
    check_launch(
        op, rq_level_backward(res.data_ptr<float>(), gx.data_ptr<float>(), n, D, cb.const_data_ptr(), elem_type(cb),
                              cb.stride(0), cb.stride(1), K, il, commit_coef.const_data_ptr<float>() + l, stream));
    float* out = gcb.data_ptr<float>() + (codebooks.dim() == 3 ? l * K * D : 0);
    const float* coef = codebook_coef.const_data_ptr<float>() + l;
    if (deterministic) {
      check_launch(op, scatter_rows_sorted(
                           res.const_data_ptr<float>(), ElemType::F32, D, 1, order.const_data_ptr<int64_t>() + l * n,
                           offsets.const_data_ptr<int64_t>() + l * (K + 1), K, D, coef, out, D, stream));
    } else {
      check_launch(op, scatter_rows_atomic(res.const_data_ptr<float>(), ElemType::F32, D, 1, il, n, K, D, coef, out, D,
                                           nullptr, nullptr, stream));
    }
  }
  return {gx.to(x.scalar_type()), gcb.to(codebooks.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) {
  m.impl("residual_quantize", &vqk::cuda::residual_quantize);
  m.impl("residual_quantize_backward", &vqk::cuda::residual_quantize_backward);
}
