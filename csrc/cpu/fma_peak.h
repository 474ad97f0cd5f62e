// The measured fp32 FMA peak of this machine for one instruction set (the ceiling the benchmarks
// hold the search kernels to).
#pragma once

#include <cstdint>
#include <string>

namespace vqk {
namespace cpu {

// GFLOP/s (an FMA counts 2) of `threads` threads each running independent FMA chains of the
// ISA's widest vectors ("avx512": 16 lanes, "avx2": 8, "portable": scalar) for about `seconds`.
double fma_peak_gflops(const std::string& isa, int64_t threads, double seconds);

}  // namespace cpu
}  // namespace vqk
