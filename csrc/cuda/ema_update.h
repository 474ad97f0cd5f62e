// Host launchers of the CUDA ema_update_ kernels (csrc/cuda/ema_update.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

// The float32 statistics update after this step's counts [K] (int64) and row sums [K, D]
// (float32, row stride D) were gathered (csrc/cuda/scatter.h):
//   cluster_size = decay * cluster_size + (1 - decay) * counts
//   embed_sum    = decay * embed_sum + (1 - decay) * sums
//   codebook     = embed_sum / ((cluster_size + eps) / (total + K eps) * total), total = sum(cluster_size)
// total is summed in double in a fixed order (one block); `total` is a device double scratch.
// Strides in elements; the codebook has element type cb_type.
cudaError_t ema_finalize(void* codebook, ElemType cb_type, int64_t cb0, int64_t cb1, float* cluster_size, int64_t cs0,
                         float* embed_sum, int64_t es0, int64_t es1, const int64_t* counts, const float* sums,
                         int64_t K, int64_t D, double decay, double eps, double* total, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqk
