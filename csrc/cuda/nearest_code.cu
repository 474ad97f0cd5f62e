// The per-code terms of the searches' affine score form (search.cuh: code_terms_kernel).
#include "cuda/nearest_code.h"
#include "cuda/search.cuh"

namespace vqk {
namespace cuda {

cudaError_t code_terms(const SearchArgs& a, cudaStream_t stream) {
  const int64_t kp = padded_codes(a.k);
  constexpr int kThreads = 256;  // 8 codes (warps) per block
  const unsigned blocks = static_cast<unsigned>((kp * 32 + kThreads - 1) / kThreads);
  switch (a.dtype) {
    case ElemType::F16:
      code_terms_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const __half*>(a.codebook), a.k, kp, a.d, a.metric,
                                                         a.add, a.scale);
      break;
    case ElemType::BF16:
      code_terms_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(a.codebook), a.k, kp, a.d,
                                                         a.metric, a.add, a.scale);
      break;
    default:
      code_terms_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(a.codebook), a.k, kp, a.d, a.metric,
                                                         a.add, a.scale);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vqk
