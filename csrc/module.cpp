// The Python module vqkernels._C. Loading it registers the compiled kernels (each backend
// file's TORCH_LIBRARY_IMPL); the op schemas live in vqkernels/schemas.py. The functions
// here report and steer build facts for vqkernels.info and the tests.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/cpu_isa.h"
#include "cpu/fma_peak.h"
#include "cpu/fsq.h"
#include "dispatch.h"
#if VQK_WITH_CUDA
#include "cuda/probe.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vqkernels compiled kernels";
  m.def("cpu_isa", [] { return vqk::isa_name(vqk::active_isa()); }, "The CPU kernels' instruction set in use.");
  m.def("set_cpu_isa", &vqk::set_isa, "Choose the CPU instruction set: 'auto', 'avx512', 'avx2' or 'portable'.");
  m.def("cpu_has_avx2", &vqk::cpu_has_avx2, "Whether this CPU supports AVX2 and FMA.");
  m.def("cpu_has_avx512", &vqk::cpu_has_avx512, "Whether this CPU supports AVX-512F (and AVX2, FMA).");
  m.def("fma_peak_gflops", &vqk::cpu::fma_peak_gflops, pybind11::arg("isa"), pybind11::arg("threads"),
        pybind11::arg("seconds") = 0.2,
        "Measured fp32 FMA GFLOP/s of `threads` threads with the ISA's widest vectors.");
  m.def(
      "fsq_tanh",
      [](pybind11::array_t<float, pybind11::array::c_style | pybind11::array::forcecast> x) {
        pybind11::array_t<float> y(x.size());
        vqk::cpu::fsq_tanh(x.data(), x.size(), y.mutable_data());
        return y;
      },
      "tanh of float32 values (flattened) as the FSQ kernels compute it under the active CPU ISA.");
  m.def("install_routers", &vqk::dispatch::install_routers,
        "Register the backend router of each named op for the CPU and CUDA keys.");
  m.def(
      "set_route",
      [](const std::string& device, const std::string& op,
         const std::vector<std::tuple<int64_t, std::string, std::string, bool>>& rules) {
        std::vector<vqk::dispatch::RuleSpec> specs;
        for (const auto& [rows, dtype, ns, float64] : rules) specs.push_back({rows, dtype, ns, float64});
        vqk::dispatch::set_route(device, op, specs);
      },
      "Set the routing rules (max_rows, dtype name or '', namespace, has float64 kernels) of one op on one device.");
  m.def("cuda_compiled", [] { return bool(VQK_WITH_CUDA); }, "Whether the CUDA sources were built.");
#if VQK_WITH_CUDA
  m.def("cuda_runtime_version", &vqk::cuda::runtime_version, "CUDART_VERSION compiled against.");
  m.def(
      "cuda_selftest",
      [] {
        const char* err = vqk::cuda::selftest();
        return err ? std::string(err) : std::string("ok");
      },
      "Launch the probe kernel on the current CUDA device: 'ok' or what failed.");
#endif
}
