// Register-only peak loops: the arithmetic limit each kernel's throughput is
// measured against (benchmarks/bench_peak.py).
//
// Each loop is inline assembly over 8-16 independent accumulators, so the
// compiler can neither hoist nor CSE it (plain intrinsics with loop-invariant
// operands get folded away) nor spill the accumulators, and the chains are
// long enough to hide the instruction latency (4-5 cycles) at full issue rate.
// Operands stay in registers: no loads or stores inside the loop.
//
// Every function runs `iters` iterations and is compiled in its ISA's file
// (peak_avx2.cpp, peak_avx512.cpp, peak_neon.cpp); peak.cpp only calls one
// after checking the CPU supports it.
#pragma once

#include <cstdint>

namespace tallow {
namespace peak_avx2 {
// 12 x vfmadd231ps ymm per iteration: 12 * 8 lanes * 2 = 192 FLOP.
void fp32_fma(int64_t iters);
// 8 x (vpmaddubsw ymm + vpmaddwd ymm(ones) + vpaddd ymm): 8 * 32 u8*s8 pairs * 2 = 512 OP.
void int8_maddubs(int64_t iters);
// 8 x (vpmaddwd ymm + vpaddd ymm) on int16: 8 * 16 pairs * 2 = 256 OP.
void int16_maddwd(int64_t iters);
}  // namespace peak_avx2
namespace peak_avx512 {
// 16 x vfmadd231ps zmm: 16 * 16 * 2 = 512 FLOP.
void fp32_fma(int64_t iters);
// 16 x vpdpbusd zmm: 16 * 64 u8*s8 pairs * 2 = 2048 OP.
void int8_vnni(int64_t iters);
}  // namespace peak_avx512
namespace peak_neon {
// 16 x fmla v.4s: 16 * 4 * 2 = 128 FLOP.
void fp32_fma(int64_t iters);
// 16 x sdot v.4s, v.16b, v.16b: 16 * 16 pairs * 2 = 512 OP.
void int8_sdot(int64_t iters);
}  // namespace peak_neon
}  // namespace tallow
