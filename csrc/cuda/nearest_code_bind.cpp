// ATen binding of the CUDA searches: vqkernels_cuda::nearest_code and nearest_code_topk.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/bind_util.h"
#include "cuda/nearest_code.h"

namespace vqk {
namespace cuda {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

int metric_id(Metric m) { return m == Metric::L2 ? 0 : (m == Metric::IP ? 1 : 2); }  // search.cuh MetricId

// The kernels' inputs: float16 and bfloat16 pairs stay as they are, any other pair (float32,
// or a mix) is converted to float32 (as the Triton kernel); contiguous rows; the per-code terms.
struct Prepared {
  at::Tensor x, codebook, add, scale;
  SearchArgs args;
};

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& codebook, Metric metric, cudaStream_t stream) {
  Prepared p;
  const auto dt = x.scalar_type();
  const bool half_pair = dt == codebook.scalar_type() && (dt == at::kHalf || dt == at::kBFloat16);
  const auto kernel_dt = half_pair ? dt : at::kFloat;
  p.x = x.to(kernel_dt).contiguous();
  p.codebook = codebook.to(kernel_dt).contiguous();
  const int64_t k = codebook.size(0);
  p.add = at::empty({padded_codes(k)}, x.options().dtype(at::kFloat));
  p.scale = at::empty({padded_codes(k)}, x.options().dtype(at::kFloat));
  p.args = SearchArgs{elem_type(p.x),    p.x.const_data_ptr(),    p.codebook.const_data_ptr(), x.size(0), k, x.size(1),
                      metric_id(metric), p.add.data_ptr<float>(), p.scale.data_ptr<float>()};
  check_launch(op, code_terms(p.args, stream));
  return p;
}

// Allocates indices int64 and distances float32 of `shape` and runs the search (topk = 0: nearest).
Pair search_outputs(const char* op, const at::Tensor& x, const at::Tensor& codebook, Metric metric, int64_t topk,
                    std::vector<int64_t> shape) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor indices = at::empty(shape, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty(shape, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return {indices, distances};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Prepared p = prepare(op, x, codebook, metric, stream);
  check_launch(op, search(p.args, topk, indices.data_ptr<int64_t>(), distances.data_ptr<float>(), stream));
  return {indices, distances};
}

Pair nearest_code(const at::Tensor& x, const at::Tensor& codebook, c10::string_view metric_name) {
  const Metric metric = check_search("nearest_code", x, codebook, metric_name);
  check_no_float64("nearest_code", {&x, &codebook});
  return search_outputs("nearest_code", x, codebook, metric, 0, {x.size(0)});
}

Pair nearest_code_topk(const at::Tensor& x, const at::Tensor& codebook, int64_t k, c10::string_view metric_name) {
  const Metric metric = check_search("nearest_code_topk", x, codebook, metric_name);
  VQK_CHECK(k >= 1 && k <= codebook.size(0), "nearest_code_topk", "k must be in [1, K=", codebook.size(0),
            "], got k=", k);
  check_no_float64("nearest_code_topk", {&x, &codebook});
  if (k > kMaxTopk) {  // past the kernel's register list: the reference serves it
    static const auto ref = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("vqkernels_ref::nearest_code_topk", "")
                                .typed<Pair(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view)>();
    return ref.call(x, codebook, k, metric_name);
  }
  return search_outputs("nearest_code_topk", x, codebook, metric, k, {x.size(0), k});
}

}  // namespace
}  // namespace cuda
}  // namespace vqk

TORCH_LIBRARY_IMPL(vqkernels_cuda, CUDA, m) {
  m.impl("nearest_code", &vqk::cuda::nearest_code);
  m.impl("nearest_code_topk", &vqk::cuda::nearest_code_topk);
}
