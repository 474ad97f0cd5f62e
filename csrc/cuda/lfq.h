// Host launchers of the CUDA lfq_entropy kernels (csrc/cuda/lfq.cu): the parts of the
// factorised entropy around the two GEMMs (which the binding runs with at::mm). x is [n, d]
// of element type xt with element strides s0, s1; da = d / 2 top bits, db = d - da bottom
// bits; A [n, 2**da] and B [n, 2**db] float32 contiguous; the bit logits are l = x * scale.
// Row weights w (float32 [n], contiguous) are optional: null means every row weight 1 and the
// divisor n; with them the divisor is the device scalar *total (lfq_weight_total).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// A[r, a] = w[r] * prod_j p(bit j of a) over the top bits, first bit = top bit of a (the
// reference's _code_probs order), B likewise over the bottom bits (not weighted); row_entropy [n]
// (if not null) gets w[r] times the row's sum of binary entropies H(sigmoid(l_j)) over j in order.
// A row of weight 0 gets zeros in A, B and row_entropy, whatever x holds.
cudaError_t lfq_factors(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                        const float* w, float* a, float* b, float* row_entropy, cudaStream_t stream);

// Doubles of scratch that lfq_weight_total and lfq_entropy_sums need.
int64_t lfq_sums_scratch();

// *total = float(sum(w)), summed in double in a fixed order, or 1 where that is 0 (n >= 1).
cudaError_t lfq_weight_total(const float* w, int64_t n, double* scratch, float* total, cudaStream_t stream);

// per_sample = float(sum(row_entropy) / (total ? *total : n)), codebook = float(-sum_i avg[i]
// log(max(avg[i], 1e-5))), both summed in double in a fixed order (per-block partials, then the
// blocks in order).
cudaError_t lfq_entropy_sums(const float* row_entropy, int64_t n, const float* avg, int64_t k, const float* total,
                             double* scratch, float* per_sample, float* codebook, cudaStream_t stream);

// g[i] = (gcb * -(log(max(avg[i], 1e-5)) + [avg[i] >= 1e-5]) + gavg[i]) / (total ? *total : n),
// gcb a device scalar.
cudaError_t lfq_grad_avg(const float* avg, const float* gavg, const float* gcb, int64_t k, const float* total,
                         int64_t n, float* g, cudaStream_t stream);

// grad [n, d] (contiguous, type xt) of x: with p1 = sigmoid(l), p0 = sigmoid(-l), u = gA * A
// (top bits; gB * B bottom; A weighted as lfq_factors gives it), s1_j / s0_j the sums of u over
// the patterns with bit j set / clear: grad = scale * (p0 s1 - p1 s0 + (*gps / div) * w[r] *
// (-l p1 p0)) (the last term 0 at |l| = inf), div = total ? *total : n; 0 for rows of weight 0.
cudaError_t lfq_backward_rows(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                              const float* w, const float* total, const float* a, const float* ga, const float* b,
                              const float* gb, const float* gps, void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
