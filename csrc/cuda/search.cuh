// Device-side building blocks of the fused nearest-code searches (CUDA, no ATen).
//
// A search block owns BM rows of x and walks the codebook in tiles of kTileK = 128 codes; each
// tile's dot products x . c are accumulated over D in chunks of BD columns staged in shared
// memory, so the N x K matrix never reaches global memory. Two "engines" compute a tile:
//   TcEngine<T, BM>  (float16 / bfloat16): tensor cores, mma.sync m16n8k16 with float32
//                    accumulators (products of halves are exact in float32);
//   FmaEngine<BM>    (float32): plain IEEE fmaf on CUDA cores (never TF32).
// Both use BM * 2 threads, and every thread owns kRows rows x kCols codes of the tile at known
// positions (row(i), col(j), with col increasing in j), so epilogues can work on registers.
// The threads sharing a row are kGroup consecutive lanes of one warp.
//
// Every metric is one affine form of the dot (as vqkernels/triton/nearest_code.py):
//   score[n, k] = add[k] - dot[n, k] * scale[k] (* rowscale[n] for cosine)
//   l2: add = ||c||^2, scale = 2;  ip: add = 0, scale = 1;  cosine: add = 1, scale = 1/max(||c||, eps)
// with add = +inf for codes holding a NaN and for the padding past K (code_terms_kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_util.cuh"

namespace vqk {
namespace cuda {

enum MetricId : int { kL2 = 0, kIP = 1, kCosine = 2 };

constexpr int kTileK = 128;         // codes per tile
constexpr float kNormEps = 1e-12f;  // as torch.nn.functional.normalize (reference.NORM_EPS)
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {  // fixed butterfly order: deterministic
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Lexicographic (score, index) minimum over the kGroup lanes that share a row; a lower index
// wins a tie, so the result is the first minimum whatever the lanes' order.
template <int kGroup>
__device__ __forceinline__ void group_argmin(float& best, int& idx) {
  for (int off = 1; off < kGroup; off <<= 1) {
    const float ob = __shfl_xor_sync(kFullMask, best, off);
    const int oi = __shfl_xor_sync(kFullMask, idx, off);
    if (ob < best || (ob == best && oi < idx)) {
      best = ob;
      idx = oi;
    }
  }
}

// Per-code terms of the affine score form, one warp per code, for kp >= k padded codes.
template <typename T>
__global__ void code_terms_kernel(const T* __restrict__ c, int64_t k, int64_t kp, int64_t d, int metric,
                                  float* __restrict__ add, float* __restrict__ scale) {
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (code >= kp) return;  // whole warps leave together
  float sq = 0.f;
  if (code < k)
    for (int64_t j = lane; j < d; j += 32) {
      const float v = to_float(c[code * d + j]);
      sq = fmaf(v, v, sq);
    }
  sq = warp_sum(sq);  // NaN iff the code holds a NaN (squares are never -inf)
  if (lane != 0) return;
  float a = metric == kL2 ? sq : (metric == kIP ? 0.f : 1.f);
  float s = metric == kL2 ? 2.f : (metric == kIP ? 1.f : 1.f / fmaxf(sqrtf(sq), kNormEps));
  if (code >= k || isnan(sq)) {
    a = __int_as_float(0x7f800000);  // +inf: never chosen
    s = 0.f;
  }
  add[code] = a;
  scale[code] = s;
}

// Loads a ROWS x BD chunk (rows [row0, row0 + ROWS) of a row-major [nrows, d] matrix, columns
// [d0, d0 + BD)) into registers as 16-byte vectors; out-of-range entries are zero (they add
// nothing to a dot). vec_ok: d is a multiple of the vector width and the base is 16-byte
// aligned, so a vector starting inside a row is whole and aligned.
template <typename T, int ROWS, int BD, int NT>
struct ChunkLoader {
  static constexpr int kVec = 16 / sizeof(T);             // elements per vector
  static constexpr int kPerRow = BD / kVec;               // vectors per chunk row
  static constexpr int kPerThread = ROWS * kPerRow / NT;  // vectors each thread moves
  static_assert(ROWS * kPerRow % NT == 0, "chunk must split evenly over the threads");
  uint4 v[kPerThread];

  __device__ __forceinline__ static int row_of(int i) { return (threadIdx.x + i * NT) / kPerRow; }
  __device__ __forceinline__ static int col_of(int i) { return (threadIdx.x + i * NT) % kPerRow * kVec; }

  __device__ __forceinline__ void fetch(const T* __restrict__ base, int64_t row0, int64_t nrows, int64_t d, int64_t d0,
                                        bool vec_ok) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t r = row0 + row_of(i), col = d0 + col_of(i);
      if (vec_ok && r < nrows && col < d) {
        v[i] = __ldg(reinterpret_cast<const uint4*>(base + r * d + col));
      } else {
        alignas(16) T e[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) e[j] = (r < nrows && col + j < d) ? base[r * d + col + j] : from_float<T>(0.f);
        v[i] = *reinterpret_cast<const uint4*>(e);
      }
    }
  }
  // Row-major store: dst[row][col], row stride ld elements (ld * sizeof(T) a multiple of 16).
  __device__ __forceinline__ void store_rows(T* dst, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) *reinterpret_cast<uint4*>(dst + row_of(i) * ld + col_of(i)) = v[i];
  }
  // Transposed store: dst[col][row], row stride ld elements.
  __device__ __forceinline__ void store_cols(T* dst, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) dst[(col_of(i) + j) * ld + row_of(i)] = e[j];
    }
  }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Tensor-core tile engine for float16 / bfloat16. BM / 16 warps; warp w owns rows
// [16w, 16w + 16) of the block and all 128 codes of the tile: 16 m16n8 accumulator fragments.
// In a fragment, lane = 4g + t holds rows g and g + 8, columns 2t and 2t + 1 (PTX ISA mma
// m16n8 layout), so thread (g, t) owns rows {16w + g, 16w + g + 8} and codes 8j + 2t + {0, 1}.
template <typename T, int BM>
struct TcEngine {
  static constexpr int kThreads = BM * 2;
  static constexpr int BD = 32;       // D chunk: two k16 steps
  static constexpr int kLd = BD + 8;  // padded smem row (80 bytes): ldmatrix rows hit distinct banks
  static constexpr int kRows = 2, kCols = 32, kGroup = 4;
  using XLoader = ChunkLoader<T, BM, BD, kThreads>;
  using CLoader = ChunkLoader<T, kTileK, BD, kThreads>;
  struct Smem {
    alignas(16) T xs[BM][kLd];
    alignas(16) T cs[kTileK][kLd];
  };

  float acc[16][4];

  __device__ __forceinline__ static int row(int i) {
    const int lane = threadIdx.x % 32;
    return (threadIdx.x / 32) * 16 + lane / 4 + 8 * i;
  }
  __device__ __forceinline__ static int col(int j) { return 8 * (j / 2) + 2 * (threadIdx.x % 4) + j % 2; }
  __device__ __forceinline__ float& at(int i, int j) { return acc[j / 2][j % 2 + 2 * i]; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < 16; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[f][e] = 0.f;
  }
  __device__ __forceinline__ static void store(Smem& s, bool with_x, const XLoader& xl, const CLoader& cl) {
    if (with_x) xl.store_rows(&s.xs[0][0], kLd);
    cl.store_rows(&s.cs[0][0], kLd);
  }
  __device__ __forceinline__ void mma(const Smem& s) {
    const int lane = threadIdx.x % 32;
    const int r0 = (threadIdx.x / 32) * 16;
#pragma unroll
    for (int k0 = 0; k0 < BD; k0 += 16) {
      // A fragment: ldmatrix matrices (rows +0/+8) x (cols +0/+8), lanes 8m..8m+7 address matrix m.
      unsigned a[4];
      ldmatrix_x4(a, &s.xs[r0 + lane % 8 + (lane / 8 % 2) * 8][k0 + (lane / 16) * 8]);
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        // B fragments of codes 16p..16p+7 and 16p+8..16p+15: matrices (codes +0/+8) x (cols +0/+8).
        unsigned b[4];
        ldmatrix_x4(b, &s.cs[16 * p + lane % 8 + (lane / 16) * 8][k0 + (lane / 8 % 2) * 8]);
        mma_16816<T>(acc[2 * p], a, b[0], b[1]);
        mma_16816<T>(acc[2 * p + 1], a, b[2], b[3]);
      }
    }
  }
};

// float32 tile engine: exact fmaf. Threads form a (BM / 8) x 16 grid; thread (ty, tx) owns
// rows ty*4 + {0..3} and BM/2 + ty*4 + {0..3}, codes tx*4 + {0..3} and 64 + tx*4 + {0..3}
// (an 8 x 8 register block). The 16 threads of a row are lanes 16h..16h+15 of one warp.
template <int BM>
struct FmaEngine {
  static constexpr int kThreads = BM * 2;
  static constexpr int BD = 16;
  static constexpr int kRows = 8, kCols = 8, kGroup = 16;
  using XLoader = ChunkLoader<float, BM, BD, kThreads>;
  using CLoader = ChunkLoader<float, kTileK, BD, kThreads>;
  struct Smem {  // transposed (k-major) so a thread reads its 4 rows / 4 codes as one float4
    alignas(16) float xs[BD][BM + 4];
    alignas(16) float cs[BD][kTileK + 4];
  };

  float acc[8][8];

  __device__ __forceinline__ static int row(int i) { return (threadIdx.x / 16) * 4 + i % 4 + (i / 4) * (BM / 2); }
  __device__ __forceinline__ static int col(int j) { return (threadIdx.x % 16) * 4 + j % 4 + (j / 4) * 64; }
  __device__ __forceinline__ float& at(int i, int j) { return acc[i][j]; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ static void store(Smem& s, bool with_x, const XLoader& xl, const CLoader& cl) {
    if (with_x) xl.store_cols(&s.xs[0][0], BM + 4);
    cl.store_cols(&s.cs[0][0], kTileK + 4);
  }
  __device__ __forceinline__ void mma(const Smem& s) {
    const int r4 = (threadIdx.x / 16) * 4, c4 = (threadIdx.x % 16) * 4;
#pragma unroll
    for (int kk = 0; kk < BD; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&s.xs[kk][r4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&s.xs[kk][BM / 2 + r4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&s.cs[kk][c4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&s.cs[kk][64 + c4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
};

template <typename T, int BM>
struct EngineFor {
  using type = TcEngine<T, BM>;
};
template <int BM>
struct EngineFor<float, BM> {
  using type = FmaEngine<BM>;
};

// The problem one search kernel sees: contiguous x [n, d] and codebook [k, d], per-code terms
// padded to a multiple of kTileK.
template <typename T>
struct SearchProblem {
  const T* x;
  const T* c;
  int64_t n, k, d;
  const float* add;
  const float* scale;
  bool vec_ok;  // both bases 16-byte aligned and d a multiple of the 16-byte vector
};

// Runs the tile loop of one block (rows [row0, row0 + BM)): for each codebook tile, the dot
// products accumulate over D chunks, then epilogue(engine, tile_start) consumes them. The next
// chunk's global loads are issued before the current chunk's math (register prefetch); x's
// chunk is staged once when D fits in one chunk.
template <typename E, typename T, typename Epilogue>
__device__ __forceinline__ void search_tiles(const SearchProblem<T>& p, int64_t row0, typename E::Smem& sm, E& eng,
                                             Epilogue&& epilogue) {
  const int64_t nchunk = p.d > 0 ? (p.d + E::BD - 1) / E::BD : 1;  // D = 0: one all-zero chunk
  const int64_t ntile = (p.k + kTileK - 1) / kTileK;
  const int64_t steps = nchunk * ntile;
  typename E::XLoader xl;
  typename E::CLoader cl;
  xl.fetch(p.x, row0, p.n, p.d, 0, p.vec_ok);
  cl.fetch(p.c, 0, p.k, p.d, 0, p.vec_ok);
  eng.zero();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t tile = s / nchunk, chunk = s % nchunk;
    E::store(sm, nchunk > 1 || s == 0, xl, cl);
    __syncthreads();
    if (s + 1 < steps) {
      const int64_t nt = (s + 1) / nchunk, nc = (s + 1) % nchunk;
      if (nchunk > 1) xl.fetch(p.x, row0, p.n, p.d, nc * E::BD, p.vec_ok);
      cl.fetch(p.c, nt * kTileK, p.k, p.d, nc * E::BD, p.vec_ok);
    }
    eng.mma(sm);
    if (chunk == nchunk - 1) {
      epilogue(eng, tile * kTileK);
      eng.zero();
    }
    __syncthreads();  // smem reads done before the next store
  }
}

// Row statistics of one row of x against one code, float32, by one warp: ||x||^2, ||x - c||^2
// and x . c (c may be null: only ||x||^2).
struct RowStats {
  float xx, sq, dot;
};
template <typename T>
__device__ __forceinline__ RowStats row_stats(const T* __restrict__ xr, const T* __restrict__ cr, int64_t d) {
  RowStats st{0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x % 32; j < d; j += 32) {
    const float xv = to_float(xr[j]);
    st.xx = fmaf(xv, xv, st.xx);
    if (cr) {
      const float cv = to_float(cr[j]);
      const float e = xv - cv;
      st.sq = fmaf(e, e, st.sq);
      st.dot = fmaf(xv, cv, st.dot);
    }
  }
  return {warp_sum(st.xx), warp_sum(st.sq), warp_sum(st.dot)};
}

__device__ __forceinline__ float inv_norm(float xx) { return 1.f / fmaxf(sqrtf(xx), kNormEps); }

}  // namespace cuda
}  // namespace vqk
