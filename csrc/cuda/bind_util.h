// Helpers of the at:: bindings of the CUDA kernels (csrc/cuda/*_bind.cpp; plain C++, no nvcc).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// The launcher tag of a float32 / float16 / bfloat16 tensor.
inline ElemType elem_type(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "vqkernels: no CUDA kernel for dtype ", st);
  return st == at::kFloat ? ElemType::F32 : (st == at::kHalf ? ElemType::F16 : ElemType::BF16);
}

// The CUDA kernels compute in float32: a call with a float64 tensor is refused here. Through the
// public op torch.ops.vqkernels.<op>, the router (csrc/dispatch.cpp) serves such calls with the reference.
inline void check_no_float64(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK_VALUE(t->scalar_type() != at::kDouble, "vqkernels.", op,
                      " (CUDA): no float64 kernel (the CUDA kernels compute in float32); torch.ops.vqkernels.", op,
                      " serves float64 with the reference");
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "vqkernels.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// The op `name` ("namespace::op") called boxed through the dispatcher (so there is no C++
// signature to agree on with the kernels that other files register for it): its outputs.
inline std::vector<c10::IValue> call_op(const char* name, std::vector<c10::IValue> args) {
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(args);
  return args;
}

// The deterministic scatter's plan (csrc/cuda/scatter.h, scatter_rows_sorted) for int64 codes
// idx [..., n] in [-1, K) along its last dimension: order [..., n], the rows sorted stably by
// code, and offsets [..., K + 1], the first position in order of each code 0..K (-1 first).
inline std::pair<at::Tensor, at::Tensor> sort_by_code(const at::Tensor& idx, int64_t K) {
  auto [sorted, order] = at::sort(idx, /*stable=*/true, /*dim=*/-1, /*descending=*/false);
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  shape.back() = K + 1;
  const at::Tensor codes = at::arange(K + 1, idx.options()).expand(shape).contiguous();
  return {order, at::searchsorted(sorted, codes)};
}

}  // namespace cuda
}  // namespace vqk
