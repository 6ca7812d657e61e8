// Resample kernel of the preprocess op, compiled once per ISA.
//
// #included by preprocess_avx512.cpp / preprocess_avx2.cpp / preprocess_neon.cpp /
// preprocess_scalar.cpp inside a distinct namespace; the vector width follows
// the file's compile flags. Only intrinsics, builtins and malloc/free here
// (the ODR rule of csrc/common/simd.h).
//
// The maths is Pillow's antialiased bilinear resample (libImaging/Resample.c,
// ImagingResampleHorizontal_8bpc / ImagingResampleVertical_8bpc), restricted
// to the output rows and columns that survive the center crop:
//   pass 1 (horizontal): for every input row the vertical pass needs,
//     tmp[c][r][j] = clip8(2^21 + sum_t src[y][start_x[j] + t][c] * kx[j][t])
//   pass 2 (vertical):
//     v[c][i][j]   = clip8(2^21 + sum_t tmp[c][start_y[i] + t - row_first][j] * ky[i][t])
//   out[c][i][j] = lut[c][v]   ((v / 255 - mean[c]) / std[c], float32)
// with clip8(s) = 0 if s <= 0, 255 if s >= 2^30, else s >> 22. Every output
// pixel's taps depend only on its own index, so computing the crop alone is
// bit-identical to PIL's resize followed by the crop. The intermediate is
// kept planar (one plane per channel) so the vertical pass and the
// normalisation vectorise across columns. For the sizes where Pillow 13 runs
// the vertical pass first (see preprocess.cpp), run_vertical_first does the
// same two passes in the other order.
//
// Horizontal pass, SIMD: kW output columns at a time, one 4-byte gather per
// tap and lane at the source pixel's first byte (for packed RGB the row's
// last pixel is read one byte early and shifted, so no read leaves the row).

// The including file includes <immintrin.h>, <cstdint>, <cstdlib> and
// preprocess/preprocess.h at global scope first (not inside its namespace).

namespace {

using ::tallow::preprocess::ImagePlan;
using ::tallow::preprocess::Taps;

// The SIMD paths below run on AVX-512, AVX2 and NEON (preprocess_neon.cpp is
// the only aarch64 file built with +dotprod; the scalar file stays scalar).
#if defined(__AVX512F__) || defined(__AVX2__) || (defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
#define TALLOW_PP_SIMD 1
#endif

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#elif defined(TALLOW_PP_SIMD)
constexpr int kLanes = 4;
#else
constexpr int kLanes = 1;
#endif

constexpr int32_t kHalf = 1 << (::tallow::preprocess::kPrecisionBits - 1);

inline int32_t clip8(int32_t s) {
  if (s >= (1 << ::tallow::preprocess::kPrecisionBits << 8)) return 255;
  if (s <= 0) return 0;
  return s >> ::tallow::preprocess::kPrecisionBits;
}

// Generic horizontal pass: any strides (flipped, transposed or broadcast
// views), one pixel at a time.
void horizontal_generic(const ImagePlan& p, uint8_t* tmp, int64_t plane, int64_t pitch) {
  const Taps& h = p.horiz;
  for (int32_t r = 0; r < p.row_count; ++r) {
    const uint8_t* row = p.src + (int64_t)(p.row_first + r) * p.stride_y;
    uint8_t* o = tmp + (int64_t)r * pitch;
    for (int32_t j = 0; j < h.count; ++j) {
      const int32_t* k = h.coeff + (int64_t)j * h.ksize;
      const uint8_t* px = row + (int64_t)h.start[j] * p.stride_x;
      int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
      for (int32_t t = 0; t < h.taps[j]; ++t) {
        s0 += (int32_t)px[0] * k[t];
        s1 += (int32_t)px[p.stride_c] * k[t];
        s2 += (int32_t)px[2 * p.stride_c] * k[t];
        px += p.stride_x;
      }
      o[j] = (uint8_t)clip8(s0);
      o[plane + j] = (uint8_t)clip8(s1);
      o[2 * plane + j] = (uint8_t)clip8(s2);
    }
  }
}

#if defined(TALLOW_PP_SIMD)

#if defined(__AVX512F__)
using V = __m512i;
inline V v_load(const int32_t* p) { return _mm512_loadu_si512(p); }
inline V v_set1(int32_t x) { return _mm512_set1_epi32(x); }
inline V v_add(V a, V b) { return _mm512_add_epi32(a, b); }
inline V v_mul(V a, V b) { return _mm512_mullo_epi32(a, b); }
inline V v_and(V a, V b) { return _mm512_and_si512(a, b); }
inline V v_srli(V a, int n) { return _mm512_srli_epi32(a, n); }
inline V v_srlv(V a, V n) { return _mm512_srlv_epi32(a, n); }
inline V v_gather(const uint8_t* base, V idx) { return _mm512_i32gather_epi32(idx, base, 1); }
// clip8 for a vector: s >> 22 clamped to [0, 255] equals clip8(s) exactly.
inline V v_clip8(V s) {
  return _mm512_min_epi32(_mm512_max_epi32(_mm512_srai_epi32(s, ::tallow::preprocess::kPrecisionBits),
                                           _mm512_setzero_si512()),
                          _mm512_set1_epi32(255));
}
inline void v_store_u8(uint8_t* p, V v) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(v)); }
inline V v_load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline void v_lut_store(float* o, const float* lut, V idx) {
  _mm512_storeu_ps(o, _mm512_i32gather_ps(idx, lut, 4));
}
#elif defined(__aarch64__)
// NEON: 4 int32 lanes. There is no gather instruction: v_gather and
// v_lut_store do 4 scalar loads (4-byte, unaligned) into a vector; the
// multiply-adds, shifts and clamps stay vector, and the arithmetic is the
// same int32 maths as the other ISAs (bit-identical results).
using V = int32x4_t;
inline V v_load(const int32_t* p) { return vld1q_s32(p); }
inline V v_set1(int32_t x) { return vdupq_n_s32(x); }
inline V v_add(V a, V b) { return vaddq_s32(a, b); }
inline V v_mul(V a, V b) { return vmulq_s32(a, b); }
inline V v_and(V a, V b) { return vandq_s32(a, b); }
// Logical right shifts: USHL by a negative count (n may be a run-time value).
inline V v_srli(V a, int n) {
  return vreinterpretq_s32_u32(vshlq_u32(vreinterpretq_u32_s32(a), vdupq_n_s32(-n)));
}
inline V v_srlv(V a, V n) { return vreinterpretq_s32_u32(vshlq_u32(vreinterpretq_u32_s32(a), vnegq_s32(n))); }
inline V v_gather(const uint8_t* base, V idx) {
  int32_t o[4];
  vst1q_s32(o, idx);
  uint32_t w[4];
  for (int l = 0; l < 4; ++l) __builtin_memcpy(&w[l], base + o[l], 4);
  return vreinterpretq_s32_u32(vld1q_u32(w));
}
inline V v_clip8(V s) {
  return vminq_s32(vmaxq_s32(vshrq_n_s32(s, ::tallow::preprocess::kPrecisionBits), vdupq_n_s32(0)),
                   vdupq_n_s32(255));
}
inline void v_store_u8(uint8_t* p, V v) {
  // Lanes are in [0, 255]: two narrowing moves keep the low bytes.
  const uint16x4_t h = vmovn_u32(vreinterpretq_u32_s32(v));
  vst1_lane_u32(reinterpret_cast<uint32_t*>(p), vreinterpret_u32_u8(vmovn_u16(vcombine_u16(h, h))), 0);
}
inline V v_load_u8(const uint8_t* p) {
  uint32_t w;
  __builtin_memcpy(&w, p, 4);
  const uint8x8_t b = vreinterpret_u8_u32(vdup_n_u32(w));
  return vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))));
}
inline void v_lut_store(float* o, const float* lut, V idx) {
  int32_t i[4];
  vst1q_s32(i, idx);
  const float t[4] = {lut[i[0]], lut[i[1]], lut[i[2]], lut[i[3]]};
  vst1q_f32(o, vld1q_f32(t));
}
#else
using V = __m256i;
inline V v_load(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline V v_set1(int32_t x) { return _mm256_set1_epi32(x); }
inline V v_add(V a, V b) { return _mm256_add_epi32(a, b); }
inline V v_mul(V a, V b) { return _mm256_mullo_epi32(a, b); }
inline V v_and(V a, V b) { return _mm256_and_si256(a, b); }
inline V v_srli(V a, int n) { return _mm256_srli_epi32(a, n); }
inline V v_srlv(V a, V n) { return _mm256_srlv_epi32(a, n); }
inline V v_gather(const uint8_t* base, V idx) { return _mm256_i32gather_epi32((const int*)base, idx, 1); }
inline V v_clip8(V s) {
  return _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(s, ::tallow::preprocess::kPrecisionBits),
                                           _mm256_setzero_si256()),
                          _mm256_set1_epi32(255));
}
inline void v_store_u8(uint8_t* p, V v) {
  // Byte 0 of each dword -> the low 4 bytes of each 128-bit half.
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(v, pick);
  const int32_t lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(b));
  const int32_t hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1));
  __builtin_memcpy(p, &lo, 4);
  __builtin_memcpy(p + 4, &hi, 4);
}
inline V v_load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
inline void v_lut_store(float* o, const float* lut, V idx) {
  _mm256_storeu_ps(o, _mm256_i32gather_ps(lut, idx, 4));
}
#endif

// Per block of kLanes output columns, the largest tap count in the block
// (malloc'd, nblk entries; null when out of memory) and their sum in *total:
// the SIMD passes iterate that many taps per block, padding shorter columns.
int32_t* block_max_taps(const Taps& h, int32_t nblk, int32_t* total) {
  int32_t* btaps = (int32_t*)malloc(sizeof(int32_t) * (size_t)nblk);
  if (!btaps) return nullptr;
  *total = 0;
  for (int32_t b = 0; b < nblk; ++b) {
    int32_t m = 0;
    for (int32_t l = 0; l < kLanes; ++l) {
      const int32_t j = b * kLanes + l;
      if (j < h.count && h.taps[j] > m) m = h.taps[j];
    }
    btaps[b] = m;
    *total += m;
  }
  return btaps;
}

// Horizontal pass for packed RGB rows (stride_x == 3, stride_c == 1, W >= 2)
// or RGBX rows (stride_x == 4, stride_c == 1: Pillow's own pixel layout):
// per block of kLanes output columns and tap t, a table of byte offsets,
// shifts (8 for the row's last pixel, read one byte early) and coefficients
// (0 for padding taps), built once per image.
bool horizontal_simd(const ImagePlan& p, uint8_t* tmp, int64_t plane, int64_t pitch) {
  const Taps& h = p.horiz;
  const int32_t nblk = (h.count + kLanes - 1) / kLanes;
  int32_t total = 0;  // sum over blocks of the block's max taps
  int32_t* btaps = block_max_taps(h, nblk, &total);
  if (!btaps) return false;
  int32_t* table = (int32_t*)malloc(sizeof(int32_t) * 3 * (size_t)kLanes * (size_t)(total > 0 ? total : 1));
  if (!table) { free(btaps); return false; }
  int32_t* q = table;
  for (int32_t b = 0; b < nblk; ++b) {
    for (int32_t t = 0; t < btaps[b]; ++t) {
      int32_t* off = q;
      int32_t* sh = q + kLanes;
      int32_t* co = q + 2 * kLanes;
      for (int32_t l = 0; l < kLanes; ++l) {
        const int32_t j = b * kLanes + l;
        int32_t x = 0, k = 0;
        if (j < h.count) {
          x = h.start[j] + (t < h.taps[j] ? t : 0);
          k = t < h.taps[j] ? h.coeff[(int64_t)j * h.ksize + t] : 0;
        }
        // RGBX rows (stride 4): the pixel's own dword. Packed RGB (stride 3):
        // the dword at the pixel, except the row's last pixel, read one byte
        // early and shifted, so no read leaves the row.
        if (p.stride_x == 3 && x == p.in_w - 1) { off[l] = 3 * x - 1; sh[l] = 8; }
        else { off[l] = (int32_t)p.stride_x * x; sh[l] = 0; }
        co[l] = k;
      }
      q += 3 * kLanes;
    }
  }
  const V mask = v_set1(0xff);
  for (int32_t r = 0; r < p.row_count; ++r) {
    const uint8_t* row = p.src + (int64_t)(p.row_first + r) * p.stride_y;
    uint8_t* o = tmp + (int64_t)r * pitch;
    const int32_t* tq = table;
    for (int32_t b = 0; b < nblk; ++b) {
      V s0 = v_set1(kHalf), s1 = s0, s2 = s0;
      for (int32_t t = 0; t < btaps[b]; ++t) {
        V v = v_srlv(v_gather(row, v_load(tq)), v_load(tq + kLanes));
        const V k = v_load(tq + 2 * kLanes);
        s0 = v_add(s0, v_mul(v_and(v, mask), k));
        s1 = v_add(s1, v_mul(v_and(v_srli(v, 8), mask), k));
        s2 = v_add(s2, v_mul(v_and(v_srli(v, 16), mask), k));
        tq += 3 * kLanes;
      }
      // Rows are padded to a multiple of kLanes: full-width stores are safe.
      v_store_u8(o + b * kLanes, v_clip8(s0));
      v_store_u8(o + plane + b * kLanes, v_clip8(s1));
      v_store_u8(o + 2 * plane + b * kLanes, v_clip8(s2));
    }
  }
  free(table);
  free(btaps);
  return true;
}

// Vertical pass + normalisation for one output row of one channel.
void vertical_row(const uint8_t* plane0, int64_t pitch, const int32_t* k, int32_t taps, int32_t count,
                  const float* lut, float* o) {
  int32_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    V s = v_set1(kHalf);
    const uint8_t* src = plane0 + j;
    for (int32_t t = 0; t < taps; ++t) s = v_add(s, v_mul(v_load_u8(src + t * pitch), v_set1(k[t])));
    v_lut_store(o + j, lut, v_clip8(s));
  }
  for (; j < count; ++j) {
    int32_t s = kHalf;
    for (int32_t t = 0; t < taps; ++t) s += (int32_t)plane0[j + t * pitch] * k[t];
    o[j] = lut[clip8(s)];
  }
}

#else  // scalar

bool horizontal_simd(const ImagePlan&, uint8_t*, int64_t, int64_t) { return false; }

void vertical_row(const uint8_t* plane0, int64_t pitch, const int32_t* k, int32_t taps, int32_t count,
                  const float* lut, float* o) {
  for (int32_t j = 0; j < count; ++j) {
    int32_t s = kHalf;
    for (int32_t t = 0; t < taps; ++t) s += (int32_t)plane0[j + t * pitch] * k[t];
    o[j] = lut[clip8(s)];
  }
}

#endif

// ---- Vertical pass first (Pillow 13's order for > 2:1 portrait images):
//   pass 1: tmp[c][i][x] = clip8(2^21 + sum_t src[start_y[i] + t][col_first + x][c] * ky[i][t])
//   pass 2: out[c][i][j] = lut[c][clip8(2^21 + sum_t tmp[c][i][start_x[j] + t - col_first] * kx[j][t])]

// Pass 1 for columns [x_begin, x_end), any strides.
void vfirst_pass1_generic(const ImagePlan& p, uint8_t* tmp, int64_t plane, int64_t pitch, int32_t x_begin,
                          int32_t x_end) {
  const Taps& v = p.vert;
  for (int32_t i = 0; i < v.count; ++i) {
    const int32_t* k = v.coeff + (int64_t)i * v.ksize;
    uint8_t* o = tmp + (int64_t)i * pitch;
    for (int32_t x = x_begin; x < x_end; ++x) {
      const uint8_t* px = p.src + (int64_t)v.start[i] * p.stride_y + (int64_t)(p.col_first + x) * p.stride_x;
      int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
      for (int32_t t = 0; t < v.taps[i]; ++t) {
        s0 += (int32_t)px[0] * k[t];
        s1 += (int32_t)px[p.stride_c] * k[t];
        s2 += (int32_t)px[2 * p.stride_c] * k[t];
        px += p.stride_y;
      }
      o[x] = (uint8_t)clip8(s0);
      o[plane + x] = (uint8_t)clip8(s1);
      o[2 * plane + x] = (uint8_t)clip8(s2);
    }
  }
}

void vfirst_pass2_generic(const ImagePlan& p, const uint8_t* tmp, int64_t plane, int64_t pitch) {
  const Taps& h = p.horiz;
  const Taps& v = p.vert;
  const int64_t n_out = (int64_t)v.count * h.count;
  for (int c = 0; c < 3; ++c) {
    for (int32_t i = 0; i < v.count; ++i) {
      const uint8_t* row = tmp + c * plane + (int64_t)i * pitch;
      float* o = p.out + c * n_out + (int64_t)i * h.count;
      for (int32_t j = 0; j < h.count; ++j) {
        const int32_t* k = h.coeff + (int64_t)j * h.ksize;
        const uint8_t* px = row + (h.start[j] - p.col_first);
        int32_t s = kHalf;
        for (int32_t t = 0; t < h.taps[j]; ++t) s += (int32_t)px[t] * k[t];
        o[j] = p.lut[c * 256 + clip8(s)];
      }
    }
  }
}

#if defined(TALLOW_PP_SIMD)

// Pass 1, kLanes adjacent columns at a time, for packed RGB (stride 3, one
// gather per tap) or RGBX (stride 4, one plain load per tap) rows. Returns
// the number of leading columns done; loads never leave the row.
int32_t vfirst_pass1_simd(const ImagePlan& p, uint8_t* tmp, int64_t plane, int64_t pitch) {
  const Taps& v = p.vert;
  // Columns whose 4-byte reads stay inside the row: x < in_w (stride 4) or
  // x < in_w - 1 (stride 3, the dword at the last pixel would pass the end).
  const int64_t usable = (int64_t)p.in_w - (p.stride_x == 3 ? 1 : 0) - p.col_first;
  int32_t done = 0;
  while (done + kLanes <= p.col_count && done + kLanes <= usable) done += kLanes;
  if (done == 0) return 0;
  int32_t lane_off[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_off[l] = l * (int32_t)p.stride_x;
  const V offs = v_load(lane_off);
  const V mask = v_set1(0xff);
  for (int32_t i = 0; i < v.count; ++i) {
    const int32_t* k = v.coeff + (int64_t)i * v.ksize;
    const uint8_t* first = p.src + (int64_t)v.start[i] * p.stride_y + (int64_t)p.col_first * p.stride_x;
    uint8_t* o = tmp + (int64_t)i * pitch;
    for (int32_t x = 0; x < done; x += kLanes) {
      V s0 = v_set1(kHalf), s1 = s0, s2 = s0;
      const uint8_t* px = first + (int64_t)x * p.stride_x;
      for (int32_t t = 0; t < v.taps[i]; ++t) {
        const V w = v_set1(k[t]);
        const V q = p.stride_x == 4 ? v_load((const int32_t*)px) : v_gather(px, offs);
        s0 = v_add(s0, v_mul(v_and(q, mask), w));
        s1 = v_add(s1, v_mul(v_and(v_srli(q, 8), mask), w));
        s2 = v_add(s2, v_mul(v_and(v_srli(q, 16), mask), w));
        px += p.stride_y;
      }
      v_store_u8(o + x, v_clip8(s0));
      v_store_u8(o + plane + x, v_clip8(s1));
      v_store_u8(o + 2 * plane + x, v_clip8(s2));
    }
  }
  return done;
}

// Pass 2 on the planar intermediate: one gather per tap and kLanes outputs
// (rows are padded, so the 4-byte reads stay in the buffer), then the
// normalisation table.
bool vfirst_pass2_simd(const ImagePlan& p, const uint8_t* tmp, int64_t plane, int64_t pitch) {
  const Taps& h = p.horiz;
  const Taps& v = p.vert;
  const int32_t nblk = (h.count + kLanes - 1) / kLanes;
  int32_t total = 0;  // sum over blocks of the block's max taps
  int32_t* btaps = block_max_taps(h, nblk, &total);
  if (!btaps) return false;
  int32_t* table = (int32_t*)malloc(sizeof(int32_t) * 2 * (size_t)kLanes * (size_t)(total > 0 ? total : 1));
  if (!table) { free(btaps); return false; }
  int32_t* q = table;
  for (int32_t b = 0; b < nblk; ++b) {
    for (int32_t t = 0; t < btaps[b]; ++t) {
      for (int32_t l = 0; l < kLanes; ++l) {
        const int32_t j = b * kLanes + l;
        const bool live = j < h.count && t < h.taps[j];
        q[l] = j < h.count ? h.start[j] - p.col_first + (live ? t : 0) : 0;
        q[kLanes + l] = live ? h.coeff[(int64_t)j * h.ksize + t] : 0;
      }
      q += 2 * kLanes;
    }
  }
  const V mask = v_set1(0xff);
  const int64_t n_out = (int64_t)v.count * h.count;
  float spill[kLanes];
  for (int c = 0; c < 3; ++c) {
    for (int32_t i = 0; i < v.count; ++i) {
      const uint8_t* row = tmp + c * plane + (int64_t)i * pitch;
      float* o = p.out + c * n_out + (int64_t)i * h.count;
      const int32_t* tq = table;
      for (int32_t b = 0; b < nblk; ++b) {
        V s = v_set1(kHalf);
        for (int32_t t = 0; t < btaps[b]; ++t) {
          s = v_add(s, v_mul(v_and(v_gather(row, v_load(tq)), mask), v_load(tq + kLanes)));
          tq += 2 * kLanes;
        }
        const int32_t j0 = b * kLanes;
        if (j0 + kLanes <= h.count) {
          v_lut_store(o + j0, p.lut + c * 256, v_clip8(s));
        } else {  // last, partial block: do not write past the row
          v_lut_store(spill, p.lut + c * 256, v_clip8(s));
          for (int32_t j = j0; j < h.count; ++j) o[j] = spill[j - j0];
        }
      }
    }
  }
  free(table);
  free(btaps);
  return true;
}

#else

int32_t vfirst_pass1_simd(const ImagePlan&, uint8_t*, int64_t, int64_t) { return 0; }
bool vfirst_pass2_simd(const ImagePlan&, const uint8_t*, int64_t, int64_t) { return false; }

#endif

bool run_vertical_first(const ImagePlan& p) {
  // Planar intermediate: 3 planes of crop rows x col_count columns, padded
  // (the pass-2 gathers read up to 3 bytes past a row's last column).
  const int64_t pitch = ((int64_t)p.col_count + 2 * 16 + 15) / 16 * 16;
  const int64_t plane = pitch * p.vert.count;
  uint8_t* tmp = (uint8_t*)calloc((size_t)(3 * plane), 1);
  if (!tmp) return false;
  const bool packed = p.stride_c == 1 && (p.stride_x == 3 || p.stride_x == 4) &&
                      (int64_t)p.in_w * p.stride_x < ((int64_t)1 << 31);
  const int32_t done = packed ? vfirst_pass1_simd(p, tmp, plane, pitch) : 0;
  if (done < p.col_count) vfirst_pass1_generic(p, tmp, plane, pitch, done, p.col_count);
  if (!vfirst_pass2_simd(p, tmp, plane, pitch)) vfirst_pass2_generic(p, tmp, plane, pitch);
  free(tmp);
  return true;
}

}  // namespace

bool run_image(const ImagePlan& p) {
  if (p.vertical_first) return run_vertical_first(p);
  const Taps& h = p.horiz;
  const Taps& v = p.vert;
  // Planar intermediate: 3 planes of row_count rows, rows padded to a whole
  // number of vectors (+ one spare vector for the vertical pass's loads).
  const int64_t pitch = ((int64_t)h.count + 2 * 16 + 15) / 16 * 16;
  const int64_t plane = pitch * p.row_count;
  uint8_t* tmp = (uint8_t*)calloc((size_t)(3 * plane), 1);
  if (!tmp) return false;
  const bool packed = p.stride_c == 1 && ((p.stride_x == 3 && p.in_w >= 2) || p.stride_x == 4) &&
                      (int64_t)p.in_w * p.stride_x < ((int64_t)1 << 31);
  if (!(packed && horizontal_simd(p, tmp, plane, pitch))) horizontal_generic(p, tmp, plane, pitch);
  const int64_t n_out = (int64_t)v.count * h.count;
  for (int c = 0; c < 3; ++c) {
    const uint8_t* pl = tmp + c * plane;
    for (int32_t i = 0; i < v.count; ++i) {
      vertical_row(pl + (int64_t)(v.start[i] - p.row_first) * pitch, pitch, v.coeff + (int64_t)i * v.ksize,
                   v.taps[i], h.count, p.lut + c * 256, p.out + c * n_out + (int64_t)i * h.count);
    }
  }
  free(tmp);
  return true;
}
