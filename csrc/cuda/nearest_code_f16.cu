// nearest_code / nearest_code_topk kernels for __half inputs (see nearest_code_kernels.cuh).
#include "cuda/nearest_code_kernels.cuh"

namespace vqk {
namespace cuda {

cudaError_t search_f16(const SearchArgs& a, int64_t topk, int64_t* indices, float* distances, cudaStream_t stream) {
  return launch_search<__half>(a, topk, indices, distances, stream);
}

}  // namespace cuda
}  // namespace vqk
