// Encoder kernel bodies (fp32 GEMM with fused epilogue, residual LayerNorm),
// written once over csrc/common/simd.h and compiled per ISA:
// encoder_{avx512,avx2,neon,scalar}.cpp include this inside an anonymous
// namespace (no include guard on purpose; never include it from baseline code).
//
// sgemm: C = act(A B + bias), B packed in 16-column panels (encoder.h). A
// register tile is kMR rows x kPT panels (kPT * 16 columns): per k, kPT * 16
// / kW vector loads of B and kMR broadcasts of A, kMR * kPT * 16 / kW FMAs
// (AVX2: 6 rows x 16 columns = 12 ymm accumulators; AVX-512: 8 rows x 32
// columns = 16 zmm). A is read in place (rows of a few KiB: they stay in L1/L2
// while the tiles of a task sweep over them), B panels are streamed. Tasks
// are (block of kMB rows) x (group of kPG panels), row blocks fastest, so the
// two threads usually share a panel group while it is hot in the shared L3,
// and M = 1 (a GEMV) streams each weight once, split over N.
// Every output row is computed by the same sequence of FMAs whatever M is
// and wherever the row sits in the batch (k in order, one accumulator per
// output), so a row's result does not depend on the rest of the batch.

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
constexpr int kVP = kPanel / kW;  // vectors per 16-column panel
constexpr int kMB = kMR * 8;      // rows per task
constexpr int kPG = 4;            // panels per task (64 columns; a multiple of kPT)
constexpr int64_t kKC = 128;      // k per register accumulation block (two-level sum)

#include "common/vec_math.h"

inline VF enc_act(VF y, int act) {
  switch (act) {
    case 1:
      return vf_max(vf_zero(), y);
    case 2:
      return gelu_erf(y);
    case 3:
      return gelu_tanh(y);
    default:
      return y;
  }
}

// One register tile: R rows (R <= kMR) x P panels from panel pointer bp
// (panel q at bp + q * K * 16), then the epilogue into c. n0: first column.
template <int R, int P>
inline void sgemm_tile(const float* a, int64_t lda, const float* bp, int64_t K, const float* bias,
                       float* c, int64_t ldc, int64_t n0, int64_t N, int act) {
  // Two-level summation: registers accumulate kKC values of k, then add into
  // `tot` (memory, touched once per block), which keeps the rounding error
  // of long rows (K = 1536, 3072) at the level of torch's blocked GEMM.
  VF acc[R][P * kVP], tot[R][P * kVP];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < P * kVP; ++j) tot[r][j] = vf_zero();  // 0 + x == x: the first block is exact
  const int64_t pstride = K * kPanel;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t k1 = k0 + kKC < K ? k0 + kKC : K;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < P * kVP; ++j) acc[r][j] = vf_zero();
    for (int64_t k = k0; k < k1; ++k) {
      VF b[P * kVP];
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 16
        for (int v = 0; v < kVP; ++v) b[q * kVP + v] = vf_load(bp + q * pstride + k * kPanel + v * kW);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const VF ar = vf_set1(a[r * lda + k]);
#pragma GCC unroll 16
        for (int j = 0; j < P * kVP; ++j) acc[r][j] = vf_fmadd(ar, b[j], acc[r][j]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < P * kVP; ++j) tot[r][j] = vf_add(tot[r][j], acc[r][j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < P * kVP; ++j) {
    const int64_t n = n0 + j * kW;
    if (n >= N) break;
    const int cnt = static_cast<int>(N - n < kW ? N - n : kW);
    const VF bv = bias ? (cnt == kW ? vf_load(bias + n) : vf_load_n(bias + n, cnt)) : vf_zero();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VF y = enc_act(vf_add(tot[r][j], bv), act);
      if (cnt == kW)
        vf_store(c + r * ldc + n, y);
      else
        vf_store_n(c + r * ldc + n, y, cnt);
    }
  }
}

template <int P>
inline void sgemm_rows(int R, const float* a, int64_t lda, const float* bp, int64_t K, const float* bias,
                       float* c, int64_t ldc, int64_t n0, int64_t N, int act) {
  switch (R) {
#define TALLOW_TILE_CASE(r)                                                                \
  case r:                                                                                  \
    if constexpr (r <= kMR) sgemm_tile<r, P>(a, lda, bp, K, bias, c, ldc, n0, N, act);     \
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

struct SgemmTasks {
  const SgemmArgs* g;
  int64_t row_blocks, panels;
};

void sgemm_task(void* ctx, int64_t begin, int64_t end) {
  const SgemmTasks& t = *static_cast<const SgemmTasks*>(ctx);
  const SgemmArgs& g = *t.g;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t rb = task % t.row_blocks, pg = task / t.row_blocks;
    const int64_t m0 = rb * kMB, m1 = m0 + kMB < g.M ? m0 + kMB : g.M;
    const int64_t p0 = pg * kPG, p1 = p0 + kPG < t.panels ? p0 + kPG : t.panels;
    for (int64_t p = p0; p < p1; p += kPT) {
      const float* bp = g.bp + p * g.K * kPanel;
      const bool full = p + kPT <= p1;
      for (int64_t m = m0; m < m1; m += kMR) {
        const int R = static_cast<int>(m1 - m < kMR ? m1 - m : kMR);
        const float* a = g.a + m * g.lda;
        float* c = g.c + m * g.ldc;
        if (full)
          sgemm_rows<kPT>(R, a, g.lda, bp, g.K, g.bias, c, g.ldc, p * kPanel, g.N, g.act);
        else
          sgemm_rows<1>(R, a, g.lda, bp, g.K, g.bias, c, g.ldc, p * kPanel, g.N, g.act);
      }
    }
  }
}

void isa_sgemm(const SgemmArgs& g) {
  if (g.M <= 0 || g.N <= 0) return;
  SgemmTasks t{&g, (g.M + kMB - 1) / kMB, (g.N + kPanel - 1) / kPanel};
  const int64_t groups = (t.panels + kPG - 1) / kPG;
  tallow::parallel_for(t.row_blocks * groups, 1, &sgemm_task, &t);
}

// ---------------------------------------------------------------- LayerNorm

struct LayerNormCtx {
  const float *x, *add, *gamma, *beta;
  int64_t H;
  float eps;
  float* out;
};

void layer_norm_rows(void* ctx, int64_t begin, int64_t end) {
  const LayerNormCtx& c = *static_cast<const LayerNormCtx*>(ctx);
  const int64_t H = c.H, Hv = H / kW * kW;
  for (int64_t m = begin; m < end; ++m) {
    const float* x = c.x + m * H;
    const float* add = c.add ? c.add + m * H : nullptr;
    float* o = c.out + m * H;
    // pass 1: v = x + add (into o), sum
    VF s = vf_zero();
    float st = 0.0f;
    int64_t h = 0;
    for (; h < Hv; h += kW) {
      VF v = vf_load(x + h);
      if (add) v = vf_add(v, vf_load(add + h));
      vf_store(o + h, v);
      s = vf_add(s, v);
    }
    for (; h < H; ++h) {
      const float v = x[h] + (add ? add[h] : 0.0f);
      o[h] = v;
      st += v;
    }
    const float mean = (vf_reduce_add(s) + st) / static_cast<float>(H);
    // pass 2: variance around the mean (two-pass: no cancellation)
    const VF mv = vf_set1(mean);
    VF q = vf_zero();
    float qt = 0.0f;
    for (h = 0; h < Hv; h += kW) {
      const VF d = vf_sub(vf_load(o + h), mv);
      q = vf_fmadd(d, d, q);
    }
    for (; h < H; ++h) qt += (o[h] - mean) * (o[h] - mean);
    const float var = (vf_reduce_add(q) + qt) / static_cast<float>(H);
    const float rstd = 1.0f / __builtin_sqrtf(var + c.eps);
    const VF rv = vf_set1(rstd);
    for (h = 0; h < Hv; h += kW) {
      const VF d = vf_mul(vf_sub(vf_load(o + h), mv), rv);
      vf_store(o + h, vf_fmadd(d, vf_load(c.gamma + h), vf_load(c.beta + h)));
    }
    for (; h < H; ++h) o[h] = (o[h] - mean) * rstd * c.gamma[h] + c.beta[h];
  }
}

void isa_add_layer_norm(const float* x, const float* add, int64_t M, int64_t H, const float* gamma,
                        const float* beta, float eps, float* out) {
  if (M <= 0) return;
  LayerNormCtx c{x, add, gamma, beta, H, eps, out};
  const int64_t grain = 1 + (1 << 14) / (H + 1);
  tallow::parallel_for(M, grain, &layer_norm_rows, &c);
}

// ---------------------------------------------------------------- RMSNorm, SwiGLU (decoders)

struct RmsNormCtx {
  const float *x, *gamma;
  int64_t H;
  float eps;
  float* out;
};

// out = gamma * (x * rsqrt(mean(x^2) + eps)), torch's order (Llama's RMSNorm).
void rms_norm_rows(void* ctx, int64_t begin, int64_t end) {
  const RmsNormCtx& c = *static_cast<const RmsNormCtx*>(ctx);
  const int64_t H = c.H, Hv = H / kW * kW;
  for (int64_t m = begin; m < end; ++m) {
    const float* x = c.x + m * H;
    float* o = c.out + m * H;
    VF q = vf_zero();
    float qt = 0.0f;
    int64_t h = 0;
    for (; h < Hv; h += kW) {
      const VF v = vf_load(x + h);
      q = vf_fmadd(v, v, q);
    }
    for (; h < H; ++h) qt += x[h] * x[h];
    const float rs = 1.0f / __builtin_sqrtf((vf_reduce_add(q) + qt) / static_cast<float>(H) + c.eps);
    const VF rv = vf_set1(rs);
    for (h = 0; h < Hv; h += kW) vf_store(o + h, vf_mul(vf_load(c.gamma + h), vf_mul(vf_load(x + h), rv)));
    for (; h < H; ++h) o[h] = c.gamma[h] * (x[h] * rs);
  }
}

void isa_rms_norm(const float* x, int64_t M, int64_t H, const float* gamma, float eps, float* out) {
  if (M <= 0) return;
  RmsNormCtx c{x, gamma, H, eps, out};
  tallow::parallel_for(M, 1 + (1 << 14) / (H + 1), &rms_norm_rows, &c);
}

// out[m, f] = silu(gu[m, f]) * gu[m, F + f], silu(g) = g / (1 + exp(-g)).
void isa_swiglu(const float* gu, int64_t M, int64_t F, float* out) {
  const int64_t Fv = F / kW * kW;
  const VF nlog2e = vf_set1(-1.4426950408889634f);
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gu + m * 2 * F;
    const float* u = g + F;
    float* o = out + m * F;
    int64_t f = 0;
    for (; f < Fv; f += kW) {
      const VF gv = vf_load(g + f);
      const VF s = k_div(gv, vf_add(vf_set1(1.0f), vf_exp2(vf_mul(gv, nlog2e))));
      vf_store(o + f, vf_mul(s, vf_load(u + f)));
    }
    for (; f < F; ++f) {
      const VF gv = vf_load_n(g + f, 1);
      const VF s = k_div(gv, vf_add(vf_set1(1.0f), vf_exp2(vf_mul(gv, nlog2e))));
      vf_store_n(o + f, vf_mul(s, vf_load_n(u + f, 1)), 1);
    }
  }
}
