// Fused attention (FlashAttention-2 forward) — ISA-neutral declarations.
//
// Plain structs and function declarations only: this header is included by
// the ISA-specific translation units (attention_avx512.cpp, ...), which must
// not share inline code with the rest of the library (see attention_kernel.h).
#pragma once

#include <cstdint>

namespace tallow {

// One attention call. All strides are in elements (not bytes) and may be
// arbitrary (views into a KV cache, a transposed [B, L, H, D] projection);
// the innermost (D) stride is 1 for q, k, v and out.
struct AttentionArgs {
  const float* q;  // [B, H, Lq, D]
  const float* k;  // [B, H, Lk, D]
  const float* v;  // [B, H, Lk, D]
  float* out;      // [B, H, Lq, D]
  // bfloat16 K and V (a low-precision KV cache), read directly by the
  // decode path (Lq <= 4): when set, k and v are null and these hold the
  // bf16 bits; strides as for k and v (in elements).
  const uint16_t* k_bf16;
  const uint16_t* v_bf16;
  const uint8_t* key_padding_mask;  // [B, Lk] C-contiguous, nonzero = padding; or null
  int64_t B, H, Lq, Lk, D;
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t o_sb, o_sh, o_sl;
  bool causal;  // query i sees keys j <= Lk - Lq + i
  float scale;  // multiplies q . k before the softmax
};

// Runs the kernel of the active ISA (tallow::active_isa()). Returns false
// when its scratch memory could not be allocated (nothing else can fail).
bool attention_forward(const AttentionArgs& args);

// Per-ISA entry points (each defined in its own translation unit).
namespace attention_avx512 { bool forward(const AttentionArgs& args); }
namespace attention_avx2 { bool forward(const AttentionArgs& args); }
namespace attention_neon { bool forward(const AttentionArgs& args); }
namespace attention_scalar { bool forward(const AttentionArgs& args); }

}  // namespace tallow
