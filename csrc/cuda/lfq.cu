// CUDA kernels of lfq_entropy and its backward around the binding's GEMMs (see
// csrc/cpu/lfq.cpp for the factorisation). Each row is one block: its bit probabilities are
// computed once into shared memory, then the threads walk the row's 2**(d/2) patterns.
// Every sum has a fixed order (thread-strided, then fixed shuffle / shared-memory trees).
// Row weights (optional, float32 [n]): A's row r is scaled by w[r] and the divisor n becomes
// *total = sum(w) (1 where that is 0), read on the device; a row of weight 0 is skipped (zeros in
// A and B, gradient 0). The row loops branch per row, uniformly across a block, so no barrier is
// ever skipped by part of a block.
#include "cuda/device_util.cuh"
#include "cuda/lfq.h"

namespace vqk {
namespace cuda {
namespace {

constexpr int kMaxBits = 30;                       // lfq_entropy's d limit (csrc/checks.h kLfqEntropyMaxBits)
constexpr int kMaxHalf = kMaxBits - kMaxBits / 2;  // at most 15 bits per half
constexpr int kRowThreads = 128;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kSumThreads = 256;
constexpr int64_t kSumChunk = int64_t(kSumThreads) * 16;  // entries per partial sum
constexpr int kMaxSumBlocks = 1024;
constexpr float kProbEps = 1e-5f;  // vector-quantize-pytorch's clamp inside the log (reference.LFQ_PROB_EPS)

__device__ __forceinline__ float sigmoid(float l) { return 1.0f / (1.0f + expf(-l)); }

// max(v, eps) propagating NaN, as torch's clamp_min.
__device__ __forceinline__ float clamp_eps(float v) { return v < kProbEps ? kProbEps : v; }

// Entropy of sigmoid(l) without cancellation: softplus(-|l|) + |l| sigmoid(-|l|), 0 at |l| = inf.
__device__ __forceinline__ float binary_entropy(float l) {
  const float a = fabsf(l);
  return log1pf(expf(-a)) + (isinf(a) ? 0.0f : a * sigmoid(-a));
}

// Pattern a of k bits: the product of its bits' probabilities, top bit first (1 * p exact).
__device__ __forceinline__ float pattern_prob(const float* p0, const float* p1, int k, int64_t a) {
  float v = 1.0f;
  for (int j = 0; j < k; ++j) v *= (a >> (k - 1 - j)) & 1 ? p1[j] : p0[j];
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    factors_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t n, int d, float scale,
                   const float* __restrict__ w, float* __restrict__ A, float* __restrict__ B,
                   float* __restrict__ row_entropy) {
  __shared__ float p0[kMaxBits], p1[kMaxBits], lg[kMaxBits];
  const int da = d / 2, db = d - da;
  const int64_t ka = int64_t(1) << da, kb = int64_t(1) << db;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const float wr = w ? w[r] : 1.0f;
    if (wr == 0.0f) {
      for (int64_t a = threadIdx.x; a < ka; a += kRowThreads) A[r * ka + a] = 0.0f;
      for (int64_t b = threadIdx.x; b < kb; b += kRowThreads) B[r * kb + b] = 0.0f;
      if (row_entropy && threadIdx.x == 0) row_entropy[r] = 0.0f;
      continue;
    }
    if (threadIdx.x < d) {
      const float l = to_float(x[r * s0 + threadIdx.x * s1]) * scale;
      lg[threadIdx.x] = l;
      p1[threadIdx.x] = sigmoid(l);
      p0[threadIdx.x] = sigmoid(-l);
    }
    __syncthreads();
    if (row_entropy && threadIdx.x == 0) {
      float h = 0.0f;
      for (int j = 0; j < d; ++j) h += binary_entropy(lg[j]);
      row_entropy[r] = wr * h;
    }
    for (int64_t a = threadIdx.x; a < ka; a += kRowThreads) A[r * ka + a] = wr * pattern_prob(p0, p1, da, a);
    for (int64_t b = threadIdx.x; b < kb; b += kRowThreads) B[r * kb + b] = pattern_prob(p0 + da, p1 + da, db, b);
    __syncthreads();  // the next row overwrites the shared probabilities
  }
}

// partial[b] = sum of term(v[i]) over block b's chunk [b * chunk, (b + 1) * chunk).
template <bool kXLogX>
__global__ void __launch_bounds__(kSumThreads)
    partial_sum_kernel(const float* __restrict__ v, int64_t count, int64_t chunk, double* __restrict__ partial) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = start + chunk < count ? start + chunk : count;
  double s = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += kSumThreads) {
    const double t = static_cast<double>(v[i]);
    s += kXLogX ? t * log(static_cast<double>(clamp_eps(v[i]))) : t;
  }
  const double total = block_sum<kSumThreads>(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// *total = float(sum(partial[0, nb))), 1 where that is 0: the divisor of the weighted sums.
__global__ void __launch_bounds__(kSumThreads)
    weight_total_kernel(const double* __restrict__ partial, int nb, float* __restrict__ total) {
  double s = 0;
  for (int i = threadIdx.x; i < nb; i += kSumThreads) s += partial[i];
  const double sum = block_sum<kSumThreads>(s);
  if (threadIdx.x == 0) {
    const float t = static_cast<float>(sum);
    *total = t == 0.0f ? 1.0f : t;
  }
}

// Block 0: per_sample = sum(partial[0, nb0)) / (total ? *total : n); block 1: codebook =
// -sum(partial[kMaxSumBlocks, + nb1)).
__global__ void __launch_bounds__(kSumThreads)
    final_sums_kernel(const double* __restrict__ partial, int nb0, int nb1, const float* __restrict__ total, double n,
                      float* __restrict__ per_sample, float* __restrict__ codebook) {
  const bool first = blockIdx.x == 0;
  const double* p = partial + (first ? 0 : kMaxSumBlocks);
  const int count = first ? nb0 : nb1;
  double s = 0;
  for (int i = threadIdx.x; i < count; i += kSumThreads) s += p[i];
  const double sum = block_sum<kSumThreads>(s);
  if (threadIdx.x == 0) {
    if (first)
      *per_sample = static_cast<float>(sum / (total ? static_cast<double>(*total) : n));
    else
      *codebook = static_cast<float>(-sum);
  }
}

__global__ void grad_avg_kernel(const float* __restrict__ avg, const float* __restrict__ gavg,
                                const float* __restrict__ gcb, int64_t k, const float* __restrict__ total, float n,
                                float* __restrict__ g) {
  const float c = *gcb, div = total ? *total : n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < k; i += step) {
    const float v = avg[i];
    const float dv = -(logf(clamp_eps(v)) + (v >= kProbEps ? 1.0f : 0.0f));
    g[i] = (c * dv + gavg[i]) / div;
  }
}

// s1[j] / s0[j] (j < k, shared memory) of one row: sums of w = g * probs over the patterns with
// bit j (top bit first) set / clear. Per thread in pattern order, then shuffle and warp trees.
__device__ void bit_sums(const float* __restrict__ g, const float* __restrict__ probs, int k, float* s1, float* s0,
                         float (*warp_part)[2 * kMaxHalf]) {
  float t1[kMaxHalf], t0[kMaxHalf];
#pragma unroll
  for (int j = 0; j < kMaxHalf; ++j) t1[j] = t0[j] = 0.0f;
  for (int64_t a = threadIdx.x; a < (int64_t(1) << k); a += kRowThreads) {
    const float w = g[a] * probs[a];
#pragma unroll
    for (int j = 0; j < kMaxHalf; ++j) {
      const bool set = j < k && ((a >> (k - 1 - j)) & 1);
      const bool clear = j < k && !((a >> (k - 1 - j)) & 1);
      t1[j] += set ? w : 0.0f;  // + 0: the same sums, kept in registers
      t0[j] += clear ? w : 0.0f;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kMaxHalf; ++j) {
    float u1 = t1[j], u0 = t0[j];
    for (int off = 16; off > 0; off >>= 1) {
      u1 += __shfl_down_sync(0xffffffffu, u1, off);
      u0 += __shfl_down_sync(0xffffffffu, u0, off);
    }
    if (lane == 0) {
      warp_part[warp][j] = u1;
      warp_part[warp][kMaxHalf + j] = u0;
    }
  }
  __syncthreads();
  if (threadIdx.x < k) {
    float u1 = 0.0f, u0 = 0.0f;
    for (int w = 0; w < kRowWarps; ++w) {
      u1 += warp_part[w][threadIdx.x];
      u0 += warp_part[w][kMaxHalf + threadIdx.x];
    }
    s1[threadIdx.x] = u1;
    s0[threadIdx.x] = u0;
  }
  __syncthreads();  // warp_part is reused by the next call
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    backward_rows_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t n, int d, float scale,
                         const float* __restrict__ w, const float* __restrict__ total, const float* __restrict__ A,
                         const float* __restrict__ gA, const float* __restrict__ B, const float* __restrict__ gB,
                         const float* __restrict__ gps, T* __restrict__ grad) {
  __shared__ float sum1[kMaxBits], sum0[kMaxBits];
  __shared__ float warp_part[kRowWarps][2 * kMaxHalf];
  const int da = d / 2, db = d - da;
  const int64_t ka = int64_t(1) << da, kb = int64_t(1) << db;
  // as the reference: grad_per_sample.to(float32) / n (or / total)
  const float gl = *gps / (total ? *total : static_cast<float>(n));
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const float wr = w ? w[r] : 1.0f;
    if (wr == 0.0f) {
      if (threadIdx.x < d) grad[r * d + threadIdx.x] = from_float<T>(0.0f);
      continue;
    }
    bit_sums(gA + r * ka, A + r * ka, da, sum1, sum0, warp_part);
    bit_sums(gB + r * kb, B + r * kb, db, sum1 + da, sum0 + da, warp_part);
    if (threadIdx.x < d) {
      const int j = threadIdx.x;
      const float l = to_float(x[r * s0 + j * s1]) * scale;
      const float p1 = sigmoid(l), p0 = sigmoid(-l);
      const float dh = isinf(l) ? 0.0f : -l * p1 * p0;               // d H(sigmoid(l)) / dl
      const float g = (p0 * sum1[j] - p1 * sum0[j]) + gl * wr * dh;  // the sums carry wr through A
      grad[r * d + j] = from_float<T>(g * scale);
    }
    // bit_sums ends with a barrier, so the next row's sums cannot overtake these reads
  }
}

unsigned int row_grid(int64_t n) { return static_cast<unsigned int>(n < 65535 ? n : 65535); }

// A fixed number of blocks for a given count: at most kMaxSumBlocks chunks of >= kSumChunk entries.
int64_t chunk_of(int64_t count) {
  const int64_t c = (count + kMaxSumBlocks - 1) / kMaxSumBlocks;
  return c < kSumChunk ? kSumChunk : c;
}

}  // namespace

cudaError_t lfq_factors(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                        const float* w, float* a, float* b, float* row_entropy, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (d < 1 || d > kMaxBits) return cudaErrorInvalidValue;
  return dispatch_elem(xt, [&](auto tag) {
    using T = decltype(tag);
    factors_kernel<T><<<row_grid(n), kRowThreads, 0, stream>>>(static_cast<const T*>(x), s0, s1, n, static_cast<int>(d),
                                                               scale, w, a, b, row_entropy);
    return cudaGetLastError();
  });
}

int64_t lfq_sums_scratch() { return 2 * kMaxSumBlocks; }

cudaError_t lfq_weight_total(const float* w, int64_t n, double* scratch, float* total, cudaStream_t stream) {
  const int64_t c = chunk_of(n);
  const int nb = static_cast<int>((n + c - 1) / c);
  if (nb > 0) partial_sum_kernel<false><<<nb, kSumThreads, 0, stream>>>(w, n, c, scratch);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  weight_total_kernel<<<1, kSumThreads, 0, stream>>>(scratch, nb, total);
  return cudaGetLastError();
}

cudaError_t lfq_entropy_sums(const float* row_entropy, int64_t n, const float* avg, int64_t k, const float* total,
                             double* scratch, float* per_sample, float* codebook, cudaStream_t stream) {
  const int64_t c0 = chunk_of(n), c1 = chunk_of(k);
  const int nb0 = static_cast<int>((n + c0 - 1) / c0), nb1 = static_cast<int>((k + c1 - 1) / c1);
  if (nb0 > 0) partial_sum_kernel<false><<<nb0, kSumThreads, 0, stream>>>(row_entropy, n, c0, scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (nb1 > 0) partial_sum_kernel<true><<<nb1, kSumThreads, 0, stream>>>(avg, k, c1, scratch + kMaxSumBlocks);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  final_sums_kernel<<<2, kSumThreads, 0, stream>>>(scratch, nb0, nb1, total, static_cast<double>(n), per_sample,
                                                   codebook);
  return cudaGetLastError();
}

cudaError_t lfq_grad_avg(const float* avg, const float* gavg, const float* gcb, int64_t k, const float* total,
                         int64_t n, float* g, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  grad_avg_kernel<<<blocks_for(k, kThreads, 1 << 20), kThreads, 0, stream>>>(avg, gavg, gcb, k, total,
                                                                             static_cast<float>(n), g);
  return cudaGetLastError();
}

cudaError_t lfq_backward_rows(const void* x, ElemType xt, int64_t s0, int64_t s1, int64_t n, int64_t d, float scale,
                              const float* w, const float* total, const float* a, const float* ga, const float* b,
                              const float* gb, const float* gps, void* grad, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (d < 1 || d > kMaxBits) return cudaErrorInvalidValue;
  return dispatch_elem(xt, [&](auto tag) {
    using T = decltype(tag);
    backward_rows_kernel<T><<<row_grid(n), kRowThreads, 0, stream>>>(static_cast<const T*>(x), s0, s1, n,
                                                                     static_cast<int>(d), scale, w, total, a, ga, b, gb,
                                                                     gps, static_cast<T*>(grad));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace vqk
