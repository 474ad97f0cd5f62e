// The CUDA build probe: a raw kernel and a small launcher, no ATen (keeps nvcc fast).
// It holds no vqkernels op: the GPU kernels of the ops arrive with the GPU-backend work.
#include <cuda_runtime.h>

#include "cuda/probe.h"

namespace vqk {
namespace cuda {
namespace {

constexpr int kThreads = 64;

__global__ void iota_kernel(int* out) { out[threadIdx.x] = 3 * static_cast<int>(threadIdx.x) + 1; }

}  // namespace

int runtime_version() { return CUDART_VERSION; }

const char* selftest() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return "no CUDA device";
  int* dev = nullptr;
  int host[kThreads] = {};
  cudaError_t err = cudaMalloc(&dev, sizeof(host));
  if (err == cudaSuccess) {
    iota_kernel<<<1, kThreads>>>(dev);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) err = cudaMemcpy(host, dev, sizeof(host), cudaMemcpyDeviceToHost);
  if (dev) cudaFree(dev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  for (int i = 0; i < kThreads; ++i)
    if (host[i] != 3 * i + 1) return "the probe kernel wrote wrong values";
  return nullptr;
}

}  // namespace cuda
}  // namespace vqk
