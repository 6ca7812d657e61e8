// FlashAttention-2 forward on the CPU, written once over simd.h.
//
// Included by attention_{avx512,avx2,neon,scalar}.cpp
// INSIDE a namespace of their own, after "common/simd.h", "common/thread_pool.h"
// and "attention/attention.h". No system header, STL or <cmath> here (ODR rule:
// every function below becomes a distinct per-ISA symbol).
//
// Maths (Dao 2023, "FlashAttention-2", Algorithm 1), per query row i:
//   s_j = (scale q_i) . k_j
//   over key blocks:  m' = max(m, max_j s_j),  p_j = 2^((s_j - m') log2 e),
//                     l' = 2^((m - m') log2 e) l + sum_j p_j,
//                     O' = 2^((m - m') log2 e) O + sum_j p_j v_j
//   out_i = O / l   (l == 0, i.e. no visible key: zeros)
// q is scaled by `scale` alone (exact when it is a power of two, e.g. 1/8 for
// D = 64) and log2 e is applied to the difference s - m, so the exponent has
// a small relative error (like exp(s - m)); exp2 is vf_exp2 from simd.h.
// The Lq x Lk score matrix is never materialised: only a row tile x key block.
//
// Two paths:
//  - prefill (Lq > kDecodeMaxLq): a task is (b, h, query chunk); the chunk's
//    q is packed transposed (and pre-scaled) into kW-query panels [D][kW].
//    Per tile of kQT queries and block of kKB keys: S^T = K Q^T with a
//    register tile (kRK keys x kQP query panels; k[j][d] read in place and
//    broadcast against the panels), the online softmax done vertically (a
//    vector holds kW queries: no horizontal reductions), then O += P V with a
//    register tile of query rows x (up to kMaxCW vectors of D). Causal: keys
//    past the tile's last visible key are never computed, only the diagonal
//    block is masked. Padding: fully padded key blocks are skipped, padded
//    keys of the others get p = 0.
//  - decode (Lq <= kDecodeMaxLq): memory-bound, K and V are read once, no
//    packing: dot products over D (on AVX-512 16 keys at a time, summed with
//    one transpose-and-add tree), the online softmax per row, then O += P V
//    with the prefill's register tile. When B*H is too small to feed every
//    thread the key range is split (flash-decoding, Dao et al. 2023) and the
//    partial (m, l, O) combined.
// Tiny calls run on the calling thread; others use tallow::parallel_for.

#if defined(__AVX512F__)
constexpr int kQP = 3;          // query panels (of kW queries) per S^T register tile
constexpr int kRK = 8;          // keys per S^T register tile
constexpr int kAccBudget = 24;  // accumulator registers for the P.V tile
constexpr int kMaxCW = 8;       // max vectors of D per P.V tile
#elif defined(__AVX2__)
constexpr int kQP = 2;
constexpr int kRK = 6;
constexpr int kAccBudget = 12;
constexpr int kMaxCW = 4;
#elif defined(TALLOW_SIMD_NEON)
// 32 q registers of 4 floats. GCC loads every broadcast operand of a tile
// step up front (fmla by element), so a tile needs acc + operands + RK
// registers: S^T 5 keys x 4 panels (16 queries) = 20 + 4 + 5; P.V 16
// accumulators (e.g. 8 rows x 2 vectors + 2 + 8). Chosen by register count
// (no aarch64 machine has timed them yet).
constexpr int kQP = 4;
constexpr int kRK = 5;
constexpr int kAccBudget = 16;
constexpr int kMaxCW = 8;
#else
constexpr int kQP = 4;
constexpr int kRK = 3;
constexpr int kAccBudget = 12;
constexpr int kMaxCW = 4;
#endif
constexpr int kQT = kQP * kW;     // queries per tile
constexpr int kKB = 64;           // keys per block
constexpr int kDB = 32;           // head-dim block of the score tile's dot products
constexpr int kKBD = 64;          // keys per block on the decode path
constexpr int kMaxChunk = 256;    // max query rows per prefill task
constexpr int64_t kDecodeMaxLq = 4;
constexpr int kDecodeSplitMinKeys = 256;


// Full unrolling of the register-tile loops lets GCC keep accumulator arrays
// in registers (otherwise it mirrors them on the stack at every iteration).
#define TALLOW_UNROLL _Pragma("GCC unroll 32")

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline float neg_inf() { return -__builtin_inff(); }

// Lane 0 of 2^x, with the same polynomial as the vector path (so that the
// ISAs differ only in summation order).
inline float exp2_scalar(float x) { return vf_reduce_max(vf_exp2(vf_set1(x))); }

constexpr float kLog2e = 1.4426950408889634f;
// 2^((x - m) log2 e) = e^(x - m); x = -inf gives 0.
inline VF exp_diff(VF x, VF m) { return vf_exp2(vf_mul(vf_sub(x, m), vf_set1(kLog2e))); }
inline float exp_diff_scalar(float x, float m) { return exp2_scalar((x - m) * kLog2e); }

// K/V element loads for the decode path: float32, or bfloat16 bits (a bf16
// value is the high half of the float32 with the same bits: widen, shift).
inline VF kv_load(const float* p) { return vf_load(p); }
inline VF kv_load_n(const float* p, int n) { return vf_load_n(p, n); }
#if defined(__AVX512F__)
inline VF kv_load(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#elif defined(__AVX2__)
inline VF kv_load(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#elif defined(TALLOW_SIMD_NEON)
inline VF kv_load(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
#else
// Any other width (scalar): through a float buffer.
inline VF kv_load(const uint16_t* p) {
  float f[kW];
  for (int i = 0; i < kW; ++i) {
    const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    __builtin_memcpy(&f[i], &u, 4);
  }
  return vf_load(f);
}
#endif
inline VF kv_load_n(const uint16_t* p, int n) {
  if (n == kW) return kv_load(p);  // the common case: D a multiple of the width
  uint16_t tmp[kW];
  for (int i = 0; i < kW; ++i) tmp[i] = i < n ? p[i] : 0;
  return kv_load(tmp);
}

inline float* alloc_floats(int64_t n) {
  const int64_t bytes = round_up(imax(n, 1) * 4, 64);
  return static_cast<float*>(aligned_alloc(64, static_cast<size_t>(bytes)));
}

// ---------------------------------------------------------------------------
// Online softmax of one row of a score block (the decode path).
//   s[0, n_valid): scores (base 2, -inf for invisible keys); keys at or past
//   n_valid are invisible too.
// On return s[0, n_cols) holds p (zeros past n_valid), m and l are updated,
// and the factor the row's O must be multiplied by is returned. s must have
// room for round_up(n_valid, kW) floats.
inline float softmax_row(float* s, int n_valid, int n_cols, float& m, float& l) {
  if (n_valid <= 0) {
    for (int j = 0; j < n_cols; ++j) s[j] = 0.0f;
    return 1.0f;
  }
  const int nv = static_cast<int>(round_up(n_valid, kW));
  for (int j = n_valid; j < nv; ++j) s[j] = neg_inf();
  VF mx = vf_set1(neg_inf());
  for (int j = 0; j < nv; j += kW) mx = vf_max(mx, vf_load(s + j));
  const float mb = vf_reduce_max(mx);
  const float mn = m > mb ? m : mb;
  if (mn == neg_inf()) {  // nothing visible yet: p = 0, state unchanged
    for (int j = 0; j < n_cols; ++j) s[j] = 0.0f;
    return 1.0f;
  }
  const float alpha = exp_diff_scalar(m, mn);  // m == -inf gives 0 (O and l are 0 then)
  const VF vm = vf_set1(mn);
  VF sum = vf_zero();
  for (int j = 0; j < nv; j += kW) {
    const VF p = exp_diff(vf_load(s + j), vm);
    vf_store(s + j, p);
    sum = vf_add(sum, p);
  }
  for (int j = nv; j < n_cols; ++j) s[j] = 0.0f;
  l = l * alpha + vf_reduce_add(sum);
  m = mn;
  return alpha;
}

// ---------------------------------------------------------------------------
// Prefill micro-kernels. The score block is kept transposed, S^T[key][query],
// so a vector runs over kW queries: the online softmax is then purely
// vertical (running max, sum and rescale factor are vectors over queries, no
// horizontal reductions), and K is read in place (its rows are broadcast),
// never packed; only the query chunk is packed, transposed, once per task.

// Per-ISA "x where q >= t, else -inf" for the causal diagonal.
#if defined(__AVX512F__)
inline VF vf_keep_ge(VF x, VF q, VF t) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, t, _CMP_GE_OQ), vf_set1(neg_inf()), x);
}
#elif defined(__AVX2__)
inline VF vf_keep_ge(VF x, VF q, VF t) {
  return _mm256_blendv_ps(vf_set1(neg_inf()), x, _mm256_cmp_ps(q, t, _CMP_GE_OQ));
}
#elif defined(TALLOW_SIMD_NEON)
inline VF vf_keep_ge(VF x, VF q, VF t) { return vbslq_f32(vcgeq_f32(q, t), x, vf_set1(neg_inf())); }
#else
inline VF vf_keep_ge(VF x, VF q, VF t) { return q >= t ? x : neg_inf(); }
#endif

// ST[RK][QP*kW] = K[RK rows, stride ldk] . Qp, Qp = QP consecutive query
// panels [D][kW] (q transposed and pre-scaled).
// Also folds the tile's column maxima into bmax[0, QP) (the block's running
// max per query, used when no key of the block is masked).
template <int RK, int QP>
inline void st_tile(const float* k, int64_t ldk, const float* qp, int64_t D, float* st, VF* bmax) {
  VF acc[RK][QP];
  const float* kr[RK];
  TALLOW_UNROLL
  for (int r = 0; r < RK; ++r) kr[r] = k + r * ldk;
  // Blocked over d (kDB at a time, partial sums added through st): the
  // rounding error of the dot product grows like kDB + D / kDB rather than D.
  for (int64_t d0 = 0; d0 < D; d0 += kDB) {
    const int64_t d1 = d0 + kDB < D ? d0 + kDB : D;
    TALLOW_UNROLL
    for (int r = 0; r < RK; ++r)
      TALLOW_UNROLL
      for (int p = 0; p < QP; ++p) acc[r][p] = vf_zero();
    for (int64_t d = d0; d < d1; ++d) {
      VF b[QP];
      TALLOW_UNROLL
      for (int p = 0; p < QP; ++p) b[p] = vf_load(qp + (p * D + d) * kW);
      TALLOW_UNROLL
      for (int r = 0; r < RK; ++r) {
        const VF a = vf_set1(kr[r][d]);
        TALLOW_UNROLL
        for (int p = 0; p < QP; ++p) acc[r][p] = vf_fmadd(a, b[p], acc[r][p]);
      }
    }
    if (d0 > 0) {
      TALLOW_UNROLL
      for (int r = 0; r < RK; ++r)
        TALLOW_UNROLL
        for (int p = 0; p < QP; ++p) acc[r][p] = vf_add(vf_load(st + r * kQT + p * kW), acc[r][p]);
    }
    TALLOW_UNROLL
    for (int r = 0; r < RK; ++r)
      TALLOW_UNROLL
      for (int p = 0; p < QP; ++p) vf_store(st + r * kQT + p * kW, acc[r][p]);
  }
  TALLOW_UNROLL
  for (int p = 0; p < QP; ++p) {
    // Pairwise tree over the tile's rows: short dependency chains.
    TALLOW_UNROLL
    for (int w = 1; w < RK; w *= 2)
      TALLOW_UNROLL
      for (int r = 0; r + w < RK; r += 2 * w) acc[r][p] = vf_max(acc[r][p], acc[r + w][p]);
    bmax[p] = vf_max(bmax[p], acc[0][p]);
  }
}

template <int QP, int RK>
inline void st_keys(int nk, const float* k, int64_t ldk, const float* qp, int64_t D, float* st, VF* bmax) {
  int j = 0;
  for (; j + RK <= nk; j += RK) st_tile<RK, QP>(k + j * ldk, ldk, qp, D, st + j * kQT, bmax);
  if constexpr (RK > 1) {
    if (j < nk) st_keys<QP, RK - 1>(nk - j, k + j * ldk, ldk, qp, D, st + j * kQT, bmax);
  }
}

template <int QP>
inline void st_block(int np, int nk, const float* k, int64_t ldk, const float* qp, int64_t D, float* st,
                     VF* bmax) {
  if constexpr (QP > 1) {
    if (np < QP) {
      st_block<QP - 1>(np, nk, k, ldk, qp, D, st, bmax);
      return;
    }
  }
  st_keys<QP, kRK>(nk, k, ldk, qp, D, st, bmax);
}

// O[RV][CW vectors] = alpha_r * O + P[RV][0, nk) . V[0, nk)[CW vectors], with
// P read transposed: P[r][j] = pt[j * kQT + r]. The last vector loads `lastn`
// lanes of V (the D tail; never reads past it).
// The block's sum starts from zero and is added to O once at the end: a
// two-level summation (within a block, then across blocks) whose rounding
// error grows like the block length, not like all of Lk (for Lk = 4096 this
// is ~5x more accurate than accumulating straight into O).
template <int RV, int CW, typename KV = float>
inline void pv_tile(const float* pt, int nk, const KV* v, int64_t ldv, int lastn, float* o,
                    int64_t ldo, const float* alpha) {
  VF acc[RV][CW];
  TALLOW_UNROLL
  for (int r = 0; r < RV; ++r)
    TALLOW_UNROLL
    for (int c = 0; c < CW; ++c) acc[r][c] = vf_zero();
  for (int j = 0; j < nk; ++j) {
    const KV* vr = v + j * ldv;
    VF vv[CW];
    TALLOW_UNROLL
    for (int c = 0; c < CW - 1; ++c) vv[c] = kv_load(vr + c * kW);
    vv[CW - 1] = kv_load_n(vr + (CW - 1) * kW, lastn);
    TALLOW_UNROLL
    for (int r = 0; r < RV; ++r) {
      const VF a = vf_set1(pt[j * kQT + r]);
      TALLOW_UNROLL
      for (int c = 0; c < CW; ++c) acc[r][c] = vf_fmadd(a, vv[c], acc[r][c]);
    }
  }
  TALLOW_UNROLL
  for (int r = 0; r < RV; ++r) {
    const VF a = vf_set1(alpha[r]);
    TALLOW_UNROLL
    for (int c = 0; c < CW; ++c) vf_store(o + r * ldo + c * kW, vf_fmadd(vf_load(o + r * ldo + c * kW), a, acc[r][c]));
  }
}

template <int CW, int RV, typename KV>
inline void pv_rows(int rows, const float* pt, int nk, const KV* v, int64_t ldv, int lastn, float* o,
                    int64_t ldo, const float* alpha) {
  if constexpr (RV > 1) {
    if (rows < RV) {
      pv_rows<CW, RV - 1>(rows, pt, nk, v, ldv, lastn, o, ldo, alpha);
      return;
    }
  }
  pv_tile<RV, CW, KV>(pt, nk, v, ldv, lastn, o, ldo, alpha);
}

template <int CW, typename KV>
inline void pv_chunk(int rows, const float* pt, int nk, const KV* v, int64_t ldv, int lastn, float* o,
                     int64_t ldo, const float* alpha) {
  constexpr int kRV = kAccBudget / CW < kQT ? kAccBudget / CW : kQT;
  for (int r = 0; r < rows; r += kRV) {
    const int n = rows - r < kRV ? rows - r : kRV;
    pv_rows<CW, kRV>(n, pt + r, nk, v, ldv, lastn, o + r * ldo, ldo, alpha + r);
  }
}

template <int CW, typename KV>
inline void pv_dispatch(int cw, int rows, const float* pt, int nk, const KV* v, int64_t ldv, int lastn,
                        float* o, int64_t ldo, const float* alpha) {
  if constexpr (CW <= kMaxCW) {
    if (cw == CW) {
      pv_chunk<CW>(rows, pt, nk, v, ldv, lastn, o, ldo, alpha);
      return;
    }
    pv_dispatch<CW + 1>(cw, rows, pt, nk, v, ldv, lastn, o, ldo, alpha);
  }
}

// Full P.V update of a query tile: D split into chunks of <= kMaxCW vectors.
// V is float32, or bfloat16 bits (a bf16 KV cache, decode path).
template <typename KV = float>
inline void pv_update(int rows, const float* pt, int nk, const KV* v, int64_t ldv, int64_t D, float* o,
                      int64_t ldo, const float* alpha) {
  const int nvec = static_cast<int>((D + kW - 1) / kW);
  const int nchunks = (nvec + kMaxCW - 1) / kMaxCW;
  int c0 = 0;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int cw = (nvec - c0) / (nchunks - ch);  // balanced chunk widths
    const bool last = c0 + cw == nvec;
    const int lastn = last ? static_cast<int>(D - (nvec - 1) * static_cast<int64_t>(kW)) : kW;
    pv_dispatch<1>(cw, rows, pt, nk, v + c0 * kW, ldv, lastn, o + c0 * kW, ldo, alpha);
    c0 += cw;
  }
}

// Packs `n` (<= kW) rows of q (row stride ldq) times c, transposed, into
// dst[d][kW] for d < D; lanes past n are zeros.
#if defined(__AVX512F__)
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  TALLOW_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  TALLOW_UNROLL
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  TALLOW_UNROLL
  for (int i = 0; i < 2; ++i)
    TALLOW_UNROLL
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
    }
  TALLOW_UNROLL
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
  }
}

inline void pack_q_panel(const float* src, int64_t ldq, int n, int64_t D, float c, float* dst) {
  const VF vc = vf_set1(c);
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const int nd = static_cast<int>(imin(16, D - d0));
    __m512 r[16];
    TALLOW_UNROLL
    for (int i = 0; i < 16; ++i) r[i] = i < n ? vf_mul(vf_load_n(src + i * ldq + d0, nd), vc) : vf_zero();
    transpose16x16(r);
    for (int x = 0; x < nd; ++x) vf_store(dst + (d0 + x) * 16, r[x]);
  }
}
#else
inline void pack_q_panel(const float* src, int64_t ldq, int n, int64_t D, float c, float* dst) {
  for (int lane = 0; lane < kW; ++lane) {
    if (lane < n) {
      const float* row = src + lane * ldq;
      for (int64_t d = 0; d < D; ++d) dst[d * kW + lane] = row[d] * c;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * kW + lane] = 0.0f;
    }
  }
}
#endif

// ---------------------------------------------------------------------------
// Prefill.

struct Prefill {
  const tallow::AttentionArgs* a;
  float qscale;     // scale
  int64_t chunk;    // query rows per task (a multiple of kQT)
  int64_t nq;       // chunks per (b, h)
  int64_t Dp;       // D rounded up to kW
  float** scratch;  // one buffer per thread
  int nbuf;         // buffers in scratch
  int64_t scratch_floats;
  int failed;       // set (atomically) when a fallback buffer cannot be allocated
};

inline int64_t prefill_scratch_floats(int64_t chunk, int64_t D, int64_t Dp) {
  return chunk * D + kQT * Dp + kKB * kQT + 4 * kQT + kW;
}

// The largest float: the running max starts here instead of -inf, so that
// 2^(m_old - m_new) and 2^(s - m_new) never see -inf - (-inf) = NaN; scores of
// invisible keys are -inf and give p = 0 exactly.
constexpr float kMinMax = -3.4028234663852886e38f;

inline void prefill_task(const Prefill& P, float* ws, int64_t t) {
  const tallow::AttentionArgs& a = *P.a;
  const int64_t BH = a.B * a.H;
  // Heaviest chunks first (with causal, later query chunks see more keys).
  const int64_t qc = P.nq - 1 - t / BH;
  const int64_t bh = t % BH;
  const int64_t b = bh / a.H, h = bh % a.H;
  const int64_t D = a.D, Dp = P.Dp, Lq = a.Lq, Lk = a.Lk;
  const int64_t q0 = qc * P.chunk, q1 = imin(Lq, q0 + P.chunk);
  if (q1 <= q0) return;

  float* qp = ws;                    // [chunk / kW][D][kW], q^T pre-scaled
  float* o = qp + P.chunk * D;       // [kQT][Dp]
  float* st = o + kQT * Dp;          // [kKB][kQT]
  float* m = st + kKB * kQT;         // [kQT]
  float* l = m + kQT;                // [kQT]
  float* alpha = l + kQT;            // [kQT]
  float* iota = alpha + kQT;         // [kQT]: 0, 1, 2, ...

  const float* qb = a.q + b * a.q_sb + h * a.q_sh;
  const float* kbase = a.k + b * a.k_sb + h * a.k_sh;
  const float* vbase = a.v + b * a.v_sb + h * a.v_sh;
  const uint8_t* mask = a.key_padding_mask ? a.key_padding_mask + b * Lk : nullptr;
  float* ob = a.out + b * a.o_sb + h * a.o_sh;

  // Pack q^T * scale; rows past q1 are zeros (their scores are
  // finite and their results never written).
  const int64_t n_rows = q1 - q0;
  const int64_t n_panels = (n_rows + kW - 1) / kW;
  for (int64_t pnl = 0; pnl < n_panels; ++pnl)
    pack_q_panel(qb + (q0 + pnl * kW) * a.q_sl, a.q_sl, static_cast<int>(imin(kW, n_rows - pnl * kW)), D,
                 P.qscale, qp + pnl * D * kW);
  for (int i = 0; i < kQT; ++i) iota[i] = static_cast<float>(i);

  const int64_t offset = Lk - Lq;  // query i sees keys j <= offset + i (causal)
  for (int64_t t0 = 0; t0 < n_rows; t0 += kQT) {
    const int rows = static_cast<int>(imin(kQT, n_rows - t0));
    const int np = (rows + kW - 1) / kW;
    const float* qpt = qp + t0 * D;  // this tile's panels
    const int64_t gq0 = q0 + t0;     // global index of its first query
    for (int i = 0; i < kQT; ++i) {
      m[i] = kMinMax;
      l[i] = 0.0f;
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < Dp; c += kW) vf_store(o + i * Dp + c, vf_zero());

    const int64_t key_end = a.causal ? imin(Lk, offset + gq0 + rows) : Lk;
    // Keys below diag_start are visible to every query of the tile.
    const int64_t diag_start = a.causal ? offset + gq0 + 1 : Lk;
    for (int64_t kb = 0; kb < key_end; kb += kKB) {
      const int nk = static_cast<int>(imin(kKB, key_end - kb));
      bool padded = false;
      if (mask) {
        int visible = 0, masked = 0;
        for (int j = 0; j < nk; ++j) {
          visible |= !mask[kb + j];
          masked |= mask[kb + j];
        }
        if (!visible) continue;  // a fully padded block changes nothing
        padded = masked != 0;
      }
      VF bmax[kQP];
      for (int pnl = 0; pnl < kQP; ++pnl) bmax[pnl] = vf_set1(kMinMax);
      st_block<kQP>(np, nk, kbase + kb * a.k_sl, a.k_sl, qpt, D, st, bmax);
      const bool masked_block = padded || kb + nk > diag_start;

      // Online softmax, vertically: a vector holds kW queries.
      for (int pnl = 0; pnl < np; ++pnl) {
        float* sp = st + pnl * kW;
        const VF m_old = vf_load(m + pnl * kW);
        VF mx = vf_max(m_old, bmax[pnl]);
        if (masked_block) {  // mask first, then the max of what stays visible
          const VF qidx = vf_add(vf_load(iota + pnl * kW), vf_set1(static_cast<float>(gq0)));
          mx = m_old;
          for (int j = 0; j < nk; ++j) {
            const int64_t key = kb + j;
            VF x;
            if (padded && mask[key]) {
              x = vf_set1(neg_inf());
            } else {
              x = vf_load(sp + j * kQT);
              if (key >= diag_start) x = vf_keep_ge(x, qidx, vf_set1(static_cast<float>(key - offset)));
              mx = vf_max(mx, x);
            }
            vf_store(sp + j * kQT, x);
          }
        }
        const VF al = exp_diff(m_old, mx);
        VF sum0 = vf_zero(), sum1 = vf_zero();
        int j = 0;
        for (; j + 2 <= nk; j += 2) {
          const VF p0 = exp_diff(vf_load(sp + j * kQT), mx);
          const VF p1 = exp_diff(vf_load(sp + (j + 1) * kQT), mx);
          vf_store(sp + j * kQT, p0);
          vf_store(sp + (j + 1) * kQT, p1);
          sum0 = vf_add(sum0, p0);
          sum1 = vf_add(sum1, p1);
        }
        if (j < nk) {
          const VF p0 = exp_diff(vf_load(sp + j * kQT), mx);
          vf_store(sp + j * kQT, p0);
          sum0 = vf_add(sum0, p0);
        }
        vf_store(l + pnl * kW, vf_fmadd(vf_load(l + pnl * kW), al, vf_add(sum0, sum1)));
        vf_store(m + pnl * kW, mx);
        vf_store(alpha + pnl * kW, al);
      }
      pv_update(rows, st, nk, vbase + kb * a.v_sl, a.v_sl, D, o, Dp, alpha);
    }

    // out = O / l; rows that saw no key (l == 0) are zeros.
    for (int i = 0; i < rows; ++i) {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      const VF vi = vf_set1(inv);
      float* dst = ob + (gq0 + i) * a.o_sl;
      int64_t d = 0;
      for (; d + kW <= D; d += kW) vf_store(dst + d, vf_mul(vf_load(o + i * Dp + d), vi));
      if (d < D) vf_store_n(dst + d, vf_mul(vf_load(o + i * Dp + d), vi), static_cast<int>(D - d));
    }
  }
}

// The calling pool thread's scratch buffer; a fresh one (owned, to be freed)
// if the pool grew since the buffers were made (set_num_threads raced us).
inline float* thread_scratch(float** scratch, int nbuf, int64_t n_floats, float** owned) {
  const int ti = tallow::thread_index();
  *owned = nullptr;
  if (ti >= 0 && ti < nbuf) return scratch[ti];
  *owned = alloc_floats(n_floats);
  return *owned;
}

inline void prefill_range(void* ctx, int64_t begin, int64_t end) {
  Prefill& P = *static_cast<Prefill*>(ctx);
  float* owned;
  float* ws = thread_scratch(P.scratch, P.nbuf, P.scratch_floats, &owned);
  if (!ws) {
    __atomic_store_n(&P.failed, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t t = begin; t < end; ++t) prefill_task(P, ws, t);
  free(owned);
}

// ---------------------------------------------------------------------------
// Decode (small Lq): no packing, K and V streamed once per (b, h, split).

struct Decode {
  const tallow::AttentionArgs* a;
  float qscale;
  int64_t Dp;
  int64_t nsplit;       // key-range splits per (b, h)
  int64_t split_len;    // keys per split
  float** scratch;      // per thread: qs [Lq][Dp], s [Lq][kKBD + kW], O/m/l when unsplit
  float* part_o;        // [B*H*nsplit][Lq][Dp]   (nsplit > 1)
  float* part_ml;       // [B*H*nsplit][Lq][2]
  int nbuf;
  int64_t scratch_floats;
  int failed;
};

inline int64_t decode_scratch_floats(int64_t Lq, int64_t Dp) {
  return Lq * Dp + Lq * (kKBD + kW) + kKBD * kQT + kQT + Lq * Dp + 2 * Lq;
}

#if defined(__AVX512F__)
// Lane of reduce16's tree result that holds key j.
alignas(64) constexpr int32_t kReduce16Perm[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

// Sums of 16 vectors at once: lane j of the result = sum of the lanes of
// a[j] (a transpose-and-add tree: 45 shuffles/adds instead of 16 full
// horizontal reductions).
inline VF reduce16(VF a[16]) {
  VF t[8];
  TALLOW_UNROLL
  for (int j = 0; j < 8; ++j)  // 256-bit halves: [a_j | a_j+8]
    t[j] = vf_add(_mm512_shuffle_f32x4(a[j], a[j + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                  _mm512_shuffle_f32x4(a[j], a[j + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  VF u[4];
  TALLOW_UNROLL
  for (int j = 0; j < 4; ++j)  // 128-bit lanes: [a_j | a_j+8 | a_j+4 | a_j+12]
    u[j] = vf_add(_mm512_shuffle_f32x4(t[j], t[j + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm512_shuffle_f32x4(t[j], t[j + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  VF w[2];
  TALLOW_UNROLL
  for (int j = 0; j < 2; ++j)  // pairs within 128-bit lanes
    w[j] = vf_add(_mm512_shuffle_ps(u[j], u[j + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                  _mm512_shuffle_ps(u[j], u[j + 2], _MM_SHUFFLE(3, 2, 3, 2)));
  const VF f = vf_add(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // f's lane order is a fixed permutation of the keys; undo it.
  return _mm512_permutexvar_ps(vi_load(kReduce16Perm), f);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// Lane j of the result = sum of the lanes of a[j].
inline VF reduce8(VF a[8]) {
  const VF t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const VF t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const VF u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a0..a3 | a0..a3] halves, [a4..a7 | ..]
  return vf_add(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// Scores (base 2) of rows [0, R) against keys [0, n) (n <= kKBD), row-major
// into s[r * lds + j]; padded keys are skipped (set to -inf later).
template <int R, typename KV>
inline void decode_scores(const KV* kb, int64_t ldk, int n, const float* qs, int64_t Dp, int nvec, int lastn,
                          float* s, int lds) {
#if defined(__AVX512F__)
  for (int j0 = 0; j0 < n; j0 += 16) {
    const int cnt = n - j0 < 16 ? n - j0 : 16;
    TALLOW_UNROLL
    for (int r = 0; r < R; ++r) {
      VF acc[16];
      TALLOW_UNROLL
      for (int jj = 0; jj < 16; ++jj) acc[jj] = vf_zero();
      for (int c = 0; c < nvec; ++c) {
        const VF qv = vf_load(qs + r * Dp + c * kW);
        const int nl = c == nvec - 1 ? lastn : kW;
        TALLOW_UNROLL
        for (int jj = 0; jj < 16; ++jj)
          if (jj < cnt) acc[jj] = vf_fmadd(qv, kv_load_n(kb + (j0 + jj) * ldk + c * kW, nl), acc[jj]);
      }
      vf_store(s + r * lds + j0, reduce16(acc));
    }
  }
#elif defined(__AVX2__)
  // 8 keys at a time: 8 independent FMA chains (one key each), summed with
  // one transpose-and-add tree (a single chain per key would wait on the FMA
  // latency, and reduce each key horizontally).
  for (int j0 = 0; j0 < n; j0 += 8) {
    const int cnt = n - j0 < 8 ? n - j0 : 8;
    TALLOW_UNROLL
    for (int r = 0; r < R; ++r) {
      VF acc[8];
      TALLOW_UNROLL
      for (int jj = 0; jj < 8; ++jj) acc[jj] = vf_zero();
      for (int c = 0; c < nvec; ++c) {
        const VF qv = vf_load(qs + r * Dp + c * kW);
        TALLOW_UNROLL
        for (int jj = 0; jj < 8; ++jj) {
          if (jj >= cnt) continue;
          const KV* kr = kb + (j0 + jj) * ldk + c * kW;
          acc[jj] = vf_fmadd(qv, c == nvec - 1 ? kv_load_n(kr, lastn) : kv_load(kr), acc[jj]);
        }
      }
      vf_store(s + r * lds + j0, reduce8(acc));
    }
  }
#else
  for (int j = 0; j < n; ++j) {
    const KV* kr = kb + j * ldk;
    VF acc[R];
    TALLOW_UNROLL
    for (int r = 0; r < R; ++r) acc[r] = vf_zero();
    for (int c = 0; c < nvec; ++c) {
      const VF kv = c == nvec - 1 ? kv_load_n(kr + c * kW, lastn) : kv_load(kr + c * kW);
      TALLOW_UNROLL
      for (int r = 0; r < R; ++r) acc[r] = vf_fmadd(vf_load(qs + r * Dp + c * kW), kv, acc[r]);
    }
    TALLOW_UNROLL
    for (int r = 0; r < R; ++r) s[r * lds + j] = vf_reduce_add(acc[r]);
  }
#endif
}

// Writes the unnormalised (O, m, l) of rows [0, R) over keys [j0, j1).
template <int R, typename KV>
inline void decode_keys(const Decode& P, int64_t b, int64_t h, int64_t j0, int64_t j1, float* ws, float* o,
                        float* ml, const KV* kall, const KV* vall) {
  const tallow::AttentionArgs& a = *P.a;
  const int64_t D = a.D, Dp = P.Dp, Lk = a.Lk;
  const int nvec = static_cast<int>(Dp / kW);
  const int lastn = static_cast<int>(D - (nvec - 1) * static_cast<int64_t>(kW));
  float* qs = ws;                  // [R][Dp], zero-padded
  float* s = qs + R * Dp;          // [R][lds]: scores, then p
  constexpr int lds = kKBD + kW;
  float* pt = s + R * lds;         // [kKBD][kQT]: p transposed for pv_update
  float* alpha = pt + kKBD * kQT;  // [kQT]

  const float* qb = a.q + b * a.q_sb + h * a.q_sh;
  const KV* kbase = kall + b * a.k_sb + h * a.k_sh;
  const KV* vbase = vall + b * a.v_sb + h * a.v_sh;
  const uint8_t* mask = a.key_padding_mask ? a.key_padding_mask + b * Lk : nullptr;
  const VF vscale = vf_set1(P.qscale);
  float m[R], l[R];
  int64_t lim[R];  // row r sees keys j <= lim[r]
  for (int r = 0; r < R; ++r) {
    const float* src = qb + r * a.q_sl;
    for (int c = 0; c < nvec; ++c) {
      const int n = c == nvec - 1 ? lastn : kW;
      vf_store(qs + r * Dp + c * kW, vf_mul(vf_load_n(src + c * kW, n), vscale));
    }
    for (int c = 0; c < nvec; ++c) vf_store(o + r * Dp + c * kW, vf_zero());
    m[r] = neg_inf();
    l[r] = 0.0f;
    lim[r] = a.causal ? Lk - a.Lq + r : Lk - 1;
  }
  const int64_t jend = imin(j1, lim[R - 1] + 1);

  for (int64_t kb = j0; kb < jend; kb += kKBD) {
    const int n = static_cast<int>(imin(kKBD, jend - kb));
    int visible = 1;
    if (mask) {
      visible = 0;
      for (int jj = 0; jj < n; ++jj) visible |= !mask[kb + jj];
      if (!visible) continue;  // a fully padded block changes nothing
    }
    decode_scores<R>(kbase + kb * a.k_sl, a.k_sl, n, qs, Dp, nvec, lastn, s, lds);
    if (mask)
      for (int jj = 0; jj < n; ++jj)
        if (mask[kb + jj])
          for (int r = 0; r < R; ++r) s[r * lds + jj] = neg_inf();
    if (a.causal)
      for (int r = 0; r < R; ++r)
        for (int64_t jj = imax(0, lim[r] + 1 - kb); jj < n; ++jj) s[r * lds + jj] = neg_inf();
    for (int r = 0; r < R; ++r) {
      alpha[r] = softmax_row(s + r * lds, n, n, m[r], l[r]);
      for (int jj = 0; jj < n; ++jj) pt[jj * kQT + r] = s[r * lds + jj];
    }
    pv_update(R, pt, n, vbase + kb * a.v_sl, a.v_sl, D, o, Dp, alpha);
  }
  for (int r = 0; r < R; ++r) {
    ml[2 * r] = m[r];
    ml[2 * r + 1] = l[r];
  }
}

inline void write_normalised(const tallow::AttentionArgs& a, int64_t b, int64_t h, int64_t r, const float* o,
                             float l) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const VF vi = vf_set1(inv);
  float* dst = a.out + b * a.o_sb + h * a.o_sh + r * a.o_sl;
  int64_t d = 0;
  for (; d + kW <= a.D; d += kW) vf_store(dst + d, vf_mul(vf_load(o + d), vi));
  if (d < a.D) vf_store_n(dst + d, vf_mul(vf_load(o + d), vi), static_cast<int>(a.D - d));
}

template <typename KV>
inline void decode_rows(const Decode& P, int64_t Lq, int64_t b, int64_t h, int64_t j0, int64_t j1, float* ws,
                        float* o, float* ml, const KV* k, const KV* v) {
  switch (Lq) {
    case 1: decode_keys<1>(P, b, h, j0, j1, ws, o, ml, k, v); break;
    case 2: decode_keys<2>(P, b, h, j0, j1, ws, o, ml, k, v); break;
    case 3: decode_keys<3>(P, b, h, j0, j1, ws, o, ml, k, v); break;
    default: decode_keys<4>(P, b, h, j0, j1, ws, o, ml, k, v); break;
  }
}

inline void decode_range(void* ctx, int64_t begin, int64_t end) {
  Decode& P = *static_cast<Decode*>(ctx);
  const tallow::AttentionArgs& a = *P.a;
  float* owned;
  float* ws = thread_scratch(P.scratch, P.nbuf, P.scratch_floats, &owned);
  if (!ws) {
    __atomic_store_n(&P.failed, 1, __ATOMIC_RELAXED);
    return;
  }
  const int64_t Lq = a.Lq;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t bh = t / P.nsplit, sp = t % P.nsplit;
    const int64_t b = bh / a.H, h = bh % a.H;
    const int64_t j0 = sp * P.split_len, j1 = imin(a.Lk, j0 + P.split_len);
    float* o;
    float* ml;
    if (P.nsplit > 1) {
      o = P.part_o + t * Lq * P.Dp;
      ml = P.part_ml + t * Lq * 2;
    } else {
      o = ws + Lq * P.Dp + Lq * (kKBD + kW) + kKBD * kQT + kQT;
      ml = o + Lq * P.Dp;
    }
    if (a.k_bf16)
      decode_rows(P, Lq, b, h, j0, j1, ws, o, ml, a.k_bf16, a.v_bf16);
    else
      decode_rows(P, Lq, b, h, j0, j1, ws, o, ml, a.k, a.v);
    if (P.nsplit == 1)
      for (int64_t r = 0; r < Lq; ++r) write_normalised(a, b, h, r, o + r * P.Dp, ml[2 * r + 1]);
  }
  free(owned);
}

// Combines the splits of one (b, h): M = max m_s, L = sum l_s 2^(m_s - M),
// O = sum O_s 2^(m_s - M); out = O / L.
inline void decode_combine(void* ctx, int64_t begin, int64_t end) {
  Decode& P = *static_cast<Decode*>(ctx);
  const tallow::AttentionArgs& a = *P.a;
  float* owned;
  float* acc = thread_scratch(P.scratch, P.nbuf, P.scratch_floats, &owned);  // [Dp] used
  if (!acc) {
    __atomic_store_n(&P.failed, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    for (int64_t r = 0; r < a.Lq; ++r) {
      float mx = neg_inf();
      for (int64_t sp = 0; sp < P.nsplit; ++sp) {
        const float ms = P.part_ml[((bh * P.nsplit + sp) * a.Lq + r) * 2];
        mx = ms > mx ? ms : mx;
      }
      for (int64_t c = 0; c < P.Dp; c += kW) vf_store(acc + c, vf_zero());
      float L = 0.0f;
      if (mx != neg_inf()) {
        for (int64_t sp = 0; sp < P.nsplit; ++sp) {
          const int64_t t = bh * P.nsplit + sp;
          const float ms = P.part_ml[(t * a.Lq + r) * 2];
          if (ms == neg_inf()) continue;  // this split saw no key
          const float w = exp_diff_scalar(ms, mx);
          L += w * P.part_ml[(t * a.Lq + r) * 2 + 1];
          const VF vw = vf_set1(w);
          const float* os = P.part_o + (t * a.Lq + r) * P.Dp;
          for (int64_t c = 0; c < P.Dp; c += kW) vf_store(acc + c, vf_fmadd(vw, vf_load(os + c), vf_load(acc + c)));
        }
      }
      write_normalised(a, b, h, r, acc, L);
    }
  }
  free(owned);
}

// ---------------------------------------------------------------------------
// Entry point. Returns false when scratch memory could not be allocated.

inline bool run_attention(const tallow::AttentionArgs& a) {
  const int64_t B = a.B, H = a.H, Lq = a.Lq, Lk = a.Lk, D = a.D;
  if (B <= 0 || H <= 0 || Lq <= 0 || D <= 0) return true;
  const int64_t BH = B * H;
  const int64_t Dp = round_up(D, kW);
  if (Lk <= 0) {  // no key at all: every row is zeros
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t i = 0; i < Lq; ++i) {
        float* dst = a.out + (bh / H) * a.o_sb + (bh % H) * a.o_sh + i * a.o_sl;
        for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      }
    return true;
  }
  const int nt = tallow::num_threads();
  // Tiny calls (a few microseconds of work: short decode steps, toy shapes)
  // run on the calling thread: waking the pool would cost more than it saves.
  const double flops = 4.0 * static_cast<double>(BH) * static_cast<double>(Lq) * static_cast<double>(Lk) *
                       static_cast<double>(D);
  const double kv_bytes = 8.0 * static_cast<double>(BH) * static_cast<double>(Lk) * static_cast<double>(D);
  const bool serial = flops < 2e6 && kv_bytes < 256e3;
  const float qscale = a.scale;
  // One scratch buffer per pool thread (thread_index() picks it).
  const int nbuf = nt;
  float** bufs = static_cast<float**>(malloc(sizeof(float*) * static_cast<size_t>(nbuf)));
  if (!bufs) return false;
  for (int i = 0; i < nbuf; ++i) bufs[i] = nullptr;
  bool ok = true;

  if (Lq <= kDecodeMaxLq) {
    Decode P{&a, qscale, Dp, 1, Lk, bufs, nullptr, nullptr, nbuf, decode_scratch_floats(Lq, Dp) + Dp, 0};
    // Split the keys when B*H alone cannot keep every thread busy.
    const int64_t want_tasks = 8 * static_cast<int64_t>(nt);
    if (nt > 1 && !serial && BH < want_tasks && Lk >= 2 * kDecodeSplitMinKeys) {
      P.nsplit = imin((want_tasks + BH - 1) / BH, Lk / kDecodeSplitMinKeys);
      P.split_len = round_up((Lk + P.nsplit - 1) / P.nsplit, kW);
      P.nsplit = (Lk + P.split_len - 1) / P.split_len;
    }
    for (int i = 0; i < nbuf && ok; ++i) ok = (bufs[i] = alloc_floats(P.scratch_floats)) != nullptr;
    if (ok && P.nsplit > 1) {
      P.part_o = alloc_floats(BH * P.nsplit * Lq * Dp);
      P.part_ml = alloc_floats(BH * P.nsplit * Lq * 2);
      ok = P.part_o && P.part_ml;
    }
    if (ok) {
      tallow::parallel_for(BH * P.nsplit, serial ? BH * P.nsplit : 1, decode_range, &P);
      if (P.nsplit > 1 && !P.failed) tallow::parallel_for(BH, serial ? BH : 1, decode_combine, &P);
      ok = !P.failed;
    }
    free(P.part_o);
    free(P.part_ml);
  } else {
    // Query chunks: enough tasks for every thread (8 per thread, for dynamic
    // balance under causal's uneven work), each a whole number of query tiles.
    int64_t nq = (Lq + kMaxChunk - 1) / kMaxChunk;
    while (BH * nq < 8 * static_cast<int64_t>(nt) && (Lq + nq) / (nq + 1) >= kQT) ++nq;
    const int64_t chunk = round_up((Lq + nq - 1) / nq, kQT);
    nq = (Lq + chunk - 1) / chunk;
    Prefill P{&a, qscale, chunk, nq, Dp, bufs, nbuf, prefill_scratch_floats(chunk, D, Dp), 0};
    for (int i = 0; i < nbuf && ok; ++i) ok = (bufs[i] = alloc_floats(P.scratch_floats)) != nullptr;
    if (ok) {
      tallow::parallel_for(BH * nq, serial ? BH * nq : 1, prefill_range, &P);
      ok = !P.failed;
    }
  }
  for (int i = 0; i < nbuf; ++i) free(bufs[i]);
  free(bufs);
  return ok;
}
