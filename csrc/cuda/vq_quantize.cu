// vq_quantize's CUDA kernels besides the search (the binding runs vqkernels_cuda::nearest_code
// first): the lookup + squared-error loss of the forward, and the backward's gradients. All
// elementwise over the n * d entries of x; the float32 arithmetic follows vqkernels/reference.py.
#include "cuda/vq_quantize.h"
#include "cuda/search.cuh"

namespace vqk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // entries per thread in the forward: one partial per 2048 entries
constexpr int64_t kBlockEntries = kThreads * kPerThread;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// The code row's value at column j, as float32; NaN for index -1 (or any index outside [0, k)).
template <typename TC>
__device__ __forceinline__ float code_value(const TC* c, int64_t code, int64_t k, int64_t d, int64_t j) {
  return code >= 0 && code < k ? to_float(c[code * d + j]) : quiet_nan();
}

// Block b handles entries [b * 2048, (b + 1) * 2048): a fixed split, so the partials (and the
// loss) do not depend on scheduling.
template <typename TX, typename TC>
__global__ void __launch_bounds__(kThreads)
    gather_loss_kernel(const TX* __restrict__ x, const TC* __restrict__ c, const int64_t* __restrict__ idx,
                       int64_t numel, int64_t k, int64_t d, TX* __restrict__ q, float* __restrict__ partials) {
  __shared__ float warp_sums[kThreads / 32];
  float sum = 0.f;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockEntries;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t e = base + i * kThreads + threadIdx.x;
    if (e < numel) {
      const int64_t r = e / d;
      const float cv = code_value(c, idx[r], k, d, e - r * d);
      q[e] = from_float<TX>(cv);  // codebook -> float32 -> x's type, as the reference
      const float diff = __fsub_rn(to_float(x[e]), cv);
      sum = __fadd_rn(sum, __fmul_rn(diff, diff));  // NaN rows make the loss NaN
    }
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partials[blockIdx.x] = total;
  }
}

// One block: the partials in a fixed order (strided per thread, then a fixed tree), in float64.
__global__ void __launch_bounds__(kThreads)
    loss_final_kernel(const float* __restrict__ partials, int64_t count, double inv_numel, float* commit_loss,
                      float* codebook_loss) {
  __shared__ double s[kThreads];
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) v += partials[i];
  s[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float loss = static_cast<float>(s[0] * inv_numel);
    *commit_loss = loss;
    *codebook_loss = loss;
  }
}

// grad_x (and, when grad_codebook is set, the atomic scatter of grad_codebook), grid-stride.
template <typename TG, typename TX, typename TC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const TG* __restrict__ g, const float* gcommit, const float* gcodebook, float scale,
                    const TX* __restrict__ x, const TC* __restrict__ c, const int64_t* __restrict__ idx, int64_t numel,
                    int64_t k, int64_t d, TX* __restrict__ gx, float* grad_codebook) {
  const float a = __fmul_rn(*gcommit, scale);     // grad_commit_loss * scale
  const float b = __fmul_rn(-*gcodebook, scale);  // -grad_codebook_loss * scale
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e / d, j = e - r * d;
    const int64_t code = idx[r];
    const float diff = __fsub_rn(to_float(x[e]), code_value(c, code, k, d, j));
    gx[e] = from_float<TX>(__fadd_rn(to_float(g[e]), __fmul_rn(a, diff)));
    if (grad_codebook && code >= 0 && code < k) atomicAdd(grad_codebook + code * d + j, __fmul_rn(b, diff));
  }
}

// Block (code, y) owns columns y * 256 + t (strided): each sums its code's rows in row order.
template <typename TX, typename TC>
__global__ void __launch_bounds__(kThreads)
    codebook_grad_sorted_kernel(const float* gcodebook, float scale, const TX* __restrict__ x, const TC* __restrict__ c,
                                const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets, int64_t d,
                                float* __restrict__ grad_codebook) {
  const int64_t code = blockIdx.x;
  const float b = __fmul_rn(-*gcodebook, scale);
  const int64_t first = offsets[code], last = offsets[code + 1];
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.y) * kThreads) {
    const float cv = to_float(c[code * d + j]);
    float acc = 0.f;
    for (int64_t t = first; t < last; ++t)
      acc = __fadd_rn(acc, __fmul_rn(b, __fsub_rn(to_float(x[perm[t] * d + j]), cv)));
    grad_codebook[code * d + j] = acc;
  }
}

// Calls f(T{}) with T the element type of t.
template <typename F>
cudaError_t with_type(ElemType t, F&& f) {
  switch (t) {
    case ElemType::F16:
      return f(__half{});
    case ElemType::BF16:
      return f(__nv_bfloat16{});
    default:
      return f(float{});
  }
}

unsigned elementwise_blocks(int64_t numel) {  // grid-stride kernels: at most 64K blocks
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

float loss_scale(int64_t numel) { return static_cast<float>(2.0 / static_cast<double>(numel > 1 ? numel : 1)); }

}  // namespace

int64_t vq_partial_count(int64_t numel) { return (numel + kBlockEntries - 1) / kBlockEntries; }

cudaError_t vq_gather_loss(ElemType x_type, ElemType code_type, const void* x, const void* codebook,
                           const int64_t* indices, int64_t n, int64_t k, int64_t d, void* quantized, float* partials,
                           float* commit_loss, float* codebook_loss, cudaStream_t stream) {
  const int64_t numel = n * d, count = vq_partial_count(numel);
  if (numel == 0) return cudaSuccess;
  const cudaError_t err = with_type(x_type, [&](auto tx) {
    using TX = decltype(tx);
    return with_type(code_type, [&](auto tc) {
      using TC = decltype(tc);
      gather_loss_kernel<TX, TC><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(
          static_cast<const TX*>(x), static_cast<const TC*>(codebook), indices, numel, k, d,
          static_cast<TX*>(quantized), partials);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  loss_final_kernel<<<1, kThreads, 0, stream>>>(partials, count, 1.0 / static_cast<double>(numel), commit_loss,
                                                codebook_loss);
  return cudaGetLastError();
}

cudaError_t vq_backward(ElemType grad_type, ElemType x_type, ElemType code_type, const void* grad_quantized,
                        const float* grad_commit_loss, const float* grad_codebook_loss, const void* x,
                        const void* codebook, const int64_t* indices, int64_t n, int64_t k, int64_t d, void* grad_x,
                        float* grad_codebook, bool atomic_codebook, cudaStream_t stream) {
  const int64_t numel = n * d;
  if (numel == 0) return cudaSuccess;
  return with_type(x_type, [&](auto tx) {
    using TX = decltype(tx);
    return with_type(code_type, [&](auto tc) {
      using TC = decltype(tc);
      auto launch = [&](auto tg) {
        using TG = decltype(tg);
        backward_kernel<TG, TX, TC><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
            static_cast<const TG*>(grad_quantized), grad_commit_loss, grad_codebook_loss, loss_scale(numel),
            static_cast<const TX*>(x), static_cast<const TC*>(codebook), indices, numel, k, d, static_cast<TX*>(grad_x),
            atomic_codebook ? grad_codebook : nullptr);
        return cudaGetLastError();
      };
      return grad_type == ElemType::F32 ? launch(float{}) : launch(TX{});
    });
  });
}

cudaError_t vq_codebook_grad_sorted(ElemType x_type, ElemType code_type, const float* grad_codebook_loss, const void* x,
                                    const void* codebook, const int64_t* perm, const int64_t* offsets, int64_t n,
                                    int64_t k, int64_t d, float* grad_codebook, cudaStream_t stream) {
  if (k == 0 || d == 0) return cudaSuccess;
  const int64_t col_blocks = (d + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(k), static_cast<unsigned>(col_blocks < 65535 ? col_blocks : 65535));
  return with_type(x_type, [&](auto tx) {
    using TX = decltype(tx);
    return with_type(code_type, [&](auto tc) {
      using TC = decltype(tc);
      codebook_grad_sorted_kernel<TX, TC>
          <<<grid, kThreads, 0, stream>>>(grad_codebook_loss, loss_scale(n * d), static_cast<const TX*>(x),
                                          static_cast<const TC*>(codebook), perm, offsets, d, grad_codebook);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace vqk
