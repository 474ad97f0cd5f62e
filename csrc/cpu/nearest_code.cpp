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
      topk_rows(pc, x0, ld, r1 - r0, k, s.tile, s.ranked, idx + r0 * k, dist + r0 * k);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) {
  m.impl("nearest_code", &vqk::cpu::nearest_code);
  m.impl("nearest_code_topk", &vqk::cpu::nearest_code_topk);
}
