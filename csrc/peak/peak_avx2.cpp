// AVX2 register-only peak loops (see peak.h). AT&T operand order: sources
// first, destination last.
#include "peak/peak.h"

namespace tallow {
namespace peak_avx2 {

#define TALLOW_FMA(acc) "vfmadd231ps %%ymm13, %%ymm12, %%ymm" #acc "\n\t"

void fp32_fma(int64_t iters) {
  __asm__ volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n\t"
      "vmovaps %%ymm0, %%ymm1\n\t vmovaps %%ymm0, %%ymm2\n\t vmovaps %%ymm0, %%ymm3\n\t"
      "vmovaps %%ymm0, %%ymm4\n\t vmovaps %%ymm0, %%ymm5\n\t vmovaps %%ymm0, %%ymm6\n\t"
      "vmovaps %%ymm0, %%ymm7\n\t vmovaps %%ymm0, %%ymm8\n\t vmovaps %%ymm0, %%ymm9\n\t"
      "vmovaps %%ymm0, %%ymm10\n\t vmovaps %%ymm0, %%ymm11\n\t"
      "vmovaps %%ymm0, %%ymm12\n\t vmovaps %%ymm0, %%ymm13\n\t"
      ".p2align 5\n"
      "1:\n\t"
      TALLOW_FMA(0) TALLOW_FMA(1) TALLOW_FMA(2) TALLOW_FMA(3) TALLOW_FMA(4) TALLOW_FMA(5)
      TALLOW_FMA(6) TALLOW_FMA(7) TALLOW_FMA(8) TALLOW_FMA(9) TALLOW_FMA(10) TALLOW_FMA(11)
      "sub $1, %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "cc");
}
#undef TALLOW_FMA

// ymm12: u8 activations, ymm13: s8 weights, ymm14: int16 ones; ymm8-11 are
// temporaries (renamed each use), ymm0-7 the int32 accumulators.
#define TALLOW_MADDUBS(tmp, acc)                    \
  "vpmaddubsw %%ymm13, %%ymm12, %%ymm" #tmp "\n\t"  \
  "vpmaddwd %%ymm14, %%ymm" #tmp ", %%ymm" #tmp "\n\t" \
  "vpaddd %%ymm" #tmp ", %%ymm" #acc ", %%ymm" #acc "\n\t"

#define TALLOW_ZERO_0_14                                                                   \
  "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"                                                        \
  "vmovdqa %%ymm0, %%ymm1\n\t vmovdqa %%ymm0, %%ymm2\n\t vmovdqa %%ymm0, %%ymm3\n\t"        \
  "vmovdqa %%ymm0, %%ymm4\n\t vmovdqa %%ymm0, %%ymm5\n\t vmovdqa %%ymm0, %%ymm6\n\t"        \
  "vmovdqa %%ymm0, %%ymm7\n\t vmovdqa %%ymm0, %%ymm12\n\t vmovdqa %%ymm0, %%ymm13\n\t"      \
  "vpcmpeqw %%ymm14, %%ymm14, %%ymm14\n\t vpsrlw $15, %%ymm14, %%ymm14\n\t" /* ones */

void int8_maddubs(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_0_14
      ".p2align 5\n"
      "1:\n\t"
      TALLOW_MADDUBS(8, 0) TALLOW_MADDUBS(9, 1) TALLOW_MADDUBS(10, 2) TALLOW_MADDUBS(11, 3)
      TALLOW_MADDUBS(8, 4) TALLOW_MADDUBS(9, 5) TALLOW_MADDUBS(10, 6) TALLOW_MADDUBS(11, 7)
      "sub $1, %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "cc");
}
#undef TALLOW_MADDUBS

// The exact int16 scheme: ymm12, ymm13 hold sign-extended int16 operands.
#define TALLOW_MADDWD(tmp, acc)                   \
  "vpmaddwd %%ymm13, %%ymm12, %%ymm" #tmp "\n\t"  \
  "vpaddd %%ymm" #tmp ", %%ymm" #acc ", %%ymm" #acc "\n\t"

void int16_maddwd(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_0_14
      ".p2align 5\n"
      "1:\n\t"
      TALLOW_MADDWD(8, 0) TALLOW_MADDWD(9, 1) TALLOW_MADDWD(10, 2) TALLOW_MADDWD(11, 3)
      TALLOW_MADDWD(8, 4) TALLOW_MADDWD(9, 5) TALLOW_MADDWD(10, 6) TALLOW_MADDWD(11, 7)
      "sub $1, %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "cc");
}
#undef TALLOW_MADDWD
#undef TALLOW_ZERO_0_14

}  // namespace peak_avx2
}  // namespace tallow
