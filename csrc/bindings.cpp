// The tallow._C module: build/ISA/thread queries here, one register_* call per op.
// Every op binding releases the GIL around its kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>

#include "common/cpu_features.h"
#include "common/thread_pool.h"

namespace py = pybind11;

namespace tallow {
void register_attention(py::module_& m);
void register_int8_matmul(py::module_& m);
void register_preprocess(py::module_& m);
void register_peak(py::module_& m);
void register_encoder(py::module_& m);
void register_decoder(py::module_& m);
void register_vision(py::module_& m);
}  // namespace tallow

#ifndef TALLOW_VERSION
#define TALLOW_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "tallow native CPU kernels (attention, int8 matmul, preprocess)";
  m.attr("__version__") = TALLOW_VERSION;
  m.attr("compiler") = __VERSION__;

  m.def("arch", [] { return std::string(tallow::arch_name()); },
        "Architecture the module was built for: x86_64, aarch64 or other.");
  m.def("isa_levels", [] {
    std::vector<std::string> names;
    for (tallow::Isa isa : tallow::arch_isas()) names.emplace_back(tallow::isa_name(isa));
    return names;
  }, "The ISA tiers this build has kernels for, lowest first (x86_64: scalar, avx2, avx512_vnni; "
     "aarch64: scalar, neon).");
  m.def("best_isa", [] { return std::string(tallow::isa_name(tallow::best_isa())); },
        "Best ISA this CPU supports: avx512_vnni, avx2, neon or scalar.");
  m.def("active_isa", [] { return std::string(tallow::isa_name(tallow::active_isa())); },
        "ISA the kernels use now (best_isa unless lowered by TALLOW_ISA or set_isa).");
  m.def("set_isa", [](const std::string& name) { tallow::set_isa(name); }, py::arg("name"),
        "Force the kernels onto an ISA no higher than best_isa().");
  m.def("cpu_features", &tallow::cpu_feature_string);
  m.def("isa_requirements", [] {
    std::map<std::string, std::vector<std::string>> req;
    for (tallow::Isa isa : tallow::arch_isas()) req[tallow::isa_name(isa)] = tallow::isa_requirements(isa);
    return req;
  }, "The CPU features each tier of this build needs (what its files' compile flags enable, implied "
     "extensions included, plus the OS register state): a tier is used only where cpu_features() has them all.");
  m.def("num_threads", &tallow::num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    tallow::set_num_threads(n);
  }, py::arg("n"));

  tallow::register_attention(m);
  tallow::register_int8_matmul(m);
  tallow::register_preprocess(m);
  tallow::register_peak(m);
  tallow::register_encoder(m);
  tallow::register_decoder(m);
  tallow::register_vision(m);
}
