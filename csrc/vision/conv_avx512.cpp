// Convolution kernels compiled for avx512 (flags from CMakeLists.txt by file name).
// Everything from conv_kernel.h lands in an anonymous namespace, so this
// file's copies can never be linked into another ISA's code path.
// GCC 12 reports its own _mm512_undefined_ps() inside the AVX-512 intrinsics
// as "may be used uninitialized" (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "common/simd.h"
#include "common/thread_pool.h"
#include "encoder/encoder.h"
#include "vision/conv.h"
#include "vision/winograd.h"

namespace tallow {
namespace vision {
namespace {
#include "vision/conv_kernel.h"
}  // namespace

extern const IsaKernels kKernelsAvx512;
const IsaKernels kKernelsAvx512 = {&isa_conv, &isa_winograd, &isa_max_pool_3x3s2};

}  // namespace vision
}  // namespace tallow
