// Vector helpers and activation functions over csrc/common/simd.h, shared by
// the per-ISA kernel bodies (int8_matmul_kernel.h, encoder_kernel.h). Like
// simd.h, include it only from ISA-specific translation units, inside their
// anonymous namespace (after simd.h), so each ISA gets its own copy.
#pragma once

// ---------------------------------------------------------------- ISA helpers

#if defined(__AVX512F__)
inline VF k_div(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF k_abs(VF a) { return _mm512_abs_ps(a); }
// x < 0 ? if_neg : if_pos
inline VF k_select_neg(VF x, VF if_neg, VF if_pos) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), if_pos, if_neg);
}
inline VI k_sub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
// Stores the low byte of the first n lanes (values already in [0, 255]).
inline void k_store_u8(uint8_t* p, VI v, int n) {
  const __m128i b = _mm512_cvtepi32_epi8(v);
  if (n == 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
  else
    _mm_mask_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1u), b);
}
inline void k_store_i32_n(int32_t* p, VI v, int n) {
  _mm512_mask_storeu_epi32(p, static_cast<__mmask16>((1u << n) - 1u), v);
}
#elif defined(__AVX2__)
inline VF k_div(VF a, VF b) { return _mm256_div_ps(a, b); }
inline VF k_abs(VF a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline VF k_select_neg(VF x, VF if_neg, VF if_pos) {
  return _mm256_blendv_ps(if_pos, if_neg, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
inline VI k_sub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
inline void k_store_u8(uint8_t* p, VI v, int n) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i b = _mm_packus_epi16(w, w);
  if (n == 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
  } else {
    uint8_t tmp[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), b);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
}
inline void k_store_i32_n(int32_t* p, VI v, int n) { _mm256_maskstore_epi32(p, tail_mask(n), v); }
// Stores the first n lanes as int16 (values already in [0, 255]).
inline void k_store_u8(int16_t* p, VI v, int n) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  if (n == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), w);
  } else {
    int16_t tmp[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), w);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
}
#elif defined(TALLOW_SIMD_NEON)
inline VF k_div(VF a, VF b) { return vdivq_f32(a, b); }
inline VF k_abs(VF a) { return vabsq_f32(a); }
inline VF k_select_neg(VF x, VF if_neg, VF if_pos) {
  return vbslq_f32(vcltq_f32(x, vdupq_n_f32(0.0f)), if_neg, if_pos);
}
inline VI k_sub(VI a, VI b) { return vsubq_s32(a, b); }
inline void k_store_u8(uint8_t* p, VI v, int n) {
  // Lanes are already in [0, 255]: two narrowing moves keep the low bytes.
  const uint16x4_t h = vmovn_u32(vreinterpretq_u32_s32(v));
  const uint8x8_t b = vmovn_u16(vcombine_u16(h, h));
  uint8_t t[8];
  vst1_u8(t, b);
  __builtin_memcpy(p, t, static_cast<unsigned>(n > 0 ? n : 0));
}
inline void k_store_i32_n(int32_t* p, VI v, int n) {
  int32_t t[4];
  vst1q_s32(t, v);
  __builtin_memcpy(p, t, static_cast<unsigned>(n > 0 ? n : 0) * 4u);
}
#else
inline VF k_div(VF a, VF b) { return a / b; }
inline VF k_abs(VF a) { return __builtin_fabsf(a); }
inline VF k_select_neg(VF x, VF if_neg, VF if_pos) { return x < 0.0f ? if_neg : if_pos; }
inline VI k_sub(VI a, VI b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
}
inline void k_store_u8(uint8_t* p, VI v, int n) {
  if (n > 0) *p = static_cast<uint8_t>(v);
}
inline void k_store_i32_n(int32_t* p, VI v, int n) {
  if (n > 0) *p = v;
}
#endif

// ---------------------------------------------------------------- activations

// GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)). With z = |x| / sqrt 2,
// erfc(z) ~= t P(t) exp(-z^2), t = 1 / (1 + p z) (Abramowitz & Stegun 7.1.26,
// |error| <= 1.5e-7, the same approximation as ATen's vectorised erf);
// 1 + erf(x/sqrt2) is erfc(z) for x < 0 (no cancellation) and 2 - erfc(z) otherwise.
inline VF gelu_erf(VF x) {
  const VF z = vf_mul(k_abs(x), vf_set1(0.70710678118654752f));
  const VF t = k_div(vf_set1(1.0f), vf_fmadd(vf_set1(0.3275911f), z, vf_set1(1.0f)));
  VF p = vf_set1(1.061405429f);
  p = vf_fmadd(p, t, vf_set1(-1.453152027f));
  p = vf_fmadd(p, t, vf_set1(1.421413741f));
  p = vf_fmadd(p, t, vf_set1(-0.284496736f));
  p = vf_fmadd(p, t, vf_set1(0.254829592f));
  p = vf_mul(p, t);
  // exp(-z^2) = 2^(-z^2 log2 e)
  const VF e = vf_exp2(vf_mul(vf_mul(z, z), vf_set1(-1.4426950408889634f)));
  const VF erfc = vf_mul(p, e);
  const VF half_x = vf_mul(x, vf_set1(0.5f));
  return vf_mul(half_x, k_select_neg(x, erfc, vf_sub(vf_set1(2.0f), erfc)));
}

// GELU, tanh form (GPT-2): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as x * sigmoid(2u) = x / (1 + exp(-2u)) (same value, no cancellation).
inline VF gelu_tanh(VF x) {
  const VF x3 = vf_mul(vf_mul(x, x), x);
  const VF u = vf_fmadd(vf_set1(0.044715f), x3, x);
  // exp(-2 sqrt(2/pi) u) = 2^(-2 sqrt(2/pi) log2(e) u)
  const VF e = vf_exp2(vf_mul(u, vf_set1(-2.0f * 0.7978845608028654f * 1.4426950408889634f)));
  return k_div(x, vf_add(vf_set1(1.0f), e));
}
