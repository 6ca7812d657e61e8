// Native encoder forward (baseline code): picks the active ISA's kernels and
// runs embeddings -> layers -> pooling over a packed batch in one call.
#include "encoder/encoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>

#include "attention/attention.h"
#include "common/cpu_features.h"
#include "common/thread_pool.h"
#include "encoder/model.h"
#include "int8_matmul/int8_matmul.h"

namespace tallow {
namespace encoder {

const IsaKernels& kernels() {
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Vnni:
      return kKernelsAvx512;
    case Isa::Avx2:
      return kKernelsAvx2;
#endif
#if defined(__aarch64__) && defined(TALLOW_HAVE_NEON_KERNELS)
    case Isa::Neon:
      return kKernelsNeon;
#endif
    default:
      return kKernelsScalar;
  }
}

void pack_weight(const float* w, int64_t N, int64_t K, float* out) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        out[(p * K + k) * kPanel + j] = n < N ? w[n * K + k] : 0.0f;
      }
}

void linear_fp32(const float* x, int64_t ldx, int64_t M, const float* packed, const float* bias,
                 int64_t N, int64_t K, int act, float* y) {
  SgemmArgs g{};
  g.a = x;
  g.lda = ldx;
  g.bp = packed;
  g.bias = bias;
  g.c = y;
  g.ldc = N;
  g.M = M;
  g.N = N;
  g.K = K;
  g.act = act;
  kernels().sgemm(g);
}

Encoder::Encoder(const EncoderConfig& cfg) : cfg_(cfg) {
  if (cfg.hidden <= 0 || cfg.heads <= 0 || cfg.hidden % cfg.heads != 0)
    throw std::invalid_argument("encoder: hidden must be a positive multiple of heads");
}

Linear Encoder::make_fp32(const float* w, const float* bias, int64_t N, int64_t K) {
  Linear l;
  l.N = N;
  l.K = K;
  l.packed.resize(static_cast<size_t>((N + kPanel - 1) / kPanel * K * kPanel));
  pack_weight(w, N, K, l.packed.data());
  if (bias) l.bias.assign(bias, bias + N);
  return l;
}

Linear Encoder::make_int8(const int8_t* packed, const int32_t* colsum, const float* scale,
                          const float* bias, int64_t N, int64_t K) {
  Linear l;
  l.N = N;
  l.K = K;
  l.int8 = true;
  l.qpacked = packed;
  l.colsum = colsum;
  l.scale = scale;
  if (bias) l.bias.assign(bias, bias + N);
  return l;
}

int64_t Encoder::owned_bytes() const {
  int64_t bytes = 0;
  for (const Layer& l : layers_)
    for (const Linear* lin : {&l.qkv, &l.out, &l.ffn1, &l.ffn2})
      bytes += static_cast<int64_t>((lin->packed.size() + lin->bias.size()) * sizeof(float));
  return bytes;
}

void apply_linear(const Linear& l, const float* x, int64_t ldx, int64_t M, int act, float* y) {
  const float* bias = l.bias.empty() ? nullptr : l.bias.data();
  if (l.int8 && l.block_scale)
    int8mm::linear_b32(x, ldx, M, l.K, l.qpacked, l.block_scale, bias, l.N, act, y);
  else if (l.int8)
    int8mm::linear(x, ldx, M, l.K, l.qpacked, l.colsum, l.scale, bias, l.N, act, y);
  else
    linear_fp32(x, ldx, M, l.packed.data(), bias, l.N, l.K, act, y);
}

namespace {

struct EmbedCtx {
  const Embeddings* e;
  const int64_t *ids, *types, *pos;
  int64_t H;
  float* x;
};

void embed_rows(void* p, int64_t begin, int64_t end) {
  const EmbedCtx& c = *static_cast<const EmbedCtx*>(p);
  for (int64_t t = begin; t < end; ++t) {
    const float* w = c.e->word + c.ids[t] * c.H;
    const float* ps = c.e->position + c.pos[t] * c.H;
    const float* ty = c.e->token_type + (c.types ? c.types[t] : 0) * c.H;
    float* x = c.x + t * c.H;
    // torch's order: (word + token_type) + position
    for (int64_t h = 0; h < c.H; ++h) x[h] = (w[h] + ty[h]) + ps[h];
  }
}

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

}  // namespace

void Encoder::forward(const int64_t* ids, const int64_t* type_ids, const int64_t* cu, int64_t B,
                      int pooling, bool normalize, float* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  const IsaKernels& kr = kernels();
  const int64_t T = cu[B], H = cfg_.hidden, F = cfg_.intermediate, heads = cfg_.heads, D = H / heads;
  grow(x_, T * H);
  grow(qkv_, T * 3 * H);
  grow(ctx_, T * H);
  grow(tmp_, T * H);
  grow(ffn_, T * F);
  float *x = x_.data(), *qkv = qkv_.data(), *ctx = ctx_.data(), *tmp = tmp_.data(), *ffn = ffn_.data();

  // Embeddings: positions restart at 0 in every sequence.
  if (static_cast<int64_t>(pos_.size()) < T) pos_.resize(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) pos_[t] = t - cu[b];
  EmbedCtx ec{&emb_, ids, type_ids, pos_.data(), H, x};
  parallel_for(T, std::max<int64_t>(1, 4096 / H), &embed_rows, &ec);
  kr.add_layer_norm(x, nullptr, T, H, emb_.ln.gamma, emb_.ln.beta, cfg_.eps, x);

  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (const Layer& L : layers_) {
    apply_linear(L.qkv, x, L.qkv.K, T, 0, qkv);  // [T, 3H]: q | k | v, heads side by side
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t0 = cu[b], len = cu[b + 1] - t0;
      AttentionArgs a{};
      a.q = qkv + t0 * 3 * H;
      a.k = a.q + H;
      a.v = a.q + 2 * H;
      a.out = ctx + t0 * H;
      a.B = 1, a.H = heads, a.Lq = len, a.Lk = len, a.D = D;
      a.q_sb = a.k_sb = a.v_sb = 0;
      a.q_sh = a.k_sh = a.v_sh = D;
      a.q_sl = a.k_sl = a.v_sl = 3 * H;
      a.o_sb = 0, a.o_sh = D, a.o_sl = H;
      a.causal = false;
      a.scale = scale;
      if (!attention_forward(a)) throw std::bad_alloc();
    }
    apply_linear(L.out, ctx, L.out.K, T, 0, tmp);
    kr.add_layer_norm(x, tmp, T, H, L.ln1.gamma, L.ln1.beta, cfg_.eps, x);
    apply_linear(L.ffn1, x, L.ffn1.K, T, cfg_.act, ffn);
    apply_linear(L.ffn2, ffn, L.ffn2.K, T, 0, tmp);
    kr.add_layer_norm(x, tmp, T, H, L.ln2.gamma, L.ln2.beta, cfg_.eps, x);
  }

  if (pooling == kPoolNone) {
    std::memcpy(out, x, static_cast<size_t>(T * H) * sizeof(float));
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * H;
    const int64_t t0 = cu[b], len = cu[b + 1] - t0;
    if (pooling == kPoolCls) {
      std::memcpy(o, x + t0 * H, static_cast<size_t>(H) * sizeof(float));
    } else {
      for (int64_t h = 0; h < H; ++h) o[h] = 0.0f;
      for (int64_t t = t0; t < t0 + len; ++t)
        for (int64_t h = 0; h < H; ++h) o[h] += x[t * H + h];
      const float inv = 1.0f / static_cast<float>(len);
      for (int64_t h = 0; h < H; ++h) o[h] *= inv;
    }
    if (normalize) {  // torch.nn.functional.normalize: x / max(||x||, 1e-12)
      double ss = 0.0;
      for (int64_t h = 0; h < H; ++h) ss += static_cast<double>(o[h]) * o[h];
      const float inv = 1.0f / std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
      for (int64_t h = 0; h < H; ++h) o[h] *= inv;
    }
  }
}

}  // namespace encoder
}  // namespace tallow
