// CPU kernel of vqkernels::latent_quantize (latent quantization, Hsu et al. 2023, as vector-quantize-pytorch's
// LatentQuantize): every value z[r][j] snaps to the nearest of dimension j's levels[j] values, the first minimum of
// |z - value| in the compute dtype (torch.argmin's choice: a NaN distance counts as the least, its first one wins).
//
// Rows in parallel blocks. A block's column j is copied out (converted to the compute type T) so that the scan over
// dimension j's values runs down a contiguous column, one vector lane per row: best distance and position per row,
// updated by compares and selects the compiler vectorises (one body for every CPU, compiled for the baseline ISA:
// the scan is a few compares a value, so the forced ISA does not change it, nor its results).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr int64_t kBlockRows = 256;  // rows per block: a block's column and its best distances stay in L1

// Positions within a dimension as integers of T's width, so that the scan's selects vectorise.
template <typename T>
using Pos = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
struct Scratch {
  std::vector<T> column, best;
  std::vector<Pos<T>> pos;
  std::vector<uint8_t> nan_row;
};

// The first minimum of |column[r] - values[k]| over k < count for every r < rows, a NaN distance counting as the
// least (torch.argmin). With finite values a distance is NaN only for a NaN z, whose every distance is: the plain
// scan (`dist < best`, vectorised) then keeps position 0, as argmin; values holding an inf or a NaN take the scan
// that honours NaN distances.
template <typename T>
void nearest_in_column(const T* __restrict__ column, int64_t rows, const T* values, int64_t count, T* __restrict__ best,
                       Pos<T>* __restrict__ pos) {
  for (int64_t r = 0; r < rows; ++r) {
    best[r] = std::abs(column[r] - values[0]);
    pos[r] = 0;
  }
  const bool finite = std::all_of(values, values + count, [](T v) { return std::isfinite(v); });
  for (int64_t k = 1; k < count; ++k) {
    const T v = values[k];
    const Pos<T> at = static_cast<Pos<T>>(k);
    if (finite) {
      for (int64_t r = 0; r < rows; ++r) {  // branch-free, so that it vectorises (data-dependent branches mispredict)
        const T dist = std::abs(column[r] - v);
        const bool take = dist < best[r];
        pos[r] = take ? at : pos[r];
        best[r] = std::min(dist, best[r]);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const T dist = std::abs(column[r] - v);
        if (dist < best[r] || (std::isnan(dist) && !std::isnan(best[r]))) {
          best[r] = dist;
          pos[r] = at;
        }
      }
    }
  }
}

template <typename T, typename S>
void quantize_rows(const at::Tensor& z, const T* values, at::IntArrayRef levels, S* codes, int64_t* positions,
                   int64_t* indices) {
  const int64_t n = z.size(0), d = z.size(1);
  std::vector<int64_t> start(d), basis(d);
  for (int64_t j = 0, s = 0, b = 1; j < d; s += levels[j], b *= levels[j], ++j) {
    start[j] = s;
    basis[j] = b;
  }
  const RowSource<T> src(z);
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / (kBlockRows * d)), [&](int64_t b0, int64_t b1) {
    Scratch<T> s;
    std::vector<T> rows_buf;
    s.column.resize(kBlockRows);
    s.best.resize(kBlockRows);
    s.pos.resize(kBlockRows);
    s.nan_row.resize(kBlockRows);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlockRows, rows = std::min(kBlockRows, n - r0);
      int64_t ld;
      const T* zr = src.rows(r0, rows, rows_buf, ld);
      std::fill(s.nan_row.begin(), s.nan_row.begin() + rows, 0);
      std::fill(indices + r0, indices + r0 + rows, 0);
      for (int64_t j = 0; j < d; ++j) {
        for (int64_t r = 0; r < rows; ++r) s.column[r] = zr[r * ld + j];
        nearest_in_column(s.column.data(), rows, values + start[j], levels[j], s.best.data(), s.pos.data());
        const T* col = s.column.data();
        const T* own = values + start[j];
        const Pos<T>* chosen = s.pos.data();
        const int64_t weight = basis[j];
        uint8_t* nan_row = s.nan_row.data();
        S* code = codes + r0 * d + j;
        int64_t* position = positions + r0 * d + j;
        int64_t* index = indices + r0;
        for (int64_t r = 0; r < rows; ++r) {
          const T zv = col[r];
          const bool nan = zv != zv;
          const int64_t p = chosen[r];
          nan_row[r] |= nan;
          position[r * d] = nan ? -1 : p;
          code[r * d] = static_cast<S>(nan ? zv : own[p]);
          index[r] += p * weight;
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        if (s.nan_row[r]) indices[r0 + r] = -1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_quantize(const at::Tensor& z, const at::Tensor& values,
                                                               at::IntArrayRef levels) {
  check_latent_quantize("latent_quantize", z, values, levels);
  const int64_t n = z.size(0), d = z.size(1);
  const at::ScalarType dt = compute_dtype(z, values);
  at::Tensor codes = at::empty({n, d}, z.options().dtype(dt));
  at::Tensor positions = at::empty({n, d}, z.options().dtype(at::kLong));
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  if (n == 0) return {codes, positions, indices};
  const at::Tensor v = values.to(dt).contiguous();
  if (dt == at::kDouble)
    quantize_rows<double>(z, v.const_data_ptr<double>(), levels, codes.data_ptr<double>(),
                          positions.data_ptr<int64_t>(), indices.data_ptr<int64_t>());
  else
    quantize_rows<float>(z, v.const_data_ptr<float>(), levels, codes.data_ptr<float>(), positions.data_ptr<int64_t>(),
                         indices.data_ptr<int64_t>());
  return {codes, positions, indices};
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) { m.impl("latent_quantize", &vqk::cpu::latent_quantize); }
