// CUDA lookup of multiscale_quantize_step: reference.lookup(codebook, indices) permuted to
// NCHW, written directly in NCHW (consecutive threads: consecutive cells of one channel).
#include "cuda/device_util.cuh"
#include "cuda/multiscale.h"

namespace vqk {
namespace cuda {
namespace {

template <typename T>
__global__ void lookup_kernel(const T* __restrict__ cb, int64_t cb0, int64_t cb1, int64_t K,
                              const int64_t* __restrict__ idx, int64_t C, int64_t plane, int64_t total,
                              T* __restrict__ h) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += step) {
    const int64_t p = o % plane, c = (o / plane) % C, b = o / (plane * C);  // o = (b * C + c) * plane + p
    const int64_t k = idx[b * plane + p];
    h[o] = k >= 0 && k < K ? cb[k * cb0 + c * cb1] : from_float<T>(__int_as_float(0x7fffffff));
  }
}

}  // namespace

cudaError_t multiscale_lookup(const void* cb, ElemType ct, int64_t cb0, int64_t cb1, int64_t K, const int64_t* idx,
                              int64_t B, int64_t C, int64_t plane, void* h, cudaStream_t stream) {
  const int64_t total = B * C * plane;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  return dispatch_elem(ct, [&](auto tag) {
    using T = decltype(tag);
    lookup_kernel<T><<<blocks_for(total, kThreads, 1 << 20), kThreads, 0, stream>>>(
        static_cast<const T*>(cb), cb0, cb1, K, idx, C, plane, total, static_cast<T*>(h));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vqk
