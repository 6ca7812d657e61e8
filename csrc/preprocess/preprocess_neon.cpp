// The preprocess resample kernel compiled for neon (see preprocess_kernel.h;
// built with -march=armv8.2-a+dotprod, which is what selects its NEON branch).
#include <arm_neon.h>

#include <cstdint>
#include <cstdlib>

#include "preprocess/preprocess.h"

namespace tallow {
namespace preprocess_neon {
#include "preprocess/preprocess_kernel.h"
}  // namespace preprocess_neon
}  // namespace tallow
