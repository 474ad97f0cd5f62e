// The nearest_code and nearest_code_topk kernels and their launcher, templated on the element
// type; nearest_code_{f32,f16,bf16}.cu each instantiate one type (parallel compilation).
#pragma once

#include "cuda/nearest_code.h"
#include "cuda/search.cuh"

namespace vqk {
namespace cuda {

constexpr float kInf = __builtin_huge_valf();

// Nearest code of BM = 128 rows per block. The running (min score, argmin) of each of a thread's
// rows stays in registers; codes arrive in increasing index order per thread and replace the
// best only on a strict '<', so each thread holds the first minimum of its codes, and the
// lexicographic group_argmin then gives the row's first minimum: ties -> lowest index. NaN
// scores never pass '<'; codes with add = +inf (NaN codes, padding) score +inf or NaN and are
// never chosen. A row with no finite score keeps index 0 and distance +inf, as the reference's
// min over an all-+inf row. Epilogue: one warp per row recomputes the chosen code's distance in
// float32 from x and the code, and maps a NaN row (or a chosen NaN code) to index -1, NaN.
// Blocks per SM the nearest kernel is tuned for: the tensor-core engine fits two in 128
// registers per thread; the float32 engine's 8 x 8 register block needs more (no spills at one).
template <typename T>
constexpr int kNearestMinBlocks = 2;
template <>
constexpr int kNearestMinBlocks<float> = 1;

template <typename T, int METRIC>
__global__ void __launch_bounds__(256, kNearestMinBlocks<T>)
    nearest_kernel(SearchProblem<T> p, int64_t* __restrict__ indices, float* __restrict__ distances) {
  constexpr int BM = 128;
  using E = typename EngineFor<T, BM>::type;
  constexpr int NT = E::kThreads;
  __shared__ typename E::Smem sm;
  __shared__ float rowscale[BM];  // cosine: 1 / max(||x||, eps)
  __shared__ float best_score[BM];
  __shared__ int best_idx[BM];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int lane = threadIdx.x % 32;

  float rs[E::kRows];
  if constexpr (METRIC == kCosine) {
    for (int r = threadIdx.x / 32; r < BM; r += NT / 32) {
      const int64_t row = row0 + r;
      const float xx = row < p.n ? row_stats<T>(p.x + row * p.d, nullptr, p.d).xx : 0.f;
      if (lane == 0) rowscale[r] = inv_norm(xx);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < E::kRows; ++i) rs[i] = rowscale[E::row(i)];
  }

  E eng;
  float best[E::kRows];
  int bidx[E::kRows];
#pragma unroll
  for (int i = 0; i < E::kRows; ++i) {
    best[i] = kInf;
    bidx[i] = 0;
  }
  search_tiles<E>(p, row0, sm, eng, [&](E& e, int64_t k0) {
#pragma unroll
    for (int j = 0; j < E::kCols; ++j) {
      const int64_t code = k0 + E::col(j);  // < padded_codes(k): add / scale are padded
      const float add = __ldg(p.add + code);
      const float sc = METRIC == kL2 ? 2.f : (METRIC == kIP ? 1.f : __ldg(p.scale + code));
#pragma unroll
      for (int i = 0; i < E::kRows; ++i) {
        const float score = fmaf(-e.at(i, j), METRIC == kCosine ? sc * rs[i] : sc, add);
        if (score < best[i]) {
          best[i] = score;
          bidx[i] = static_cast<int>(code);
        }
      }
    }
  });

#pragma unroll
  for (int i = 0; i < E::kRows; ++i) {
    group_argmin<E::kGroup>(best[i], bidx[i]);
    if (threadIdx.x % E::kGroup == 0) {  // one writer per row
      best_score[E::row(i)] = best[i];
      best_idx[E::row(i)] = bidx[i];
    }
  }
  __syncthreads();

  for (int r = threadIdx.x / 32; r < BM; r += NT / 32) {
    const int64_t row = row0 + r;
    if (row >= p.n) break;  // warp-uniform
    const int k = best_idx[r];
    const RowStats st = row_stats<T>(p.x + row * p.d, p.c + static_cast<int64_t>(k) * p.d, p.d);
    if (lane == 0) {
      const float add = p.add[k];
      float dist;
      if constexpr (METRIC == kL2)
        dist = st.sq;
      else if constexpr (METRIC == kIP)
        dist = -st.dot;
      else
        dist = add - st.dot * p.scale[k] * rowscale[r];
      if (best_score[r] == kInf) dist = kInf;            // no finite score: as the reference
      const bool invalid = isnan(st.xx) || add == kInf;  // NaN row, or only NaN codes to choose from
      indices[row] = invalid ? -1 : k;
      distances[row] = invalid ? __int_as_float(0x7fc00000) : dist;
    }
  }
}

// The topk nearest codes of BM = 64 rows per block, sorted. Each tile's scores go to shared
// memory; then warp w keeps, for each of its 16 rows, a sorted list of (score, index) across its
// lanes (lane j holds the j-th best). A tile's codes are offered in increasing index order and
// enter only when the list is short or they beat the k-th best strictly, inserted after every
// entry <= them: equal scores stay in index order (the reference's stable sort). NaN scores
// count as +inf (they still fill a short list, by index, as in the reference).
template <typename T, int METRIC>
__global__ void __launch_bounds__(128)
    topk_kernel(SearchProblem<T> p, int topk, int64_t* __restrict__ indices, float* __restrict__ distances) {
  constexpr int BM = 64;
  using E = typename EngineFor<T, BM>::type;
  constexpr int NT = E::kThreads;
  constexpr int kRowsPerWarp = BM / (NT / 32);
  __shared__ typename E::Smem sm;
  __shared__ float xx[BM];                  // ||x||^2 per row
  __shared__ float scores[BM][kTileK + 1];  // one tile's scores (+1: spread the banks)
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int r = warp; r < BM; r += NT / 32) {
    const int64_t row = row0 + r;
    const float v = row < p.n ? row_stats<T>(p.x + row * p.d, nullptr, p.d).xx : 0.f;
    if (lane == 0) xx[r] = v;
  }
  __syncthreads();
  float rs[E::kRows];
#pragma unroll
  for (int i = 0; i < E::kRows; ++i) rs[i] = METRIC == kCosine ? inv_norm(xx[E::row(i)]) : 1.f;

  float lv[kRowsPerWarp];  // lane j: the row's j-th best score ...
  int li[kRowsPerWarp];    // ... and its code
  int cnt[kRowsPerWarp];   // list length (warp-uniform), at most topk
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    lv[r] = kInf;
    li[r] = -1;
    cnt[r] = 0;
  }

  E eng;
  search_tiles<E>(p, row0, sm, eng, [&](E& e, int64_t k0) {
#pragma unroll
    for (int j = 0; j < E::kCols; ++j) {
      const int64_t code = k0 + E::col(j);
      const float add = __ldg(p.add + code);
      const float sc = METRIC == kL2 ? 2.f : (METRIC == kIP ? 1.f : __ldg(p.scale + code));
#pragma unroll
      for (int i = 0; i < E::kRows; ++i) {
        const float s = fmaf(-e.at(i, j), sc * rs[i], add);
        scores[E::row(i)][E::col(j)] = isnan(s) ? kInf : s;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float* srow = scores[warp * kRowsPerWarp + r];
      float thr = __shfl_sync(kFullMask, lv[r], topk - 1);
#pragma unroll 1
      for (int q = 0; q < kTileK / 32; ++q) {
        const int col = 32 * q + lane;
        const float v = srow[col];
        const bool cand = k0 + col < p.k && (cnt[r] < topk || v < thr);
        for (unsigned m = __ballot_sync(kFullMask, cand); m; m &= m - 1) {
          const int src = __ffs(m) - 1;  // lowest column first
          const float cv = __shfl_sync(kFullMask, v, src);
          if (cnt[r] == topk && !(cv < thr)) continue;  // an earlier insertion raised the bar
          const int pos = __popc(__ballot_sync(kFullMask, lane < cnt[r] && lv[r] <= cv));
          const float up_v = __shfl_up_sync(kFullMask, lv[r], 1);
          const int up_i = __shfl_up_sync(kFullMask, li[r], 1);
          if (lane > pos) {
            lv[r] = up_v;
            li[r] = up_i;
          }
          if (lane == pos) {
            lv[r] = cv;
            li[r] = static_cast<int>(k0) + 32 * q + src;
          }
          cnt[r] = min(cnt[r] + 1, topk);
          thr = __shfl_sync(kFullMask, lv[r], topk - 1);
        }
      }
    }
  });

  // Output: lane j < topk writes the row's j-th entry. Unusable codes (NaN codes) -> -1, +inf;
  // a NaN row -> -1, NaN everywhere. l2 adds ||x||^2 back (clamped at 0, as the reference).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int local = warp * kRowsPerWarp + r;
    const int64_t row = row0 + local;
    if (row >= p.n || lane >= topk) continue;
    const int code = li[r];
    const bool unusable = code < 0 || p.add[code] == kInf;
    float dist = METRIC == kL2 ? fmaxf(lv[r] + xx[local], 0.f) : lv[r];
    if (unusable) dist = kInf;
    const bool nan_row = isnan(xx[local]);
    indices[row * topk + lane] = nan_row || unusable ? -1 : code;
    distances[row * topk + lane] = nan_row ? __int_as_float(0x7fc00000) : dist;
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int METRIC>
void launch_metric(const SearchProblem<T>& p, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream) {
  if (topk == 0)
    nearest_kernel<T, METRIC><<<static_cast<unsigned>((p.n + 127) / 128), 256, 0, stream>>>(p, indices, distances);
  else
    topk_kernel<T, METRIC>
        <<<static_cast<unsigned>((p.n + 63) / 64), 128, 0, stream>>>(p, static_cast<int>(topk), indices, distances);
}

template <typename T>
cudaError_t launch_search(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(a.x);
  const T* c = static_cast<const T*>(a.codebook);
  const bool vec_ok = a.d % (16 / sizeof(T)) == 0 && aligned16(x) && aligned16(c);
  const SearchProblem<T> p{x, c, a.n, a.k, a.d, a.add, a.scale, vec_ok};
  switch (a.metric) {
    case kL2:
      launch_metric<T, kL2>(p, topk, indices, distances, stream);
      break;
    case kIP:
      launch_metric<T, kIP>(p, topk, indices, distances, stream);
      break;
    default:
      launch_metric<T, kCosine>(p, topk, indices, distances, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vqk
