// Run-time CPU feature detection and ISA selection.
//
// Compiled without ISA flags: safe to call on any x86-64 CPU. Kernels are
// compiled once per ISA (files named *_avx512.cpp, *_avx2.cpp, *_scalar.cpp)
// and each op's dispatcher asks `active_isa()` which one to call.
#pragma once

#include <string>

namespace tallow {

// Ordered: a higher value implies every lower one is usable.
enum class Isa : int {
  Scalar = 0,      // portable C++, baseline x86-64
  Avx2 = 1,        // AVX2 + FMA (Haswell and later)
  Avx512Vnni = 2,  // AVX-512 F/BW/VL/DQ + VNNI (Cascade Lake and later)
};

// The best ISA this CPU (and OS, via XCR0) supports.
Isa best_isa();

// The ISA kernels use now: best_isa() unless lowered by set_isa() or the
// TALLOW_ISA environment variable (read once, at first use).
Isa active_isa();

// Forces an ISA. Throws std::invalid_argument for an unknown name and
// std::runtime_error when the CPU lacks the requested ISA.
void set_isa(const std::string& name);

const char* isa_name(Isa isa);

// Human-readable feature list, e.g. "avx2 fma avx512f ... avx512_vnni".
std::string cpu_feature_string();

}  // namespace tallow
