// Native decoder step (see decoder.h). Baseline code: the vector work is in
// the encoder's per-ISA kernels (GEMM, norms, SwiGLU) and the attention
// kernel; what is here is O(B * E) glue per block.
#include "decoder/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>

#include "attention/attention.h"
#include "encoder/encoder.h"

namespace tallow {
namespace decoder {
namespace {

// float32 -> bfloat16 bits, round to nearest even (torch's .to(torch.bfloat16));
// NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

// Rotate-half RoPE of one head vector x[d] at the position whose tables are cos/sin [d].
inline void rotate(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + (-b) * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

}  // namespace

Decoder::Decoder(const DecoderConfig& cfg) : cfg_(cfg) {
  if (cfg.heads <= 0 || cfg.kv_heads <= 0 || cfg.heads % cfg.kv_heads != 0)
    throw std::invalid_argument("decoder: heads must be a positive multiple of kv_heads");
}

void Decoder::norm(const Norm& n, const float* x, int64_t M, float* out) {
  const encoder::IsaKernels& kr = encoder::kernels();
  if (cfg_.norm == kRmsNorm)
    kr.rms_norm(x, M, cfg_.hidden, n.gamma, cfg_.eps, out);
  else
    kr.add_layer_norm(x, nullptr, M, cfg_.hidden, n.gamma, n.beta, cfg_.eps, out);
}

void Decoder::grow_buffers(int64_t T) {
  const int64_t E = cfg_.hidden, qw = cfg_.heads * cfg_.head_dim, W = qw + 2 * cfg_.kv_heads * cfg_.head_dim;
  const int64_t F = cfg_.intermediate;
  grow(x_, T * E);
  grow(h_, T * E);
  grow(qkv_, T * W);
  grow(ctx_, T * qw);
  grow(tmp_, T * E);
  grow(ffn_, T * (cfg_.mlp == kSwiGlu ? 2 * F : F));
  grow(act_, T * F);
}

void Decoder::qkv_and_cache(const Block& L, const CacheLayer& c, int64_t T, const int64_t* pos,
                            const int64_t* slot, bool bf16) {
  const int64_t E = cfg_.hidden, d = cfg_.head_dim, Hq = cfg_.heads, Hkv = cfg_.kv_heads;
  const int64_t qw = Hq * d, kw = Hkv * d, W = qw + 2 * kw;
  float* qkv = qkv_.data();
  norm(L.norm1, x_.data(), T, h_.data());
  encoder::apply_linear(L.qkv, h_.data(), E, T, 0, qkv);
  for (int64_t t = 0; t < T; ++t) {
    float* row = qkv + t * W;
    const int64_t p = pos[t];
    if (cfg_.rope) {
      const float* cs = cos_ + p * d;
      const float* sn = sin_ + p * d;
      for (int64_t hh = 0; hh < Hq + Hkv; ++hh) rotate(row + hh * d, cs, sn, d);  // q heads, then k heads
    }
    for (int64_t j = 0; j < Hkv; ++j) {
      const float* kv[2] = {row + qw + j * d, row + qw + kw + j * d};
      void* dst[2] = {c.k, c.v};
      const int64_t off = slot[t] * c.s_slot + j * c.s_head + p * c.s_pos;
      for (int s = 0; s < 2; ++s) {
        if (bf16) {
          uint16_t* o = static_cast<uint16_t*>(dst[s]) + off;
          for (int64_t i = 0; i < d; ++i) o[i] = to_bf16(kv[s][i]);
        } else {
          std::memcpy(static_cast<float*>(dst[s]) + off, kv[s], static_cast<size_t>(d) * sizeof(float));
        }
      }
    }
  }
}

void Decoder::finish_block(const Block& L, int64_t T) {
  const int64_t E = cfg_.hidden, qw = cfg_.heads * cfg_.head_dim, F = cfg_.intermediate;
  float *x = x_.data(), *h = h_.data(), *tmp = tmp_.data();
  encoder::apply_linear(L.out, ctx_.data(), qw, T, 0, tmp);
  for (int64_t i = 0; i < T * E; ++i) x[i] += tmp[i];
  norm(L.norm2, x, T, h);
  if (cfg_.mlp == kSwiGlu) {
    encoder::apply_linear(L.fc, h, E, T, 0, ffn_.data());
    encoder::kernels().swiglu(ffn_.data(), T, F, act_.data());
    encoder::apply_linear(L.proj, act_.data(), F, T, 0, tmp);
  } else {
    encoder::apply_linear(L.fc, h, E, T, cfg_.mlp_act, ffn_.data());
    encoder::apply_linear(L.proj, ffn_.data(), F, T, 0, tmp);
  }
  for (int64_t i = 0; i < T * E; ++i) x[i] += tmp[i];
}

namespace {

// x [T, E] = token embedding (+ the learned position's, torch's order).
void embed(const float* wte, const float* wpe, bool rope, const int64_t* tokens, const int64_t* pos, int64_t T,
           int64_t E, float* x) {
  for (int64_t t = 0; t < T; ++t) {
    const float* w = wte + tokens[t] * E;
    float* xt = x + t * E;
    if (rope) {
      std::memcpy(xt, w, static_cast<size_t>(E) * sizeof(float));
    } else {
      const float* p = wpe + pos[t] * E;
      for (int64_t e = 0; e < E; ++e) xt[e] = w[e] + p[e];
    }
  }
}

}  // namespace

void Decoder::step(const int64_t* tokens, const int64_t* positions, int64_t B, const CacheLayer* caches,
                   bool bf16, float* logits) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t E = cfg_.hidden, d = cfg_.head_dim, Hq = cfg_.heads, Hkv = cfg_.kv_heads;
  const int64_t group = Hq / Hkv, qw = Hq * d, W = qw + 2 * Hkv * d;
  grow_buffers(B);
  embed(wte_, wpe_, cfg_.rope, tokens, positions, B, E, x_.data());
  std::vector<int64_t> slot(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) slot[b] = b;
  // Keys each row may read: 0..positions[b]; one mask for every block.
  int64_t Lk = 0;
  for (int64_t b = 0; b < B; ++b) Lk = std::max(Lk, positions[b] + 1);
  std::vector<uint8_t> mask(static_cast<size_t>(B * Lk));
  bool ragged = false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Lk; ++j) {
      mask[b * Lk + j] = j > positions[b];
      ragged |= j > positions[b];
    }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  for (size_t li = 0; li < blocks_.size(); ++li) {
    const Block& L = blocks_[li];
    const CacheLayer& c = caches[li];
    qkv_and_cache(L, c, B, positions, slot.data(), bf16);
    // The group query heads of KV head j are its query rows (at most 4 per
    // call: the bf16 decode path's limit); no causal mask: every key up to
    // a row's position is visible to it.
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
      AttentionArgs a{};
      a.q = qkv_.data() + g0 * d;
      a.out = ctx_.data() + g0 * d;
      if (bf16) {
        a.k_bf16 = static_cast<const uint16_t*>(c.k);
        a.v_bf16 = static_cast<const uint16_t*>(c.v);
      } else {
        a.k = static_cast<const float*>(c.k);
        a.v = static_cast<const float*>(c.v);
      }
      a.key_padding_mask = ragged ? mask.data() : nullptr;
      a.B = B, a.H = Hkv, a.Lq = std::min<int64_t>(4, group - g0), a.Lk = Lk, a.D = d;
      a.q_sb = W, a.q_sh = group * d, a.q_sl = d;
      a.k_sb = a.v_sb = c.s_slot;
      a.k_sh = a.v_sh = c.s_head;
      a.k_sl = a.v_sl = c.s_pos;
      a.o_sb = qw, a.o_sh = group * d, a.o_sl = d;
      a.causal = false;
      a.scale = scale;
      if (!attention_forward(a)) throw std::bad_alloc();
    }
    finish_block(L, B);
  }
  norm(final_norm_, x_.data(), B, h_.data());
  encoder::apply_linear(lm_head_, h_.data(), E, B, 0, logits);
}

void Decoder::prefill(const int64_t* tokens, const int64_t* cu, int64_t B, const CacheLayer* caches, bool bf16,
                      float* logits) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t E = cfg_.hidden, d = cfg_.head_dim, Hq = cfg_.heads, Hkv = cfg_.kv_heads;
  const int64_t group = Hq / Hkv, qw = Hq * d, kw = Hkv * d, W = qw + 2 * kw;
  const int64_t T = cu[B];
  grow_buffers(T);
  std::vector<int64_t> pos(static_cast<size_t>(T)), slot(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      pos[t] = t - cu[b];
      slot[t] = b;
    }
  embed(wte_, wpe_, cfg_.rope, tokens, pos.data(), T, E, x_.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (size_t li = 0; li < blocks_.size(); ++li) {
    const Block& L = blocks_[li];
    qkv_and_cache(L, caches[li], T, pos.data(), slot.data(), bf16);
    // Causal attention of each row over its own fresh float32 keys (the
    // pool's, in an fp32 pool; no float32 copy of a bf16 one). Per KV head j
    // its `group` query heads read the same keys: head stride 0 (GQA
    // without repeating K/V).
    // Without GQA (group 1) one call takes every head.
    const int64_t calls = group == 1 ? 1 : Hkv, heads = group == 1 ? Hq : group;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t0 = cu[b], n = cu[b + 1] - t0;
      for (int64_t j = 0; j < calls; ++j) {
        AttentionArgs a{};
        const float* row = qkv_.data() + t0 * W;
        a.q = row + j * group * d;
        a.k = row + qw + j * d;
        a.v = row + qw + kw + j * d;
        a.out = ctx_.data() + t0 * qw + j * group * d;
        a.B = 1, a.H = heads, a.Lq = n, a.Lk = n, a.D = d;
        a.q_sb = 0, a.q_sh = d, a.q_sl = W;
        a.k_sb = a.v_sb = 0;
        a.k_sh = a.v_sh = group == 1 ? d : 0;
        a.k_sl = a.v_sl = W;
        a.o_sb = 0, a.o_sh = d, a.o_sl = qw;
        a.causal = true;
        a.scale = scale;
        if (!attention_forward(a)) throw std::bad_alloc();
      }
    }
    finish_block(L, T);
  }
  // Only each row's last token goes through the final norm and the LM head.
  float* last = tmp_.data();
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(last + b * E, x_.data() + (cu[b + 1] - 1) * E, static_cast<size_t>(E) * sizeof(float));
  norm(final_norm_, last, B, h_.data());
  encoder::apply_linear(lm_head_, h_.data(), E, B, 0, logits);
}

}  // namespace decoder
}  // namespace tallow
