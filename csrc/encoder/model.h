// The native encoder model (baseline code only: encoder.cpp, binding.cpp).
// Holds the weights (fp32 packed here; INT8 and embedding tables borrowed
// from the caller's buffers, which must outlive it), a workspace that only
// grows (no allocation per forward once warm) and runs a forward pass in one
// call. See encoder.h for the maths.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace tallow {
namespace encoder {

struct EncoderConfig {
  int64_t hidden, heads, intermediate, layers;
  int64_t vocab, max_positions, type_vocab;
  float eps;
  int act;  // FFN activation (int8mm::Act code)
};

// One linear layer y = act(x W^T + b): fp32 (packed here) or INT8 (borrowed
// int8mm buffers: packed [ceil(N/16)][ceil(K/4)][16][4], colsum, scale).
struct Linear {
  int64_t N = 0, K = 0;
  bool int8 = false;
  std::vector<float> packed;  // fp32
  std::vector<float> bias;    // fp32 and int8 ([N] or empty)
  const int8_t* qpacked = nullptr;
  const int32_t* colsum = nullptr;
  const float* scale = nullptr;
  // Block-quantized INT8 (int8mm::linear_b32, LLM decoders): the weights'
  // scales per 32 k, [NB][nblk][16] (borrowed; colsum and scale unused).
  const float* block_scale = nullptr;
};

struct LayerNormParams {
  const float* gamma = nullptr;
  const float* beta = nullptr;
};

struct Layer {
  Linear qkv, out, ffn1, ffn2;
  LayerNormParams ln1, ln2;
};

struct Embeddings {
  const float* word = nullptr;      // [vocab, H]
  const float* position = nullptr;  // [max_positions, H]
  const float* token_type = nullptr;  // [type_vocab, H]
  LayerNormParams ln;
};

enum Pooling : int { kPoolNone = 0, kPoolMean = 1, kPoolCls = 2 };

class Encoder {
 public:
  explicit Encoder(const EncoderConfig& cfg);

  const EncoderConfig& config() const { return cfg_; }
  void set_embeddings(const Embeddings& e) { emb_ = e; }
  void add_layer(Layer&& layer) { layers_.push_back(std::move(layer)); }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // fp32 linear from W [N, K] row-major and bias [N] (or null): packed copy.
  static Linear make_fp32(const float* w, const float* bias, int64_t N, int64_t K);
  // INT8 linear over borrowed buffers (bias copied, may be null).
  static Linear make_int8(const int8_t* packed, const int32_t* colsum, const float* scale,
                          const float* bias, int64_t N, int64_t K);

  // Forward over B packed sequences: ids / type_ids (may be null) [T] with
  // T = cu[B], sequence b = tokens [cu[b], cu[b + 1]) (each non-empty).
  // pooling kPoolNone writes hidden states out [T, H]; kPoolMean / kPoolCls
  // write out [B, H] (L2-normalised when `normalize`). Inputs are checked
  // by the caller (ids < vocab, lengths <= max_positions, types < type_vocab).
  void forward(const int64_t* ids, const int64_t* type_ids, const int64_t* cu, int64_t B,
               int pooling, bool normalize, float* out);

  // Bytes of the weights this object owns (packed fp32 copies).
  int64_t owned_bytes() const;

 private:
  EncoderConfig cfg_;
  Embeddings emb_;
  std::vector<Layer> layers_;
  std::mutex mutex_;  // one forward at a time per model (the workspace)
  std::vector<float> x_, qkv_, ctx_, tmp_, ffn_;
  std::vector<int64_t> pos_;
};

// y [M, N] = act(x W^T + b) for a Linear (fp32 or INT8); x rows at stride ldx.
void apply_linear(const Linear& l, const float* x, int64_t ldx, int64_t M, int act, float* y);

// y = act(x W^T + b) for one fp32 packed weight (for tests): x [M, K] row stride ldx.
void linear_fp32(const float* x, int64_t ldx, int64_t M, const float* packed, const float* bias,
                 int64_t N, int64_t K, int act, float* y);

}  // namespace encoder
}  // namespace tallow
