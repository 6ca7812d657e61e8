// pybind11 bindings for preprocess (placeholder until the kernel lands).
#include <pybind11/pybind11.h>

namespace tallow {
void register_preprocess(pybind11::module_& m) { (void)m; }
}  // namespace tallow
