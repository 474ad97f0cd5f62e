#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace vqk {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

static Isa resolve(const std::string& name) {
  if (name == "auto") return cpu_has_avx512() ? Isa::Avx512 : cpu_has_avx2() ? Isa::Avx2 : Isa::Portable;
  if (name == "portable") return Isa::Portable;
  if (name == "avx512") {
    TORCH_CHECK_VALUE(cpu_has_avx512(), "vqkernels: this CPU lacks AVX-512F; use 'avx2', 'portable' or 'auto'");
    return Isa::Avx512;
  }
  TORCH_CHECK_VALUE(name == "avx2", "vqkernels: unknown CPU ISA '", name, "'; expected auto, avx512, avx2 or portable");
  TORCH_CHECK_VALUE(cpu_has_avx2(), "vqkernels: this CPU lacks AVX2+FMA; use 'portable' or 'auto'");
  return Isa::Avx2;
}

static Isa initial_isa() {
  const char* env = std::getenv("VQK_CPU_ISA");
  return resolve(env && *env ? env : "auto");
}

static std::atomic<Isa>& isa_state() {
  static std::atomic<Isa> state{initial_isa()};
  return state;
}

Isa active_isa() { return isa_state().load(std::memory_order_relaxed); }

std::string isa_name(Isa isa) { return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "portable"; }

std::string set_isa(const std::string& name) {
  isa_state().store(resolve(name));
  return isa_name(active_isa());
}

}  // namespace vqk
