// Scatter-adds of rows onto codebook rows (ema_update_ sums, codebook gradients), used by
// several op families: a fast path with float atomics and a deterministic path over rows
// sorted by code. Both add scale * src[r, :] to out[indices[r], :] for every row r whose
// index is a code (0 <= index < K); other indices are skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// src: n rows of D elements of type t at src[r * s0 + d * s1]; indices [n] contiguous;
// out: float32, out[k * out_ld + d]. scale: a device float (nullptr: 1). Optional outputs:
// counts[k] (int64) += 1 per row of code k (counts alone when out is nullptr), and *bad = 1
// when some index lies outside [-1, K). Float atomics: the summation order varies run to run.
cudaError_t scatter_rows_atomic(const void* src, ElemType t, int64_t s0, int64_t s1, const int64_t* indices, int64_t n,
                                int64_t K, int64_t D, const float* scale, float* out, int64_t out_ld, int64_t* counts,
                                int64_t* bad, cudaStream_t stream);

// Deterministic: order [*] lists the rows sorted stably by code, offsets [K + 1] the first
// position in order of each code (offsets[K]: the end). out[k, d] += sum over code k's rows,
// in increasing row order, of scale * src[r, d]: the same bits on every run.
cudaError_t scatter_rows_sorted(const void* src, ElemType t, int64_t s0, int64_t s1, const int64_t* order,
                                const int64_t* offsets, int64_t K, int64_t D, const float* scale, float* out,
                                int64_t out_ld, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
