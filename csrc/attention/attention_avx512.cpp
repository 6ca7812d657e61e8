// Attention kernel compiled for avx512 (flags from the file name, see
// CMakeLists.txt). The kernel body lives in attention_kernel.h and is
// included inside this file's own namespace, so no inline function is shared
// with another ISA's translation unit (the linker could otherwise keep one
// copy for all of them).
#include <cstdlib>  // aligned_alloc, free: plain C functions, not inline

// GCC 12 reports its own _mm512_undefined_ps() inside the AVX-512 shuffle
// intrinsics as "may be used uninitialized" (GCC bug 105593, fixed in 13);
// the warnings are emitted late, so this covers the whole (kernel-only) file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "attention/attention.h"
#include "common/simd.h"
#include "common/thread_pool.h"

namespace tallow {
namespace attention_avx512 {
namespace {
#include "attention/attention_kernel.h"
}  // namespace

bool forward(const AttentionArgs& args) { return run_attention(args); }

}  // namespace attention_avx512
}  // namespace tallow
