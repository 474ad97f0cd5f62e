// nearest_code / nearest_code_topk kernels for __nv_bfloat16 inputs (see nearest_code_kernels.cuh).
#include "cuda/nearest_code_kernels.cuh"

namespace vqk {
namespace cuda {

cudaError_t search_bf16(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream) {
  return launch_search<__nv_bfloat16>(a, topk, indices, distances, stream);
}

}  // namespace cuda
}  // namespace vqk
