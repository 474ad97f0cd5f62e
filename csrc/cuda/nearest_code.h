// Host interface of the CUDA nearest-code searches (nearest_code*.cu): plain C++ types only,
// so the ATen binding (nearest_code_bind.cpp) and other families' bindings can include it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

constexpr int64_t kMaxTopk = 32;  // nearest_code_topk's kernel keeps at most this many per row

// One search: x [n, d] and codebook [k, d], both contiguous and of one element type `dtype`
// (mixed inputs are converted to float32 first), metric a MetricId (search.cuh: 0 l2, 1 ip,
// 2 cosine). add / scale: float32 [padded_codes(k)] device buffers, filled by code_terms.
struct SearchArgs {
  ElemType dtype;
  const void* x;
  const void* codebook;
  int64_t n, k, d;
  int metric;
  float* add;
  float* scale;
};

inline int64_t padded_codes(int64_t k) { return (k + 127) / 128 * 128; }  // a whole number of tiles

// The per-code terms of the affine score form (add = +inf for codes holding a NaN).
cudaError_t code_terms(const SearchArgs& a, cudaStream_t stream);

// topk == 0: nearest code (indices [n], distances [n]); 1 <= topk <= kMaxTopk: the topk nearest,
// sorted (indices [n, topk], distances [n, topk]). One function per element type, each in its own
// .cu file (nearest_code_f32.cu, nearest_code_f16.cu, nearest_code_bf16.cu).
cudaError_t search_f32(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream);
cudaError_t search_f16(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream);
cudaError_t search_bf16(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream);

inline cudaError_t search(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream) {
  switch (a.dtype) {
    case ElemType::F16:
      return search_f16(a, topk, indices, distances, stream);
    case ElemType::BF16:
      return search_bf16(a, topk, indices, distances, stream);
    default:
      return search_f32(a, topk, indices, distances, stream);
  }
}

}  // namespace cuda
}  // namespace vqk
