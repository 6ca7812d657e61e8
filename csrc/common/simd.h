// Thin SIMD layer so one kernel source compiles for AVX-512, AVX2 and scalar
// (and NEON on aarch64).
//
// Include this ONLY from ISA-specific translation units (*_avx512.cpp,
// *_avx2.cpp, *_neon.cpp, *_scalar.cpp). The vector width follows the flags
// the file is compiled with (__AVX512F__ / __AVX2__ / __ARM_FEATURE_DOTPROD /
// none of them). On aarch64 NEON itself is baseline, so every file sees
// __ARM_NEON; only the *_neon.cpp files are built with +dotprod, and that
// macro is what selects the NEON branch (the scalar files stay scalar).
// Everything here lives in an anonymous namespace, so each translation unit
// gets its own copy and the linker can never hand an AVX-512 body to the
// scalar path. For the same reason ISA files call compiler builtins
// (__builtin_fmaf, ...) rather than inline functions of shared headers
// (<cmath>, <algorithm>, STL containers).
//
//   VF: kW floats        VI: kW int32 lanes
//   vi_dpbusd(acc, a, w): per int32 lane, acc += sum_{j<4} u8(a.byte[j]) * s8(w.byte[j])
//   (vpdpbusd on AVX-512 VNNI; exact emulation on AVX2, NEON and scalar).
//   vi_dot4_s8(acc, a, w): per int32 lane, acc += sum_{j<4} s8(a.byte[j]) * s8(w.byte[j]),
//   exact for bytes in [-127, 127] (-128 excluded: the x86 forms take |a|
//   and move a's sign onto w, and vpmaddubsw's pair sums stay below 2^15).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define TALLOW_SIMD_NEON 1
#endif

#include <cstdint>

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;
using VF = __m512;
using VI = __m512i;

inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline VF vf_zero() { return _mm512_setzero_ps(); }
inline VF vf_set1(float x) { return _mm512_set1_ps(x); }
inline VF vf_load(const float* p) { return _mm512_loadu_ps(p); }
inline VF vf_load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
inline void vf_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline void vf_store_n(float* p, VF v, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
inline VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vf_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vf_fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vf_max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF vf_min(VF a, VF b) { return _mm512_min_ps(a, b); }
inline float vf_reduce_add(VF v) { return _mm512_reduce_add_ps(v); }
inline float vf_reduce_max(VF v) { return _mm512_reduce_max_ps(v); }
inline VF vf_round(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// v * 2^n for integral-valued float n.
inline VF vf_scale2(VF v, VF n) { return _mm512_scalef_ps(v, n); }

inline VI vi_zero() { return _mm512_setzero_si512(); }
inline VI vi_set1(int32_t x) { return _mm512_set1_epi32(x); }
inline VI vi_load(const void* p) { return _mm512_loadu_si512(p); }
inline void vi_store(void* p, VI v) { _mm512_storeu_si512(p, v); }
inline VI vi_add(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI vi_mullo(VI a, VI b) { return _mm512_mullo_epi32(a, b); }
inline VF vi_to_vf(VI v) { return _mm512_cvtepi32_ps(v); }
// Round to nearest, ties to even (the MXCSR default), like torch.round.
inline VI vf_round_to_vi(VF v) { return _mm512_cvtps_epi32(v); }
inline VI vi_dpbusd(VI acc, VI a_u8, VI w_s8) { return _mm512_dpbusd_epi32(acc, a_u8, w_s8); }
inline VI vi_dot4_s8(VI acc, VI a, VI w) {
  // vpdpbusd is u8 x s8: |a| times w with a's sign (w negated where a < 0).
  const __m512i wn = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(a), _mm512_setzero_si512(), w);
  return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(a), wn);
}

#elif defined(__AVX2__)
constexpr int kW = 8;
using VF = __m256;
using VI = __m256i;

inline __m256i tail_mask(int n) {
  static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}
inline VF vf_zero() { return _mm256_setzero_ps(); }
inline VF vf_set1(float x) { return _mm256_set1_ps(x); }
inline VF vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline VF vf_load_n(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
inline void vf_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline void vf_store_n(float* p, VF v, int n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
inline VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vf_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vf_fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vf_max(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF vf_min(VF a, VF b) { return _mm256_min_ps(a, b); }
inline float vf_reduce_add(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vf_reduce_max(VF v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VF vf_round(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF vf_scale2(VF v, VF n) {
  // n is integral and, by the callers' clamping, in [-126, 127].
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(v, _mm256_castsi256_ps(e));
}

inline VI vi_zero() { return _mm256_setzero_si256(); }
inline VI vi_set1(int32_t x) { return _mm256_set1_epi32(x); }
inline VI vi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void vi_store(void* p, VI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline VI vi_add(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI vi_mullo(VI a, VI b) { return _mm256_mullo_epi32(a, b); }
inline VF vi_to_vf(VI v) { return _mm256_cvtepi32_ps(v); }
inline VI vf_round_to_vi(VF v) { return _mm256_cvtps_epi32(v); }
inline VI vi_dpbusd(VI acc, VI a_u8, VI w_s8) {
  // Exact u8*s8 dot of 4 bytes per lane without vpmaddubsw's s16 saturation:
  // widen even/odd bytes to 16 bits, then two vpmaddwd (s16*s16 -> s32 pairs).
  const __m256i lo8 = _mm256_set1_epi16(0x00ff);
  const __m256i a_even = _mm256_and_si256(a_u8, lo8);
  const __m256i a_odd = _mm256_srli_epi16(a_u8, 8);
  const __m256i w_even = _mm256_srai_epi16(_mm256_slli_epi16(w_s8, 8), 8);
  const __m256i w_odd = _mm256_srai_epi16(w_s8, 8);
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a_even, w_even));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a_odd, w_odd));
}
inline VI vi_dot4_s8(VI acc, VI a, VI w) {
  // |a| (u8 <= 127) x sign(w, a) (s8 in [-127, 127]): vpmaddubsw's pair sums
  // are at most 2 * 127 * 127 < 2^15, so nothing saturates.
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

#elif defined(TALLOW_SIMD_NEON)
// aarch64 Advanced SIMD (128-bit) + the dot-product extension (SDOT).
constexpr int kW = 4;
using VF = float32x4_t;
using VI = int32x4_t;

inline VF vf_zero() { return vdupq_n_f32(0.0f); }
inline VF vf_set1(float x) { return vdupq_n_f32(x); }
inline VF vf_load(const float* p) { return vld1q_f32(p); }
// Partial loads/stores lane by lane: never touch memory past n (n >= 4 is a
// plain load: callers pass kW for whole vectors, e.g. D % 4 == 0).
inline VF vf_load_n(const float* p, int n) {
  if (n >= 4) return vld1q_f32(p);
  VF v = vdupq_n_f32(0.0f);
  if (n > 0) v = vsetq_lane_f32(p[0], v, 0);
  if (n > 1) v = vsetq_lane_f32(p[1], v, 1);
  if (n > 2) v = vsetq_lane_f32(p[2], v, 2);
  return v;
}
inline void vf_store(float* p, VF v) { vst1q_f32(p, v); }
inline void vf_store_n(float* p, VF v, int n) {
  if (n >= 4) {
    vst1q_f32(p, v);
    return;
  }
  if (n > 0) vst1q_lane_f32(p, v, 0);
  if (n > 1) vst1q_lane_f32(p + 1, v, 1);
  if (n > 2) vst1q_lane_f32(p + 2, v, 2);
}
inline VF vf_add(VF a, VF b) { return vaddq_f32(a, b); }
inline VF vf_sub(VF a, VF b) { return vsubq_f32(a, b); }
inline VF vf_mul(VF a, VF b) { return vmulq_f32(a, b); }
inline VF vf_fmadd(VF a, VF b, VF c) { return vfmaq_f32(c, a, b); }
// x86 semantics (a > b ? a : b: the second operand when either is NaN), not
// FMAX's (NaN wins): exp2 clamps NaN like the other ISAs, ReLU passes it.
inline VF vf_max(VF a, VF b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
inline VF vf_min(VF a, VF b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
inline float vf_reduce_add(VF v) { return vaddvq_f32(v); }
inline float vf_reduce_max(VF v) { return vmaxvq_f32(v); }
inline VF vf_round(VF v) { return vrndnq_f32(v); }  // ties to even
inline VF vf_scale2(VF v, VF n) {
  // n is integral and, by the callers' clamping, in [-126, 127].
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(v, vreinterpretq_f32_s32(e));
}

inline VI vi_zero() { return vdupq_n_s32(0); }
inline VI vi_set1(int32_t x) { return vdupq_n_s32(x); }
inline VI vi_load(const void* p) { return vld1q_s32(static_cast<const int32_t*>(p)); }
inline void vi_store(void* p, VI v) { vst1q_s32(static_cast<int32_t*>(p), v); }
inline VI vi_add(VI a, VI b) { return vaddq_s32(a, b); }
inline VI vi_mullo(VI a, VI b) { return vmulq_s32(a, b); }
inline VF vi_to_vf(VI v) { return vcvtq_f32_s32(v); }
inline VI vf_round_to_vi(VF v) { return vcvtnq_s32_f32(v); }  // ties to even
inline VI vi_dpbusd(VI acc, VI a_u8, VI w_s8) {
  // Exact u8*s8 with SDOT (s8*s8): a = (a ^ 0x80) + 128 with a ^ 0x80 read as
  // s8, so sum a*w = sdot(a ^ 0x80, w) - sdot(-128, w). Both partial sums fit
  // easily in int32 (|.| <= 4 * 128 * 128); the int32 adds wrap like vpdpbusd.
  // Hot loops (the INT8 GEMM) avoid the second SDOT by folding 128 * colsum
  // into their zero-point correction instead (int8_matmul_kernel.h).
  const int8x16_t w = vreinterpretq_s8_s32(w_s8);
  const int8x16_t a = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_s32(a_u8), vdupq_n_u8(0x80)));
  acc = vdotq_s32(acc, a, w);
  return vsubq_s32(acc, vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(-128), w));
}
inline VI vi_dot4_s8(VI acc, VI a, VI w) {
  return vdotq_s32(acc, vreinterpretq_s8_s32(a), vreinterpretq_s8_s32(w));
}

#else  // scalar
constexpr int kW = 1;
using VF = float;
using VI = int32_t;

inline VF vf_zero() { return 0.0f; }
inline VF vf_set1(float x) { return x; }
inline VF vf_load(const float* p) { return *p; }
inline VF vf_load_n(const float* p, int n) { return n > 0 ? *p : 0.0f; }
inline void vf_store(float* p, VF v) { *p = v; }
inline void vf_store_n(float* p, VF v, int n) { if (n > 0) *p = v; }
inline VF vf_add(VF a, VF b) { return a + b; }
inline VF vf_sub(VF a, VF b) { return a - b; }
inline VF vf_mul(VF a, VF b) { return a * b; }
// Not __builtin_fmaf: without -mfma it becomes a libm call (~50x slower).
inline VF vf_fmadd(VF a, VF b, VF c) { return a * b + c; }
inline VF vf_max(VF a, VF b) { return a > b ? a : b; }
inline VF vf_min(VF a, VF b) { return a < b ? a : b; }
inline float vf_reduce_add(VF v) { return v; }
inline float vf_reduce_max(VF v) { return v; }
inline VF vf_round(VF v) { return __builtin_nearbyintf(v); }
inline VF vf_scale2(VF v, VF n) { return __builtin_ldexpf(v, static_cast<int>(n)); }

inline VI vi_zero() { return 0; }
inline VI vi_set1(int32_t x) { return x; }
inline VI vi_load(const void* p) { int32_t v; __builtin_memcpy(&v, p, 4); return v; }
inline void vi_store(void* p, VI v) { __builtin_memcpy(p, &v, 4); }
inline VI vi_add(VI a, VI b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));  // wraps like SIMD
}
inline VI vi_mullo(VI a, VI b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) * static_cast<uint32_t>(b));
}
inline VF vi_to_vf(VI v) { return static_cast<float>(v); }
inline VI vf_round_to_vi(VF v) { return static_cast<int32_t>(__builtin_nearbyintf(v)); }
inline VI vi_dpbusd(VI acc, VI a_u8, VI w_s8) {
  uint32_t sum = static_cast<uint32_t>(acc);
  for (int j = 0; j < 4; ++j) {
    const int32_t a = static_cast<uint8_t>(static_cast<uint32_t>(a_u8) >> (8 * j));
    const int32_t w = static_cast<int8_t>(static_cast<uint32_t>(w_s8) >> (8 * j));
    sum += static_cast<uint32_t>(a * w);
  }
  return static_cast<int32_t>(sum);
}
inline VI vi_dot4_s8(VI acc, VI a_s8, VI w_s8) {
  uint32_t sum = static_cast<uint32_t>(acc);
  for (int j = 0; j < 4; ++j) {
    const int32_t a = static_cast<int8_t>(static_cast<uint32_t>(a_s8) >> (8 * j));
    const int32_t w = static_cast<int8_t>(static_cast<uint32_t>(w_s8) >> (8 * j));
    sum += static_cast<uint32_t>(a * w);
  }
  return static_cast<int32_t>(sum);
}
#endif

// 2^x for float x, within ~1 ulp on [-126, 127]; exactly 1 at x == 0 and
// exactly 0 for x <= -150 (including -inf, so masked scores vanish, no NaN).
// Range reduction x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by its
// degree-7 Taylor polynomial (truncation error < 6e-9 relative).
inline VF vf_exp2(VF x) {
  x = vf_max(x, vf_set1(-150.0f));
  x = vf_min(x, vf_set1(127.0f));
  const VF n = vf_round(x);
  const VF f = vf_sub(x, n);
  VF p = vf_set1(1.5252734e-5f);               // ln2^7 / 7!
  p = vf_fmadd(p, f, vf_set1(1.5403530e-4f));  // ln2^6 / 6!
  p = vf_fmadd(p, f, vf_set1(1.3333558e-3f));  // ln2^5 / 5!
  p = vf_fmadd(p, f, vf_set1(9.6181291e-3f));  // ln2^4 / 4!
  p = vf_fmadd(p, f, vf_set1(5.5504109e-2f));  // ln2^3 / 3!
  p = vf_fmadd(p, f, vf_set1(2.4022651e-1f));  // ln2^2 / 2!
  p = vf_fmadd(p, f, vf_set1(6.9314718e-1f));  // ln2
  p = vf_fmadd(p, f, vf_set1(1.0f));
#if defined(__AVX512F__)
  return vf_scale2(p, n);
#else
  // Without vscalefps, split very small exponents in two steps so that
  // results in the subnormal range / underflow are still correct.
  const VF n1 = vf_max(n, vf_set1(-126.0f));
  const VF n2 = vf_max(vf_sub(n, n1), vf_set1(-126.0f));
  return vf_scale2(vf_scale2(p, n1), n2);
#endif
}

}  // namespace
