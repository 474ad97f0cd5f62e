// CPU kernels of vqkernels::nearest_code and vqkernels::nearest_code_topk.
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

// Allocates indices int64 and distances (compute dtype), both [N, cols...], and unless N = 0
// calls body(pc, src, idx, dist) with the codebook packed and x's rows in the compute type T.
template <typename F>
std::tuple<at::Tensor, at::Tensor> search_outputs(const at::Tensor& x, const at::Tensor& codebook, Metric metric,
                                                  std::vector<int64_t> shape, F&& body) {
  at::Tensor indices = at::empty(shape, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty(shape, x.options().dtype(compute_dtype(x, codebook)));
  if (x.size(0) == 0) return {indices, distances};
  with_compute_type(x, codebook, [&](auto t) {
    using T = decltype(t);
    body(pack_codebook<T>(codebook, metric), RowSource<T>(x), indices.data_ptr<int64_t>(), distances.data_ptr<T>());
  });
  return {indices, distances};
}

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook,
                                                c10::string_view metric_name) {
  const Metric metric = check_search("nearest_code", x, codebook, metric_name);
  const int64_t n = x.size(0);
  return search_outputs(x, codebook, metric, {n}, [&](const auto& pc, const auto& src, int64_t* idx, auto* dist) {
    using T = std::remove_pointer_t<decltype(dist)>;
    struct Scratch {
      std::vector<T> rows, best;
      std::vector<int32_t> bidx;
    };
    parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
      int64_t ld;
      const T* xr = src.rows(r0, r1 - r0, s.rows, ld);
      nearest_rows(pc, xr, ld, r1 - r0, s.best, s.bidx, idx + r0, dist + r0);
    });
  });
}

// Inserts (s, code) into the sorted list (d, i) of length k if it beats the last entry;
// equal scores keep the earlier (lower) code first.
template <typename T>
inline void topk_insert(T* d, int64_t* i, int64_t k, T s, int64_t code) {
  if (!(s < d[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && d[pos - 1] > s) {
    d[pos] = d[pos - 1];
    i[pos] = i[pos - 1];
    --pos;
  }
  d[pos] = s;
  i[pos] = code;
}

// The k best of one row by score -> by exact distance, re-sorted (distance, then index).
template <typename T>
void finish_topk_row(const PackedCodebook<T>& pc, const T* xr, int64_t k, int64_t* i, T* d,
                     std::vector<std::pair<T, int64_t>>& v) {
  if (row_has_nan(xr, pc.D)) {
    std::fill(i, i + k, -1);
    std::fill(d, d + k, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  if (i[k - 1] < 0) {  // fewer than k codes with a finite score: rank exactly
    rank_row_exact(pc, xr, k, i, d);
    return;
  }
  v.resize(k);  // the task's scratch: no allocation per row
  for (int64_t j = 0; j < k; ++j) v[j] = {static_cast<T>(exact_distance(pc, xr, i[j])), i[j]};
  std::sort(v.begin(), v.end());
  for (int64_t j = 0; j < k; ++j) std::tie(d[j], i[j]) = v[j];
}

std::tuple<at::Tensor, at::Tensor> nearest_code_topk(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                                     c10::string_view metric_name) {
  const Metric metric = check_search("nearest_code_topk", x, codebook, metric_name);
  VQK_CHECK(k >= 1 && k <= codebook.size(0), "nearest_code_topk", "k must be in [1, K=", codebook.size(0),
            "], got k=", k);
  const int64_t n = x.size(0);
  return search_outputs(x, codebook, metric, {n, k}, [&](const auto& pc, const auto& src, int64_t* idx, auto* dist) {
    using T = std::remove_pointer_t<decltype(dist)>;
    struct Scratch {
      std::vector<T> rows, tile;
      std::vector<std::pair<T, int64_t>> ranked;
    };
    parallel_row_blocks<Scratch>(n, [&](Scratch& s, int64_t, int64_t r0, int64_t r1) {
      int64_t ld;
      const T* x0 = src.rows(r0, r1 - r0, s.rows, ld);
      s.tile.resize(kMR * kLanes);
      std::fill(dist + r0 * k, dist + r1 * k, std::numeric_limits<T>::infinity());
      std::fill(idx + r0 * k, idx + r1 * k, -1);
      with_kernel<T>([&](auto kern) {
        using Kern = decltype(kern);
        for (int64_t r = r0; r < r1; r += kMR) {
          with_mr(std::min<int64_t>(kMR, r1 - r), [&](auto m) {
            constexpr int MR = decltype(m)::value;
            T thr[MR];
            uint32_t mask[MR];
            for (int64_t p = 0; p < pc.P; ++p) {
              for (int rr = 0; rr < MR; ++rr) thr[rr] = dist[(r + rr) * k + k - 1];  // the current k-th best
              Kern::template scores<MR>(x0 + (r - r0) * ld, ld, pc, p, thr, s.tile.data(), mask);
              for (int rr = 0; rr < MR; ++rr)
                for (uint32_t bits = mask[rr]; bits; bits &= bits - 1) {  // only the lanes that beat it
                  const int j = __builtin_ctz(bits);
                  topk_insert(dist + (r + rr) * k, idx + (r + rr) * k, k, s.tile[rr * kLanes + j], p * kLanes + j);
                }
            }
          });
        }
      });
      for (int64_t r = r0; r < r1; ++r) finish_topk_row(pc, x0 + (r - r0) * ld, k, idx + r * k, dist + r * k, s.ranked);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("nearest_code", &vqk::cpu::nearest_code);
  m.impl("nearest_code_topk", &vqk::cpu::nearest_code_topk);
}
