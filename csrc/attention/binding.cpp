// pybind11 bindings for attention (placeholder until the kernel lands).
#include <pybind11/pybind11.h>

namespace tallow {
void register_attention(pybind11::module_& m) { (void)m; }
}  // namespace tallow
