// Attention kernel compiled for neon (flags from the file name, see
// CMakeLists.txt: -march=armv8.2-a+dotprod, which is what selects simd.h's
// NEON branch). The kernel body lives in attention_kernel.h and is included
// inside this file's own namespace, so no inline function is shared with
// another ISA's translation unit (the linker could otherwise keep one copy
// for all of them).
#include <cstdlib>  // aligned_alloc, free: plain C functions, not inline

#include "attention/attention.h"
#include "common/simd.h"
#include "common/thread_pool.h"

namespace tallow {
namespace attention_neon {
namespace {
#include "attention/attention_kernel.h"
}  // namespace

bool forward(const AttentionArgs& args) { return run_attention(args); }

}  // namespace attention_neon
}  // namespace tallow
