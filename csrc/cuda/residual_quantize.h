// Host launchers of the CUDA residual_quantize kernels (csrc/cuda/residual_quantize.cu).
// Buffers are float32 [n, D] contiguous unless stated; codebooks are one level's [K, D] with
// element strides cb0, cb1 and element type ct. An index outside [0, K) means "no usable
// code": the row's code reads as NaN, as reference.lookup gives for -1.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// Number of per-block loss partials (per level) of rq_level_forward for n rows.
int64_t rq_loss_blocks(int64_t n);

// Greedy level `level` after its search chose idx [n]: indices[r * L + level] = idx[r]; with
// c = codebook row idx[r] (float32): loss partial += sum_d (double(res) - double(c))^2 per
// block of rows, in a fixed order (partial [rq_loss_blocks(n)] of this level);
// res -= c; qsum += c; and when quantized is not null (the last level) quantized = qsum in qt.
cudaError_t rq_level_forward(float* res, float* qsum, int64_t n, int64_t D, const void* cb, ElemType ct, int64_t cb0,
                             int64_t cb1, int64_t K, const int64_t* idx, int64_t* indices, int64_t L, int64_t level,
                             double* partial, void* quantized, ElemType qt, cudaStream_t stream);

// losses[l] = float(sum of partial[l * blocks + b] over b in order / count) into both outputs.
cudaError_t rq_losses(const double* partial, int64_t L, int64_t blocks, double count, float* commit, float* codebook,
                      cudaStream_t stream);

// Backward, one level: with c = codebook row idx[r]: res -= c, then grad_x += (*commit_coef) * res.
cudaError_t rq_level_backward(float* res, float* grad_x, int64_t n, int64_t D, const void* cb, ElemType ct, int64_t cb0,
                              int64_t cb1, int64_t K, const int64_t* idx, const float* commit_coef,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
