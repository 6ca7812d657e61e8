// AVX-512 register-only peak loops (see peak.h): 16 zmm accumulators
// (zmm0-15), operands in zmm30/zmm31. AT&T operand order.
#include "peak/peak.h"

namespace tallow {
namespace peak_avx512 {

#define TALLOW_ZERO_ZMM                                                                     \
  "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"                                                        \
  "vmovdqa64 %%zmm0, %%zmm1\n\t vmovdqa64 %%zmm0, %%zmm2\n\t vmovdqa64 %%zmm0, %%zmm3\n\t"   \
  "vmovdqa64 %%zmm0, %%zmm4\n\t vmovdqa64 %%zmm0, %%zmm5\n\t vmovdqa64 %%zmm0, %%zmm6\n\t"   \
  "vmovdqa64 %%zmm0, %%zmm7\n\t vmovdqa64 %%zmm0, %%zmm8\n\t vmovdqa64 %%zmm0, %%zmm9\n\t"   \
  "vmovdqa64 %%zmm0, %%zmm10\n\t vmovdqa64 %%zmm0, %%zmm11\n\t vmovdqa64 %%zmm0, %%zmm12\n\t" \
  "vmovdqa64 %%zmm0, %%zmm13\n\t vmovdqa64 %%zmm0, %%zmm14\n\t vmovdqa64 %%zmm0, %%zmm15\n\t" \
  "vmovdqa64 %%zmm0, %%zmm30\n\t vmovdqa64 %%zmm0, %%zmm31\n\t"

#define TALLOW_CLOBBER_ZMM                                                                   \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",   \
      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm30", "xmm31", "cc"

#define TALLOW_16(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) \
  OP(8) OP(9) OP(10) OP(11) OP(12) OP(13) OP(14) OP(15)

#define TALLOW_FMA(acc) "vfmadd231ps %%zmm31, %%zmm30, %%zmm" #acc "\n\t"
#define TALLOW_DPBUSD(acc) "vpdpbusd %%zmm31, %%zmm30, %%zmm" #acc "\n\t"

void fp32_fma(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_ZMM
      ".p2align 5\n"
      "1:\n\t"
      TALLOW_16(TALLOW_FMA)
      "sub $1, %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(iters)
      :
      : TALLOW_CLOBBER_ZMM);
}

// zmm30: u8 activations, zmm31: s8 weights (vpdpbusd: first source unsigned).
void int8_vnni(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_ZMM
      ".p2align 5\n"
      "1:\n\t"
      TALLOW_16(TALLOW_DPBUSD)
      "sub $1, %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(iters)
      :
      : TALLOW_CLOBBER_ZMM);
}

}  // namespace peak_avx512
}  // namespace tallow
