// Host launcher of the CUDA multiscale_quantize_step lookup (csrc/cuda/multiscale.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// h [B, C, plane] (NCHW, contiguous, element type ct) with h[b, c, p] = codebook[idx[b * plane + p], c]
// (element strides cb0, cb1), NaN where the index is outside [0, K) (-1: no usable code).
cudaError_t multiscale_lookup(const void* cb, ElemType ct, int64_t cb0, int64_t cb1, int64_t K, const int64_t* idx,
                              int64_t B, int64_t C, int64_t plane, void* h, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
