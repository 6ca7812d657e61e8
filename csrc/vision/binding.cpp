// pybind11 binding of the native ResNet (tallow._C.ResNet) and of its
// convolution (tallow._C.conv2d_f32, for the kernel tests). Weights are
// copied (packed) at load; every check names the argument; the GIL is
// released around the forward pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/array_checks.h"
#include "vision/resnet.h"

namespace py = pybind11;

namespace tallow {
namespace {

constexpr const char* kOp = "resnet";

// An INT8 convolution from tallow.ops.QuantizedLinear / QuantizedConv2d's
// buffers: {"shape": (cout, cin, kh, kw), "packed": int8 [ceil(cout / 16),
// ceil(K / 4), 16, 4], "colsum": int32 [cout], "scale": float32 [cout],
// "bias": float32 [cout]}.
vision::ConvLayer int8_conv_layer(const std::string& name, py::dict d, int64_t stride) {
  for (const char* key : {"shape", "packed", "colsum", "scale", "bias"})
    if (!d.contains(key))
      throw py::value_error(std::string(kOp) + ": " + name + " (INT8) needs '" + key + "'");
  std::vector<int64_t> shape;
  for (py::handle v : d["shape"].cast<py::sequence>()) shape.push_back(v.cast<int64_t>());
  if (shape.size() != 4 || shape[0] < 1 || shape[1] < 1 || shape[2] < 1 || shape[3] < 1)
    throw py::value_error(std::string(kOp) + ": " + name + ".shape must be 4 sizes >= 1 (cout, cin, kh, kw)");
  const int64_t cout = shape[0], cin = shape[1], kh = shape[2], kw = shape[3];
  py::array p = d["packed"].cast<py::array>(), cs = d["colsum"].cast<py::array>();
  py::array sc = d["scale"].cast<py::array>(), b = d["bias"].cast<py::array>();
  const std::string pn = name + ".packed", csn = name + ".colsum", scn = name + ".scale", bn = name + ".bias";
  check_array<int8_t>(kOp, pn.c_str(), p, 4);
  check_dim(kOp, pn.c_str(), p, 0, (cout + 15) / 16);
  check_dim(kOp, pn.c_str(), p, 1, (kh * kw * cin + 3) / 4);
  check_dim(kOp, pn.c_str(), p, 2, 16);
  check_dim(kOp, pn.c_str(), p, 3, 4);
  check_array<int32_t>(kOp, csn.c_str(), cs, 1);
  check_dim(kOp, csn.c_str(), cs, 0, cout);
  check_array<float>(kOp, scn.c_str(), sc, 1);
  check_dim(kOp, scn.c_str(), sc, 0, cout);
  check_array<float>(kOp, bn.c_str(), b, 1);
  check_dim(kOp, bn.c_str(), b, 0, cout);
  return vision::ResNet::make_int8_conv(static_cast<const int8_t*>(p.data()), static_cast<const int32_t*>(cs.data()),
                                        static_cast<const float*>(sc.data()), static_cast<const float*>(b.data()),
                                        cout, cin, kh, kw, stride);
}

// A convolution from {"weight": [cout, cin, kh, kw] float32, "bias": [cout]},
// or an INT8 one (a dict with "packed": int8_conv_layer).
vision::ConvLayer conv_layer(const std::string& name, py::dict d, int64_t stride, int winograd = 0) {
  if (d.contains("packed")) return int8_conv_layer(name, d, stride);
  const std::string wn = name + ".weight", bn = name + ".bias";
  if (!d.contains("weight") || !d.contains("bias"))
    throw py::value_error(std::string(kOp) + ": " + name + " needs 'weight' and 'bias'");
  py::array w = d["weight"].cast<py::array>(), b = d["bias"].cast<py::array>();
  check_array<float>(kOp, wn.c_str(), w, 4);
  check_array<float>(kOp, bn.c_str(), b, 1);
  check_dim(kOp, bn.c_str(), b, 0, w.shape(0));
  return vision::ResNet::make_conv(static_cast<const float*>(w.data()), static_cast<const float*>(b.data()),
                                   w.shape(0), w.shape(1), w.shape(2), w.shape(3), stride, winograd);
}

void expect(bool ok, const std::string& what) {
  if (!ok) throw py::value_error(std::string(kOp) + ": " + what);
}

class PyResNet {
 public:
  void set_stem(py::dict conv, int64_t stride) {
    expect(stride >= 1, "stem stride must be >= 1");
    vision::ConvLayer l = conv_layer("stem", conv, stride);
    expect(l.kh == l.kw && l.kh % 2 == 1, "the stem kernel must be square and odd, got " +
                                              std::to_string(l.kh) + "x" + std::to_string(l.kw));
    channels_ = l.cout;
    net_.set_stem(std::move(l));
  }

  // One bottleneck: conv1 1x1, conv2 3x3 with the block's stride, conv3
  // 1x1; `down` (1x1, the same stride) or None. winograd: 0, or m = 2 / 4
  // to run conv2 by Winograd F(m, 3) (stride 1 only). A block's layers are
  // all fp32 ({"weight", "bias"}) or all INT8 ({"packed", ...}: no Winograd).
  void add_block(py::dict conv1, py::dict conv2, py::dict conv3, py::object down, int64_t stride, int winograd) {
    expect(channels_ > 0, "set_stem() must come before add_block()");
    expect(stride >= 1, "block stride must be >= 1");
    expect(winograd == 0 || ((winograd == 2 || winograd == 4) && stride == 1),
           "winograd must be 0, or 2 or 4 with stride 1, got " + std::to_string(winograd) + " with stride " +
               std::to_string(stride));
    const std::string p = "block " + std::to_string(net_.num_blocks());
    vision::Bottleneck b;
    b.conv1 = conv_layer(p + ".conv1", conv1, 1);
    b.conv2 = conv_layer(p + ".conv2", conv2, stride, winograd);
    b.conv3 = conv_layer(p + ".conv3", conv3, 1);
    expect(b.conv1.kh == 1 && b.conv1.kw == 1 && b.conv3.kh == 1 && b.conv3.kw == 1,
           p + ": conv1 and conv3 must be 1x1");
    expect(b.conv2.kh == 3 && b.conv2.kw == 3, p + ": conv2 must be 3x3");
    expect(b.conv1.cin == channels_, p + ".conv1 takes " + std::to_string(b.conv1.cin) +
                                         " channels, the previous layer gives " + std::to_string(channels_));
    expect(b.conv2.cin == b.conv1.cout && b.conv3.cin == b.conv2.cout,
           p + ": conv1 -> conv2 -> conv3 channels do not chain");
    const bool int8 = b.conv1.is_int8();
    expect(b.conv2.is_int8() == int8 && b.conv3.is_int8() == int8,
           p + ": conv1, conv2 and conv3 must all be fp32 or all INT8");
    expect(!(int8 && winograd), p + ": an INT8 conv2 runs direct (winograd must be 0)");
    if (!down.is_none()) {
      b.down = conv_layer(p + ".downsample", down.cast<py::dict>(), stride);
      expect(b.down.is_int8() == int8, p + ".downsample must be " + (int8 ? "INT8" : "fp32") + " as the block");
      expect(b.down.kh == 1 && b.down.kw == 1 && b.down.cin == channels_ && b.down.cout == b.conv3.cout,
             p + ".downsample must be 1x1 from " + std::to_string(channels_) + " to " +
                 std::to_string(b.conv3.cout) + " channels");
      b.has_down = true;
    } else {
      expect(stride == 1 && b.conv3.cout == channels_,
             p + " has no downsample, so it needs stride 1 and conv3 out channels = its input's (" +
                 std::to_string(channels_) + ")");
    }
    channels_ = b.conv3.cout;
    net_.add_block(std::move(b));
  }

  void features(py::array x, py::array out) {
    check_array<float>(kOp, "images", x, 4);
    check_array<float>(kOp, "out", out, 2);
    expect(net_.num_blocks() > 0, "the model has no blocks");
    expect(out.writeable(), "out must be writeable");
    const int64_t B = x.shape(0), H = x.shape(2), W = x.shape(3);
    check_dim(kOp, "images", x, 1, net_.stem_channels());
    expect(H >= 32 && W >= 32, "images must be at least 32x32, got shape " + shape_str(x));
    check_dim(kOp, "out", out, 0, B);
    check_dim(kOp, "out", out, 1, net_.feature_size());
    const float* xp = static_cast<const float*>(x.data());
    float* op = static_cast<float*>(out.mutable_data());
    if (B == 0) return;
    // Checked here rather than with a torch op in Python: any torch op
    // leaves torch's OpenMP threads spinning on the cores this forward needs.
    const int64_t n = B * net_.stem_channels() * H * W;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(xp[i]);
    if (!finite) throw py::value_error("images contain NaN or inf");
    py::gil_scoped_release release;
    net_.features(xp, B, H, W, op);
  }

  int64_t feature_size() const { return net_.feature_size(); }
  int64_t num_blocks() const { return net_.num_blocks(); }
  int64_t owned_bytes() const { return net_.owned_bytes(); }

 private:
  vision::ResNet net_;
  int64_t channels_ = 0;  // output channels of the last layer added
};

}  // namespace

void register_vision(py::module_& m) {
  py::class_<PyResNet>(m, "ResNet",
                       "Native bottleneck ResNet (v1.5): stem, max pool, blocks and global average pool in one "
                       "call on NHWC buffers (see csrc/vision/conv.h).")
      .def(py::init<>())
      .def("set_stem", &PyResNet::set_stem, py::arg("conv"), py::arg("stride"))
      .def("add_block", &PyResNet::add_block, py::arg("conv1"), py::arg("conv2"), py::arg("conv3"),
           py::arg("down"), py::arg("stride"), py::arg("winograd") = 0)
      .def("features", &PyResNet::features, py::arg("images"), py::arg("out"))
      .def_property_readonly("feature_size", &PyResNet::feature_size)
      .def_property_readonly("num_blocks", &PyResNet::num_blocks)
      .def_property_readonly("owned_bytes", &PyResNet::owned_bytes);

  m.def(
      "conv2d_f32",
      [](py::array x, py::array weight, py::object bias, int64_t stride, int64_t pad, py::object residual,
         int act, py::array out, int winograd) {
        const char* op = "conv2d_f32";
        check_array<float>(op, "x", x, 4);
        check_array<float>(op, "weight", weight, 4);
        check_array<float>(op, "out", out, 4);
        if (stride < 1) throw py::value_error("conv2d_f32: stride must be >= 1, got " + std::to_string(stride));
        if (pad < 0) throw py::value_error("conv2d_f32: padding must be >= 0, got " + std::to_string(pad));
        if (act != 0 && act != 1) throw py::value_error("conv2d_f32: act must be 0 (none) or 1 (relu)");
        if (winograd != 0 && winograd != 2 && winograd != 4)
          throw py::value_error("conv2d_f32: winograd must be 0 (direct), 2 or 4, got " + std::to_string(winograd));
        const int64_t B = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3);
        const int64_t N = weight.shape(0), KH = weight.shape(2), KW = weight.shape(3);
        check_dim(op, "weight", weight, 1, C);
        if (H + 2 * pad < KH || W + 2 * pad < KW)
          throw py::value_error("conv2d_f32: the padded input is smaller than the kernel, got x shape " +
                                shape_str(x) + " and weight shape " + shape_str(weight));
        const int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
        check_dim(op, "out", out, 0, B);
        check_dim(op, "out", out, 1, OH);
        check_dim(op, "out", out, 2, OW);
        check_dim(op, "out", out, 3, N);
        if (!out.writeable()) throw py::value_error("conv2d_f32: out must be writeable");
        const float* bp = nullptr;
        py::array b, r;
        if (!bias.is_none()) {
          b = bias.cast<py::array>();
          check_array<float>(op, "bias", b, 1);
          check_dim(op, "bias", b, 0, N);
          bp = static_cast<const float*>(b.data());
        }
        const float* rp = nullptr;
        if (!residual.is_none()) {
          r = residual.cast<py::array>();
          check_array<float>(op, "residual", r, 4);
          for (int d = 0; d < 4; ++d) check_dim(op, "residual", r, d, out.shape(d));
          rp = static_cast<const float*>(r.data());
        }
        if (winograd && (KH != 3 || KW != 3 || stride != 1 || pad != 1 || rp))
          throw py::value_error("conv2d_f32: winograd needs a 3x3 kernel, stride 1, padding 1 and no residual");
        vision::ConvLayer l = vision::ResNet::make_conv(static_cast<const float*>(weight.data()), bp, N, C, KH,
                                                        KW, stride, winograd);
        const float* xp = static_cast<const float*>(x.data());
        float* yp = static_cast<float*>(out.mutable_data());
        if (B == 0) return;
        py::gil_scoped_release release;
        vision::conv_nhwc(l, xp, B, H, W, pad, rp, act, yp);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
      py::arg("residual"), py::arg("act"), py::arg("out"), py::arg("winograd") = 0,
      "out[B, OH, OW, N] = act(conv2d(x[B, H, W, C], weight[N, C, KH, KW]) + bias + residual), NHWC, "
      "zero padding: the native ResNet's implicit-GEMM convolution, or Winograd F(m, 3) with winograd=m "
      "(weights packed per call).");
}

}  // namespace tallow
