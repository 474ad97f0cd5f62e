// The element types the CUDA kernels of this directory read and write: the launchers take
// raw pointers plus one of these tags (float64 inputs are served by the reference ops).
#pragma once

namespace vqk {
namespace cuda {

enum class ElemType { F32, F16, BF16 };

}  // namespace cuda
}  // namespace vqk
