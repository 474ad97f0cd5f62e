// Device helpers shared by the .cu files: element loads/stores as float, dispatch on
// ElemType, and a fixed-order block reduction (deterministic for a fixed block size).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem_type.h"

namespace vqk {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch's casts.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the C++ type of `t`.
template <typename F>
cudaError_t dispatch_elem(ElemType t, F&& f) {
  switch (t) {
    case ElemType::F32:
      return f(float{});
    case ElemType::F16:
      return f(__half{});
    case ElemType::BF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Sum of v over the block (blockDim.x == kThreads, a power of two >= 32, 1-D block), valid in
// thread 0. The tree has a fixed shape, so the result depends only on the inputs per thread.
template <int kThreads>
__device__ double block_sum(double v) {
  static_assert(kThreads >= 32 && (kThreads & (kThreads - 1)) == 0, "kThreads: a power of two >= 32");
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

inline unsigned int blocks_for(int64_t work, int64_t per_block, int64_t cap = 65535) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > cap ? cap : b));
}

}  // namespace cuda
}  // namespace vqk
