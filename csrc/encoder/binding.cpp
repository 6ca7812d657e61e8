// pybind11 binding of the native encoder (tallow._C.Encoder) and of its fp32
// linear kernel (tallow._C.pack_f32 / linear_f32, for the kernel tests).
// Borrowed buffers (embedding tables, LayerNorm parameters, INT8 weights) are
// kept alive by the Python object; every check names the argument; the GIL
// is released around the forward pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "common/array_checks.h"
#include "encoder/borrowed.h"
#include "encoder/encoder.h"
#include "encoder/model.h"

namespace py = pybind11;

namespace tallow {
namespace {

constexpr const char* kOp = "encoder";

class PyEncoder {
 public:
  PyEncoder(int64_t hidden, int64_t heads, int64_t intermediate, int64_t vocab, int64_t max_positions,
            int64_t type_vocab, double eps, int act)
      : enc_(std::make_unique<encoder::Encoder>(encoder::EncoderConfig{
            hidden, heads, intermediate, 0, vocab, max_positions, type_vocab, static_cast<float>(eps), act})) {
    if (act < 0 || act > 3) throw py::value_error("encoder: act must be 0..3, got " + std::to_string(act));
  }

  void set_embeddings(py::array word, py::array position, py::array token_type, py::array gamma, py::array beta) {
    const auto& c = enc_->config();
    encoder::Embeddings e;
    e.word = borrowed_.table("word_embeddings", word, c.vocab, c.hidden);
    e.position = borrowed_.table("position_embeddings", position, c.max_positions, c.hidden);
    e.token_type = borrowed_.table("token_type_embeddings", token_type, c.type_vocab, c.hidden);
    e.ln = norm("embeddings.LayerNorm", gamma, beta);
    enc_->set_embeddings(e);
    has_embeddings_ = true;
  }

  // A layer: dicts name -> arrays. fp32 linears: {"weight", "bias"};
  // INT8: {"packed", "colsum", "scale", "bias"}; LayerNorms: {"weight", "bias"}.
  void add_layer(py::dict qkv, py::dict out, py::dict ln1, py::dict ffn1, py::dict ffn2, py::dict ln2) {
    const auto& c = enc_->config();
    const int64_t H = c.hidden, F = c.intermediate;
    encoder::Layer L;
    L.qkv = borrowed_.linear("qkv", qkv, 3 * H, H);
    L.out = borrowed_.linear("attention.output", out, H, H);
    L.ln1 = norm("attention.output.LayerNorm", ln1["weight"], ln1["bias"]);
    L.ffn1 = borrowed_.linear("intermediate", ffn1, F, H);
    L.ffn2 = borrowed_.linear("output", ffn2, H, F);
    L.ln2 = norm("output.LayerNorm", ln2["weight"], ln2["bias"]);
    enc_->add_layer(std::move(L));
  }

  void forward(py::array ids, py::object type_ids, py::array cu, int pooling, bool normalize, py::array out) {
    const auto& c = enc_->config();
    if (!has_embeddings_) throw py::value_error("encoder: set_embeddings() was not called");
    check_array<int64_t>(kOp, "ids", ids, 1);
    check_array<int64_t>(kOp, "cu_seqlens", cu, 1);
    check_array<float>(kOp, "out", out, 2);
    if (!out.writeable()) throw py::value_error("encoder: out must be writeable");
    const int64_t T = ids.shape(0), B = cu.shape(0) - 1;
    if (B < 1) throw py::value_error("encoder: cu_seqlens must hold at least 2 offsets, got " + shape_str(cu));
    const int64_t* cp = static_cast<const int64_t*>(cu.data());
    if (cp[0] != 0 || cp[B] != T)
      throw py::value_error("encoder: cu_seqlens must start at 0 and end at len(ids) = " + std::to_string(T) +
                            ", got " + std::to_string(cp[0]) + " .. " + std::to_string(cp[B]));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = cp[b + 1] - cp[b];
      if (len < 1 || len > c.max_positions)
        throw py::value_error("encoder: sequence " + std::to_string(b) + " has " + std::to_string(len) +
                              " tokens; each needs 1.." + std::to_string(c.max_positions));
    }
    const int64_t* ip = static_cast<const int64_t*>(ids.data());
    for (int64_t t = 0; t < T; ++t)
      if (ip[t] < 0 || ip[t] >= c.vocab)
        throw py::value_error("encoder: token id " + std::to_string(ip[t]) + " at position " + std::to_string(t) +
                              " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
    const int64_t* tp = nullptr;
    py::array types;
    if (!type_ids.is_none()) {
      types = type_ids.cast<py::array>();
      check_array<int64_t>(kOp, "token_type_ids", types, 1);
      check_dim(kOp, "token_type_ids", types, 0, T);
      tp = static_cast<const int64_t*>(types.data());
      for (int64_t t = 0; t < T; ++t)
        if (tp[t] < 0 || tp[t] >= c.type_vocab)
          throw py::value_error("encoder: token type " + std::to_string(tp[t]) + " at position " +
                                std::to_string(t) + " is outside [0, " + std::to_string(c.type_vocab) + ")");
    }
    check_dim(kOp, "out", out, 0, pooling == encoder::kPoolNone ? T : B);
    check_dim(kOp, "out", out, 1, c.hidden);
    if (pooling < 0 || pooling > 2) throw py::value_error("encoder: pooling must be 0 (none), 1 (mean) or 2 (cls)");
    float* op = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    enc_->forward(ip, tp, cp, B, pooling, normalize, op);
  }

  int64_t num_layers() const { return enc_->num_layers(); }
  int64_t owned_bytes() const { return enc_->owned_bytes(); }

 private:
  encoder::LayerNormParams norm(const std::string& name, py::handle gamma, py::handle beta) {
    const int64_t H = enc_->config().hidden;
    return {borrowed_.vec<float>(name + ".weight", gamma, H), borrowed_.vec<float>(name + ".bias", beta, H)};
  }

  std::unique_ptr<encoder::Encoder> enc_;
  encoder::Borrowed borrowed_{kOp};  // borrowed buffers stay alive with the model
  bool has_embeddings_ = false;
};

}  // namespace

void register_encoder(py::module_& m) {
  py::class_<PyEncoder>(m, "Encoder",
                        "Native BERT-family encoder: one call runs embeddings, every layer and the pooling "
                        "over packed sequences (see csrc/encoder/encoder.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int>(), py::arg("hidden"),
           py::arg("heads"), py::arg("intermediate"), py::arg("vocab"), py::arg("max_positions"),
           py::arg("type_vocab"), py::arg("eps"), py::arg("act"))
      .def("set_embeddings", &PyEncoder::set_embeddings, py::arg("word"), py::arg("position"),
           py::arg("token_type"), py::arg("gamma"), py::arg("beta"))
      .def("add_layer", &PyEncoder::add_layer, py::arg("qkv"), py::arg("out"), py::arg("ln1"), py::arg("ffn1"),
           py::arg("ffn2"), py::arg("ln2"))
      .def("forward", &PyEncoder::forward, py::arg("ids"), py::arg("token_type_ids"), py::arg("cu_seqlens"),
           py::arg("pooling"), py::arg("normalize"), py::arg("out"))
      .def_property_readonly("num_layers", &PyEncoder::num_layers)
      .def_property_readonly("owned_bytes", &PyEncoder::owned_bytes);

  m.def(
      "pack_f32",
      [](py::array w) {
        check_array<float>("pack_f32", "weight", w, 2);
        const int64_t N = w.shape(0), K = w.shape(1);
        py::array_t<float> out({(N + encoder::kPanel - 1) / encoder::kPanel, K, int64_t{encoder::kPanel}});
        encoder::pack_weight(static_cast<const float*>(w.data()), N, K, out.mutable_data());
        return out;
      },
      py::arg("weight"), "Packs W [N, K] float32 into the fp32 GEMM's panels [ceil(N/16), K, 16].");
  m.def(
      "linear_f32",
      [](py::array x, py::array packed, py::object bias, int64_t N, int act, py::array out) {
        const char* op = "linear_f32";
        check_array<float>(op, "x", x, 2);
        check_array<float>(op, "packed", packed, 3);
        check_array<float>(op, "out", out, 2);
        const int64_t M = x.shape(0), K = x.shape(1);
        check_dim(op, "packed", packed, 0, (N + encoder::kPanel - 1) / encoder::kPanel);
        check_dim(op, "packed", packed, 1, K);
        check_dim(op, "out", out, 0, M);
        check_dim(op, "out", out, 1, N);
        if (act < 0 || act > 3) throw py::value_error("linear_f32: act must be 0..3");
        const float* bp = nullptr;
        py::array b;
        if (!bias.is_none()) {
          b = bias.cast<py::array>();
          check_array<float>(op, "bias", b, 1);
          check_dim(op, "bias", b, 0, N);
          bp = static_cast<const float*>(b.data());
        }
        const float* xp = static_cast<const float*>(x.data());
        const float* pp = static_cast<const float*>(packed.data());
        float* yp = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        encoder::linear_fp32(xp, K, M, pp, bp, N, K, act, yp);
      },
      py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"), py::arg("act"), py::arg("out"),
      "out[M, N] = act(x[M, K] W^T + bias) with W packed by pack_f32.");
}

}  // namespace tallow
