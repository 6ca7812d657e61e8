// Named input checks at the native boundary (pybind11 side only).
//
// Every check raises a Python ValueError/TypeError that names the argument
// and the offending value, e.g. "attention: q must be float32, got int64".
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

namespace tallow {
namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype T, the number of dimensions and (optionally) C-contiguity.
template <typename T>
void check_array(const char* op, const char* name, const py::array& a, int ndim,
                 bool contiguous = true) {
  if (!py::dtype::of<T>().is(a.dtype()))
    throw py::type_error(std::string(op) + ": " + name + " must be " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  if (ndim >= 0 && a.ndim() != ndim)
    throw py::value_error(std::string(op) + ": " + name + " must have " + std::to_string(ndim) +
                          " dimensions, got shape " + shape_str(a));
  if (contiguous && !(a.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": " + name + " must be C-contiguous");
}

inline void check_dim(const char* op, const char* name, const py::array& a, int dim,
                      py::ssize_t expected) {
  if (a.shape(dim) != expected)
    throw py::value_error(std::string(op) + ": " + name + ".shape[" + std::to_string(dim) +
                          "] must be " + std::to_string(expected) + ", got shape " +
                          shape_str(a));
}

}  // namespace tallow
