// Host interface of the CUDA build probe (csrc/cuda/probe.cu): proves on a GPU machine that
// the CUDA half of the extension was compiled for the device and launches there.
#pragma once

namespace vqk {
namespace cuda {

int runtime_version();  // CUDART_VERSION the sources were compiled against
// Launches a small kernel on the current device and checks its result. Returns nullptr on
// success, else a description of what failed (no device, launch error, wrong result).
const char* selftest();

}  // namespace cuda
}  // namespace vqk
