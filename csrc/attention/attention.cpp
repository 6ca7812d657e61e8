// Baseline dispatcher: picks the attention kernel of the active ISA.
// Compiled without ISA flags, so it is safe to run on any CPU of the target
// architecture; only the tiers this architecture builds are referenced.
#include "attention/attention.h"

#include "common/cpu_features.h"

namespace tallow {

bool attention_forward(const AttentionArgs& args) {
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Vnni:
      return attention_avx512::forward(args);
    case Isa::Avx2:
      return attention_avx2::forward(args);
#endif
#if defined(__aarch64__) && defined(TALLOW_HAVE_NEON_KERNELS)
    case Isa::Neon:
      return attention_neon::forward(args);
#endif
    default:
      break;
  }
  return attention_scalar::forward(args);
}

}  // namespace tallow
