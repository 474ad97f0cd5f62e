// Backend routing of torch.ops.vqkernels.<op> (csrc/dispatch.cpp), steered from vqkernels/_backend.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vqk {
namespace dispatch {

// One rule of a route: calls whose first tensor argument has at most max_rows rows (size(0)) and,
// unless dtype is empty, that dtype (c10::toString name: "Float", "Half", "BFloat16", "Double")
// go to ns::<op> (ns: vqkernels_cpu, vqkernels_cuda, vqkernels_triton or vqkernels_ref); those of
// them with a float64 tensor argument go to vqkernels_ref::<op> unless float64 (ns has float64 kernels).
struct RuleSpec {
  int64_t max_rows;
  std::string dtype;
  std::string ns;
  bool float64;
};

// Registers the router kernel of each op for the CPU and CUDA keys (once per process).
void install_routers(const std::vector<std::string>& ops);
// Replaces the rules of (device "cpu"/"cuda", op); the first matching rule wins.
void set_route(const std::string& device, const std::string& op, const std::vector<RuleSpec>& rules);

}  // namespace dispatch
}  // namespace vqk
