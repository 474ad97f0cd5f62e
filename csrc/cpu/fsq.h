// The float32 tanh of the CPU FSQ kernels, exposed for the tests (vqkernels._C.fsq_tanh).
#pragma once

#include <cstdint>

namespace vqk {
namespace cpu {

// y[i] = tanh(x[i]) for i < n, computed as the FSQ kernels compute it under the active CPU ISA.
void fsq_tanh(const float* x, int64_t n, float* y);

}  // namespace cpu
}  // namespace vqk
