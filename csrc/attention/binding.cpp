// pybind11 binding of the fused attention kernel: named input checks, then the
// kernel with the GIL released. Takes numpy views as they are (any strides
// over B, H, L; stride 1 over D) so KV-cache slices and transposed
// projections are never copied.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <new>
#include <string>

#include "attention/attention.h"
#include "common/array_checks.h"

namespace py = pybind11;

namespace tallow {
namespace {

constexpr const char* kOp = "attention";

// Element strides of a float32 (or, for k and v, bf16-bits uint16) array; D
// (the last axis) must be unit-stride.
void float_strides(const char* name, const py::array& a, int64_t* s) {
  const py::ssize_t item = a.itemsize();
  if (reinterpret_cast<std::uintptr_t>(a.data()) % item != 0)
    throw py::value_error(std::string(kOp) + ": " + name + " data is not aligned to " + std::to_string(item) +
                          " bytes");
  for (int i = 0; i < 4; ++i) {
    const py::ssize_t st = a.strides(i);
    if (st % item != 0)
      throw py::value_error(std::string(kOp) + ": " + name + ".strides[" + std::to_string(i) + "] = " +
                            std::to_string(st) + " bytes is not a multiple of " + std::to_string(item));
    s[i] = st / item;
  }
  if (a.shape(3) > 1 && s[3] != 1)
    throw py::value_error(std::string(kOp) + ": " + name +
                          " must be contiguous over its last (head) dimension, got element stride " +
                          std::to_string(s[3]));
}

void attention_forward_py(const py::array& q, const py::array& k, const py::array& v, py::array& out,
                          const py::object& mask, bool causal, double scale) {
  check_array<float>(kOp, "q", q, 4, false);
  // k and v: float32, or uint16 holding bfloat16 bits (a bf16 KV cache; numpy has no bf16)
  const bool bf16 = py::dtype::of<uint16_t>().is(k.dtype());
  if (bf16) {
    check_array<uint16_t>(kOp, "k", k, 4, false);
    check_array<uint16_t>(kOp, "v", v, 4, false);
  } else {
    check_array<float>(kOp, "k", k, 4, false);
    check_array<float>(kOp, "v", v, 4, false);
  }
  check_array<float>(kOp, "out", out, 4, false);
  const py::ssize_t B = q.shape(0), H = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  const py::ssize_t Lk = k.shape(2);
  check_dim(kOp, "k", k, 0, B);
  check_dim(kOp, "k", k, 1, H);
  check_dim(kOp, "k", k, 3, D);
  for (int i = 0; i < 4; ++i) check_dim(kOp, "v", v, i, k.shape(i));
  for (int i = 0; i < 4; ++i) check_dim(kOp, "out", out, i, q.shape(i));
  if (causal && Lk < Lq)  // the queries are the last Lq of the Lk positions
    throw py::value_error(std::string(kOp) + ": causal attention needs Lk >= Lq, got Lq=" + std::to_string(Lq) +
                          " (q.shape[2]) and Lk=" + std::to_string(Lk) + " (k.shape[2])");
  if (!out.writeable()) throw py::value_error(std::string(kOp) + ": out must be writeable");
  if (bf16 && Lq > 4)
    throw py::value_error(std::string(kOp) + ": bfloat16 k/v are read by the decode path only (Lq <= 4), got Lq=" +
                          std::to_string(Lq) + "; pass float32 k/v for prefill");
  if (!std::isfinite(scale))
    throw py::value_error(std::string(kOp) + ": scale must be finite, got " + std::to_string(scale));

  AttentionArgs a{};
  int64_t s[4];
  float_strides("q", q, s);
  a.q_sb = s[0], a.q_sh = s[1], a.q_sl = s[2];
  float_strides("k", k, s);
  a.k_sb = s[0], a.k_sh = s[1], a.k_sl = s[2];
  float_strides("v", v, s);
  a.v_sb = s[0], a.v_sh = s[1], a.v_sl = s[2];
  float_strides("out", out, s);
  a.o_sb = s[0], a.o_sh = s[1], a.o_sl = s[2];

  py::array mask_arr;
  if (!mask.is_none()) {
    if (!py::isinstance<py::array>(mask))
      throw py::type_error(std::string(kOp) + ": key_padding_mask must be a numpy bool array or None, got " +
                           std::string(py::str(py::type::handle_of(mask).attr("__name__"))));
    mask_arr = py::reinterpret_borrow<py::array>(mask);
    check_array<bool>(kOp, "key_padding_mask", mask_arr, 2, true);
    check_dim(kOp, "key_padding_mask", mask_arr, 0, B);
    check_dim(kOp, "key_padding_mask", mask_arr, 1, Lk);
    a.key_padding_mask = static_cast<const uint8_t*>(mask_arr.data());
  }

  a.q = static_cast<const float*>(q.data());
  if (bf16) {
    a.k_bf16 = static_cast<const uint16_t*>(k.data());
    a.v_bf16 = static_cast<const uint16_t*>(v.data());
  } else {
    a.k = static_cast<const float*>(k.data());
    a.v = static_cast<const float*>(v.data());
  }
  a.out = static_cast<float*>(out.mutable_data());
  a.B = B, a.H = H, a.Lq = Lq, a.Lk = Lk, a.D = D;
  a.causal = causal;
  a.scale = static_cast<float>(scale);

  bool ok;
  {
    py::gil_scoped_release release;
    ok = attention_forward(a);
  }
  if (!ok) throw std::bad_alloc();
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("mask"), py::arg("causal"), py::arg("scale"),
        R"doc(Fused attention (FlashAttention-2 forward), float32.

q, out: [B, H, Lq, D]; k, v: [B, H, Lk, D] (Lk >= Lq when causal), float32 — or uint16 arrays
holding bfloat16 bits when Lq <= 4 (a bf16 KV cache); any strides over B, H, L,
stride 1 over D. mask: None or a C-contiguous bool [B, Lk], True = padding.
causal: query i sees keys j <= Lk - Lq + i. Writes softmax(scale q k^T) v into
out; rows that see no key are zeros. Releases the GIL.)doc");
}

}  // namespace tallow
