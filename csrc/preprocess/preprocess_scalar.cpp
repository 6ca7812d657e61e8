// The preprocess resample kernel compiled for scalar (see preprocess_kernel.h).
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstdlib>

#include "preprocess/preprocess.h"

namespace tallow {
namespace preprocess_scalar {
#include "preprocess/preprocess_kernel.h"
}  // namespace preprocess_scalar
}  // namespace tallow
