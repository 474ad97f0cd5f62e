// Host interface of the CUDA vq_quantize kernels (vq_quantize.cu): plain C++ types only.
// Element types use nearest_code.h's ElemType; x, codebook, grad_quantized are contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/nearest_code.h"

namespace vqk {
namespace cuda {

// Per-block partial sums the forward writes: the size of its `partials` scratch buffer.
int64_t vq_partial_count(int64_t numel);

// quantized [n, d] (x's type) = codebook[indices] (NaN rows where the index is -1), and
// commit_loss = codebook_loss = mean((x - quantized)^2) in float32, summed deterministically
// (per-block partials, then one fixed-order sum).
cudaError_t vq_gather_loss(ElemType x_type, ElemType code_type, const void* x, const void* codebook,
                           const int64_t* indices, int64_t n, int64_t k, int64_t d, void* quantized, float* partials,
                           float* commit_loss, float* codebook_loss, cudaStream_t stream);

// grad_x [n, d] (x's type) = grad_quantized + grad_commit_loss * 2 / (n d) * (x - q); grad_type is
// x_type or F32. With atomic_codebook, also grad_codebook[indices[r]] += -grad_codebook_loss *
// 2 / (n d) * (x_r - q_r) by float atomics (grad_codebook: float32 [k, d], zeroed).
cudaError_t vq_backward(ElemType grad_type, ElemType x_type, ElemType code_type, const void* grad_quantized,
                        const float* grad_commit_loss, const float* grad_codebook_loss, const void* x,
                        const void* codebook, const int64_t* indices, int64_t n, int64_t k, int64_t d, void* grad_x,
                        float* grad_codebook, bool atomic_codebook, cudaStream_t stream);

// The deterministic grad_codebook: code c sums the rows perm[offsets[c] .. offsets[c + 1]) (the
// rows holding index c, in increasing row order) sequentially; every entry of grad_codebook written.
cudaError_t vq_codebook_grad_sorted(ElemType x_type, ElemType code_type, const float* grad_codebook_loss, const void* x,
                                    const void* codebook, const int64_t* perm, const int64_t* offsets, int64_t n,
                                    int64_t k, int64_t d, float* grad_codebook, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
