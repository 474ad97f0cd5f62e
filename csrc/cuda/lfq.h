// Host launchers of the CUDA lfq_entropy kernels (csrc/cuda/lfq.cu): the parts of the
// factorised entropy around the two GEMMs (which the binding runs with at::mm). x is [n, d]
// of element type xt with element strides s0, s1; da = d / 2 top bits, db = d - da bottom
// bits; A [n, 2**da] and B [n, 2**db] float32 contiguous; the bit logits are l = x * scale.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// A[r, a] = prod_j p(bit j of a) over the top bits, first bit = top bit of a (the reference's
// _code_probs order), B likewise over the bottom bits; row_entropy [n] (if not null) gets the
// row's sum of binary entropies H(sigmoid(l_j)) over j in order.
cudaError_t lfq_factors(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                        float* a, float* b, float* row_entropy, cudaStream_t stream);

// Doubles of scratch that lfq_entropy_sums needs.
int64_t lfq_sums_scratch();

// per_sample = float(sum(row_entropy) / n), codebook = float(-sum_i avg[i] log(max(avg[i], 1e-5))),
// both summed in double in a fixed order (per-block partials, then the blocks in order).
cudaError_t lfq_entropy_sums(const float* row_entropy, int64_t n, const float* avg, int64_t k, double* scratch,
                             float* per_sample, float* codebook, cudaStream_t stream);

// g[i] = (gcb * -(log(max(avg[i], 1e-5)) + [avg[i] >= 1e-5]) + gavg[i]) / n, gcb a device scalar.
cudaError_t lfq_grad_avg(const float* avg, const float* gavg, const float* gcb, int64_t k, int64_t n, float* g,
                         cudaStream_t stream);

// grad [n, d] (contiguous, type xt) of x: with p1 = sigmoid(l), p0 = sigmoid(-l), w = gA * A
// (top bits; gB * B bottom), s1_j / s0_j the sums of w over the patterns with bit j set / clear:
// grad = scale * (p0 s1 - p1 s0 + (*gps / n) * (-l p1 p0)) (the last term 0 at |l| = inf).
cudaError_t lfq_backward_rows(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                              const float* a, const float* ga, const float* b, const float* gb, const float* gps,
                              void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
