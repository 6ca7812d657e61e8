// Convolution kernel bodies (implicit-GEMM fp32 convolution with fused
// epilogue, max pool), written once over csrc/common/simd.h and compiled per
// ISA: conv_{avx512,avx2,neon,scalar}.cpp include this inside an anonymous
// namespace (no include guard on purpose; never include it from baseline code).
//
// The register tile is the encoder sgemm's (kMR rows x kPT 16-column panels:
// AVX2 6 x 16, AVX-512 8 x 32), but each of its rows has its own A pointer
// (the output pixel's window in the padded input, conv.h) and its own output
// pointer (a row of pixels may wrap into the next image row, or into a padded
// output buffer). Tasks are (row block) x (group of panels) in the order
// ConvTasks explains; row blocks and the tiles inside them are balanced (49
// rows are 5+5+5+5+5+6+6+6+6, not 8 x 6 + 1: a 1-row tile streams a whole
// weight panel for one pixel). The Winograd path (below) runs its a^2 GEMMs
// on the same tasks.

#if defined(__AVX512F__)
constexpr int kMR = 8;
constexpr int kPT = 2;
#elif defined(__AVX2__)
constexpr int kMR = 6;
constexpr int kPT = 1;
#elif defined(TALLOW_SIMD_NEON)
constexpr int kMR = 5;
constexpr int kPT = 1;
#else
constexpr int kMR = 2;
constexpr int kPT = 1;
#endif
constexpr int64_t kP = encoder::kPanel;
constexpr int kVP = kP / kW;   // vectors per 16-column panel
constexpr int64_t kMB = kMR * 4;  // rows per task (before balancing)
constexpr int kPG = 4;         // panels per task (a multiple of kPT)
constexpr int64_t kKC = 256;   // k per block: registers sum it, the output row holds the partial sum
constexpr int64_t kWholeB = 96 << 10;  // bytes of weights a tile may sweep whole (ConvTasks::group)

// One register tile over k in [k0, k1): R output pixels x P panels from
// panel pointer bp (panel q at bp + q * K * 16). a[r]: pixel r's window
// origin, whose k runs over segments of `seg_len` floats, `seg` apart. The
// registers sum the block; c[r] (its output row) holds the partial sum
// between blocks (two-level summation, as the encoder's sgemm: K reaches 4608
// in ResNet-50's last 3x3 convolutions) and, after the last block, the
// epilogue's act(sum + bias + res[r]).
template <int R, int P>
inline void conv_tile(const float* const* a, int64_t seg_len, int64_t seg, const float* bp, int64_t K, int64_t k0,
                      int64_t k1, const float* bias, const float* const* res, float* const* c, int64_t n0,
                      int64_t N, int act) {
  VF acc[R][P * kVP];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < P * kVP; ++j) acc[r][j] = vf_zero();
  const int64_t pstride = K * kP;
  int64_t s = k0 / seg_len, j0 = k0 % seg_len;
  for (int64_t k = k0; k < k1; ++s, j0 = 0) {
    const int64_t run = seg_len - j0 < k1 - k ? seg_len - j0 : k1 - k;
    const int64_t off = s * seg + j0;
    const float* bs = bp + k * kP;
    for (int64_t i = 0; i < run; ++i) {
      VF b[P * kVP];
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
        for (int v = 0; v < kVP; ++v) b[q * kVP + v] = vf_load(bs + q * pstride + i * kP + v * kW);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const VF ar = vf_set1(a[r][off + i]);
#pragma GCC unroll 16
        for (int j = 0; j < P * kVP; ++j) acc[r][j] = vf_fmadd(ar, b[j], acc[r][j]);
      }
    }
    k += run;
  }
  const bool first = k0 == 0, last = k1 == K;
#pragma GCC unroll 16
  for (int j = 0; j < P * kVP; ++j) {
    const int64_t n = n0 + j * kW;
    if (n >= N) break;
    const int cnt = static_cast<int>(N - n < kW ? N - n : kW);
    const VF bv = !last || !bias ? vf_zero() : cnt == kW ? vf_load(bias + n) : vf_load_n(bias + n, cnt);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      VF y = acc[r][j];
      if (!first) y = vf_add(y, cnt == kW ? vf_load(c[r] + n) : vf_load_n(c[r] + n, cnt));
      if (last) {
        y = vf_add(y, bv);
        if (res) y = vf_add(y, cnt == kW ? vf_load(res[r] + n) : vf_load_n(res[r] + n, cnt));
        if (act == 1) y = vf_max(vf_zero(), y);
      }
      if (cnt == kW)
        vf_store(c[r] + n, y);
      else
        vf_store_n(c[r] + n, y, cnt);
    }
  }
}

template <int P>
inline void conv_rows(int R, const float* const* a, int64_t seg_len, int64_t seg, const float* bp, int64_t K,
                      int64_t k0, int64_t k1, const float* bias, const float* const* res, float* const* c,
                      int64_t n0, int64_t N, int act) {
  switch (R) {
#define TALLOW_TILE_CASE(r)                                                                                 \
  case r:                                                                                                   \
    if constexpr (r <= kMR) conv_tile<r, P>(a, seg_len, seg, bp, K, k0, k1, bias, res, c, n0, N, act);      \
    break;
    TALLOW_TILE_CASE(1)
    TALLOW_TILE_CASE(2)
    TALLOW_TILE_CASE(3)
    TALLOW_TILE_CASE(4)
    TALLOW_TILE_CASE(5)
    TALLOW_TILE_CASE(6)
    TALLOW_TILE_CASE(7)
    TALLOW_TILE_CASE(8)
#undef TALLOW_TILE_CASE
    default:
      break;
  }
}

struct ConvTasks {
  const ConvArgs* g;
  int64_t M, row_blocks, panels;
  // Task order. Row blocks fastest when the weights are the bigger operand
  // (K >= M: ResNet's late layers at small batches), so the threads sweep
  // one panel group while it is hot; otherwise (K < M: the activations are
  // bigger, e.g. a 1x1 convolution from 64 to 256 channels over 56 x 56
  // pixels) the panel groups of a row block are consecutive tasks, so its
  // input rows, output rows and residual are each brought in once instead of
  // once per panel group.
  bool rows_outer;
  // Panels per task: kPG, or all of them when the weights are small (one k
  // block, K x N floats within kWholeB: layer1's 1x1 convolutions, the stem,
  // the Winograd GEMMs up to 128 channels): then a tile sweeps every panel
  // and writes whole output rows. Not for bigger weights: a tile would
  // stream them all from L3 (layer3's 256 -> 1024 is 1 MB per 6 rows).
  int64_t group;
  int64_t count() const { return row_blocks * ((panels + group - 1) / group); }
};

inline ConvTasks conv_tasks(const ConvArgs* g) {
  const int64_t M = g->B * g->OH * g->OW, K = g->KH * g->KW * g->C;
  const int64_t panels = (g->N + kP - 1) / kP;
  const bool whole = K <= kKC && K * panels * kP * 4 <= kWholeB;
  return ConvTasks{g, M, (M + kMB - 1) / kMB, panels, K < M, whole ? panels : kPG};
}

// A task: rows [m0, m1) of output pixels (balanced tiles of <= kMR rows) x
// a group of panels, k in blocks of kKC: a block of the group's panels (kPG
// x kKC x 16 floats) stays in L1/L2 while every tile of the rows sweeps it.
void conv_task(void* ctx, int64_t begin, int64_t end) {
  const ConvTasks& t = *static_cast<const ConvTasks*>(ctx);
  const ConvArgs& g = *t.g;
  const int64_t K = g.KH * g.KW * g.C, seg_len = g.KW * g.C, seg = g.XW * g.C;
  const int64_t OHW = g.OH * g.OW, YW = g.OW + 2 * g.y_pad, YH = g.OH + 2 * g.y_pad;
  const float* a[kMB];
  const float* res[kMB];
  float* c[kMB];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t groups = (t.panels + t.group - 1) / t.group;
    const int64_t rb = t.rows_outer ? task / groups : task % t.row_blocks;
    const int64_t pg = t.rows_outer ? task % groups : task / t.row_blocks;
    const int64_t m0 = t.M * rb / t.row_blocks, m1 = t.M * (rb + 1) / t.row_blocks;
    const int64_t p0 = pg * t.group, p1 = p0 + t.group < t.panels ? p0 + t.group : t.panels;
    const int64_t tiles = (m1 - m0 + kMR - 1) / kMR;
    for (int64_t m = m0; m < m1; ++m) {  // the rows' pointers, once per task
      const int64_t b = m / OHW, oh = m % OHW / g.OW, ow = m % g.OW;
      a[m - m0] = g.x + ((b * g.XH + oh * g.stride) * g.XW + ow * g.stride) * g.C;
      c[m - m0] = g.y + ((b * YH + oh + g.y_pad) * YW + ow + g.y_pad) * g.N;
      res[m - m0] = g.res ? g.res + m * g.N : nullptr;
    }
    if (t.group == t.panels && K <= kKC) {
      // Small weights (see ConvTasks::group): a tile sweeps all the panels
      // (from L1/L2), so it writes whole output rows and reads its residual
      // rows left to right, as the prefetcher likes.
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t r0 = (m1 - m0) * i / tiles, r1 = (m1 - m0) * (i + 1) / tiles;
        const int R = static_cast<int>(r1 - r0);
        const float* const* rp = g.res ? res + r0 : nullptr;
        for (int64_t p = p0; p < p1; p += kPT) {
          const float* bp = g.bp + p * K * kP;
          if (p + kPT <= p1)
            conv_rows<kPT>(R, a + r0, seg_len, seg, bp, K, 0, K, g.bias, rp, c + r0, p * kP, g.N, g.act);
          else
            conv_rows<1>(R, a + r0, seg_len, seg, bp, K, 0, K, g.bias, rp, c + r0, p * kP, g.N, g.act);
        }
      }
      continue;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t k1 = k0 + kKC < K ? k0 + kKC : K;
      for (int64_t p = p0; p < p1; p += kPT) {
        const float* bp = g.bp + p * K * kP;
        const bool full = p + kPT <= p1;
        for (int64_t i = 0; i < tiles; ++i) {
          const int64_t r0 = (m1 - m0) * i / tiles, r1 = (m1 - m0) * (i + 1) / tiles;
          const int R = static_cast<int>(r1 - r0);
          const float* const* rp = g.res ? res + r0 : nullptr;
          if (full)
            conv_rows<kPT>(R, a + r0, seg_len, seg, bp, K, k0, k1, g.bias, rp, c + r0, p * kP, g.N, g.act);
          else
            conv_rows<1>(R, a + r0, seg_len, seg, bp, K, k0, k1, g.bias, rp, c + r0, p * kP, g.N, g.act);
        }
      }
    }
  }
}

void isa_conv(const ConvArgs& g) {
  const int64_t M = g.B * g.OH * g.OW;
  if (M <= 0 || g.N <= 0) return;
  ConvTasks t = conv_tasks(&g);
  tallow::parallel_for(t.count(), 1, &conv_task, &t);
}

// ---------------------------------------------------------------- Winograd

// acc + coef * x for a coefficient known at compile time once the transform
// loops are unrolled: zeros vanish, +-1 become an add or a subtract (-O3
// without -ffast-math would otherwise keep every 0 * x).
inline VF wino_term(float coef, VF x, VF acc) {
  if (coef == 0.0f) return acc;
  if (coef == 1.0f) return vf_add(acc, x);
  if (coef == -1.0f) return vf_sub(acc, x);
  return vf_fmadd(vf_set1(coef), x, acc);
}

template <int M>
struct WinoTables;
template <>
struct WinoTables<2> {
  static constexpr const float (&BT)[4][4] = winograd::kBT2;
  static constexpr const float (&AT)[2][4] = winograd::kAT2;
};
template <>
struct WinoTables<4> {
  static constexpr const float (&BT)[6][6] = winograd::kBT4;
  static constexpr const float (&AT)[4][6] = winograd::kAT4;
};

struct WinoCtx {
  const WinogradArgs* g;
  int64_t TH, TW, T;  // tiles per column, per row, in all
};

// Input transform of tiles [begin, end): V[(i, j)][tile][c] = (B^T d B)[i][j].
template <int M>
void wino_input(void* ctx, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  constexpr const auto& BT = WinoTables<M>::BT;
  const WinoCtx& w = *static_cast<const WinoCtx*>(ctx);
  const WinogradArgs& g = *w.g;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b = tile / (w.TH * w.TW), ty = tile / w.TW % w.TH, tx = tile % w.TW;
    for (int64_t c0 = 0; c0 < g.C; c0 += kW) {
      const int cnt = static_cast<int>(g.C - c0 < kW ? g.C - c0 : kW);
      VF d[A][A], t[A][A];
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) {
        const int64_t ih = ty * M + i;
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          const int64_t iw = tx * M + j;
          const float* src = g.x + ((b * g.XH + ih) * g.XW + iw) * g.C + c0;
          d[i][j] = ih >= g.XH || iw >= g.XW ? vf_zero() : cnt == kW ? vf_load(src) : vf_load_n(src, cnt);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          VF acc = vf_zero();
#pragma GCC unroll 8
          for (int k = 0; k < A; ++k) acc = wino_term(BT[i][k], d[k][j], acc);
          t[i][j] = acc;
        }
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          VF acc = vf_zero();
#pragma GCC unroll 8
          for (int k = 0; k < A; ++k) acc = wino_term(BT[j][k], t[i][k], acc);
          float* dst = g.v + ((i * A + j) * w.T + tile) * g.C + c0;
          if (cnt == kW)
            vf_store(dst, acc);
          else
            vf_store_n(dst, acc, cnt);
        }
    }
  }
}

// Output transform of tiles [begin, end): y = act(A^T Mt A + bias), the
// parts of the m x m tile inside the output.
template <int M>
void wino_output(void* ctx, int64_t begin, int64_t end) {
  constexpr int A = M + 2;
  constexpr const auto& AT = WinoTables<M>::AT;
  const WinoCtx& w = *static_cast<const WinoCtx*>(ctx);
  const WinogradArgs& g = *w.g;
  const int64_t YH = g.OH + 2 * g.y_pad, YW = g.OW + 2 * g.y_pad;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t b = tile / (w.TH * w.TW), ty = tile / w.TW % w.TH, tx = tile % w.TW;
    for (int64_t n0 = 0; n0 < g.N; n0 += kW) {
      const int cnt = static_cast<int>(g.N - n0 < kW ? g.N - n0 : kW);
      VF mt[A][A], t[M][A];
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          const float* src = g.mm + ((i * A + j) * w.T + tile) * g.N + n0;
          mt[i][j] = cnt == kW ? vf_load(src) : vf_load_n(src, cnt);
        }
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          VF acc = vf_zero();
#pragma GCC unroll 8
          for (int k = 0; k < A; ++k) acc = wino_term(AT[i][k], mt[k][j], acc);
          t[i][j] = acc;
        }
      const VF bv = !g.bias ? vf_zero() : cnt == kW ? vf_load(g.bias + n0) : vf_load_n(g.bias + n0, cnt);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const int64_t oh = ty * M + i;
        if (oh >= g.OH) break;
#pragma GCC unroll 8
        for (int j = 0; j < M; ++j) {
          const int64_t ow = tx * M + j;
          if (ow >= g.OW) break;
          VF acc = bv;
#pragma GCC unroll 8
          for (int k = 0; k < A; ++k) acc = wino_term(AT[j][k], t[i][k], acc);
          if (g.act == 1) acc = vf_max(vf_zero(), acc);
          float* dst = g.y + ((b * YH + oh + g.y_pad) * YW + ow + g.y_pad) * g.N + n0;
          if (cnt == kW)
            vf_store(dst, acc);
          else
            vf_store_n(dst, acc, cnt);
        }
      }
    }
  }
}

// The a^2 GEMMs V[(i, j)] [T, C] x U[(i, j)] [C, N] as one parallel_for:
// each a direct 1x1 convolution over a row of T "pixels".
struct WinoGemms {
  ConvArgs args[36];
  ConvTasks tasks[36];
  int64_t per;  // tasks per GEMM
};

void wino_gemm_tasks(void* ctx, int64_t begin, int64_t end) {
  const WinoGemms& w = *static_cast<const WinoGemms*>(ctx);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t q = i / w.per, task = i % w.per;
    conv_task(const_cast<ConvTasks*>(&w.tasks[q]), task, task + 1);
  }
}

template <int M>
void winograd_m(const WinogradArgs& g) {
  constexpr int A = M + 2;
  WinoCtx w{&g, (g.OH + M - 1) / M, (g.OW + M - 1) / M, 0};
  w.T = g.B * w.TH * w.TW;
  if (w.T <= 0 || g.N <= 0) return;
  tallow::parallel_for(w.T, 4, &wino_input<M>, &w);
  WinoGemms gm;
  const int64_t panels = (g.N + kP - 1) / kP, upstride = panels * g.C * kP;
  for (int q = 0; q < A * A; ++q) {
    ConvArgs& a = gm.args[q];
    a = ConvArgs{};
    a.x = g.v + q * w.T * g.C;
    a.XH = 1;
    a.XW = w.T;
    a.C = g.C;
    a.B = 1;
    a.OH = 1;
    a.OW = w.T;
    a.KH = a.KW = a.stride = 1;
    a.bp = g.up + q * upstride;
    a.y = g.mm + q * w.T * g.N;
    a.N = g.N;
    gm.tasks[q] = conv_tasks(&gm.args[q]);
  }
  gm.per = gm.tasks[0].count();
  tallow::parallel_for(A * A * gm.per, 1, &wino_gemm_tasks, &gm);
  tallow::parallel_for(w.T, 4, &wino_output<M>, &w);
}

void isa_winograd(const WinogradArgs& g) {
  if (g.m == 4)
    winograd_m<4>(g);
  else
    winograd_m<2>(g);
}

// ---------------------------------------------------------------- max pool

struct PoolCtx {
  const float* x;
  int64_t H, W, C, OH, OW;
  float* y;
};

void max_pool_rows(void* ctx, int64_t begin, int64_t end) {
  const PoolCtx& p = *static_cast<const PoolCtx*>(ctx);
  const int64_t Cv = p.C / kW * kW;
  for (int64_t row = begin; row < end; ++row) {  // row = b * OH + oh
    const int64_t b = row / p.OH, oh = row % p.OH;
    const int64_t h0 = oh * 2 - 1 < 0 ? 0 : oh * 2 - 1, h1 = oh * 2 + 2 < p.H ? oh * 2 + 2 : p.H;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      const int64_t w0 = ow * 2 - 1 < 0 ? 0 : ow * 2 - 1, w1 = ow * 2 + 2 < p.W ? ow * 2 + 2 : p.W;
      float* y = p.y + (row * p.OW + ow) * p.C;
      int64_t c = 0;
      for (; c < Cv; c += kW) {
        VF m = vf_load(p.x + ((b * p.H + h0) * p.W + w0) * p.C + c);
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) m = vf_max(m, vf_load(p.x + ((b * p.H + h) * p.W + w) * p.C + c));
        vf_store(y + c, m);
      }
      for (; c < p.C; ++c) {
        float m = p.x[((b * p.H + h0) * p.W + w0) * p.C + c];
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) {
            const float v = p.x[((b * p.H + h) * p.W + w) * p.C + c];
            m = v > m ? v : m;
          }
        y[c] = m;
      }
    }
  }
}

void isa_max_pool_3x3s2(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, float* y) {
  PoolCtx p{x, H, W, C, (H - 1) / 2 + 1, (W - 1) / 2 + 1, y};
  if (B * p.OH <= 0) return;
  tallow::parallel_for(B * p.OH, 1, &max_pool_rows, &p);
}
