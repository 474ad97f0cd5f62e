// CUDA kernels of residual_quantize (greedy levels) and its backward. Each level's
// arithmetic is reference.residual_quantize's in float32: r_{l+1} = r_l - q_l, quantized =
// ((0 + q_0) + q_1) + ..., the loss |r_l - q_l|^2 from float64 differences, reduced per
// block of rows and then over the blocks in order (deterministic).
#include "cuda/device_util.cuh"
#include "cuda/residual_quantize.h"

namespace vqk {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 8;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kLossThreads = 256;

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// Block b owns rows [b * kRowsPerBlock, +kRowsPerBlock): warp w its rows w, w + kWarps, ...;
// lanes stride over D. The block's loss partial is summed lane -> warp (shuffle tree) ->
// rows of the warp in order -> warps in order: fixed for a given n.
template <typename C, typename Q>
__global__ void __launch_bounds__(kWarps * 32)
    level_forward_kernel(float* __restrict__ res, float* __restrict__ qsum, int64_t n, int64_t D,
                         const C* __restrict__ cb, int64_t cb0, int64_t cb1, int64_t K, const int64_t* __restrict__ idx,
                         int64_t* __restrict__ indices, int64_t L, int64_t level, double* __restrict__ partial,
                         Q* __restrict__ quantized) {
  __shared__ double warp_loss[kWarps];
  const int lane = threadIdx.x, warp = threadIdx.y;
  double warp_sum = 0;
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + i * kWarps + warp;
    if (r >= n) break;
    const int64_t k = idx[r];
    const bool valid = k >= 0 && k < K;
    if (lane == 0) indices[r * L + level] = k;
    double row = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const float c = valid ? to_float(cb[k * cb0 + d * cb1]) : nan_f();
      float& rv = res[r * D + d];
      const double e = static_cast<double>(rv) - static_cast<double>(c);
      row += e * e;
      rv = rv - c;
      float& qv = qsum[r * D + d];
      qv = qv + c;
      if (quantized) quantized[r * D + d] = from_float<Q>(qv);
    }
    for (int off = 16; off > 0; off >>= 1) row += __shfl_down_sync(0xffffffffu, row, off);
    warp_sum += row;  // lane 0's value is the row's sum
  }
  if (lane == 0) warp_loss[warp] = warp_sum;
  __syncthreads();
  if (lane == 0 && warp == 0) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_loss[w];
    partial[blockIdx.x] = s;
  }
}

// One block per level: the partials in order (thread-strided, then the fixed tree).
__global__ void __launch_bounds__(kLossThreads)
    losses_kernel(const double* __restrict__ partial, int64_t blocks, double count, float* __restrict__ commit,
                  float* __restrict__ codebook) {
  double s = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kLossThreads) s += partial[blockIdx.x * blocks + b];
  const double total = block_sum<kLossThreads>(s);
  if (threadIdx.x == 0) commit[blockIdx.x] = codebook[blockIdx.x] = static_cast<float>(total / count);
}

template <typename C>
__global__ void level_backward_kernel(float* __restrict__ res, float* __restrict__ grad_x, int64_t n, int64_t D,
                                      const C* __restrict__ cb, int64_t cb0, int64_t cb1, int64_t K,
                                      const int64_t* __restrict__ idx, const float* __restrict__ commit_coef) {
  const float a = *commit_coef;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * D; i += step) {
    const int64_t r = i / D, d = i % D, k = idx[r];
    const float c = k >= 0 && k < K ? to_float(cb[k * cb0 + d * cb1]) : nan_f();
    const float v = res[i] - c;  // r_{l+1}
    res[i] = v;
    grad_x[i] = grad_x[i] + a * v;
  }
}

}  // namespace

int64_t rq_loss_blocks(int64_t n) { return (n + kRowsPerBlock - 1) / kRowsPerBlock; }

cudaError_t rq_level_forward(float* res, float* qsum, int64_t n, int64_t D, const void* cb, ElemType ct, int64_t cb0,
                             int64_t cb1, int64_t K, const int64_t* idx, int64_t* indices, int64_t L, int64_t level,
                             double* partial, void* quantized, ElemType qt, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = rq_loss_blocks(n);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_elem(ct, [&](auto ctag) {
    using C = decltype(ctag);
    return dispatch_elem(qt, [&](auto qtag) {
      using Q = decltype(qtag);
      level_forward_kernel<C, Q><<<static_cast<unsigned int>(blocks), dim3(32, kWarps), 0, stream>>>(
          res, qsum, n, D, static_cast<const C*>(cb), cb0, cb1, K, idx, indices, L, level, partial,
          static_cast<Q*>(quantized));
      return cudaGetLastError();
    });
  });
}

cudaError_t rq_losses(const double* partial, int64_t L, int64_t blocks, double count, float* commit, float* codebook,
                      cudaStream_t stream) {
  if (L == 0) return cudaSuccess;
  losses_kernel<<<static_cast<unsigned int>(L), kLossThreads, 0, stream>>>(partial, blocks, count, commit, codebook);
  return cudaGetLastError();
}

cudaError_t rq_level_backward(float* res, float* grad_x, int64_t n, int64_t D, const void* cb, ElemType ct, int64_t cb0,
                              int64_t cb1, int64_t K, const int64_t* idx, const float* commit_coef,
                              cudaStream_t stream) {
  if (n * D == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  return dispatch_elem(ct, [&](auto tag) {
    using C = decltype(tag);
    level_backward_kernel<C><<<blocks_for(n * D, kThreads, 1 << 20), kThreads, 0, stream>>>(
        res, grad_x, n, D, static_cast<const C*>(cb), cb0, cb1, K, idx, commit_coef);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vqk
