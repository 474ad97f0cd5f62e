// FMA throughput probe: kChains independent accumulators per thread (more than the FMA latency
// times the FMA units, so the units never wait), no loads or stores in the loop.
#include "cpu/fma_peak.h"

#include <c10/util/Exception.h>
#include <omp.h>

#include <chrono>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/search.h"

namespace vqk {
namespace cpu {
namespace {

constexpr int kChains = 12;
constexpr int64_t kIters = 1 << 16;  // FMA rounds per timed batch

// One batch of kIters rounds of kChains independent FMAs on VEC vectors; returns a value depending on
// every chain (so none is dead code). A macro, not a template taking lambdas: the intrinsics must be
// compiled inside the function carrying the ISA's target attribute.
#define VQK_FMA_BATCH(VEC, SET1, FMADD, FIRST)                                                   \
  VEC acc[kChains];                                                                              \
  const VEC mul = SET1(0.999999f), add = SET1(1e-7f);                                            \
  for (int i = 0; i < kChains; ++i) acc[i] = add;                                                \
  for (int64_t it = 0; it < kIters; ++it) {                                                      \
    _Pragma("GCC unroll 12") for (int i = 0; i < kChains; ++i) acc[i] = FMADD(acc[i], mul, add); \
  }                                                                                              \
  float s = 0;                                                                                   \
  for (int i = 0; i < kChains; ++i) s += FIRST(acc[i]);                                          \
  return s;

#if VQK_X86
VQK_TARGET_AVX512 float batch_avx512(){
    VQK_FMA_BATCH(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_cvtss_f32)} VQK_TARGET_AVX2 float batch_avx2() {
  VQK_FMA_BATCH(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_cvtss_f32)
}
#endif

inline float scalar_fma(float a, float b, float c) { return a * b + c; }
inline float first(float a) { return a; }
float batch_portable() { VQK_FMA_BATCH(float, float, scalar_fma, first) }

}  // namespace

double fma_peak_gflops(const std::string& isa, int64_t threads, double seconds) {
  int lanes = 1;
  float (*batch)() = batch_portable;
#if VQK_X86
  if (isa == "avx512") {
    TORCH_CHECK_VALUE(cpu_has_avx512(), "vqkernels: this CPU lacks AVX-512F");
    lanes = 16;
    batch = batch_avx512;
  } else if (isa == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2(), "vqkernels: this CPU lacks AVX2+FMA");
    lanes = 8;
    batch = batch_avx2;
  }
#endif
  TORCH_CHECK_VALUE(lanes > 1 || isa == "portable", "vqkernels: unknown ISA '", isa, "' (avx512, avx2, portable)");
  TORCH_CHECK_VALUE(threads >= 1, "vqkernels: threads must be >= 1");
  std::vector<int64_t> batches(threads, 0);
  std::vector<float> sink(threads, 0.f);
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const auto until = start + std::chrono::duration<double>(seconds);
    while (Clock::now() < until) {
      sink[t] += batch();
      ++batches[t];
    }
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  double flops = 0;
  for (int64_t t = 0; t < threads; ++t) flops += static_cast<double>(batches[t]) * kIters * kChains * lanes * 2.0;
  volatile float keep = sink[0];  // the chains' results are used
  (void)keep;
  return flops / elapsed / 1e9;
}

}  // namespace cpu
}  // namespace vqk
