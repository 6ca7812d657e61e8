// NEON register-only peak loops (see peak.h): 16 accumulators v0-v15,
// operands in v30/v31. Built on aarch64 only (with +dotprod for SDOT).
#include "peak/peak.h"

namespace tallow {
namespace peak_neon {

#define TALLOW_ZERO_V                                                            \
  "movi v0.4s, #0\n\t movi v1.4s, #0\n\t movi v2.4s, #0\n\t movi v3.4s, #0\n\t"   \
  "movi v4.4s, #0\n\t movi v5.4s, #0\n\t movi v6.4s, #0\n\t movi v7.4s, #0\n\t"   \
  "movi v8.4s, #0\n\t movi v9.4s, #0\n\t movi v10.4s, #0\n\t movi v11.4s, #0\n\t" \
  "movi v12.4s, #0\n\t movi v13.4s, #0\n\t movi v14.4s, #0\n\t movi v15.4s, #0\n\t" \
  "movi v30.4s, #0\n\t movi v31.4s, #0\n\t"

#define TALLOW_CLOBBER_V                                                                 \
  "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13", \
      "v14", "v15", "v30", "v31", "cc"

#define TALLOW_16(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) \
  OP(8) OP(9) OP(10) OP(11) OP(12) OP(13) OP(14) OP(15)

#define TALLOW_FMLA(acc) "fmla v" #acc ".4s, v30.4s, v31.4s\n\t"
#define TALLOW_SDOT(acc) "sdot v" #acc ".4s, v30.16b, v31.16b\n\t"

void fp32_fma(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_V
      "1:\n\t"
      TALLOW_16(TALLOW_FMLA)
      "subs %x0, %x0, #1\n\t"
      "b.ne 1b\n\t"
      : "+r"(iters)
      :
      : TALLOW_CLOBBER_V);
}

void int8_sdot(int64_t iters) {
  __asm__ volatile(
      TALLOW_ZERO_V
      "1:\n\t"
      TALLOW_16(TALLOW_SDOT)
      "subs %x0, %x0, #1\n\t"
      "b.ne 1b\n\t"
      : "+r"(iters)
      :
      : TALLOW_CLOBBER_V);
}

}  // namespace peak_neon
}  // namespace tallow
