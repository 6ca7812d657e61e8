// pybind11 binding of the native decoder step (tallow._C.Decoder). Borrowed
// buffers (embedding and RoPE tables, norms, INT8 weights) are kept alive by
// the Python object. The KV pool arrives as raw addresses with its strides
// (python/tallow/models/decoder_native.py checks every layer's view against
// them): turning 2 x layers tensors into numpy arrays on every step would
// cost more than the step's glue.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/array_checks.h"
#include "decoder/decoder.h"
#include "encoder/borrowed.h"

namespace py = pybind11;

namespace tallow {
namespace {

constexpr const char* kOp = "decoder";

class PyDecoder {
 public:
  PyDecoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
            int64_t vocab, int64_t max_positions, int norm, int mlp, int mlp_act, double eps, bool rope)
      : dec_(std::make_unique<decoder::Decoder>(decoder::DecoderConfig{
            hidden, heads, kv_heads, head_dim, intermediate, vocab, max_positions, norm, mlp, mlp_act,
            static_cast<float>(eps), rope})) {
    if (norm < 0 || norm > 1) throw py::value_error("decoder: norm must be 0 (LayerNorm) or 1 (RMSNorm)");
    if (mlp < 0 || mlp > 1) throw py::value_error("decoder: mlp must be 0 (GELU MLP) or 1 (SwiGLU)");
    if (mlp_act < 0 || mlp_act > 3) throw py::value_error("decoder: mlp_act must be 0..3");
    if (head_dim % 2) throw py::value_error("decoder: head_dim must be even");
  }

  void set_embeddings(py::array tokens, py::object positions) {
    const auto& c = dec_->config();
    const float* wpe = nullptr;
    if (!positions.is_none()) wpe = borrowed_.table("position_embeddings", positions.cast<py::array>(), c.max_positions, c.hidden);
    dec_->set_embeddings(borrowed_.table("token_embeddings", tokens, c.vocab, c.hidden), wpe);
    has_embeddings_ = true;
  }

  void set_rope(py::array cos, py::array sin) {
    const auto& c = dec_->config();
    dec_->set_rope(borrowed_.table("rope_cos", cos, c.max_positions, c.head_dim),
                   borrowed_.table("rope_sin", sin, c.max_positions, c.head_dim));
    has_rope_ = true;
  }

  void set_final(py::dict norm, py::dict lm_head) {
    const auto& c = dec_->config();
    dec_->set_final(make_norm("final_norm", norm), borrowed_.linear("lm_head", lm_head, c.vocab, c.hidden));
    has_final_ = true;
  }

  void add_block(py::dict norm1, py::dict qkv, py::dict out, py::dict norm2, py::dict fc, py::dict proj) {
    const auto& c = dec_->config();
    const int64_t qw = c.heads * c.head_dim, kw = c.kv_heads * c.head_dim, F = c.intermediate;
    decoder::Block b;
    b.norm1 = make_norm("norm1", norm1);
    b.qkv = borrowed_.linear("qkv", qkv, qw + 2 * kw, c.hidden);
    b.out = borrowed_.linear("out", out, c.hidden, qw);
    b.norm2 = make_norm("norm2", norm2);
    b.fc = borrowed_.linear("fc", fc, c.mlp == decoder::kSwiGlu ? 2 * F : F, c.hidden);
    b.proj = borrowed_.linear("proj", proj, c.hidden, F);
    dec_->add_block(std::move(b));
  }

  void step(py::array tokens, py::array positions, py::array k_ptrs, py::array v_ptrs, int64_t s_slot,
            int64_t s_head, int64_t s_pos, int64_t length, bool bf16, py::array logits) {
    const auto& c = dec_->config();
    check_ready();
    check_array<int64_t>(kOp, "tokens", tokens, 1);
    check_array<int64_t>(kOp, "positions", positions, 1);
    const int64_t B = tokens.shape(0);
    if (B < 1) throw py::value_error("decoder: needs at least one row");
    check_dim(kOp, "positions", positions, 0, B);
    check_logits(logits, B);
    const int64_t* tp = static_cast<const int64_t*>(tokens.data());
    const int64_t* pp = static_cast<const int64_t*>(positions.data());
    const int64_t limit = std::min(length, c.max_positions);
    for (int64_t b = 0; b < B; ++b) {
      if (tp[b] < 0 || tp[b] >= c.vocab)
        throw py::value_error("decoder: token " + std::to_string(tp[b]) + " of row " + std::to_string(b) +
                              " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
      if (pp[b] < 0 || pp[b] >= limit)
        throw py::value_error("decoder: position " + std::to_string(pp[b]) + " of row " + std::to_string(b) +
                              " is outside [0, " + std::to_string(limit) + ")");
    }
    const std::vector<decoder::CacheLayer> pool = caches(k_ptrs, v_ptrs, s_slot, s_head, s_pos, length);
    float* lp = static_cast<float*>(logits.mutable_data());
    py::gil_scoped_release release;
    dec_->step(tp, pp, B, pool.data(), bf16, lp);
  }

  void prefill(py::array tokens, py::array cu, py::array k_ptrs, py::array v_ptrs, int64_t s_slot, int64_t s_head,
               int64_t s_pos, int64_t length, bool bf16, py::array logits) {
    const auto& c = dec_->config();
    check_ready();
    check_array<int64_t>(kOp, "tokens", tokens, 1);
    check_array<int64_t>(kOp, "cu_seqlens", cu, 1);
    const int64_t B = cu.shape(0) - 1, T = tokens.shape(0);
    if (B < 1) throw py::value_error("decoder: cu_seqlens must hold at least 2 offsets");
    check_logits(logits, B);
    const int64_t* cp = static_cast<const int64_t*>(cu.data());
    const int64_t* tp = static_cast<const int64_t*>(tokens.data());
    if (cp[0] != 0 || cp[B] != T)
      throw py::value_error("decoder: cu_seqlens must start at 0 and end at len(tokens) = " + std::to_string(T));
    const int64_t limit = std::min(length, c.max_positions);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = cp[b + 1] - cp[b];
      if (n < 1 || n > limit)
        throw py::value_error("decoder: prompt " + std::to_string(b) + " has " + std::to_string(n) +
                              " tokens; each needs 1.." + std::to_string(limit));
    }
    for (int64_t t = 0; t < T; ++t)
      if (tp[t] < 0 || tp[t] >= c.vocab)
        throw py::value_error("decoder: token " + std::to_string(tp[t]) + " at position " + std::to_string(t) +
                              " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
    const std::vector<decoder::CacheLayer> pool = caches(k_ptrs, v_ptrs, s_slot, s_head, s_pos, length);
    float* lp = static_cast<float*>(logits.mutable_data());
    py::gil_scoped_release release;
    dec_->prefill(tp, cp, B, pool.data(), bf16, lp);
  }

  int64_t num_blocks() const { return dec_->num_blocks(); }

 private:
  decoder::Norm make_norm(const std::string& name, py::dict d) {
    const int64_t E = dec_->config().hidden;
    decoder::Norm n;
    n.gamma = borrowed_.vec<float>(name + ".weight", d["weight"], E);
    if (d.contains("bias") && !d["bias"].is_none()) n.beta = borrowed_.vec<float>(name + ".bias", d["bias"], E);
    if (dec_->config().norm == decoder::kLayerNorm && !n.beta)
      throw py::value_error("decoder: " + name + " is a LayerNorm and needs a bias");
    return n;
  }

  void check_ready() const {
    if (!has_embeddings_ || !has_final_ || (dec_->config().rope && !has_rope_))
      throw py::value_error("decoder: set_embeddings, set_final (and set_rope) must be called first");
  }

  // The pool's per-layer addresses (checked against the model's layers) and strides.
  std::vector<decoder::CacheLayer> caches(py::array k_ptrs, py::array v_ptrs, int64_t s_slot, int64_t s_head,
                                          int64_t s_pos, int64_t length) const {
    const int64_t layers = dec_->num_blocks();
    check_array<int64_t>(kOp, "k_ptrs", k_ptrs, 1);
    check_array<int64_t>(kOp, "v_ptrs", v_ptrs, 1);
    check_dim(kOp, "k_ptrs", k_ptrs, 0, layers);
    check_dim(kOp, "v_ptrs", v_ptrs, 0, layers);
    std::vector<decoder::CacheLayer> out(static_cast<size_t>(layers));
    const int64_t* kp = static_cast<const int64_t*>(k_ptrs.data());
    const int64_t* vp = static_cast<const int64_t*>(v_ptrs.data());
    for (int64_t i = 0; i < layers; ++i)
      out[i] = {reinterpret_cast<void*>(kp[i]), reinterpret_cast<void*>(vp[i]), s_slot, s_head, s_pos, length};
    return out;
  }

  void check_logits(py::array logits, int64_t rows) const {
    check_array<float>(kOp, "logits", logits, 2);
    check_dim(kOp, "logits", logits, 0, rows);
    check_dim(kOp, "logits", logits, 1, dec_->config().vocab);
    if (!logits.writeable()) throw py::value_error("decoder: logits must be writeable");
  }

  std::unique_ptr<decoder::Decoder> dec_;
  encoder::Borrowed borrowed_{kOp};  // borrowed buffers stay alive with the model
  bool has_embeddings_ = false, has_rope_ = false, has_final_ = false;
};

}  // namespace

void register_decoder(py::module_& m) {
  py::class_<PyDecoder>(m, "Decoder",
                        "Native decode step of a GPT-2 or Llama-family model over the scheduler's rows "
                        "(see csrc/decoder/decoder.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, double, bool>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("vocab"), py::arg("max_positions"), py::arg("norm"), py::arg("mlp"), py::arg("mlp_act"),
           py::arg("eps"), py::arg("rope"))
      .def("set_embeddings", &PyDecoder::set_embeddings, py::arg("tokens"), py::arg("positions"))
      .def("set_rope", &PyDecoder::set_rope, py::arg("cos"), py::arg("sin"))
      .def("set_final", &PyDecoder::set_final, py::arg("norm"), py::arg("lm_head"))
      .def("add_block", &PyDecoder::add_block, py::arg("norm1"), py::arg("qkv"), py::arg("out"), py::arg("norm2"),
           py::arg("fc"), py::arg("proj"))
      .def("step", &PyDecoder::step, py::arg("tokens"), py::arg("positions"), py::arg("k_ptrs"), py::arg("v_ptrs"),
           py::arg("s_slot"), py::arg("s_head"), py::arg("s_pos"), py::arg("length"), py::arg("bf16"),
           py::arg("logits"))
      .def("prefill", &PyDecoder::prefill, py::arg("tokens"), py::arg("cu_seqlens"), py::arg("k_ptrs"),
           py::arg("v_ptrs"), py::arg("s_slot"), py::arg("s_head"), py::arg("s_pos"), py::arg("length"),
           py::arg("bf16"), py::arg("logits"))
      .def_property_readonly("num_blocks", &PyDecoder::num_blocks);
}

}  // namespace tallow
