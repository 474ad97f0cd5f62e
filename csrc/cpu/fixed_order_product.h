// A matrix product whose every entry is summed in one fixed order: C[i][j] += sum_r A(r, i) B(r, j), over r in
// increasing order onto C's old value, whatever the tiling, the parallel tasks or the thread count.
//
// The CPU kernels promise the same bits for any thread count, and a BLAS does not: MKL splits the sum over r by its
// thread count on Intel Xeons, even inside an at::parallel_for task (seen with 1000 and more terms; lfq_entropy's
// batch average and gumbel_quantize's soft lookup and gradients changed bits between 1 and 2 threads), so the
// kernels that need a product with a long sum call this one.
//
// Operands are strided views: A(r, i) = a[r * a.rs + i * a.cs], B(r, j) = b[r * b.rs + j * b.cs], so A^T B, A B
// and A B^T are all this one product. An output tile of kTileRows rows (i) x Q vectors (j) is accumulated in
// registers over a block of kProductRows terms, in order, and the blocks run in order; a tile's rows of A are read in
// place (one broadcast a term), B's slice of a block is copied once per column block into a contiguous, zero-padded
// buffer (B's rows may lie far apart, or be columns of a row-major matrix), and a tile past C's edge works on a
// zero-padded copy of its valid entries. Parallel tasks (parallel = true) own whole tiles.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/search.h"

namespace vqk {
namespace cpu {

template <typename T>
struct Strided {
  const T* p;
  int64_t rs, cs;  // strides of the summed index r and of the output's index
};

namespace product {

constexpr int64_t kProductRows = 128;  // terms per pass over a tile: B's slice is 16 KiB (float, 32 columns)
constexpr int kTileRows = 4;           // rows of an output tile

// out [kTileRows][ldo] (the tile) += sum_r a[i][r * ars] bp[r][L Q], in W-byte vectors of L = W / sizeof(T) lanes.
template <typename T, int Q, int W>
VQK_LANES void tile(const T* const* a, int64_t ars, const T* bp, int64_t rows, T* out, int64_t ldo) {
  typedef T V __attribute__((vector_size(W)));
  constexpr int L = W / sizeof(T);
  V acc[kTileRows][Q];
  for (int i = 0; i < kTileRows; ++i)
    for (int q = 0; q < Q; ++q) std::memcpy(&acc[i][q], out + i * ldo + L * q, sizeof(V));
  for (int64_t r = 0; r < rows; ++r) {
    V bv[Q];
    for (int q = 0; q < Q; ++q) std::memcpy(&bv[q], bp + (r * Q + q) * L, sizeof(V));
    for (int i = 0; i < kTileRows; ++i) {
      const T ai = a[i][r * ars];
      for (int q = 0; q < Q; ++q) acc[i][q] += ai * bv[q];
    }
  }
  for (int i = 0; i < kTileRows; ++i)
    for (int q = 0; q < Q; ++q) std::memcpy(out + i * ldo + L * q, &acc[i][q], sizeof(V));
}

template <typename T>
struct Problem {
  Strided<T> a, b;
  int64_t k, m, n;  // terms, C's rows and columns
  T* c;
  int64_t ldc;
};

// The tiles [t0, t1) (tile t: column block t / tiles_down, row block t % tiles_down) over every block of terms, in
// order; scratch: kProductRows * cols + kTileRows * cols values.
#define VQK_PRODUCT_TILES(NAME, TARGET, W)                                                                        \
  template <typename T, int Q>                                                                                    \
  TARGET void NAME(const Problem<T>& p, int64_t t0, int64_t t1, T* scratch) {                                     \
    const int64_t cols = W / int64_t(sizeof(T)) * Q, tiles_down = (p.m + kTileRows - 1) / kTileRows;              \
    T *pack = scratch, *edge = scratch + kProductRows * cols;                                                     \
    for (int64_t r0 = 0; r0 < p.k; r0 += kProductRows) {                                                          \
      const int64_t rows = std::min(kProductRows, p.k - r0);                                                      \
      for (int64_t t = t0, packed = -1; t < t1; ++t) {                                                            \
        const int64_t j0 = t / tiles_down * cols, i0 = t % tiles_down * kTileRows, nj = std::min(cols, p.n - j0); \
        if (j0 != packed) {                                                                                       \
          for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T* src = p.b.p + (r0 + r) * p.b.rs + j0 * p.b.cs;                                               \
            T* dst = pack + r * cols;                                                                             \
            if (p.b.cs == 1)                                                                                      \
              std::memcpy(dst, src, nj * sizeof(T));                                                              \
            else                                                                                                  \
              for (int64_t j = 0; j < nj; ++j) dst[j] = src[j * p.b.cs];                                          \
            std::fill(dst + nj, dst + cols, T(0));                                                                \
          }                                                                                                       \
          packed = j0;                                                                                            \
        }                                                                                                         \
        const T* a[kTileRows];                                                                                    \
        for (int i = 0; i < kTileRows; ++i) a[i] = p.a.p + r0 * p.a.rs + std::min(i0 + i, p.m - 1) * p.a.cs;      \
        T* out = p.c + i0 * p.ldc + j0;                                                                           \
        const int64_t ni = std::min<int64_t>(kTileRows, p.m - i0);                                                \
        if (ni == kTileRows && nj == cols) {                                                                      \
          tile<T, Q, W>(a, p.a.rs, pack, rows, out, p.ldc);                                                       \
          continue;                                                                                               \
        }                                                                                                         \
        std::fill(edge, edge + kTileRows * cols, T(0));                                                           \
        for (int64_t i = 0; i < ni; ++i) std::memcpy(edge + i * cols, out + i * p.ldc, nj * sizeof(T));           \
        tile<T, Q, W>(a, p.a.rs, pack, rows, edge, cols);                                                         \
        for (int64_t i = 0; i < ni; ++i) std::memcpy(out + i * p.ldc, edge + i * cols, nj * sizeof(T));           \
      }                                                                                                           \
    }                                                                                                             \
  }
VQK_PRODUCT_TILES(tiles_portable, , 16)
#if VQK_X86
VQK_PRODUCT_TILES(tiles_avx2, VQK_TARGET_AVX2, 32)
VQK_PRODUCT_TILES(tiles_avx512, VQK_TARGET_AVX512, 64)
#endif
#undef VQK_PRODUCT_TILES

}  // namespace product

// C [m, n] (row stride ldc) += sum_{r < k} A(r, i) B(r, j), every entry summed in increasing r onto its old value,
// so the same bits for any thread count (parallel: tiles in parallel tasks; else on the calling thread, e.g. inside
// a task of its own). The active ISA's widest vectors no wider than a row of C serve (AVX-512: 64 bytes, up to 4 a
// tile; AVX2 32 and the portable path 16 bytes, up to 2 a tile: the registers hold the tile's accumulators and B's
// vectors); a row narrower than the vectors is zero-padded.
template <typename T>
void fixed_order_product(Strided<T> a, Strided<T> b, int64_t k, int64_t m, int64_t n, T* c, int64_t ldc,
                         bool parallel) {
  using namespace product;
  if (k <= 0 || m <= 0 || n <= 0) return;
  const auto lanes = [](int bytes) { return int64_t(bytes) / int64_t(sizeof(T)); };
  int width = VQK_X86 && active_isa() == Isa::Avx512 ? 64 : VQK_X86 && active_isa() == Isa::Avx2 ? 32 : 16;
  while (width > 16 && lanes(width / 2) >= n) width /= 2;
  const int64_t vectors = (n + lanes(width) - 1) / lanes(width), most = width == 64 ? 4 : 2;
  const Problem<T> p{a, b, k, m, n, c, ldc};
  const auto run = [&](auto qc) {
    constexpr int Q = decltype(qc)::value;
    const int64_t cols = lanes(width) * Q;
    const int64_t tiles = (m + kTileRows - 1) / kTileRows * ((n + cols - 1) / cols);
#if VQK_X86
    const auto kernel = width == 64 ? &tiles_avx512<T, Q> : width == 32 ? &tiles_avx2<T, Q> : &tiles_portable<T, Q>;
#else
    const auto kernel = &tiles_portable<T, Q>;
#endif
    const auto task = [&](int64_t t0, int64_t t1) {
      std::vector<T> scratch((kProductRows + kTileRows) * cols);
      kernel(p, t0, t1, scratch.data());
    };
    if (parallel)
      at::parallel_for(0, tiles, 1, task);
    else
      task(0, tiles);
  };
  if (std::min(vectors, most) >= 4)
    run(std::integral_constant<int, 4>{});
  else if (std::min(vectors, most) >= 2)
    run(std::integral_constant<int, 2>{});
  else
    run(std::integral_constant<int, 1>{});
}

}  // namespace cpu
}  // namespace vqk
