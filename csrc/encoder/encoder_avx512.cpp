// Encoder kernels compiled for avx512 (flags from CMakeLists.txt by file name).
// Everything from encoder_kernel.h lands in an anonymous namespace, so this
// file's copies can never be linked into another ISA's code path.
// GCC 12 reports its own _mm512_undefined_ps() inside the AVX-512 intrinsics
// as "may be used uninitialized" (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "common/simd.h"
#include "common/thread_pool.h"
#include "encoder/encoder.h"

namespace tallow {
namespace encoder {
namespace {
#include "encoder/encoder_kernel.h"
}  // namespace

extern const IsaKernels kKernelsAvx512;
const IsaKernels kKernelsAvx512 = {&isa_sgemm, &isa_add_layer_norm, &isa_rms_norm, &isa_swiglu};

}  // namespace encoder
}  // namespace tallow
