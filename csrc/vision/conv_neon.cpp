// Convolution kernels compiled for neon (flags from CMakeLists.txt by file name).
// Everything from conv_kernel.h lands in an anonymous namespace, so this
// file's copies can never be linked into another ISA's code path.
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

extern const IsaKernels kKernelsNeon;
const IsaKernels kKernelsNeon = {&isa_conv, &isa_winograd, &isa_max_pool_3x3s2};

}  // namespace vision
}  // namespace tallow
