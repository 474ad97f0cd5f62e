// The backend router of torch.ops.vqkernels.<op> on the CPU and CUDA dispatch keys.
//
// Every backend registers its kernels in its own namespace, with the same schemas
// (vqkernels/schemas.py): vqkernels_cpu (C++ CPU kernels, csrc/cpu), vqkernels_cuda (CUDA C++
// kernels, csrc/cuda), vqkernels_triton (Triton launchers, vqkernels/triton), vqkernels_ref (the
// pure-PyTorch reference). The public op vqkernels::<op> gets, for the CPU and the CUDA key, a
// router kernel that forwards the call, boxed and unchanged, to one of them. Which one is a list of
// rules set from Python (vqkernels/_backend.py: VQK_BACKEND, set_backend, use_backend, auto): the
// first rule whose row bound and dtype match the call's first tensor argument wins. A call with any
// float64 tensor argument whose chosen backend has no float64 kernels (the GPU backends: they
// compute in float32) goes to the reference instead; this is the one place that rule lives, and the
// backends' own ops refuse float64.
//
// The choice is made at run time inside the op, so it holds under torch.compile too (the op is
// opaque to the compiler; its fake kernel gives shapes).
#include "dispatch.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>

namespace vqk {
namespace dispatch {
namespace {

struct Rule {
  int64_t max_rows;
  c10::ScalarType dtype;  // Undefined: any dtype
  c10::OperatorHandle target;
  bool float64;  // whether the target has float64 kernels
};

// An op's rules on one device, and the reference op serving the float64 calls of targets without float64 kernels.
struct Route {
  std::vector<Rule> rules;
  c10::OperatorHandle reference;
};

bool is_double(const at::Tensor& t) { return t.scalar_type() == c10::ScalarType::Double; }

// Whether any tensor argument (a list's elements too) of the call on `stack` is float64.
bool any_double_argument(const torch::jit::Stack& stack, size_t first) {
  for (size_t i = first; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor() && is_double(v.toTensor())) return true;
    if (v.isTensorList())
      for (const at::Tensor& t : v.toTensorList().vec())
        if (is_double(t)) return true;
  }
  return false;
}

class Router final : public c10::OperatorKernel {
 public:
  Router(std::string op, std::string device) : op_(std::move(op)), device_(std::move(device)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
    std::shared_ptr<const Route> route = std::atomic_load(&route_);
    const size_t first = stack->size() - op.schema().arguments().size();
    int64_t rows = 0;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    for (size_t i = first; i < stack->size(); ++i) {
      const c10::IValue& v = (*stack)[i];
      if (v.isTensor()) {
        const at::Tensor& t = v.toTensor();
        rows = t.dim() > 0 ? t.size(0) : 1;
        dtype = t.scalar_type();
        break;
      }
    }
    if (route) {
      for (const Rule& r : route->rules) {
        if (rows <= r.max_rows && (r.dtype == c10::ScalarType::Undefined || r.dtype == dtype)) {
          const bool to_reference = !r.float64 && any_double_argument(*stack, first);
          (to_reference ? route->reference : r.target).callBoxed(stack);
          return;
        }
      }
    }
    TORCH_CHECK(false, "vqkernels.", op_, ": no backend is set for ", device_, " tensors (rows ", rows, ", dtype ",
                dtype, "); see vqkernels.set_backend");
  }

  void set_route(std::shared_ptr<const Route> route) { std::atomic_store(&route_, std::move(route)); }

 private:
  std::string op_, device_;
  std::shared_ptr<const Route> route_;
};

struct Registry {
  std::mutex mutex;
  std::vector<std::unique_ptr<torch::Library>> libraries;
  std::map<std::pair<std::string, std::string>, Router*> routers;  // (device, op) -> router (owned by the dispatcher)
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: the dispatcher holds the routers until exit
  return *r;
}

const std::map<std::string, c10::DispatchKey>& device_keys() {
  static const std::map<std::string, c10::DispatchKey> keys = {{"cpu", c10::DispatchKey::CPU},
                                                               {"cuda", c10::DispatchKey::CUDA}};
  return keys;
}

Router* find_router(const std::string& device, const std::string& op) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  auto it = reg.routers.find({device, op});
  TORCH_CHECK(it != reg.routers.end(), "vqkernels: no router for op '", op, "' on device '", device, "'");
  return it->second;
}

// "Float", "Half", "BFloat16", "Double": c10::toString's names of the dtypes a rule may name.
c10::ScalarType parse_dtype(const std::string& name) {
  for (c10::ScalarType t :
       {c10::ScalarType::Float, c10::ScalarType::Half, c10::ScalarType::BFloat16, c10::ScalarType::Double})
    if (name == c10::toString(t)) return t;
  TORCH_CHECK(false, "vqkernels: unknown dtype '", name, "' in a route rule");
}

}  // namespace

void install_routers(const std::vector<std::string>& ops) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (const auto& [device, key] : device_keys()) {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "vqkernels", key, __FILE__, __LINE__);
    for (const std::string& op : ops) {
      TORCH_CHECK(!reg.routers.count({device, op}), "vqkernels: router of '", op, "' installed twice");
      auto router = std::make_unique<Router>(op, device);
      reg.routers[{device, op}] = router.get();
      lib->impl(op.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::move(router)));
    }
    reg.libraries.push_back(std::move(lib));
  }
}

c10::OperatorHandle find_op(const std::string& ns, const std::string& op) {
  const std::string name = ns + "::" + op;
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), "vqkernels: no operator ", name, " is registered");
  return *handle;
}

void set_route(const std::string& device, const std::string& op, const std::vector<RuleSpec>& specs) {
  TORCH_CHECK(!specs.empty(), "vqkernels: a route needs at least one rule");
  auto route = std::make_shared<Route>(Route{{}, find_op("vqkernels_ref", op)});
  for (const RuleSpec& s : specs) {
    const c10::ScalarType dtype = s.dtype.empty() ? c10::ScalarType::Undefined : parse_dtype(s.dtype);
    route->rules.push_back(Rule{s.max_rows, dtype, find_op(s.ns, op), s.float64});
  }
  find_router(device, op)->set_route(std::move(route));
}

}  // namespace dispatch
}  // namespace vqk
