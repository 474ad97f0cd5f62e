// CUDA kernels of ema_update_'s statistics update (the per-code counts and sums come from
// csrc/cuda/scatter.cu). The arithmetic follows csrc/cpu/ema_update.cpp step by step in
// float32 (the statistics' dtype): keep * s + take * new, the total in double, then
// smoothed = (cs + eps) / float(total + K eps) * float(total) and codebook = es / smoothed.
#include "cuda/device_util.cuh"
#include "cuda/ema_update.h"

namespace vqk {
namespace cuda {
namespace {

constexpr int kTotalThreads = 1024;

// One block: cluster_size's decay step and its total (fixed thread-strided order, fixed tree).
__global__ void __launch_bounds__(kTotalThreads)
    cluster_size_kernel(float* __restrict__ cs, int64_t cs0, const int64_t* __restrict__ counts, int64_t K, float keep,
                        float take, double* __restrict__ total) {
  double part = 0;
  for (int64_t k = threadIdx.x; k < K; k += kTotalThreads) {
    const float v = keep * cs[k * cs0] + take * static_cast<float>(counts[k]);
    cs[k * cs0] = v;
    part += static_cast<double>(v);
  }
  const double sum = block_sum<kTotalThreads>(part);
  if (threadIdx.x == 0) *total = sum;
}

// Element (k, d): embed_sum's decay step and the codebook entry.
template <typename T>
__global__ void codebook_kernel(T* __restrict__ cb, int64_t cb0, int64_t cb1, const float* __restrict__ cs, int64_t cs0,
                                float* __restrict__ es, int64_t es0, int64_t es1, const float* __restrict__ sums,
                                int64_t K, int64_t D, float keep, float take, double eps,
                                const double* __restrict__ total) {
  const double tot = *total;
  const float ftot = static_cast<float>(tot), denom = static_cast<float>(tot + static_cast<double>(K) * eps);
  const float feps = static_cast<float>(eps);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < K * D; i += step) {
    const int64_t k = i / D, d = i % D;
    const float smoothed = (cs[k * cs0] + feps) / denom * ftot;
    float& e = es[k * es0 + d * es1];
    e = keep * e + take * sums[i];
    cb[k * cb0 + d * cb1] = from_float<T>(e / smoothed);
  }
}

}  // namespace

cudaError_t ema_finalize(void* codebook, ElemType cb_type, int64_t cb0, int64_t cb1, float* cluster_size, int64_t cs0,
                         float* embed_sum, int64_t es0, int64_t es1, const int64_t* counts, const float* sums,
                         int64_t K, int64_t D, double decay, double eps, double* total, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  const float keep = static_cast<float>(decay), take = static_cast<float>(1.0 - decay);
  cluster_size_kernel<<<1, kTotalThreads, 0, stream>>>(cluster_size, cs0, counts, K, keep, take, total);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || D == 0) return err;
  constexpr int kThreads = 256;
  return dispatch_elem(cb_type, [&](auto tag) {
    using T = decltype(tag);
    codebook_kernel<T><<<blocks_for(K * D, kThreads, 1 << 20), kThreads, 0, stream>>>(
        static_cast<T*>(codebook), cb0, cb1, cluster_size, cs0, embed_sum, es0, es1, sums, K, D, keep, take, eps,
        total);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vqk
