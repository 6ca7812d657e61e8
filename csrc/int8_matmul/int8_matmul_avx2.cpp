// INT8 GEMM kernels compiled for avx2 (flags from CMakeLists.txt by file name).
// Everything from int8_matmul_kernel.h lands in an anonymous namespace, so
// this file's copies can never be linked into another ISA's code path.
#include <stdlib.h>

#include <new>

#include "common/simd.h"
#include "common/thread_pool.h"
#include "int8_matmul/int8_matmul.h"

namespace tallow {
namespace int8mm {
namespace {
#include "int8_matmul/int8_matmul_kernel.h"
}  // namespace

extern const IsaKernels kKernelsAvx2;
const IsaKernels kKernelsAvx2 = {kABytes, kS8Offset, &isa_a_from_s8, &isa_quantize_rows,
                                 &isa_quantize_rows_a, &isa_gemm, &isa_quantize_rows_b32,
                                 &isa_gemm_b32, &isa_quantize_rows_u7,
                                 kU7Faster};

}  // namespace int8mm
}  // namespace tallow
