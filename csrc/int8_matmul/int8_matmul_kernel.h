// INT8 GEMM kernel body, written once over csrc/common/simd.h and compiled
// per ISA: int8_matmul_{avx512,avx2,neon,scalar}.cpp include it inside an
// anonymous namespace (no include guard on purpose; never include it from
// baseline code).
//
// Maths (VNNI u8 x s8 with zero-point compensation): vpdpbusd multiplies
// unsigned bytes of A by signed bytes of B, 4 at a time, into int32 lanes.
// With A = q - zp (q u8, zp the row's zero point; or q = a + 128, zp = 128
// for signed int8 A):
//     sum_k (q[m,k] - zp[m]) * B[k,n] = sum_k q[m,k] * B[k,n] - zp[m] * colsum[n]
// where colsum[n] = sum_k B[k,n] is computed once when B is packed, so the
// correction is one multiply-add per output in the epilogue. All int32
// arithmetic wraps, so the int8 x int8 result is exact modulo 2^32 (like
// torch's int32 reference).
//
// Blocking: a register tile of kMR rows x kNR columns of int32 accumulators
// (AVX-512: 6 x 64 = 24 zmm), broadcasting 4 bytes of an A row against 64
// bytes of packed B per zmm; k is blocked by 256 (kKBC k-groups) so the B
// panel of a tile (kNR x 256 bytes = 16 KiB) stays in L1 while the row tiles
// of a kMB-row block sweep over it. Tasks (drive()) are (row block) x
// (column chunk of kNR) pairs, row blocks fastest so both threads share one
// B panel; M = 1 thus streams the packed weights exactly once, split over N.
// With raw B (int8_matmul) each task packs its panel first (pack_panel).
// The AMX tile path (int8_matmul_avx512.cpp) reuses drive(), the packing and
// the epilogue.
//
// NEON (SDOT is s8 x s8, not u8 x s8): the micro-kernel feeds a ^ 0x80, i.e.
// a - 128 read as s8, so its accumulators hold
//     sum_k (a[m,k] - 128) * B[k,n] = sum_k a[m,k] * B[k,n] - 128 * colsum[n]
// exactly (mod 2^32). The epilogue subtracts (zp - kAccZpBias) * colsum with
// kAccZpBias = 128, which gives the same int32 as the VNNI path bit for bit.
// colsum itself stays a true column sum (colsum_range uses vi_dpbusd, an
// exact u8 x s8 emulation on NEON, with u8 ones).

#if defined(__AVX512F__)
constexpr int kMR = 6;   // rows per register tile
constexpr int kNBK = 4;  // 16-column blocks per register tile
#elif defined(__AVX2__)
#define TALLOW_I8_S16 1  // the int16 vpmaddwd path below
constexpr int kMR = 6;   // rows per register tile (6 rows x 8 columns: 12 ymm accumulators)
constexpr int kNBK = 2;  // 16-column blocks per task chunk
#elif defined(TALLOW_SIMD_NEON)
// 5 rows x 16 columns = 20 q-register accumulators + 4 B + 5 A broadcasts
// (with 6 rows GCC keeps all six broadcasts live and spills accumulators).
constexpr int kMR = 5;
constexpr int kNBK = 1;
#else
constexpr int kMR = 2;
constexpr int kNBK = 1;
#endif

// The A operand format (GemmArgs::a): u8 for vpdpbusd and its exact scalar
// emulation; int16 on AVX2, where vpmaddwd (s16 x s16 -> s32 pairs) is the
// exact multiply — vpmaddubsw (u8 x s8 -> s16 pairs) saturates at 32767, and
// 255 * 127 * 2 = 64770 overflows it (see "AVX2" below).
#if defined(TALLOW_I8_S16)
using AElem = int16_t;
constexpr int32_t kS8Offset = 0;  // signed int8 A is stored as int16 as it is
#else
using AElem = uint8_t;
constexpr int32_t kS8Offset = 128;  // signed int8 A is stored as a + 128 (u8)
#endif
constexpr int kABytes = static_cast<int>(sizeof(AElem));
// Whether this tier multiplies a 7-bit A (GemmArgs::a_u7) faster than its
// usual A: only AVX2 (vpmaddubsw, exact for A <= 127); the others run it as
// any u8 A.
#if defined(TALLOW_I8_S16)
constexpr int kU7Faster = 1;
#else
constexpr int kU7Faster = 0;
#endif
constexpr int kV = 16 / kW;          // vectors per 16-column block
constexpr int kNR = 16 * kNBK;       // columns per register tile / task
constexpr int64_t kKBC = 64;         // k-groups (of 4) per L1 block: kKC = 256
constexpr int kMB = kMR * 8;         // rows per accumulator block

#include "common/vec_math.h"

inline int64_t k_min(int64_t a, int64_t b) { return a < b ? a : b; }

// What the micro-kernel's accumulators already have subtracted, in units of
// colsum (see the NEON note at the top): the epilogue subtracts
// (zero point - kAccZpBias) * colsum.
#if defined(TALLOW_SIMD_NEON)
constexpr int32_t kAccZpBias = 128;
#else
constexpr int32_t kAccZpBias = 0;
#endif

// ---------------------------------------------------------------- activations

inline VF apply_act(VF y, int act) {
  switch (act) {
    case kActRelu:
      return vf_max(vf_zero(), y);  // second operand on NaN: NaN propagates
    case kActGeluErf:
      return gelu_erf(y);
    case kActGeluTanh:
      return gelu_tanh(y);
    default:
      return y;
  }
}

// ---------------------------------------------------------------- packing

// 4 rows x 16 bytes (rows r, r + sk, ...) -> 16 dwords (column-interleaved):
// SSE2 on x86-64 (baseline there), zips on NEON, plain bytes elsewhere.
inline void interleave4x16(const int8_t* r, int64_t sk, int8_t* o) {
#if defined(__SSE2__)
  const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r));
  const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + sk));
  const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * sk));
  const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * sk));
  const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
  const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(t0, t2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(t0, t2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpacklo_epi16(t1, t3));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi16(t1, t3));
#elif defined(TALLOW_SIMD_NEON)
  const int8x16_t r0 = vld1q_s8(r), r1 = vld1q_s8(r + sk), r2 = vld1q_s8(r + 2 * sk), r3 = vld1q_s8(r + 3 * sk);
  const int16x8_t t0 = vreinterpretq_s16_s8(vzip1q_s8(r0, r1)), t1 = vreinterpretq_s16_s8(vzip2q_s8(r0, r1));
  const int16x8_t t2 = vreinterpretq_s16_s8(vzip1q_s8(r2, r3)), t3 = vreinterpretq_s16_s8(vzip2q_s8(r2, r3));
  vst1q_s8(o, vreinterpretq_s8_s16(vzip1q_s16(t0, t2)));
  vst1q_s8(o + 16, vreinterpretq_s8_s16(vzip2q_s16(t0, t2)));
  vst1q_s8(o + 32, vreinterpretq_s8_s16(vzip1q_s16(t1, t3)));
  vst1q_s8(o + 48, vreinterpretq_s8_s16(vzip2q_s16(t1, t3)));
#else
  for (int c = 0; c < 16; ++c)
    for (int i = 0; i < 4; ++i) o[4 * c + i] = r[i * sk + c];
#endif
}

// One (block nb, k-group kb) cell of the packed layout, any strides, zero padded.
inline void pack_cell(const int8_t* b, int64_t K, int64_t N, int64_t sk, int64_t sn, int64_t nb,
                      int64_t kb, int8_t* o) {
  const int64_t n0 = nb * 16, k0 = kb * 4;
  for (int c = 0; c < 16; ++c)
    for (int i = 0; i < 4; ++i)
      o[4 * c + i] = (n0 + c < N && k0 + i < K) ? b[(k0 + i) * sk + (n0 + c) * sn] : int8_t{0};
}

struct PackCtx {
  const int8_t* b;
  int64_t K, N, sk, sn, KB, NB;
  int8_t* out;       // block nb goes to out + (nb - nb_base) * KB * 64
  int32_t* colsum;   // and its sums to colsum + (nb - nb_base) * 16
  int64_t nb_lo, nb_hi, nb_base;  // blocks [nb_lo, nb_hi) (row-major path)
};

// Row-major B (sn == 1), split over k-groups: each thread reads 4 rows of B
// sequentially (prefetch-friendly) and scatters 64-byte cells to every block.
void pack_rows_range(const PackCtx& c, int64_t kb_begin, int64_t kb_end) {
  const int64_t full_nb = k_min(c.N / 16, c.nb_hi);
  constexpr int64_t kAhead = 4;  // k-groups to prefetch ahead: B rows are N bytes apart,
                                 // a stride the hardware prefetchers follow poorly
  const int64_t pf_bytes = (c.nb_hi - c.nb_lo) * 16;
  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    if (kb + kAhead < kb_end && pf_bytes <= 256) {
      const int8_t* pf = c.b + (kb + kAhead) * 4 * c.sk + c.nb_lo * 16;
      for (int i = 0; i < 4; ++i)
        for (int64_t o = 0; o < pf_bytes; o += 64) __builtin_prefetch(pf + i * c.sk + o, 0, 3);
    }
    const bool full_k = kb * 4 + 4 <= c.K;
    int64_t nb = c.nb_lo;
#if defined(__AVX512F__)
    // 4 blocks (64 bytes of each of the 4 rows) per step with zmm: the same
    // byte/word interleave per 128-bit lane, then a 4x4 transpose of lanes.
    if (full_k)
      for (; nb + 4 <= full_nb; nb += 4) {
        const int8_t* r = c.b + kb * 4 * c.sk + nb * 16;
        const __m512i r0 = _mm512_loadu_si512(r), r1 = _mm512_loadu_si512(r + c.sk);
        const __m512i r2 = _mm512_loadu_si512(r + 2 * c.sk), r3 = _mm512_loadu_si512(r + 3 * c.sk);
        const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
        const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
        const __m512i o0 = _mm512_unpacklo_epi16(t0, t2), o1 = _mm512_unpackhi_epi16(t0, t2);
        const __m512i o2 = _mm512_unpacklo_epi16(t1, t3), o3 = _mm512_unpackhi_epi16(t1, t3);
        const __m512i u0 = _mm512_shuffle_i32x4(o0, o1, 0x44), u1 = _mm512_shuffle_i32x4(o0, o1, 0xEE);
        const __m512i u2 = _mm512_shuffle_i32x4(o2, o3, 0x44), u3 = _mm512_shuffle_i32x4(o2, o3, 0xEE);
        int8_t* o = c.out + ((nb - c.nb_base) * c.KB + kb) * 64;
        const int64_t bs = c.KB * 64;
        _mm512_storeu_si512(o, _mm512_shuffle_i32x4(u0, u2, 0x88));
        _mm512_storeu_si512(o + bs, _mm512_shuffle_i32x4(u0, u2, 0xDD));
        _mm512_storeu_si512(o + 2 * bs, _mm512_shuffle_i32x4(u1, u3, 0x88));
        _mm512_storeu_si512(o + 3 * bs, _mm512_shuffle_i32x4(u1, u3, 0xDD));
      }
#endif
    if (full_k)
      for (; nb < full_nb; ++nb)
        interleave4x16(c.b + kb * 4 * c.sk + nb * 16, c.sk, c.out + ((nb - c.nb_base) * c.KB + kb) * 64);
    for (; nb < c.nb_hi; ++nb)
      pack_cell(c.b, c.K, c.N, c.sk, c.sn, nb, kb, c.out + ((nb - c.nb_base) * c.KB + kb) * 64);
  }
}

// Column-major B (sk == 1, e.g. W^T of a row-major [N, K] weight), split over
// blocks: per 4 columns x 16 k, a 4x4 transpose of dwords.
void pack_cols_range(const PackCtx& c, int64_t nb_begin, int64_t nb_end) {
  const int64_t full_kb4 = c.K / 16;  // groups of 4 k-groups fully inside K
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    int8_t* out = c.out + (nb - c.nb_base) * c.KB * 64;
    int64_t kb = 0;
    if (nb * 16 + 16 <= c.N) {
      for (int64_t g = 0; g < full_kb4; ++g, kb += 4) {
        for (int c0 = 0; c0 < 16; c0 += 4) {
          const int8_t* src = c.b + (nb * 16 + c0) * c.sn + kb * 4;
#if !defined(__SSE2__)
          // 4 columns x 16 k: dword (k-group kb + q, column c0 + i) of the output.
          for (int q = 0; q < 4; ++q)
            for (int i = 0; i < 4; ++i)
              __builtin_memcpy(out + (kb + q) * 64 + (c0 + i) * 4, src + i * c.sn + q * 4, 4);
#else
          const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
          const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c.sn));
          const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * c.sn));
          const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 3 * c.sn));
          const __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpackhi_epi32(r0, r1);
          const __m128i t2 = _mm_unpacklo_epi32(r2, r3), t3 = _mm_unpackhi_epi32(r2, r3);
          int8_t* o = out + kb * 64 + c0 * 4;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi64(t0, t2));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 64), _mm_unpackhi_epi64(t0, t2));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 128), _mm_unpacklo_epi64(t1, t3));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 192), _mm_unpackhi_epi64(t1, t3));
#endif
        }
      }
    }
    for (; kb < c.KB; ++kb) pack_cell(c.b, c.K, c.N, c.sk, c.sn, nb, kb, out + kb * 64);
  }
}

// Column sums of packed blocks: a dot product with u8 ones, 4 independent
// accumulator chains (vpdpbusd latency).
void colsum_range(const PackCtx& c, int64_t nb_begin, int64_t nb_end) {
  const VI ones = vi_set1(0x01010101);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int8_t* blk = c.out + (nb - c.nb_base) * c.KB * 64;
    VI acc[4][kV];
    for (int u = 0; u < 4; ++u)
      for (int v = 0; v < kV; ++v) acc[u][v] = vi_zero();
    int64_t kb = 0;
    for (; kb + 4 <= c.KB; kb += 4)
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < kV; ++v)
          acc[u][v] = vi_dpbusd(acc[u][v], ones, vi_load(blk + (kb + u) * 64 + v * kW * 4));
    for (; kb < c.KB; ++kb)
      for (int v = 0; v < kV; ++v) acc[0][v] = vi_dpbusd(acc[0][v], ones, vi_load(blk + kb * 64 + v * kW * 4));
    for (int v = 0; v < kV; ++v)
      vi_store(c.colsum + (nb - c.nb_base) * 16 + v * kW,
               vi_add(vi_add(acc[0][v], acc[1][v]), vi_add(acc[2][v], acc[3][v])));
  }
}

// Packs the column chunk nc (kNBK blocks) of raw B into a thread's panel buffer
// (the fused path of int8_matmul: B is read once per task, the packed panel
// stays in L2 instead of making a round trip through memory).
void pack_panel(const GemmArgs& g, int64_t nc, int8_t* panel, int32_t* colsum) {
  const int64_t KB = (g.K + 3) / 4, NB = (g.N + 15) / 16;
  const int64_t nb_lo = nc * kNBK, nb_hi = k_min(NB, nb_lo + kNBK);
  PackCtx c{g.b_raw, g.K, g.N, g.sbk, g.sbn, KB, NB, panel, colsum, nb_lo, nb_hi, nb_lo};
  if (g.sbn == 1)
    pack_rows_range(c, 0, KB);
  else
    pack_cols_range(c, nb_lo, nb_hi);
  colsum_range(c, nb_lo, nb_hi);
}

// ---------------------------------------------------------------- A operand

struct AConvCtx {
  const int8_t* a;
  int64_t M, K, sm, sk;
  AElem* out;
  int64_t ldo;
};

// Signed int8 A in the A format: a + 128 as u8 (a ^ 0x80 bytewise), or a as int16.
void isa_a_from_s8(const int8_t* a, int64_t M, int64_t K, int64_t sm, int64_t sk, void* out,
                   int64_t ldo) {
  AConvCtx ctx{a, M, K, sm, sk, static_cast<AElem*>(out), ldo};
  const int64_t grain = k_min(M, 1 + (1 << 16) / (K + 1));
  tallow::parallel_for(M, grain, [](void* p, int64_t begin, int64_t end) {
    const AConvCtx& c = *static_cast<const AConvCtx*>(p);
    for (int64_t m = begin; m < end; ++m) {
      const int8_t* src = c.a + m * c.sm;
      AElem* dst = c.out + m * c.ldo;
      int64_t k = 0;
#if defined(TALLOW_I8_S16)
      if (c.sk == 1)
        for (; k + 16 <= c.K; k += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
      for (; k < c.K; ++k) dst[k] = src[k * c.sk];
#else
      if (c.sk == 1) {
        // x + 128 as u8 == x ^ 0x80 bytewise; 8 bytes at a time.
        for (; k + 8 <= c.K; k += 8) {
          uint64_t w;
          __builtin_memcpy(&w, src + k, 8);
          w ^= 0x8080808080808080ull;
          __builtin_memcpy(dst + k, &w, 8);
        }
      }
      for (; k < c.K; ++k) dst[k] = static_cast<uint8_t>(src[k * c.sk]) ^ 0x80u;
#endif
      for (; k < c.ldo; ++k) dst[k] = 0;
    }
  }, &ctx);
}

// ---------------------------------------------------------------- activation quantization

// Per row: mn = min(0, min x), mx = max(0, max x), scale = (mx - mn) / L
// (1 if 0), inv = 1 / scale, zp = clamp(round(-mn * inv), 0, L),
// q = clamp(round(x * inv) + zp, 0, L), round half to even — the same
// float32 operations as quantize_rows_ref, so q, scale and zp match it bit
// for bit. A row with a NaN/inf gets scale NaN, zp 0, q 0 (its outputs are NaN).
// L = 255 (8 bits), or 127 for the 7-bit A of GemmArgs::a_u7.
// QT: uint8_t (the op's q) or the GEMM's A element (int16 on AVX2: same values).
// The row's range: mn = min(0, min x) (as -max(0 - x): -0.0 when no x < 0),
// mx = max(0, max x), bad = 0 or NaN (NaN iff some x is NaN or inf). The
// range of a row equals the min / max / any of its pieces' ranges, which is
// what lets quantize_rows_split take one long row in pieces on every thread.
struct RowRange {
  float mn, mx, bad;
};

inline RowRange row_range(const float* x, int64_t K) {
  VF vmin = vf_zero(), vmax = vf_zero(), vbad = vf_zero();
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    const VF v = vf_load(x + k);
    vmin = vf_min(vmin, v);
    vmax = vf_max(vmax, v);
    vbad = vf_add(vbad, vf_mul(v, vf_zero()));  // NaN iff some v is NaN or inf
  }
  if (k < K) {
    const VF v = vf_load_n(x + k, static_cast<int>(K - k));  // zero-filled lanes: harmless
    vmin = vf_min(vmin, v);
    vmax = vf_max(vmax, v);
    vbad = vf_add(vbad, vf_mul(v, vf_zero()));
  }
  const float bad = vf_reduce_add(vbad);
  return {-vf_reduce_max(vf_sub(vf_zero(), vmin)), vf_reduce_max(vmax), bad != 0.0f || bad != bad ? 1.0f : 0.0f};
}

// scale, 1 / scale and the zero point (as a float) of a range (not bad).
template <int L>
inline void range_params(const RowRange& r, float* scale_out, float* inv_out, float* z_out) {
  constexpr float kL = static_cast<float>(L);
  float scale = (r.mx - r.mn) / kL;
  if (scale == 0.0f) scale = 1.0f;
  const float inv = 1.0f / scale;
  float z = __builtin_nearbyintf(-r.mn * inv);
  z = z < 0.0f ? 0.0f : (z > kL ? kL : z);
  *scale_out = scale;
  *inv_out = inv;
  *z_out = z;
}

// q[k] = clamp(round(x[k] * inv) + z, 0, L) for k < K.
template <typename QT, int L>
inline void quantize_span(const float* x, int64_t K, QT* q, float inv, float z) {
  const VF vinv = vf_set1(inv), vz = vf_set1(z), lo = vf_zero(), hi = vf_set1(static_cast<float>(L));
  for (int64_t k = 0; k < K; k += kW) {
    const int n = static_cast<int>(k_min(kW, K - k));
    const VF v = n == kW ? vf_load(x + k) : vf_load_n(x + k, n);
    // round(x * inv) + zp is an exact small integer in float: clamp there.
    VF r = vf_add(vf_round(vf_mul(v, vinv)), vz);
    r = vf_min(vf_max(r, lo), hi);
    k_store_u8(q + k, vf_round_to_vi(r), n);
  }
}

template <typename QT, int L = 255>
void quantize_row(const float* x, int64_t K, QT* q, int64_t ldq, float* scale_out,
                  int32_t* zp_out) {
  const RowRange r = row_range(x, K);
  if (r.bad != 0.0f) {
    *scale_out = __builtin_nanf("");
    *zp_out = 0;
    __builtin_memset(q, 0, static_cast<size_t>(ldq) * sizeof(QT));
    return;
  }
  float inv, z;
  range_params<L>(r, scale_out, &inv, &z);
  *zp_out = static_cast<int32_t>(z);
  quantize_span<QT, L>(x, K, q, inv, z);
  for (int64_t k = K; k < ldq; ++k) q[k] = 0;
}

template <typename QT>
struct QuantCtx {
  const float* x;
  int64_t K, ldx;
  QT* q;
  int64_t ldq;
  float* scale;
  int32_t* zp;
};

// Fewer rows than threads, each long (a convolution's per-image quantization
// of a whole activation, 25k-800k values for ResNet-50): each row in pieces
// of kQuantPiece values on every thread — the pieces' ranges first, then the
// pieces quantized with their row's parameters (bit for bit quantize_row's).
constexpr int64_t kQuantPiece = 16384;

template <typename QT>
struct QuantSplitCtx {
  const float* x;
  int64_t K, ldx, pieces;
  QT* q;
  int64_t ldq;
  RowRange* ranges;  // [M * pieces]
  float* inv;        // [M] (NaN: a bad row)
  float* z;          // [M]
};

template <typename QT, int L>
void quantize_rows_split(const float* x, int64_t M, int64_t K, int64_t ldx, QT* q, int64_t ldq, float* scale,
                         int32_t* zp) {
  const int64_t pieces = (K + kQuantPiece - 1) / kQuantPiece;
  RowRange* ranges = static_cast<RowRange*>(malloc(sizeof(RowRange) * static_cast<size_t>(M * pieces)));
  float* inv = static_cast<float*>(malloc(sizeof(float) * static_cast<size_t>(2 * M)));
  if (!ranges || !inv) {
    free(ranges);
    free(inv);
    throw std::bad_alloc();
  }
  QuantSplitCtx<QT> ctx{x, K, ldx, pieces, q, ldq, ranges, inv, inv + M};
  tallow::parallel_for(M * pieces, 1, [](void* p, int64_t begin, int64_t end) {
    const QuantSplitCtx<QT>& c = *static_cast<const QuantSplitCtx<QT>*>(p);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / c.pieces, k0 = (t % c.pieces) * kQuantPiece;
      c.ranges[t] = row_range(c.x + m * c.ldx + k0, k_min(kQuantPiece, c.K - k0));
    }
  }, &ctx);
  for (int64_t m = 0; m < M; ++m) {
    RowRange r = ranges[m * pieces];
    for (int64_t i = 1; i < pieces; ++i) {
      const RowRange& o = ranges[m * pieces + i];
      r.mn = o.mn < r.mn ? o.mn : r.mn;
      r.mx = o.mx > r.mx ? o.mx : r.mx;
      r.bad = r.bad != 0.0f || o.bad != 0.0f ? 1.0f : 0.0f;
    }
    if (r.bad != 0.0f) {
      scale[m] = __builtin_nanf("");
      zp[m] = 0;
      ctx.inv[m] = __builtin_nanf("");
      continue;
    }
    range_params<L>(r, scale + m, ctx.inv + m, ctx.z + m);
    zp[m] = static_cast<int32_t>(ctx.z[m]);
  }
  tallow::parallel_for(M * pieces, 1, [](void* p, int64_t begin, int64_t end) {
    const QuantSplitCtx<QT>& c = *static_cast<const QuantSplitCtx<QT>*>(p);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / c.pieces, k0 = (t % c.pieces) * kQuantPiece;
      const int64_t n = k_min(kQuantPiece, c.K - k0);
      QT* qp = c.q + m * c.ldq + k0;
      if (c.inv[m] != c.inv[m])
        __builtin_memset(qp, 0, static_cast<size_t>(n) * sizeof(QT));
      else
        quantize_span<QT, L>(c.x + m * c.ldx + k0, n, qp, c.inv[m], c.z[m]);
      if (k0 + n == c.K)
        for (int64_t k = c.K; k < c.ldq; ++k) c.q[m * c.ldq + k] = 0;
    }
  }, &ctx);
  free(ranges);
  free(inv);
}

template <typename QT, int L = 255>
void quantize_rows_as(const float* x, int64_t M, int64_t K, int64_t ldx, QT* q, int64_t ldq,
                      float* scale, int32_t* zp) {
  if (M < tallow::num_threads() && K >= 4 * kQuantPiece) {
    quantize_rows_split<QT, L>(x, M, K, ldx, q, ldq, scale, zp);
    return;
  }
  QuantCtx<QT> ctx{x, K, ldx, q, ldq, scale, zp};
  const int64_t grain = k_min(M, 1 + (1 << 14) / (K + 1));
  tallow::parallel_for(M, grain, [](void* p, int64_t begin, int64_t end) {
    const QuantCtx<QT>& c = *static_cast<const QuantCtx<QT>*>(p);
    for (int64_t m = begin; m < end; ++m)
      quantize_row<QT, L>(c.x + m * c.ldx, c.K, c.q + m * c.ldq, c.ldq, c.scale + m, c.zp + m);
  }, &ctx);
}

void isa_quantize_rows_u7(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq,
                          float* scale, int32_t* zp) {
  quantize_rows_as<uint8_t, 127>(x, M, K, ldx, q, ldq, scale, zp);
}

void isa_quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq,
                       float* scale, int32_t* zp) {
  quantize_rows_as<uint8_t>(x, M, K, ldx, q, ldq, scale, zp);
}

void isa_quantize_rows_a(const float* x, int64_t M, int64_t K, int64_t ldx, void* q, int64_t ldq,
                         float* scale, int32_t* zp) {
  quantize_rows_as<AElem>(x, M, K, ldx, static_cast<AElem*>(q), ldq, scale, zp);
}

// ---------------------------------------------------------------- GEMM

// acc (int32 [MR][NBK*16], row stride kNR) (+)= A[MR rows, k-groups kb0..kb1) x B panel.
// b points at the panel's first block; consecutive 16-column blocks are bstride bytes apart.
template <int MR, int NBK>
void micro(const uint8_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t kb0,
           int64_t kb1, int32_t* acc, bool init) {
  constexpr int NV = NBK * kV;
  VI c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = init ? vi_zero() : vi_load(acc + r * kNR + j * kW);
  const uint8_t* ap = a + kb0 * 4;
  const int8_t* bp = b + kb0 * 64;
  for (int64_t kb = kb0; kb < kb1; ++kb, ap += 4, bp += 64) {
    VI bv[NV];
    for (int j = 0; j < NBK; ++j)
      for (int v = 0; v < kV; ++v) bv[j * kV + v] = vi_load(bp + j * bstride + v * kW * 4);
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      __builtin_memcpy(&w, ap + r * lda, 4);
      const VI av = vi_set1(w);
      for (int j = 0; j < NV; ++j) c[r][j] = vi_dpbusd(c[r][j], av, bv[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) vi_store(acc + r * kNR + j * kW, c[r][j]);
}

using MicroFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t,
                         int32_t*, bool);

#if defined(__AVX512F__)
// Hand-unrolled AVX-512 tile of MR rows x 64 columns: GCC keeps the generic
// version's accumulator array on the stack (a store per vpdpbusd); named
// variables stay in zmm registers (24 accumulators + 4 B + 1 broadcast).
template <int MR>
void micro_x4(const uint8_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t kb0,
              int64_t kb1, int32_t* acc, bool init) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00;
  __m512i c10 = c00, c11 = c00, c12 = c00, c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00;
  __m512i c30 = c00, c31 = c00, c32 = c00, c33 = c00, c40 = c00, c41 = c00, c42 = c00, c43 = c00;
  __m512i c50 = c00, c51 = c00, c52 = c00, c53 = c00;
#define TALLOW_I8_LOAD(r)                                    \
  if (MR > r) {                                              \
    c##r##0 = _mm512_loadu_si512(acc + r * kNR);             \
    c##r##1 = _mm512_loadu_si512(acc + r * kNR + 16);        \
    c##r##2 = _mm512_loadu_si512(acc + r * kNR + 32);        \
    c##r##3 = _mm512_loadu_si512(acc + r * kNR + 48);        \
  }
#define TALLOW_I8_ROW(r)                                     \
  if (MR > r) {                                              \
    int32_t w;                                               \
    __builtin_memcpy(&w, ap + r * lda, 4);                   \
    const __m512i av = _mm512_set1_epi32(w);                 \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);          \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);          \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, b2);          \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, b3);          \
  }
#define TALLOW_I8_STORE(r)                                   \
  if (MR > r) {                                              \
    _mm512_storeu_si512(acc + r * kNR, c##r##0);             \
    _mm512_storeu_si512(acc + r * kNR + 16, c##r##1);        \
    _mm512_storeu_si512(acc + r * kNR + 32, c##r##2);        \
    _mm512_storeu_si512(acc + r * kNR + 48, c##r##3);        \
  }
  if (!init) {
    TALLOW_I8_LOAD(0) TALLOW_I8_LOAD(1) TALLOW_I8_LOAD(2)
    TALLOW_I8_LOAD(3) TALLOW_I8_LOAD(4) TALLOW_I8_LOAD(5)
  }
  const uint8_t* ap = a + kb0 * 4;
  const int8_t* bp = b + kb0 * 64;
  for (int64_t kb = kb0; kb < kb1; ++kb, ap += 4, bp += 64) {
    const __m512i b0 = _mm512_loadu_si512(bp);
    const __m512i b1 = _mm512_loadu_si512(bp + bstride);
    const __m512i b2 = _mm512_loadu_si512(bp + 2 * bstride);
    const __m512i b3 = _mm512_loadu_si512(bp + 3 * bstride);
    TALLOW_I8_ROW(0) TALLOW_I8_ROW(1) TALLOW_I8_ROW(2)
    TALLOW_I8_ROW(3) TALLOW_I8_ROW(4) TALLOW_I8_ROW(5)
  }
  TALLOW_I8_STORE(0) TALLOW_I8_STORE(1) TALLOW_I8_STORE(2)
  TALLOW_I8_STORE(3) TALLOW_I8_STORE(4) TALLOW_I8_STORE(5)
#undef TALLOW_I8_LOAD
#undef TALLOW_I8_ROW
#undef TALLOW_I8_STORE
}
#endif

#if defined(TALLOW_SIMD_NEON)
// NEON tile of MR rows x 16 columns (one packed block; NBK = 1): per k-group,
// 4 B vectors (4 columns x 4 k each) and, per row, the row's 4 A bytes
// broadcast and flipped to s8 (a ^ 0x80 = a - 128), then one SDOT per
// (row, vector). The accumulators hold sum (a - 128) * B: the epilogue adds
// the 128 * colsum back through kAccZpBias.
template <int MR>
void micro_sdot(const uint8_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t kb0,
                int64_t kb1, int32_t* acc, bool init) {
  int32x4_t c[MR][4];
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)
      c[r][j] = init ? vdupq_n_s32(0) : vld1q_s32(acc + r * kNR + j * 4);
  const uint8_t* ap = a + kb0 * 4;
  const int8_t* bp = b + kb0 * 64;
  const uint32x4_t flip = vdupq_n_u32(0x80808080u);
  for (int64_t kb = kb0; kb < kb1; ++kb, ap += 4, bp += 64) {
    const int8x16_t b0 = vld1q_s8(bp), b1 = vld1q_s8(bp + 16), b2 = vld1q_s8(bp + 32), b3 = vld1q_s8(bp + 48);
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
      uint32_t w;
      __builtin_memcpy(&w, ap + r * lda, 4);
      const int8x16_t av = vreinterpretq_s8_u32(veorq_u32(vdupq_n_u32(w), flip));
      c[r][0] = vdotq_s32(c[r][0], av, b0);
      c[r][1] = vdotq_s32(c[r][1], av, b1);
      c[r][2] = vdotq_s32(c[r][2], av, b2);
      c[r][3] = vdotq_s32(c[r][3], av, b3);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) vst1q_s32(acc + r * kNR + j * 4, c[r][j]);
}
#endif

#if !defined(TALLOW_I8_S16)  // AVX2 has its own int16 micro-kernel (below)
template <int MR>
MicroFn micro_for_nbk(int nbk) {
  switch (nbk) {
#if defined(__AVX512F__)
    case 4: return &micro_x4<MR>;
    case 3: return &micro<MR, 3>;
    case 2: return &micro<MR, 2>;
#endif
    default: return &micro<MR, 1>;
  }
}

MicroFn micro_for(int mr, int nbk) {
#if defined(TALLOW_SIMD_NEON)
  // kNBK = 1: nbk is always 1. Never the generic micro (its vi_dpbusd is
  // the exact u8 x s8 emulation, which would not match kAccZpBias).
  switch (mr) {
    case 5: return &micro_sdot<5>;
    case 4: return &micro_sdot<4>;
    case 3: return &micro_sdot<3>;
    case 2: return &micro_sdot<2>;
    default: return &micro_sdot<1>;
  }
#endif
  switch (mr) {
#if defined(__AVX512F__)
    case 6: return micro_for_nbk<6>(nbk);
    case 5: return micro_for_nbk<5>(nbk);
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    case 4: return micro_for_nbk<4>(nbk);
    case 3: return micro_for_nbk<3>(nbk);
#endif
    case 2: return micro_for_nbk<2>(nbk);
    default: return micro_for_nbk<1>(nbk);
  }
}
#endif

// Epilogue for rows [m0, m0 + rows) and columns [n0, n0 + ncols) of C, from
// the task's int32 accumulators (row stride kNR).
void epilogue(const GemmArgs& g, const int32_t* acc, int64_t m0, int rows, int64_t n0, int ncols,
              const int32_t* cs /* column sums from column n0 */) {
  for (int r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const int32_t* ar = acc + r * kNR;
    if (g.c_i32) {
      int32_t* out = g.c_i32 + m * g.ldc + n0;
      const VI off = vi_set1(g.a_offset - kAccZpBias);
      for (int j = 0; j < ncols; j += kW) {
        const VI y = k_sub(vi_load(ar + j), vi_mullo(off, vi_load(cs + j)));
        const int n = ncols - j < kW ? ncols - j : kW;
        if (n == kW)
          vi_store(out + j, y);
        else
          k_store_i32_n(out + j, y, n);
      }
    } else {
      float* out = g.c_f32 + m * g.ldc + n0;
      const VI zp = vi_set1(g.row_zp[m] - kAccZpBias);
      const VF sx = vf_set1(g.row_scale[m]);
      for (int j = 0; j < ncols; j += kW) {
        const VI yi = k_sub(vi_load(ar + j), vi_mullo(zp, vi_load(cs + j)));
        const VF s = vf_mul(sx, vf_load(g.col_scale + n0 + j));
        VF y = vf_add(vf_mul(vi_to_vf(yi), s), vf_load(g.bias + n0 + j));
        const int n = ncols - j < kW ? ncols - j : kW;
        if (g.residual) {
          const float* r = g.residual + m * g.ldc + n0 + j;
          y = vf_add(y, n == kW ? vf_load(r) : vf_load_n(r, n));
        }
        y = apply_act(y, g.act);
        if (n == kW)
          vf_store(out + j, y);
        else
          vf_store_n(out + j, y, n);
      }
    }
  }
}

#if !defined(TALLOW_I8_S16)
// Rows [m0, m0 + rows) x column chunk nc on the VNNI micro-kernel, from a
// panel (its 16-column blocks bstride bytes apart) and its column sums; acc
// holds kMB rows of kNR int32.
void vnni_rows(const GemmArgs& g, int64_t m0, int rows, int64_t nc, const int8_t* panel,
               const int32_t* cs, int32_t* acc) {
  const int64_t KB = (g.K + 3) / 4;
  const int64_t NB = (g.N + 15) / 16;
  const int nbk = static_cast<int>(k_min(kNBK, NB - nc * kNBK));
  const int64_t n0 = nc * kNR;
  const int ncols = static_cast<int>(k_min(kNR, g.N - n0));
  for (int64_t ms = m0; ms < m0 + rows; ms += kMB) {
    const int sub = static_cast<int>(k_min(kMB, m0 + rows - ms));
    int64_t kb0 = 0;
    do {
      const int64_t kb1 = k_min(KB, kb0 + kKBC);
      for (int mt = 0; mt < sub; mt += kMR) {
        const int mr = static_cast<int>(k_min(kMR, sub - mt));
        micro_for(mr, nbk)(g.a + (ms + mt) * g.lda, g.lda, panel, KB * 64, kb0, kb1,
                           acc + mt * kNR, kb0 == 0);
      }
      kb0 = kb1;
    } while (kb0 < KB);
    epilogue(g, acc, ms, sub, n0, ncols, cs);
  }
}
#endif

#if defined(TALLOW_I8_S16)
// ---------------------------------------------------------------- AVX2: int16 vpmaddwd
//
// AVX2 has no vpdpbusd. Its byte multiply, vpmaddubsw (u8 x s8, adjacent
// pairs summed into a *saturating* int16), overflows for u8 activations
// (255 * 127 * 2 = 64770 > 32767); the usual ways around it lose a bit of
// precision (7-bit activations, as FBGEMM's reduce_range, measured here at
// 1.6-1.9 % relative error on the test layers against 0.9-1.2 % for 8 bits:
// over the 1.5 % bound QuantizedLinear keeps) or cost an extra operation per
// multiply (vpsignb, measured no faster). So AVX2 multiplies in int16 and is
// exact: A is stored as int16 (q in 0..255, or signed int8 a), and per
// k-group (4 k) and 4 columns one vpmovsxbw widens 16 bytes of the packed
// block ([c0k0 c0k1 c0k2 c0k3 c1k0 ... c3k3]) to int16; vpmaddwd against the
// row's 4 int16 (a 64-bit broadcast) gives int32 [c0(k0+k1), c0(k2+k3), c1..,
// c2.., c3..]. Each accumulator thus holds 4 columns x 2 partial sums, folded
// with vphaddd when the tile is stored. |products| < 2^15, pair sums < 2^17:
// no saturation anywhere. Peak: one vpmaddwd (16 multiply-adds) per multiply
// pipe and cycle, the same rate as vpmaddubsw + vpmaddwd(ones) (32 per two
// multiply-pipe instructions) — benchmarks/bench_peak.py measures both.
//
// Register tile: 6 rows x 8 columns (12 ymm accumulators, 2 widened B, 1
// broadcast A, 1 product); M = 1 (decode) uses 1 row x 32 columns.

constexpr int64_t kKBC16 = 128;  // k-groups per L1 block: B 32 cols x 512 k = 16 KiB, A 6 rows = 6 KiB

// acc[r][s*4 ..] (row stride kNR int32) (+)= A[MR rows, k-groups kb0..kb1) x B for NS groups
// of 4 columns: group s at b + (s / 4) * bstride + (s % 4) * 16 (+ kb * 64).
template <int MR, int NS>
void micro_s16(const int16_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t kb0,
               int64_t kb1, int32_t* acc, bool init) {
  static_assert(NS % 2 == 0, "columns are folded in pairs of groups");
  __m256i c[MR][NS];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NS; ++s) c[r][s] = _mm256_setzero_si256();
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int8_t* bp = b + kb * 64;
    __m256i bv[NS];
    for (int s = 0; s < NS; ++s)
      bv[s] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + (s / 4) * bstride + (s % 4) * 16)));
    for (int r = 0; r < MR; ++r) {
      int64_t a4;
      __builtin_memcpy(&a4, a + r * lda + kb * 4, 8);
      const __m256i av = _mm256_set1_epi64x(a4);
      for (int s = 0; s < NS; ++s) c[r][s] = _mm256_add_epi32(c[r][s], _mm256_madd_epi16(av, bv[s]));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NS; s += 2) {
      // hadd -> [c0 c1 c4 c5 | c2 c3 c6 c7]; the permute puts the 8 columns in order.
      __m256i h = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[r][s], c[r][s + 1]), 0xD8);
      int32_t* o = acc + r * kNR + s * 4;
      if (!init) h = _mm256_add_epi32(h, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
    }
}

// R rows (R <= 6) x 8 columns hand-unrolled: GCC keeps the generic
// version's accumulator array half on the stack (a load + store per
// vpmaddwd); named variables stay in the 16 ymm registers. Rows >= R are
// compiled out (if constexpr), so the row tails of a GEMM (M = 17 is tiles
// of 6, 6 and 5) run at the full tile's speed too.
template <int R>
void micro_s16_rx8(const int16_t* a, int64_t lda, const int8_t* b, int64_t bstride, int64_t kb0,
                   int64_t kb1, int32_t* acc, bool init) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const int16_t* a0 = a + kb0 * 4;
  const int8_t* bp = b + kb0 * 64;
#define TALLOW_S16_ROW(r)                                                          \
  if constexpr (r < R) {                                                           \
    int64_t a4;                                                                    \
    __builtin_memcpy(&a4, a0 + r * lda, 8);                                        \
    const __m256i av = _mm256_set1_epi64x(a4);                                     \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(av, b0));               \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(av, b1));               \
  }
  for (int64_t kb = kb0; kb < kb1; ++kb, a0 += 4, bp += 64) {
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp)));
    const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 16)));
    TALLOW_S16_ROW(0) TALLOW_S16_ROW(1) TALLOW_S16_ROW(2)
    TALLOW_S16_ROW(3) TALLOW_S16_ROW(4) TALLOW_S16_ROW(5)
  }
#undef TALLOW_S16_ROW
  const __m256i rows[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < R; ++r) {
    __m256i h = _mm256_permute4x64_epi64(_mm256_hadd_epi32(rows[r][0], rows[r][1]), 0xD8);
    int32_t* o = acc + r * kNR;
    if (!init) h = _mm256_add_epi32(h, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
  }
}

using MicroS16Fn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, int32_t*, bool);

MicroS16Fn micro_s16_for(int mr) {
  switch (mr) {
    case 6: return &micro_s16_rx8<6>;
    case 5: return &micro_s16_rx8<5>;
    case 4: return &micro_s16_rx8<4>;
    case 3: return &micro_s16_rx8<3>;
    case 2: return &micro_s16_rx8<2>;
    default: return &micro_s16_rx8<1>;
  }
}

// Rows [m0, m0 + rows) x column chunk nc (kNBK 16-column blocks) on the int16 path.
void s16_rows(const GemmArgs& g, int64_t m0, int rows, int64_t nc, const int8_t* panel,
              const int32_t* cs, int32_t* acc) {
  const int64_t KB = (g.K + 3) / 4;
  const int64_t NB = (g.N + 15) / 16;
  const int nbk = static_cast<int>(k_min(kNBK, NB - nc * kNBK));
  const int64_t n0 = nc * kNR;
  const int ncols = static_cast<int>(k_min(kNR, g.N - n0));
  const int64_t bstride = KB * 64;
  const int16_t* a = reinterpret_cast<const int16_t*>(g.a);
  for (int64_t ms = m0; ms < m0 + rows; ms += kMB) {
    const int sub = static_cast<int>(k_min(kMB, m0 + rows - ms));
    for (int64_t kb0 = 0; kb0 < KB; kb0 += kKBC16) {
      const int64_t kb1 = k_min(KB, kb0 + kKBC16);
      const bool init = kb0 == 0;
      if (sub == 1) {  // a single row (decode): one tile over the whole chunk
        if (nbk == 2)
          micro_s16<1, 8>(a + ms * g.lda, g.lda, panel, bstride, kb0, kb1, acc, init);
        else
          micro_s16<1, 4>(a + ms * g.lda, g.lda, panel, bstride, kb0, kb1, acc, init);
        continue;
      }
      for (int mt = 0; mt < sub; mt += kMR) {
        const int mr = static_cast<int>(k_min(kMR, sub - mt));
        const MicroS16Fn fn = micro_s16_for(mr);
        for (int t = 0; t < nbk * 2; ++t)  // 8-column tiles: the A tile stays in L1 across them
          fn(a + (ms + mt) * g.lda, g.lda, panel + (t / 2) * bstride + (t % 2) * 32, bstride, kb0, kb1,
             acc + mt * kNR + t * 8, init);
      }
    }
    epilogue(g, acc, ms, sub, n0, ncols, cs);
  }
}

// ---------------------------------------------------------------- AVX2: 7-bit A, vpmaddubsw
//
// With A in [0, 127] (GemmArgs::a_u7) vpmaddubsw's pair sums stay below
// 2 * 127 * 127 = 32258 < 2^15: exact, no saturation. Then the packed layout
// is vpdpbusd's: one vpmaddubsw (u8 x s8 -> s16 pairs) + one vpmaddwd with
// ones (-> s32 sums of 4) + vpaddd per 8 columns x 4 k, 32 multiply-adds per
// two multiply-pipe instructions against the int16 path's 16 per one, and no
// widening of B (bench_peak: 1.4x the int16 path's register-only rate).
//
// Register tile: 4 rows x 16 columns (8 accumulators, 2 B vectors, the ones,
// an A broadcast and the products), named variables as in micro_s16_rx8.
constexpr int kMR7 = 4;

template <int R>
void micro_u7_rx16(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kb0, int64_t kb1, int32_t* acc,
                   bool init) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* a0 = a + kb0 * 4;
  const int8_t* bp = b + kb0 * 64;
#define TALLOW_U7_ROW(r)                                                                              \
  if constexpr (r < R) {                                                                              \
    int32_t a4;                                                                                       \
    __builtin_memcpy(&a4, a0 + r * lda, 4);                                                           \
    const __m256i av = _mm256_set1_epi32(a4);                                                         \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));      \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));      \
  }
  for (int64_t kb = kb0; kb < kb1; ++kb, a0 += 4, bp += 64) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32));
    TALLOW_U7_ROW(0) TALLOW_U7_ROW(1) TALLOW_U7_ROW(2) TALLOW_U7_ROW(3)
  }
#undef TALLOW_U7_ROW
  const __m256i rows[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) {
      __m256i* o = reinterpret_cast<__m256i*>(acc + r * kNR + v * 8);
      _mm256_storeu_si256(o, init ? rows[r][v] : _mm256_add_epi32(rows[r][v], _mm256_loadu_si256(o)));
    }
}

using MicroU7Fn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, bool);

MicroU7Fn micro_u7_for(int mr) {
  switch (mr) {
    case 4: return &micro_u7_rx16<4>;
    case 3: return &micro_u7_rx16<3>;
    case 2: return &micro_u7_rx16<2>;
    default: return &micro_u7_rx16<1>;
  }
}

// Rows [m0, m0 + rows) x column chunk nc on the 7-bit path (A: u8, 1 byte per k).
void u7_rows(const GemmArgs& g, int64_t m0, int rows, int64_t nc, const int8_t* panel, const int32_t* cs,
             int32_t* acc) {
  const int64_t KB = (g.K + 3) / 4;
  const int64_t NB = (g.N + 15) / 16;
  const int nbk = static_cast<int>(k_min(kNBK, NB - nc * kNBK));
  const int64_t n0 = nc * kNR;
  const int ncols = static_cast<int>(k_min(kNR, g.N - n0));
  const int64_t bstride = KB * 64;
  for (int64_t ms = m0; ms < m0 + rows; ms += kMB) {
    const int sub = static_cast<int>(k_min(kMB, m0 + rows - ms));
    for (int64_t kb0 = 0; kb0 < KB; kb0 += kKBC) {
      const int64_t kb1 = k_min(KB, kb0 + kKBC);
      for (int mt = 0; mt < sub; mt += kMR7) {
        const MicroU7Fn fn = micro_u7_for(static_cast<int>(k_min(kMR7, sub - mt)));
        for (int j = 0; j < nbk; ++j)  // 16-column blocks: the A tile stays in L1 across them
          fn(g.a + (ms + mt) * g.lda, g.lda, panel + j * bstride, kb0, kb1, acc + mt * kNR + j * 16, kb0 == 0);
      }
    }
    epilogue(g, acc, ms, sub, n0, ncols, cs);
  }
}
#endif

using RowsFn = void (*)(const GemmArgs&, int64_t, int, int64_t, const int8_t*, const int32_t*, int32_t*);

struct DriveCtx {
  const GemmArgs* g;
  RowsFn rows_fn;
  void (*begin_fn)();  // per-thread set-up around a chunk of tasks (AMX tile config)
  void (*end_fn)();
  int64_t task_rows, n_mb;
  int32_t* acc;
  int64_t acc_per_thread;
  int8_t* panel;  // fused path: per-thread packed panel + its column sums
  int32_t* colsum;
  int64_t panel_per_thread;
};

// Tasks are (row block of task_rows, column chunk of kNR), row blocks fastest.
// With prepacked B (QuantizedLinear) a task reads its panel in place; with
// raw B (int8_matmul) it first packs the panel (fused), so task rows are larger
// to pack each panel fewer times.
void drive(const GemmArgs& g, RowsFn rows_fn, void (*begin_fn)(), void (*end_fn)(), int64_t sub_rows) {
  const int64_t NB = (g.N + 15) / 16;
  const int64_t KB = (g.K + 3) / 4;
  const int64_t n_nc = (NB + kNBK - 1) / kNBK;
  const bool fused = g.b_raw != nullptr;
  const int64_t task_rows = fused ? sub_rows * 4 : sub_rows;
  const int64_t n_mb = (g.M + task_rows - 1) / task_rows;
  const int threads = tallow::num_threads();
  const int64_t acc_per_thread = sub_rows * kNR;
  const int64_t panel_per_thread = fused ? (kNBK * KB * 64 + 63) / 64 * 64 : 0;
  int32_t* acc = static_cast<int32_t*>(aligned_alloc(64, static_cast<size_t>(acc_per_thread) * 4 * threads));
  int8_t* panel = fused ? static_cast<int8_t*>(aligned_alloc(64, static_cast<size_t>(panel_per_thread) * threads + 64))
                        : nullptr;
  int32_t* colsum = fused ? static_cast<int32_t*>(aligned_alloc(64, static_cast<size_t>(kNR) * 4 * threads)) : nullptr;
  DriveCtx ctx{&g, rows_fn, begin_fn, end_fn, task_rows, n_mb, acc, acc_per_thread, panel, colsum, panel_per_thread};
  tallow::parallel_for(n_mb * n_nc, 1, [](void* p, int64_t begin, int64_t end) {
    const DriveCtx& c = *static_cast<const DriveCtx*>(p);
    const GemmArgs& g = *c.g;
    const int64_t ti = tallow::thread_index();
    int32_t* acc = c.acc + ti * c.acc_per_thread;
    const int64_t KB = (g.K + 3) / 4;
    if (c.begin_fn) c.begin_fn();
    int64_t packed_nc = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mb = t % c.n_mb, nc = t / c.n_mb;
      const int64_t m0 = mb * c.task_rows;
      const int rows = static_cast<int>(k_min(c.task_rows, g.M - m0));
      if (c.panel) {
        int8_t* panel = c.panel + ti * c.panel_per_thread;
        int32_t* cs = c.colsum + ti * kNR;
        if (packed_nc != nc) pack_panel(g, nc, panel, cs);
        packed_nc = nc;
        c.rows_fn(g, m0, rows, nc, panel, cs, acc);
      } else {
        c.rows_fn(g, m0, rows, nc, g.bp + nc * kNBK * KB * 64, g.colsum + nc * kNR, acc);
      }
    }
    if (c.end_fn) c.end_fn();
  }, &ctx, threads);  // thread_index() < threads: acc, panel and colsum were sized for them
  free(acc);
  free(panel);
  free(colsum);
}

#if defined(TALLOW_I8_AMX)
void gemm_amx(const GemmArgs& g);  // int8_matmul_avx512.cpp
#endif

void isa_gemm(const GemmArgs& g) {
  if (g.M <= 0 || g.N <= 0) return;
#if defined(TALLOW_I8_AMX)
  if (g.use_amx) {
    gemm_amx(g);
    return;
  }
#endif
#if defined(TALLOW_I8_S16)
  drive(g, g.a_u7 ? &u7_rows : &s16_rows, nullptr, nullptr, kMB);
#else
  drive(g, &vnni_rows, nullptr, nullptr, kMB);
#endif
}

// ---------------------------------------------------------------- block quantization (linear_b32)
//
// linear_b32 (int8_matmul.h, kQBlock): A and B are symmetric s8 with a float
// scale per 32 k, so the int32 dot of one block is scaled into float
// accumulators before the next block starts (8 k-groups of the packed layout):
//     C[m, n] = sum_blk a_scale[m, blk] * b_scale[n, blk] * dot_blk(a[m], B[:, n])
// vi_dot4_s8 multiplies s8 by s8 exactly (|a| x sign(w, a) on x86, SDOT on
// NEON). A register tile is kQR rows x one 16-column block (kQV vectors):
// int32 block sums and float totals, kQR * kQV each.
#if defined(__AVX512F__)
constexpr int kQR = 4;
#elif defined(__AVX2__) || defined(TALLOW_SIMD_NEON)
constexpr int kQR = 2;
#else
constexpr int kQR = 1;
#endif
constexpr int kQV = 16 / kW;  // vectors per 16 columns
constexpr int64_t kQG = kQBlock / 4;  // k-groups per block
constexpr int64_t kQRows = 16;  // rows per task
constexpr int64_t kQCols = 2;   // 16-column blocks per task

template <int R>
inline void b32_tile(const BlockGemmArgs& g, int64_t m, int64_t nb) {
  const int64_t KB = (g.K + 3) / 4;
  const int8_t* w = g.bp + nb * KB * 64;
  const float* ws = g.b_scale + nb * g.nblk * 16;
  VF f[R][kQV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < kQV; ++v) f[r][v] = vf_zero();
  for (int64_t blk = 0; blk < g.nblk; ++blk) {
    VI s[R][kQV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < kQV; ++v) s[r][v] = vi_zero();
    const int64_t kb0 = blk * kQG, kb1 = k_min(kb0 + kQG, KB);
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      VI wv[kQV];
#pragma GCC unroll 16
      for (int v = 0; v < kQV; ++v) wv[v] = vi_load(w + kb * 64 + v * kW * 4);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t a4;
        __builtin_memcpy(&a4, g.a + (m + r) * g.lda + kb * 4, 4);
        const VI av = vi_set1(a4);
#pragma GCC unroll 16
        for (int v = 0; v < kQV; ++v) s[r][v] = vi_dot4_s8(s[r][v], av, wv[v]);
      }
    }
    VF wsc[kQV];
#pragma GCC unroll 16
    for (int v = 0; v < kQV; ++v) wsc[v] = vf_load(ws + blk * 16 + v * kW);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VF sc = vf_set1(g.a_scale[(m + r) * g.nblk + blk]);
#pragma GCC unroll 16
      for (int v = 0; v < kQV; ++v) f[r][v] = vf_fmadd(vi_to_vf(s[r][v]), vf_mul(sc, wsc[v]), f[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < kQV; ++v) {
    const int64_t n = nb * 16 + v * kW;
    if (n >= g.N) break;
    const int cnt = static_cast<int>(k_min(g.N - n, kW));
    const VF bs = vf_load(g.bias + n);  // padded to NB * 16
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VF y = apply_act(vf_add(f[r][v], bs), g.act);
      float* c = g.c + (m + r) * g.ldc + n;
      if (cnt == kW)
        vf_store(c, y);
      else
        vf_store_n(c, y, cnt);
    }
  }
}

void b32_tasks(void* p, int64_t begin, int64_t end) {
  const BlockGemmArgs& g = *static_cast<const BlockGemmArgs*>(p);
  const int64_t n_mb = (g.M + kQRows - 1) / kQRows, NB = (g.N + 15) / 16;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t m0 = (t % n_mb) * kQRows, m1 = k_min(m0 + kQRows, g.M);
    const int64_t nb0 = (t / n_mb) * kQCols, nb1 = k_min(nb0 + kQCols, NB);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      int64_t m = m0;
      for (; m + kQR <= m1; m += kQR) b32_tile<kQR>(g, m, nb);
      for (; m < m1; ++m) b32_tile<1>(g, m, nb);
    }
  }
}

void isa_gemm_b32(const BlockGemmArgs& g) {
  if (g.M <= 0 || g.N <= 0) return;
  const int64_t n_mb = (g.M + kQRows - 1) / kQRows, NB = (g.N + 15) / 16;
  tallow::parallel_for(n_mb * ((NB + kQCols - 1) / kQCols), 1, &b32_tasks, const_cast<BlockGemmArgs*>(&g));
}

struct B32QuantCtx {
  const float* x;
  int64_t K, ldx, ldq, nblk;
  int8_t* q;
  float* scale;
};

void b32_quantize_rows(void* p, int64_t begin, int64_t end) {
  const B32QuantCtx& c = *static_cast<const B32QuantCtx*>(p);
  for (int64_t m = begin; m < end; ++m) {
    const float* x = c.x + m * c.ldx;
    int8_t* q = c.q + m * c.ldq;
    for (int64_t blk = 0; blk < c.nblk; ++blk) {
      const int64_t k0 = blk * kQBlock, n = k_min(kQBlock, c.K - k0);
      VF mx = vf_zero(), nonfinite = vf_zero();
      for (int64_t k = 0; k < n; k += kW) {
        const int cnt = static_cast<int>(k_min(n - k, kW));
        const VF v = cnt == kW ? vf_load(x + k0 + k) : vf_load_n(x + k0 + k, cnt);
        mx = vf_max(mx, vf_max(v, vf_sub(vf_zero(), v)));
        nonfinite = vf_add(nonfinite, vf_mul(v, vf_zero()));  // NaN iff a NaN or inf went in
      }
      // vf_max may drop a NaN: a block with NaN or inf gets scale NaN (its outputs are NaN).
      const float nf = vf_reduce_add(nonfinite);
      const float amax = nf == nf ? vf_reduce_max(mx) : nf;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      c.scale[m * c.nblk + blk] = amax / 127.0f;
      const VF iv = vf_set1(inv), lo = vf_set1(-127.0f), hi = vf_set1(127.0f);
      for (int64_t k = 0; k < n; k += kW) {
        const int cnt = static_cast<int>(k_min(n - k, kW));
        const VF v = cnt == kW ? vf_load(x + k0 + k) : vf_load_n(x + k0 + k, cnt);
        int32_t qi[kW];
        vi_store(qi, vf_round_to_vi(vf_min(hi, vf_max(lo, vf_round(vf_mul(v, iv))))));
        for (int j = 0; j < cnt; ++j) q[k0 + k + j] = static_cast<int8_t>(qi[j]);
      }
    }
    for (int64_t k = c.K; k < c.ldq; ++k) q[k] = 0;
  }
}

void isa_quantize_rows_b32(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                           float* scale) {
  if (M <= 0) return;
  B32QuantCtx c{x, K, ldx, ldq, (K + kQBlock - 1) / kQBlock, q, scale};
  tallow::parallel_for(M, 1 + (1 << 13) / (K + 1), &b32_quantize_rows, &c);
}
