// Run-time CPU feature detection and ISA selection.
//
// Compiled without ISA flags: safe to call on any CPU of the target
// architecture. Kernels are compiled once per ISA (files named *_avx512.cpp,
// *_avx2.cpp on x86-64; *_neon.cpp on aarch64; *_scalar.cpp everywhere) and
// each op's dispatcher asks `active_isa()` which one to call.
#pragma once

#include <string>
#include <vector>

namespace tallow {

// The ISA tiers, per architecture. Within one architecture a later tier
// implies every earlier one (arch_isas() lists them lowest first).
enum class Isa : int {
  Scalar = 0,      // portable C++: every architecture
  Avx2 = 1,        // x86-64: AVX2 + FMA (Haswell, Zen and later)
  Avx512Vnni = 2,  // x86-64: AVX-512 F/BW/VL/DQ + VNNI (Cascade Lake, Zen 4 and later)
  Neon = 3,        // aarch64: Advanced SIMD + dot product (SDOT: Neoverse N1, Apple M1 and later)
};

// The tiers this build has kernels for on this architecture, lowest first
// (x86-64: scalar, avx2, avx512_vnni; aarch64: scalar, neon; else: scalar).
std::vector<Isa> arch_isas();

// Whether this CPU (and OS) can run kernels of `isa`: it has every feature
// isa_requirements(isa) lists.
bool isa_supported(Isa isa);

// The CPU features a tier needs (names as in cpu_feature_string(), plus the
// OS-state pseudo-features os_ymm / os_zmm): every instruction-set extension
// its files' compile flags enable, implied ones included. Empty for scalar.
std::vector<std::string> isa_requirements(Isa isa);

// The best ISA this CPU supports among arch_isas().
Isa best_isa();

// The ISA kernels use now: best_isa() unless lowered by set_isa() or the
// TALLOW_ISA environment variable (read once, at first use).
Isa active_isa();

// Forces an ISA. Throws std::invalid_argument for an unknown name and
// std::runtime_error when the CPU lacks the requested ISA.
void set_isa(const std::string& name);

const char* isa_name(Isa isa);

// Human-readable feature list, e.g. "sse3 ... fma avx2 bmi2 avx512f ... avx512_vnni" on
// x86-64 or "asimd asimddp i8mm bf16" on aarch64.
std::string cpu_feature_string();

// The architecture this module was built for: "x86_64", "aarch64" or "other".
const char* arch_name();

}  // namespace tallow
