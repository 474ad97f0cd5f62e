// CPU kernel of vqkernels::ema_update_: the VQ-VAE / Sonnet EMA codebook update, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/scatter.h"

namespace vqk {
namespace cpu {
namespace {

void ema_update_(const at::Tensor& codebook, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                 const at::Tensor& x, const at::Tensor& indices, double decay, double eps) {
  check_ema("ema_update_", codebook, cluster_size, embed_sum, x, indices, decay, eps);
  const int64_t K = codebook.size(0), D = codebook.size(1), n = x.size(0);
  const at::Tensor idx = indices.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    VQK_CHECK(ip[r] >= -1 && ip[r] < K, "ema_update_", "indices must be in [-1, K=", K, "), got ", ip[r], " at row ",
              r);
  AT_DISPATCH_FLOATING_TYPES(cluster_size.scalar_type(), "ema_update_", [&] {
    using S = scalar_t;  // statistics type
    const at::Tensor xs = x.to(cluster_size.scalar_type()).contiguous();
    const S* xp = xs.const_data_ptr<S>();
    // This step's counts and sums per code, in row order per code (deterministic).
    std::vector<S> counts(K, S(0)), sums(K * D, S(0));
    scatter_by_code(ip, n, K, [&](int64_t k, int64_t r) {
      counts[k] += S(1);
      for (int64_t d = 0; d < D; ++d) sums[k * D + d] += xp[r * D + d];
    });
    S* cs = cluster_size.data_ptr<S>();
    S* es = embed_sum.data_ptr<S>();
    const int64_t cs0 = cluster_size.stride(0), es0 = embed_sum.stride(0), es1 = embed_sum.stride(1);
    const S keep = static_cast<S>(decay), take = static_cast<S>(1.0 - decay);
    double total = 0;  // serial sum: same result for any thread count
    for (int64_t k = 0; k < K; ++k) {
      cs[k * cs0] = keep * cs[k * cs0] + take * counts[k];
      total += cs[k * cs0];
    }
    const S tot = static_cast<S>(total), denom = static_cast<S>(total + K * eps);
    const int64_t cb0 = codebook.stride(0), cb1 = codebook.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "ema_update_codebook", [&] {
      scalar_t* cb = codebook.data_ptr<scalar_t>();
      at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const S smoothed = (cs[k * cs0] + static_cast<S>(eps)) / denom * tot;
          for (int64_t d = 0; d < D; ++d) {
            S& e = es[k * es0 + d * es1];
            e = keep * e + take * sums[k * D + d];
            cb[k * cb0 + d * cb1] = static_cast<scalar_t>(e / smoothed);
          }
        }
      });
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cpu, CPU, m) { m.impl("ema_update_", &vqk::cpu::ema_update_); }
