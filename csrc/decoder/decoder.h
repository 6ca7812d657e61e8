// Native decoder step (baseline code only: decoder.cpp, binding.cpp): one
// call runs a whole decode step of a GPT-2 or Llama-family model for the
// scheduler's rows — embeddings, every block, the final norm and the LM
// head — on tallow's thread pool, reading and writing the scheduler's KV
// pool in place. Row b feeds tokens[b] at positions[b]; its keys/values go
// to pool[layer][b, :, positions[b], :] (float32 or bf16) and its attention
// reads pool[layer][b, :, 0..positions[b]].
//
// Per block (x: [B, E]):
//   h = norm1(x)                      LayerNorm (GPT-2) or RMSNorm (Llama)
//   qkv = h Wqkv^T + b                [B, (Hq + 2 Hkv) d]
//   RoPE on q and k (Llama: rotate-half layout, cos/sin tables by position)
//   k, v -> the pool; attention of the Hq query heads, the `group` heads that
//   share a KV head read as that head's query rows (GQA, no repeat of K/V)
//   x += ctx Wo^T + bo
//   h = norm2(x)
//   GPT-2: x += gelu_tanh(h Wfc^T + bfc) Wproj^T + bproj   (GELU fused in the epilogue)
//   Llama: x += (silu(h Wg^T) * (h Wu^T)) Wd^T             (gate|up one GEMM)
// then logits = final_norm(x) Wlm^T.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "encoder/model.h"

namespace tallow {
namespace decoder {

enum NormKind : int { kLayerNorm = 0, kRmsNorm = 1 };
enum MlpKind : int { kGeluMlp = 0, kSwiGlu = 1 };

struct DecoderConfig {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, vocab, max_positions;
  int norm;  // NormKind
  int mlp;   // MlpKind
  int mlp_act;  // kGeluMlp: the fc activation (int8mm::Act code)
  float eps;
  bool rope;  // rotary positions (tables given) instead of a learned position table
};

struct Norm {
  const float* gamma = nullptr;
  const float* beta = nullptr;  // LayerNorm only
};

struct Block {
  Norm norm1, norm2;
  encoder::Linear qkv, out, fc, proj;  // fc: [F, E] (GELU) or [2F, E] (gate | up)
};

// The KV pool of one layer: keys and values [B, Hkv, L, d] with element
// strides (slot, head, position; d contiguous), float32 or bf16 bits.
struct CacheLayer {
  void* k;
  void* v;
  int64_t s_slot, s_head, s_pos;
  int64_t length;  // L: positions must stay below it
};

class Decoder {
 public:
  explicit Decoder(const DecoderConfig& cfg);

  const DecoderConfig& config() const { return cfg_; }
  void set_embeddings(const float* tokens, const float* positions) {
    wte_ = tokens;
    wpe_ = positions;
  }
  void set_rope(const float* cos, const float* sin) {
    cos_ = cos;
    sin_ = sin;
  }
  void set_final(const Norm& norm, encoder::Linear&& lm_head) {
    final_norm_ = norm;
    lm_head_ = std::move(lm_head);
  }
  void add_block(Block&& b) { blocks_.push_back(std::move(b)); }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // logits [B, vocab] for B rows; caches: one per block; bf16: the pool
  // holds bfloat16 bits. Inputs are checked by the caller.
  void step(const int64_t* tokens, const int64_t* positions, int64_t B, const CacheLayer* caches, bool bf16,
            float* logits);

  // Prefill of B prompts from position 0: row b's tokens are
  // tokens[cu[b] .. cu[b+1]) (packed, no padding), written into slot b of
  // the pool at positions 0..n_b-1; causal attention over the row's own
  // fresh float32 keys/values; logits [B, vocab] after each row's last token.
  void prefill(const int64_t* tokens, const int64_t* cu, int64_t B, const CacheLayer* caches, bool bf16,
               float* logits);

 private:
  void norm(const Norm& n, const float* x, int64_t M, float* out);
  // x [T, E] at positions pos[T] -> qkv (RoPE'd), its K/V written to the pool
  // (row b = slot row_of[t]): the first half of a block.
  void qkv_and_cache(const Block& L, const CacheLayer& c, int64_t T, const int64_t* pos, const int64_t* slot,
                     bool bf16);
  // The rest of a block after attention: out projection, residual, MLP, residual.
  void finish_block(const Block& L, int64_t T);
  void grow_buffers(int64_t T);

  DecoderConfig cfg_;
  const float* wte_ = nullptr;
  const float* wpe_ = nullptr;
  const float* cos_ = nullptr;
  const float* sin_ = nullptr;
  std::vector<Block> blocks_;
  Norm final_norm_;
  encoder::Linear lm_head_;
  std::mutex mutex_;
  std::vector<float> x_, h_, qkv_, ctx_, tmp_, ffn_, act_;
};

}  // namespace decoder
}  // namespace tallow
