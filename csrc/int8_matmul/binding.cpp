// pybind11 bindings for the INT8 GEMM (tallow._C.int8_*). Inputs are numpy
// views of torch tensors; every check names the argument; the GIL is
// released around the kernels.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/array_checks.h"
#include "int8_matmul/int8_matmul.h"

namespace py = pybind11;

namespace tallow {
namespace {

int64_t elem_stride(const py::array& a, int dim) {
  return static_cast<int64_t>(a.strides(dim)) / static_cast<int64_t>(a.itemsize());
}

void check_row_major_rows(const char* op, const char* name, const py::array& a) {
  // Rows may be strided, elements within a row must be contiguous.
  if (a.shape(1) > 1 && elem_stride(a, 1) != 1)
    throw py::value_error(std::string(op) + ": " + name + " must have unit stride in its last dimension");
  if (a.strides(0) % a.itemsize() != 0 || a.strides(0) < 0)
    throw py::value_error(std::string(op) + ": " + name + " has an unsupported row stride");
}

// What int8_linear and int8_linear_b32 check alike: x [M, K] float32 rows,
// packed weights [ceil(N/16)][ceil(K/4)][16][4], out [M, N] writeable, act,
// bias [N] or None (kept alive in `keep`).
struct LinearOperands {
  const float* x;
  int64_t ldx, M, K;
  const int8_t* w;
  const float* bias;
  float* y;
};

LinearOperands linear_operands(const char* op, py::array x, py::array packed, int64_t N, py::object bias, int act,
                               py::array out, py::array& keep) {
  check_array<float>(op, "x", x, 2, false);
  check_row_major_rows(op, "x", x);
  check_array<int8_t>(op, "packed_weight", packed, 4, true);
  check_array<float>(op, "out", out, 2, true);
  const int64_t M = x.shape(0), K = x.shape(1);
  check_dim(op, "packed_weight", packed, 0, (N + 15) / 16);
  check_dim(op, "packed_weight", packed, 1, (K + 3) / 4);
  check_dim(op, "packed_weight", packed, 2, 16);
  check_dim(op, "packed_weight", packed, 3, 4);
  check_dim(op, "out", out, 0, M);
  check_dim(op, "out", out, 1, N);
  if (act < int8mm::kActNone || act > int8mm::kActGeluTanh)
    throw py::value_error(std::string(op) + ": act must be 0..3, got " + std::to_string(act));
  const float* bp = nullptr;
  if (!bias.is_none()) {
    keep = bias.cast<py::array>();
    check_array<float>(op, "bias", keep, 1, true);
    check_dim(op, "bias", keep, 0, N);
    bp = static_cast<const float*>(keep.data());
  }
  if (!out.writeable()) throw py::value_error(std::string(op) + ": out must be writeable");
  return {static_cast<const float*>(x.data()), elem_stride(x, 0), M, K, static_cast<const int8_t*>(packed.data()),
          bp, static_cast<float*>(out.mutable_data())};
}

}  // namespace

void register_int8_matmul(py::module_& m) {
  m.def(
      "int8_matmul",
      [](py::array a, py::array b, py::array out) {
        const char* op = "int8_matmul";
        check_array<int8_t>(op, "a", a, 2, false);
        check_array<int8_t>(op, "b", b, 2, false);
        check_array<int32_t>(op, "out", out, 2, true);
        const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
        check_dim(op, "b", b, 0, K);
        check_dim(op, "out", out, 0, M);
        check_dim(op, "out", out, 1, N);
        if (!out.writeable()) throw py::value_error("int8_matmul: out must be writeable");
        const auto* ap = static_cast<const int8_t*>(a.data());
        const auto* bp = static_cast<const int8_t*>(b.data());
        auto* cp = static_cast<int32_t*>(out.mutable_data());
        const int64_t sam = elem_stride(a, 0), sak = elem_stride(a, 1);
        const int64_t sbk = elem_stride(b, 0), sbn = elem_stride(b, 1);
        py::gil_scoped_release release;
        int8mm::matmul_s8(ap, sam, sak, bp, sbk, sbn, M, K, N, cp);
      },
      py::arg("a"), py::arg("b"), py::arg("out"),
      "out[M, N] = a[M, K] @ b[K, N] exactly (int8 x int8 -> wrapping int32); a, b any strides.");

  m.def(
      "int8_linear",
      [](py::array x, py::array packed, py::array colsum, py::array scale_w, py::object bias,
         int act, py::array out, int a_bits) {
        const char* op = "int8_linear";
        if (a_bits != 7 && a_bits != 8)
          throw py::value_error("int8_linear: a_bits must be 7 or 8, got " + std::to_string(a_bits));
        check_array<int32_t>(op, "weight_colsum", colsum, 1, true);
        check_array<float>(op, "weight_scale", scale_w, 1, true);
        const int64_t N = colsum.shape(0);
        check_dim(op, "weight_scale", scale_w, 0, N);
        py::array bias_arr;
        const LinearOperands o = linear_operands(op, x, packed, N, bias, act, out, bias_arr);
        const auto* cs = static_cast<const int32_t*>(colsum.data());
        const auto* sw = static_cast<const float*>(scale_w.data());
        py::gil_scoped_release release;
        int8mm::linear(o.x, o.ldx, o.M, o.K, o.w, cs, sw, o.bias, N, act, o.y, a_bits);
      },
      py::arg("x"), py::arg("packed_weight"), py::arg("weight_colsum"), py::arg("weight_scale"),
      py::arg("bias"), py::arg("act"), py::arg("out"), py::arg("a_bits") = 8,
      "out[M, N] = act(dequant(quant_u8(x) @ W_s8^T) + bias) with prepacked [N/16][K/4][16][4] weights; "
      "a_bits=7 quantizes x to [0, 127] (the AVX2 vpmaddubsw GEMM).");

  m.def(
      "int8_conv2d",
      [](py::array x, py::array packed, py::array colsum, py::array scale_w, py::object bias,
         int64_t kh, int64_t kw, int64_t stride, int64_t pad, int act, py::array out, int a_bits) {
        const char* op = "int8_conv2d";
        if (a_bits != 7 && a_bits != 8)
          throw py::value_error("int8_conv2d: a_bits must be 7 or 8, got " + std::to_string(a_bits));
        check_array<float>(op, "x", x, 4, true);
        check_array<int8_t>(op, "packed_weight", packed, 4, true);
        check_array<int32_t>(op, "weight_colsum", colsum, 1, true);
        check_array<float>(op, "weight_scale", scale_w, 1, true);
        check_array<float>(op, "out", out, 4, true);
        if (kh < 1 || kw < 1) throw py::value_error("int8_conv2d: kernel size must be >= 1");
        if (stride < 1) throw py::value_error("int8_conv2d: stride must be >= 1, got " + std::to_string(stride));
        if (pad < 0) throw py::value_error("int8_conv2d: padding must be >= 0, got " + std::to_string(pad));
        const int64_t B = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3);
        const int64_t Cout = colsum.shape(0), K = kh * kw * C;
        const int64_t Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
        if (H + 2 * pad < kh || W + 2 * pad < kw)
          throw py::value_error("int8_conv2d: the padded input is smaller than the kernel, got x shape " +
                                shape_str(x));
        check_dim(op, "packed_weight", packed, 0, (Cout + 15) / 16);
        check_dim(op, "packed_weight", packed, 1, (K + 3) / 4);
        check_dim(op, "packed_weight", packed, 2, 16);
        check_dim(op, "packed_weight", packed, 3, 4);
        check_dim(op, "weight_scale", scale_w, 0, Cout);
        check_dim(op, "out", out, 0, B);
        check_dim(op, "out", out, 1, Ho);
        check_dim(op, "out", out, 2, Wo);
        check_dim(op, "out", out, 3, Cout);
        if (act < int8mm::kActNone || act > int8mm::kActGeluTanh)
          throw py::value_error("int8_conv2d: act must be 0..3, got " + std::to_string(act));
        const float* bp = nullptr;
        py::array bias_arr;
        if (!bias.is_none()) {
          bias_arr = bias.cast<py::array>();
          check_array<float>(op, "bias", bias_arr, 1, true);
          check_dim(op, "bias", bias_arr, 0, Cout);
          bp = static_cast<const float*>(bias_arr.data());
        }
        if (!out.writeable()) throw py::value_error("int8_conv2d: out must be writeable");
        const auto* xp = static_cast<const float*>(x.data());
        const auto* wp = static_cast<const int8_t*>(packed.data());
        const auto* cs = static_cast<const int32_t*>(colsum.data());
        const auto* sw = static_cast<const float*>(scale_w.data());
        auto* yp = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        int8mm::conv2d_nhwc(xp, B, H, W, C, kh, kw, stride, pad, wp, cs, sw, bp, Cout, act, yp, a_bits);
      },
      py::arg("x"), py::arg("packed_weight"), py::arg("weight_colsum"), py::arg("weight_scale"),
      py::arg("bias"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("pad"), py::arg("act"),
      py::arg("out"), py::arg("a_bits") = 8,
      "out[B, Ho, Wo, Cout] = act(conv(x[B, H, W, C]) + bias): per-image u8 activations (7-bit with "
      "a_bits=7), im2col, INT8 GEMM.");

  m.def("int8_seven_bit_faster", &int8mm::seven_bit_activations_faster,
        "True where 7-bit activations (a_bits=7) multiply faster than 8-bit ones (the AVX2 tier).");

  m.def("int8_amx_usable", &int8mm::amx_usable,
        "True when the CPU and OS allow AMX-INT8 tiles (the AVX-512 GEMM then uses them for M >= 8).");
  m.def("int8_amx_enabled", &int8mm::amx_enabled);
  m.def("int8_set_amx", [](bool on) { int8mm::set_amx_enabled(on); }, py::arg("on"),
        "Switch the AMX tile path on/off (also: TALLOW_AMX=0); a no-op 'on' where AMX is unusable.");

  m.def(
      "int8_quantize_rows",
      [](py::array x, py::array q, py::array scale, py::array zp) {
        const char* op = "int8_quantize_rows";
        check_array<float>(op, "x", x, 2, false);
        check_row_major_rows(op, "x", x);
        check_array<uint8_t>(op, "q", q, 2, true);
        check_array<float>(op, "scale", scale, 1, true);
        check_array<int32_t>(op, "zp", zp, 1, true);
        const int64_t M = x.shape(0), K = x.shape(1);
        check_dim(op, "q", q, 0, M);
        check_dim(op, "q", q, 1, K);
        check_dim(op, "scale", scale, 0, M);
        check_dim(op, "zp", zp, 0, M);
        const auto* xp = static_cast<const float*>(x.data());
        const int64_t ldx = elem_stride(x, 0);
        auto* qp = static_cast<uint8_t*>(q.mutable_data());
        auto* sp = static_cast<float*>(scale.mutable_data());
        auto* zpp = static_cast<int32_t*>(zp.mutable_data());
        py::gil_scoped_release release;
        int8mm::quantize_rows(xp, ldx, M, K, qp, sp, zpp);
      },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("zp"),
      "Dynamic per-row asymmetric u8 quantization of x (the first step of int8_linear).");

  m.def(
      "int8_linear_b32",
      [](py::array x, py::array packed, py::array block_scale, py::object bias, int act, py::array out) {
        const char* op = "int8_linear_b32";
        check_array<float>(op, "out", out, 2, true);
        check_array<float>(op, "block_scale", block_scale, 3, true);
        const int64_t N = out.shape(1);
        py::array bias_arr;
        const LinearOperands o = linear_operands(op, x, packed, N, bias, act, out, bias_arr);
        check_dim(op, "block_scale", block_scale, 0, (N + 15) / 16);
        check_dim(op, "block_scale", block_scale, 1, (o.K + int8mm::kQBlock - 1) / int8mm::kQBlock);
        check_dim(op, "block_scale", block_scale, 2, 16);
        const auto* sp = static_cast<const float*>(block_scale.data());
        py::gil_scoped_release release;
        int8mm::linear_b32(o.x, o.ldx, o.M, o.K, o.w, sp, o.bias, N, act, o.y);
      },
      py::arg("x"), py::arg("packed_weight"), py::arg("block_scale"), py::arg("bias"), py::arg("act"),
      py::arg("out"),
      "out[M, N] = act(x @ W^T + bias) with weights and activations quantized per 32 k (symmetric s8, a "
      "scale per block): packed [N/16][K/4][16][4] weights, block_scale [N/16][ceil(K/32)][16].");

  m.def(
      "int8_quantize_rows_b32",
      [](py::array x, py::array q, py::array scale) {
        const char* op = "int8_quantize_rows_b32";
        check_array<float>(op, "x", x, 2, false);
        check_row_major_rows(op, "x", x);
        check_array<int8_t>(op, "q", q, 2, true);
        check_array<float>(op, "scale", scale, 2, true);
        const int64_t M = x.shape(0), K = x.shape(1);
        check_dim(op, "q", q, 0, M);
        check_dim(op, "q", q, 1, K);
        check_dim(op, "scale", scale, 0, M);
        check_dim(op, "scale", scale, 1, (K + int8mm::kQBlock - 1) / int8mm::kQBlock);
        const auto* xp = static_cast<const float*>(x.data());
        const int64_t ldx = elem_stride(x, 0);
        auto* qp = static_cast<int8_t*>(q.mutable_data());
        auto* sp = static_cast<float*>(scale.mutable_data());
        py::gil_scoped_release release;
        int8mm::quantize_rows_b32(xp, ldx, M, K, qp, sp);
      },
      py::arg("x"), py::arg("q"), py::arg("scale"),
      "Symmetric s8 quantization of x per 32 k (the first step of int8_linear_b32).");
}

}  // namespace tallow
