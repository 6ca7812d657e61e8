// The preprocess resample kernel compiled for avx512 (see preprocess_kernel.h).
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "preprocess/preprocess.h"

namespace tallow {
namespace preprocess_avx512 {
#include "preprocess/preprocess_kernel.h"
}  // namespace preprocess_avx512
}  // namespace tallow
