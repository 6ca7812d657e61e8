// tallow._C_cuda: pybind11 bindings of the CUDA kernels.
//
// Nothing here links against libtorch: the Python layer passes device
// pointers (tensor.data_ptr()), shapes, strides and the current stream
// (torch.cuda.current_stream().cuda_stream) as integers. Checks at this
// boundary name the argument (ValueError); a failed launch raises
// RuntimeError with CUDA's message. The kernels run asynchronously on the
// given stream, so the GIL is not held during them anyway; launches release
// it too.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace py = pybind11;
using namespace tallow::cuda;

namespace {

void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string("tallow._C_cuda.") + what + ": " + error_string(err));
}

void need(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

std::vector<int64_t> three(const std::vector<int64_t>& v, const char* name) {
  need(v.size() == 3, std::string("attention_forward: ") + name + " must hold 3 strides (B, H, L), got " +
                          std::to_string(v.size()));
  return v;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "tallow CUDA kernels (attention, int8 GEMM, preprocess); device pointers in, async on a stream";

  m.def("device_count", []() {
    int err = 0;
    const int n = device_count(&err);
    return py::make_tuple(n, err == 0 ? std::string() : std::string(error_string(err)));
  }, "(number of CUDA devices, error message or '') — never raises");

  m.def("device_info", [](int device) {
    int major = 0, minor = 0, sms = 0;
    check(device_info(device, &major, &minor, &sms), "device_info");
    return py::make_tuple(major, minor, sms);
  }, py::arg("device"), "(major, minor, multiprocessor count)");

  m.def("attention_splits", &attention_splits, py::arg("bh"), py::arg("lq"), py::arg("lk"), py::arg("sms"));

  m.def("attention_forward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t mask, int64_t B, int64_t H, int64_t Lq,
           int64_t Lk, int64_t D, std::vector<int64_t> sq, std::vector<int64_t> sk, std::vector<int64_t> sv,
           std::vector<int64_t> so, int64_t mask_sb, int dtype, bool causal, double scale, int splits,
           uintptr_t workspace, uintptr_t stream) {
          need(B >= 0 && H >= 0 && Lq >= 0 && Lk >= Lq, "attention_forward: need B, H >= 0 and Lk >= Lq >= 0");
          need(D >= 1 && D <= 256, "attention_forward: D must be in [1, 256], got " + std::to_string(D));
          need(dtype >= 0 && dtype <= 2, "attention_forward: dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
          need(splits >= 1, "attention_forward: splits must be >= 1");
          need(q && k && v && out, "attention_forward: null q/k/v/out pointer");
          need(splits == 1 || workspace != 0, "attention_forward: splits > 1 needs a workspace");
          AttnArgs a{};
          a.q = ptr<const void>(q);
          a.k = ptr<const void>(k);
          a.v = ptr<const void>(v);
          a.out = ptr<void>(out);
          a.mask = ptr<const uint8_t>(mask);
          a.B = B; a.H = H; a.Lq = Lq; a.Lk = Lk; a.D = D;
          const auto s1 = three(sq, "sq"), s2 = three(sk, "sk"), s3 = three(sv, "sv"), s4 = three(so, "so");
          for (int i = 0; i < 3; ++i) {
            a.sq[i] = s1[i]; a.sk[i] = s2[i]; a.sv[i] = s3[i]; a.so[i] = s4[i];
          }
          a.mask_sb = mask_sb;
          a.dtype = dtype;
          a.causal = causal;
          a.scale = (float)scale;
          a.splits = splits;
          a.workspace = ptr<float>(workspace);
          if (B * H * Lq == 0) return;
          int err;
          {
            py::gil_scoped_release release;
            err = attention_forward(a, stream);
          }
          check(err, "attention_forward");
        });

  m.def("int8_quantize_rows",
        [](uintptr_t x, uintptr_t xq, uintptr_t scale, uintptr_t zp, int64_t M, int64_t K, int64_t ldx,
           uintptr_t stream) {
          need(M >= 0 && K >= 1 && ldx >= K, "int8_quantize_rows: need M >= 0, K >= 1, ldx >= K");
          int err;
          {
            py::gil_scoped_release release;
            err = int8_quantize_rows(ptr<const float>(x), ptr<int8_t>(xq), ptr<float>(scale), ptr<int32_t>(zp), M,
                                     K, ldx, stream);
          }
          check(err, "int8_quantize_rows");
        });

  m.def("int8_gemm",
        [](uintptr_t a, uintptr_t w, uintptr_t c, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldw,
           int64_t ldc, bool linear, int act, uintptr_t sx, uintptr_t zp, uintptr_t colsum, uintptr_t sw,
           uintptr_t bias, int path, uintptr_t stream) {
          need(M >= 0 && N >= 0 && K >= 1, "int8_gemm: need M, N >= 0 and K >= 1");
          need(lda >= K && ldw >= K && ldc >= N, "int8_gemm: leading dimensions too small");
          need(act >= 0 && act <= 3, "int8_gemm: act must be 0..3, got " + std::to_string(act));
          need(path >= 0 && path <= 2, "int8_gemm: path must be 0 (auto), 1 (mma) or 2 (dp4a)");
          need(!linear || (sx && zp && colsum && sw), "int8_gemm: linear needs sx, zp, colsum, sw");
          GemmArgs g{};
          g.a = ptr<const int8_t>(a);
          g.w = ptr<const int8_t>(w);
          g.c = ptr<void>(c);
          g.M = M; g.N = N; g.K = K; g.lda = lda; g.ldw = ldw; g.ldc = ldc;
          g.linear = linear;
          g.act = act;
          g.sx = ptr<const float>(sx);
          g.zp = ptr<const int32_t>(zp);
          g.colsum = ptr<const int32_t>(colsum);
          g.sw = ptr<const float>(sw);
          g.bias = ptr<const float>(bias);
          g.path = path;
          int err;
          {
            py::gil_scoped_release release;
            err = int8_gemm(g, stream);
          }
          check(err, "int8_gemm");
        });

  m.def("preprocess_resample",
        [](uintptr_t packed, uintptr_t meta, uintptr_t taps, uintptr_t lut, uintptr_t out, int64_t n, int64_t crop,
           int out_dtype, uintptr_t stream) {
          need(n >= 0 && n <= 65535, "preprocess_resample: n must be in [0, 65535]");
          need(crop >= 1 && crop <= 65535, "preprocess_resample: crop must be in [1, 65535]");
          need(out_dtype == 0 || out_dtype == 1, "preprocess_resample: out_dtype must be 0 (f32) or 1 (f16)");
          int err;
          {
            py::gil_scoped_release release;
            err = preprocess_resample(ptr<const uint8_t>(packed), ptr<const int64_t>(meta), ptr<const int32_t>(taps),
                                      ptr<const float>(lut), ptr<void>(out), n, crop, out_dtype, stream);
          }
          check(err, "preprocess_resample");
        });
}
