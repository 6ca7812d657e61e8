// Buffers a native model borrows from Python (embedding tables, norms, INT8
// weights) checked by name and kept alive with it, and fp32 linears packed
// from them: what the encoder and decoder bindings share (binding code only).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "common/array_checks.h"
#include "encoder/model.h"
#include "int8_matmul/int8_matmul.h"

namespace tallow {
namespace encoder {

class Borrowed {
 public:
  explicit Borrowed(const char* op) : op_(op) {}

  // A C-contiguous float32 [rows, cols] table.
  const float* table(const std::string& name, py::array a, int64_t rows, int64_t cols) {
    check_array<float>(op_, name.c_str(), a, 2);
    check_dim(op_, name.c_str(), a, 0, rows);
    check_dim(op_, name.c_str(), a, 1, cols);
    keep_.push_back(a);
    return static_cast<const float*>(a.data());
  }

  // A C-contiguous array of n values of type T (any shape).
  template <typename T>
  const T* vec(const std::string& name, py::handle h, int64_t n) {
    py::array a = py::reinterpret_borrow<py::array>(h);
    check_array<T>(op_, name.c_str(), a, -1);
    if (a.size() != n)
      throw py::value_error(std::string(op_) + ": " + name + " must hold " + std::to_string(n) +
                            " values, got shape " + shape_str(a));
    keep_.push_back(a);
    return static_cast<const T*>(a.data());
  }

  // A linear layer [N, K] from {"weight", "bias"} (fp32: packed, a copy) or
  // {"packed", "colsum", "scale", "bias"} (INT8: borrowed) or {"packed",
  // "block_scale", "bias"} (block-quantized INT8, int8mm::linear_b32); bias may be None.
  Linear linear(const std::string& name, py::dict d, int64_t N, int64_t K) {
    const float* bias = d.contains("bias") && !d["bias"].is_none() ? vec<float>(name + ".bias", d["bias"], N) : nullptr;
    if (d.contains("weight")) {  // packed into a copy: the weight itself need not stay alive
      py::array w = d["weight"].cast<py::array>();
      check_array<float>(op_, (name + ".weight").c_str(), w, 2);
      check_dim(op_, (name + ".weight").c_str(), w, 0, N);
      check_dim(op_, (name + ".weight").c_str(), w, 1, K);
      return Encoder::make_fp32(static_cast<const float*>(w.data()), bias, N, K);
    }
    const int64_t packed_bytes = (N + 15) / 16 * ((K + 3) / 4) * 64;
    const int8_t* packed = vec<int8_t>(name + ".packed", d["packed"], packed_bytes);
    if (d.contains("block_scale")) {  // block-quantized (int8mm::linear_b32)
      const int64_t nblk = (K + int8mm::kQBlock - 1) / int8mm::kQBlock;
      Linear l = Encoder::make_int8(packed, nullptr, nullptr, bias, N, K);
      l.block_scale = vec<float>(name + ".block_scale", d["block_scale"], (N + 15) / 16 * nblk * 16);
      return l;
    }
    const int32_t* colsum = vec<int32_t>(name + ".colsum", d["colsum"], N);
    const float* scale = vec<float>(name + ".scale", d["scale"], N);
    return Encoder::make_int8(packed, colsum, scale, bias, N, K);
  }

 private:
  const char* op_;
  std::vector<py::array> keep_;
};

}  // namespace encoder
}  // namespace tallow
