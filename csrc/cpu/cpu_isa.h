// Run-time choice of the CPU kernels' instruction set: AVX-512 (small-D search) and AVX2+FMA
// where the CPU has them, a portable path everywhere else (never an illegal instruction on an
// older CPU).
#pragma once

#include <string>

namespace vqk {

enum class Isa { Portable, Avx2, Avx512 };

bool cpu_has_avx2();    // what the CPU (and OS) support: AVX2 and FMA
bool cpu_has_avx512();  // AVX-512F, AVX2 and FMA
Isa active_isa();       // what the kernels use now
std::string isa_name(Isa isa);
// "auto" (the best the CPU has; the start-up default, or VQK_CPU_ISA), "avx512", "avx2" or
// "portable". Returns the ISA now in force; asking for one the CPU lacks is an error.
std::string set_isa(const std::string& name);

}  // namespace vqk
