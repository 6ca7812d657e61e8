// pybind11 bindings for int8_matmul (placeholder until the kernel lands).
#include <pybind11/pybind11.h>

namespace tallow {
void register_int8_matmul(pybind11::module_& m) { (void)m; }
}  // namespace tallow
