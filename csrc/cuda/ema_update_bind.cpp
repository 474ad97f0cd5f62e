// vqkernels_cuda::ema_update_: the at:: binding of csrc/cuda/ema_update.cu and scatter.cu.
//
// Steps (float32 statistics; float64 anywhere goes to the reference op):
//  1. counts [K] (integer atomics: exact, deterministic) and, on the fast path, the row sums
//     [K, D] (float atomics into a float32 scratch), in one kernel that also flags indices
//     outside [-1, K);
//  2. the flag is read back (one scalar copy) and raises the reference's ValueError before any
//     state is touched;
//  3. deterministic mode: the sums instead come from the rows sorted stably by code, each code's
//     segment summed in row order (sort_by_code here, then scatter_rows_sorted);
//  4. ema_finalize: the decay steps, the fixed-order total and the smoothed codebook.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/ema_update.h"
#include "cuda/scatter.h"

namespace vqk {
namespace cuda {
namespace {

void ema_update_(const at::Tensor& codebook, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                 const at::Tensor& x, const at::Tensor& indices, double decay, double eps) {
  const char* op = "ema_update_";
  check_ema(op, codebook, cluster_size, embed_sum, x, indices, decay, eps);
  check_no_float64(op, {&codebook, &cluster_size, &embed_sum, &x});
  const c10::cuda::CUDAGuard guard(codebook.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = codebook.size(0), D = codebook.size(1), n = x.size(0);
  const at::Tensor idx = indices.contiguous();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor ints = at::zeros({K + 1}, idx.options());  // counts [K], then the bad-index flag
  at::Tensor sums = at::zeros({K, D}, x.options().dtype(at::kFloat));
  int64_t* counts = ints.data_ptr<int64_t>();
  check_launch(op, scatter_rows_atomic(
                       x.const_data_ptr(), elem_type(x), x.stride(0), x.stride(1), idx.const_data_ptr<int64_t>(), n, K,
                       D, nullptr, deterministic ? nullptr : sums.data_ptr<float>(), D, counts, counts + K, stream));
  VQK_CHECK(ints[K].item<int64_t>() == 0, op, "indices must be in [-1, K=", K, "), got values outside it");
  if (deterministic && n > 0) {
    const auto [order, offsets] = sort_by_code(idx, K);
    check_launch(op, scatter_rows_sorted(x.const_data_ptr(), elem_type(x), x.stride(0), x.stride(1),
                                         order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), K, D,
                                         nullptr, sums.data_ptr<float>(), D, stream));
  }
  at::Tensor total = at::empty({}, x.options().dtype(at::kDouble));
  check_launch(op, ema_finalize(codebook.data_ptr(), elem_type(codebook), codebook.stride(0), codebook.stride(1),
                                cluster_size.data_ptr<float>(), cluster_size.stride(0), embed_sum.data_ptr<float>(),
                                embed_sum.stride(0), embed_sum.stride(1), counts, sums.const_data_ptr<float>(), K, D,
                                decay, eps, total.data_ptr<double>(), stream));
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) { m.impl("ema_update_", &vqk::cuda::ema_update_); }
