// Row scatter-adds onto codebook rows: atomic fast path and sorted deterministic path.
#include "cuda/device_util.cuh"
#include "cuda/scatter.h"

namespace vqk {
namespace cuda {
namespace {

constexpr int kLanes = 32;        // threads along D
constexpr int kRowsPerBlock = 8;  // rows (atomic) or codes (sorted) per block

// One warp per row (grid-stride over rows), lanes over the row's D elements.
template <typename T>
__global__ void scatter_atomic_kernel(const T* __restrict__ src, int64_t s0, int64_t s1,
                                      const int64_t* __restrict__ indices, int64_t n, int64_t K, int64_t D,
                                      const float* __restrict__ scale, float* __restrict__ out, int64_t out_ld,
                                      int64_t* __restrict__ counts, int64_t* __restrict__ bad) {
  const float s = scale ? *scale : 1.0f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < n; r += step) {
    const int64_t k = indices[r];
    if (k < 0 || k >= K) {
      if (bad && threadIdx.x == 0 && k != -1) *bad = 1;
      continue;
    }
    if (counts && threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + k), 1ull);
    if (out)
      for (int64_t d = threadIdx.x; d < D; d += kLanes)
        atomicAdd(out + k * out_ld + d, s * to_float(src[r * s0 + d * s1]));
  }
}

// Thread (code k, column d) sums code k's rows in their sorted (= increasing row) order.
template <typename T>
__global__ void scatter_sorted_kernel(const T* __restrict__ src, int64_t s0, int64_t s1,
                                      const int64_t* __restrict__ order, const int64_t* __restrict__ offsets, int64_t K,
                                      int64_t D, const float* __restrict__ scale, float* __restrict__ out,
                                      int64_t out_ld) {
  const float s = scale ? *scale : 1.0f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const int64_t d_step = static_cast<int64_t>(gridDim.y) * kLanes;
  for (int64_t d = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x; d < D; d += d_step) {
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; k < K; k += step) {
      float acc = 0.0f;
      for (int64_t i = offsets[k]; i < offsets[k + 1]; ++i) acc += s * to_float(src[order[i] * s0 + d * s1]);
      out[k * out_ld + d] += acc;
    }
  }
}

}  // namespace

cudaError_t scatter_rows_atomic(const void* src, ElemType t, int64_t s0, int64_t s1, const int64_t* indices, int64_t n,
                                int64_t K, int64_t D, const float* scale, float* out, int64_t out_ld, int64_t* counts,
                                int64_t* bad, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_elem(t, [&](auto tag) {
    using T = decltype(tag);
    scatter_atomic_kernel<T><<<blocks_for(n, kRowsPerBlock, 1 << 20), dim3(kLanes, kRowsPerBlock), 0, stream>>>(
        static_cast<const T*>(src), s0, s1, indices, n, K, D, scale, out, out_ld, counts, bad);
    return cudaGetLastError();
  });
}

cudaError_t scatter_rows_sorted(const void* src, ElemType t, int64_t s0, int64_t s1, const int64_t* order,
                                const int64_t* offsets, int64_t K, int64_t D, const float* scale, float* out,
                                int64_t out_ld, cudaStream_t stream) {
  if (K == 0 || D == 0) return cudaSuccess;
  const dim3 grid(blocks_for(K, kRowsPerBlock, 1 << 20), blocks_for(D, kLanes));  // gridDim.y <= 65535: d loops
  return dispatch_elem(t, [&](auto tag) {
    using T = decltype(tag);
    scatter_sorted_kernel<T><<<grid, dim3(kLanes, kRowsPerBlock), 0, stream>>>(
        static_cast<const T*>(src), s0, s1, order, offsets, K, D, scale, out, out_ld);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vqk
