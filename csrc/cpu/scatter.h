// Deterministic scatter by code: each parallel task owns a contiguous range of codes and
// visits, in increasing row order, the rows assigned to its codes. Every per-code sum is
// therefore accumulated in the same order whatever the thread count, with no atomics and
// no per-thread copies of the output.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace vqk {
namespace cpu {

// Calls add_row(code, row) for every row whose index is a valid code (indices < 0 skipped).
template <typename F>
void scatter_by_code(const int64_t* indices, int64_t n, int64_t num_codes, F&& add_row) {
  at::parallel_for(0, num_codes, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t c = indices[r];
      if (c >= k0 && c < k1) add_row(c, r);
    }
  });
}

}  // namespace cpu
}  // namespace vqk
