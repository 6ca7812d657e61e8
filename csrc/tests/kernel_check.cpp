// Stand-alone test driver of the C++ kernels: no Python, no pybind11.
//
// Links the kernel sources of one architecture (x86-64: scalar, avx2,
// avx512; aarch64: scalar, neon) with the dispatchers, runs every kernel on
// every ISA this CPU supports (tallow::set_isa) over awkward shapes, and
// compares with plain scalar C++ references written here:
//   int8_matmul  exact int32 (wrapping), vs an int64 triple loop
//   quantize     exact (q, scale, zp), vs the same float32 maths
//   int8_linear  per output |y - ref| <= 5e-6 * max(1, |ref|), ref from the
//                reference quantizer, an exact integer GEMM and the epilogue
//                (activations in double)
//   attention    |out - ref| <= 1e-5 (measured: <= 6e-7), ref a float64 softmax(q k^T * scale) v
//   preprocess   bit-identical to the scalar ISA (which the Python suite
//                checks against Pillow)
//   thread pool  a fork() child of a process whose pool has run jobs (and
//                one forked while another thread keeps the pool busy) gets
//                a working parallel_for: exact sums, within a time guard
// and checks that the best ISA is the one the CPU's features call for
// (on aarch64 with asimddp: neon). Prints a summary; exits 1 on any failure.
//
// Built and run by `make check-aarch64` (cross-compiled, under
// qemu-aarch64-static -cpu max) and `make check-kernels` (native).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_features.h"
#include "common/thread_pool.h"
#include "encoder/encoder.h"
#include "int8_matmul/int8_matmul.h"
#include "preprocess/preprocess_dispatch.h"
#include "vision/resnet.h"

namespace {

using namespace tallow;

std::mt19937 g_rng(1234);
int g_failures = 0;

struct Result {
  std::string op, isa;
  int cases = 0, failed = 0;
  double max_err = 0.0;
};
std::vector<Result> g_results;

Result& result(const std::string& op, const std::string& isa) {
  for (Result& r : g_results)
    if (r.op == op && r.isa == isa) return r;
  g_results.push_back(Result{op, isa});
  return g_results.back();
}

void record(const std::string& op, const std::string& isa, const std::string& what, bool ok, double err,
            const std::string& detail = "") {
  Result& r = result(op, isa);
  r.cases++;
  if (err > r.max_err) r.max_err = err;
  if (!ok) {
    r.failed++;
    g_failures++;
    std::printf("FAIL %-12s %-12s %s %s\n", op.c_str(), isa.c_str(), what.c_str(), detail.c_str());
  }
}

int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }
float rand_float(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g_rng); }

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// ------------------------------------------------------------------ int8 GEMM

struct MatCase { int64_t M, K, N; int layout; int fill; };
// layout: 0 A and B row-major; 1 B column-major (W^T); 2 A and B with padded
// rows; 3 A column-major, B padded column-major.  fill: 0 random, 1 extremes
// (-128 / 127 only: every product at its largest magnitude).

void check_matmul(const std::string& isa) {
  const MatCase cases[] = {
      {1, 1, 1, 0, 0},    {1, 7, 97, 0, 0},   {7, 97, 129, 1, 0},  {97, 129, 7, 2, 0},
      {3, 64, 16, 3, 1},  {129, 7, 33, 0, 1}, {5, 300, 40, 1, 1},  {50, 257, 31, 2, 0},
      {2, 1025, 17, 3, 0}, {1, 513, 80, 1, 0}, {49, 33, 65, 0, 1},
  };
  for (const MatCase& c : cases) {
    const int64_t M = c.M, K = c.K, N = c.N;
    int64_t sam = K, sak = 1, sbk = N, sbn = 1;
    if (c.layout == 1) { sbk = 1; sbn = K; }
    if (c.layout == 2) { sam = K + 5; sbk = N + 3; }
    if (c.layout == 3) { sam = 1; sak = M; sbk = 1; sbn = K + 7; }
    const int64_t asize = (c.layout == 3) ? M * K : M * sam;
    const int64_t bsize = (c.layout == 1) ? N * K : (c.layout == 3 ? N * sbn : K * sbk);
    std::vector<int8_t> a((size_t)asize), b((size_t)bsize);
    auto gen = [&]() -> int8_t { return c.fill ? (rand_int(0, 1) ? 127 : -128) : (int8_t)rand_int(-128, 127); };
    for (auto& x : a) x = gen();
    for (auto& x : b) x = gen();
    std::vector<int32_t> out((size_t)(M * N), 0x5a5a5a5a);
    int8mm::matmul_s8(a.data(), sam, sak, b.data(), sbk, sbn, M, K, N, out.data());
    int64_t bad = 0, first = -1;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += (int64_t)a[(size_t)(m * sam + k * sak)] * b[(size_t)(k * sbk + n * sbn)];
        const int32_t ref = (int32_t)(uint32_t)(uint64_t)s;
        if (out[(size_t)(m * N + n)] != ref) {
          if (first < 0) first = m * N + n;
          ++bad;
        }
      }
    record("int8_matmul", isa, fmt("M=%lld K=%lld N=%lld layout=%d fill=%d", (long long)M, (long long)K, (long long)N,
                                   c.layout, c.fill),
           bad == 0, (double)bad, bad ? fmt("%lld wrong, first at %lld", (long long)bad, (long long)first) : "");
  }
}

// The reference of int8mm::quantize_rows (python/tallow/ops/int8_matmul.py's
// quantize_rows_ref): float32 throughout, round half to even. levels 255, or
// 127 for the 7-bit activations of a_bits = 7.
void quantize_ref(const float* x, int64_t K, uint8_t* q, float* scale, int32_t* zp, int levels = 255) {
  const float top = (float)levels;
  float mn = 0.0f, mx = 0.0f;
  bool bad = false;
  for (int64_t k = 0; k < K; ++k) {
    if (!std::isfinite(x[k])) bad = true;
    mn = x[k] < mn ? x[k] : mn;
    mx = x[k] > mx ? x[k] : mx;
  }
  if (bad) {
    *scale = NAN;
    *zp = 0;
    for (int64_t k = 0; k < K; ++k) q[k] = 0;
    return;
  }
  float s = (mx - mn) / top;
  if (s == 0.0f) s = 1.0f;
  const float inv = 1.0f / s;
  float z = std::nearbyint(-mn * inv);
  z = z < 0.0f ? 0.0f : (z > top ? top : z);
  *scale = s;
  *zp = (int32_t)z;
  for (int64_t k = 0; k < K; ++k) {
    float r = std::nearbyint(x[k] * inv) + z;
    r = r < 0.0f ? 0.0f : (r > top ? top : r);
    q[k] = (uint8_t)r;
  }
}

void check_quantize(const std::string& isa) {
  // {1, 70001}: one long row, quantized in pieces on every thread (quantize_rows_split)
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {7, 97}, {2, 129}, {5, 1030}, {1, 70001}};
  for (const auto& sh : shapes) {
    const int64_t M = sh[0], K = sh[1], ldx = K + 3;
    std::vector<float> x((size_t)(M * ldx));
    for (auto& v : x) v = rand_float(-3.0f, 2.0f);
    if (M > 2) for (int64_t k = 0; k < K; ++k) x[(size_t)(1 * ldx + k)] = rand_float(0.5f, 2.0f);  // all positive
    if (M > 3) x[(size_t)(3 * ldx)] = NAN;                                                          // a NaN row
    std::vector<uint8_t> q((size_t)(M * K)), qr((size_t)K);
    std::vector<float> s((size_t)M);
    std::vector<int32_t> z((size_t)M);
    int8mm::quantize_rows(x.data(), ldx, M, K, q.data(), s.data(), z.data());
    bool ok = true;
    for (int64_t m = 0; m < M; ++m) {
      float sr;
      int32_t zr;
      quantize_ref(x.data() + m * ldx, K, qr.data(), &sr, &zr);
      const bool same_scale = (std::isnan(sr) && std::isnan(s[(size_t)m])) || sr == s[(size_t)m];
      ok = ok && same_scale && zr == z[(size_t)m] && std::memcmp(qr.data(), q.data() + m * K, (size_t)K) == 0;
    }
    record("quantize", isa, fmt("M=%lld K=%lld", (long long)M, (long long)K), ok, ok ? 0.0 : 1.0);
  }
}

double gelu_erf_ref(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

void check_linear(const std::string& isa) {
  const int64_t shapes[][3] = {{1, 7, 97}, {7, 97, 129}, {97, 129, 7}, {1, 300, 33}, {50, 64, 16}};
  for (const auto& sh : shapes) {
    for (int act = 0; act <= 3; ++act) {
      // 7-bit activations (AVX2's vpmaddubsw path) on every other case
      const int a_bits = (act % 2) ? 7 : 8;
      const int64_t M = sh[0], K = sh[1], N = sh[2], ldx = K + 5;
      const int64_t NB = (N + 15) / 16, KB = (K + 3) / 4;
      std::vector<float> x((size_t)(M * ldx));
      for (auto& v : x) v = rand_float(-2.0f, 2.0f);
      std::vector<int8_t> w((size_t)(N * K));  // [N, K], like a Linear weight
      for (auto& v : w) v = (int8_t)rand_int(-127, 127);
      std::vector<float> sw((size_t)N), bias((size_t)N);
      for (auto& v : sw) v = rand_float(0.002f, 0.01f);
      for (auto& v : bias) v = rand_float(-1.0f, 1.0f);
      // The packed layout [NB][KB][16][4] and column sums (what the Python op packs).
      std::vector<int8_t> packed((size_t)(NB * KB * 64), 0);
      std::vector<int32_t> colsum((size_t)N, 0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          packed[(size_t)(((n / 16) * KB + k / 4) * 64 + (n % 16) * 4 + k % 4)] = w[(size_t)(n * K + k)];
          colsum[(size_t)n] += w[(size_t)(n * K + k)];
        }
      const bool with_bias = act != 1;
      const bool with_res = act <= 1;  // the residual operand (a ResNet block's shortcut), before the activation
      std::vector<float> y((size_t)(M * N)), res((size_t)(M * N));
      for (auto& v : res) v = rand_float(-2.0f, 2.0f);
      int8mm::linear(x.data(), ldx, M, K, packed.data(), colsum.data(), sw.data(), with_bias ? bias.data() : nullptr,
                     N, act, y.data(), a_bits, with_res ? res.data() : nullptr);
      double worst = 0.0;
      std::vector<uint8_t> q((size_t)K);
      for (int64_t m = 0; m < M; ++m) {
        float sx;
        int32_t zp;
        quantize_ref(x.data() + m * ldx, K, q.data(), &sx, &zp, a_bits == 7 ? 127 : 255);
        for (int64_t n = 0; n < N; ++n) {
          int64_t acc = 0;
          for (int64_t k = 0; k < K; ++k) acc += ((int64_t)q[(size_t)k] - zp) * w[(size_t)(n * K + k)];
          float yf = (float)acc * (sx * sw[(size_t)n]) + (with_bias ? bias[(size_t)n] : 0.0f);
          if (with_res) yf += res[(size_t)(m * N + n)];
          double ref = yf;
          if (act == int8mm::kActRelu) ref = ref > 0.0 ? ref : 0.0;
          if (act == int8mm::kActGeluErf) ref = gelu_erf_ref(ref);
          if (act == int8mm::kActGeluTanh) ref = gelu_tanh_ref(ref);
          const double err = std::fabs(y[(size_t)(m * N + n)] - ref) / std::fmax(1.0, std::fabs(ref));
          if (!(err <= worst)) worst = err;  // NaN sticks
        }
      }
      record("int8_linear", isa,
             fmt("M=%lld K=%lld N=%lld act=%d a_bits=%d%s", (long long)M, (long long)K, (long long)N, act, a_bits,
                 with_res ? " +residual" : ""),
             worst <= 5e-6, worst,
             fmt("max rel err %.3g", worst));
    }
  }
}

// linear_b32: weights and activations symmetric s8 per block of 32 k (the
// activations by the reference quantization of python/tallow/ops/int8_block.py,
// which the kernel's q and scales match bit for bit), the integer dot of each
// block exact, summed in double here; extremes (every x and w at +-127, every
// scale 1) check that no s8 x s8 product path saturates.
void check_linear_b32(const std::string& isa) {
  const int64_t shapes[][3] = {{1, 7, 97}, {2, 64, 33}, {5, 97, 129}, {3, 300, 16}, {17, 33, 50}, {1, 96, 20}};
  for (int fill = 0; fill <= 1; ++fill) {
    for (const auto& sh : shapes) {
      for (int act = 0; act <= 3; ++act) {
        const int64_t M = sh[0], K = sh[1], N = sh[2], ldx = K + 3;
        const int64_t NB = (N + 15) / 16, KB = (K + 3) / 4, QB = int8mm::kQBlock;
        std::vector<float> x((size_t)(M * ldx));
        std::vector<int8_t> w((size_t)(N * K));
        for (auto& v : x) v = fill ? (rand_int(0, 1) ? 127.0f : -127.0f) : rand_float(-2.0f, 2.0f);
        for (auto& v : w) v = (int8_t)(fill ? (rand_int(0, 1) ? 127 : -127) : rand_int(-127, 127));
        if (!fill)
          for (int64_t m = 0; m < M; ++m) x[(size_t)(m * ldx + (m * 7) % K)] = 60.0f;  // an outlier channel
        const int64_t nblk = (K + QB - 1) / QB;
        std::vector<float> ws((size_t)(NB * nblk * 16), 0.0f), bias((size_t)N);  // [NB][nblk][16]
        for (int64_t n = 0; n < N; ++n)
          for (int64_t b = 0; b < nblk; ++b)
            ws[(size_t)(((n / 16) * nblk + b) * 16 + n % 16)] = fill ? 1.0f : rand_float(0.002f, 0.01f);
        for (auto& v : bias) v = fill ? 0.0f : rand_float(-1.0f, 1.0f);
        std::vector<int8_t> packed((size_t)(NB * KB * 64), 0);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k)
            packed[(size_t)(((n / 16) * KB + k / 4) * 64 + (n % 16) * 4 + k % 4)] = w[(size_t)(n * K + k)];
        std::vector<float> y((size_t)(M * N));
        int8mm::linear_b32(x.data(), ldx, M, K, packed.data(), ws.data(), fill ? nullptr : bias.data(), N, act,
                           y.data());
        double worst = 0.0;
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = x.data() + m * ldx;
          std::vector<int32_t> q((size_t)K);
          std::vector<float> sx((size_t)((K + QB - 1) / QB));
          for (int64_t b = 0; b * QB < K; ++b) {
            float amax = 0.0f;
            for (int64_t k = b * QB; k < K && k < (b + 1) * QB; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            sx[(size_t)b] = amax / 127.0f;
            for (int64_t k = b * QB; k < K && k < (b + 1) * QB; ++k)
              q[(size_t)k] = (int32_t)std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(xr[k] * inv)));
          }
          for (int64_t n = 0; n < N; ++n) {
            double acc = 0.0;
            for (int64_t b = 0; b * QB < K; ++b) {
              int64_t dot = 0;
              for (int64_t k = b * QB; k < K && k < (b + 1) * QB; ++k) dot += (int64_t)q[(size_t)k] * w[(size_t)(n * K + k)];
              acc += (double)dot * sx[(size_t)b] * ws[(size_t)(((n / 16) * nblk + b) * 16 + n % 16)];
            }
            double ref = acc + (fill ? 0.0 : bias[(size_t)n]);
            if (act == int8mm::kActRelu) ref = ref > 0.0 ? ref : 0.0;
            if (act == int8mm::kActGeluErf) ref = gelu_erf_ref(ref);
            if (act == int8mm::kActGeluTanh) ref = gelu_tanh_ref(ref);
            const double err = std::fabs(y[(size_t)(m * N + n)] - ref) / std::fmax(1.0, std::fabs(ref));
            if (!(err <= worst)) worst = err;  // NaN sticks
          }
        }
        // fill 1: x and w at +-127 with every scale 1: the integer dot itself
        // (below 2^24, exact in float32; GELU aside, only the activation's rounding).
        record("int8_linear_b32", isa,
               fmt("M=%lld K=%lld N=%lld act=%d fill=%d", (long long)M, (long long)K, (long long)N, act, fill),
               worst <= 1e-5, worst, fmt("max rel err %.3g", worst));
      }
    }
  }
}

// ------------------------------------------------------------------ encoder kernels

// fp32 GEMM on packed panels (bias, activation) against a double reference;
// LayerNorm with residual, RMSNorm and SwiGLU against double references.
void check_encoder(const std::string& isa) {
  const encoder::IsaKernels& kr = encoder::kernels();
  const int64_t shapes[][3] = {{1, 7, 97}, {7, 97, 129}, {97, 129, 7}, {1, 300, 33}, {17, 384, 70}, {9, 16, 16}};
  for (const auto& sh : shapes) {
    for (int act = 0; act <= 3; ++act) {
      const int64_t M = sh[0], K = sh[1], N = sh[2];
      std::vector<float> x((size_t)(M * K)), w((size_t)(N * K)), bias((size_t)N), y((size_t)(M * N));
      for (auto& v : x) v = rand_float(-2.0f, 2.0f);
      for (auto& v : w) v = rand_float(-1.0f, 1.0f);
      for (auto& v : bias) v = rand_float(-1.0f, 1.0f);
      std::vector<float> packed((size_t)((N + 15) / 16 * K * 16));
      encoder::pack_weight(w.data(), N, K, packed.data());
      encoder::SgemmArgs g{x.data(), K, packed.data(), bias.data(), y.data(), N, M, N, K, act};
      kr.sgemm(g);
      double worst = 0.0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double ref = bias[(size_t)n];
          for (int64_t k = 0; k < K; ++k) ref += (double)x[(size_t)(m * K + k)] * w[(size_t)(n * K + k)];
          if (act == 1) ref = ref > 0.0 ? ref : 0.0;
          if (act == 2) ref = gelu_erf_ref(ref);
          if (act == 3) ref = gelu_tanh_ref(ref);
          const double err = std::fabs(y[(size_t)(m * N + n)] - ref) / std::fmax(1.0, std::fabs(ref));
          if (!(err <= worst)) worst = err;
        }
      record("sgemm", isa, fmt("M=%lld K=%lld N=%lld act=%d", (long long)M, (long long)K, (long long)N, act),
             worst <= 2e-5, worst, fmt("max rel err %.3g", worst));
    }
  }
  for (int64_t H : {1, 7, 36, 384}) {
    const int64_t M = 5, F = H + 3;
    std::vector<float> x((size_t)(M * H)), add((size_t)(M * H)), gamma((size_t)H), beta((size_t)H), out((size_t)(M * H));
    for (auto& v : x) v = rand_float(-3.0f, 3.0f);
    for (auto& v : add) v = rand_float(-3.0f, 3.0f);
    for (auto& v : gamma) v = rand_float(0.5f, 1.5f);
    for (auto& v : beta) v = rand_float(-0.5f, 0.5f);
    double worst_ln = 0.0, worst_rms = 0.0, worst_glu = 0.0;
    kr.add_layer_norm(x.data(), add.data(), M, H, gamma.data(), beta.data(), 1e-5f, out.data());
    for (int64_t m = 0; m < M; ++m) {
      double mean = 0.0, var = 0.0;
      for (int64_t h = 0; h < H; ++h) mean += (double)x[(size_t)(m * H + h)] + add[(size_t)(m * H + h)];
      mean /= (double)H;
      for (int64_t h = 0; h < H; ++h) {
        const double d = (double)x[(size_t)(m * H + h)] + add[(size_t)(m * H + h)] - mean;
        var += d * d;
      }
      var /= (double)H;
      for (int64_t h = 0; h < H; ++h) {
        const double v = (double)x[(size_t)(m * H + h)] + add[(size_t)(m * H + h)];
        const double ref = (v - mean) / std::sqrt(var + 1e-5) * gamma[(size_t)h] + beta[(size_t)h];
        worst_ln = std::fmax(worst_ln, std::fabs(out[(size_t)(m * H + h)] - ref));
      }
    }
    kr.rms_norm(x.data(), M, H, gamma.data(), 1e-6f, out.data());
    for (int64_t m = 0; m < M; ++m) {
      double ss = 0.0;
      for (int64_t h = 0; h < H; ++h) ss += (double)x[(size_t)(m * H + h)] * x[(size_t)(m * H + h)];
      const double r = 1.0 / std::sqrt(ss / (double)H + 1e-6);
      for (int64_t h = 0; h < H; ++h)
        worst_rms = std::fmax(worst_rms, std::fabs(out[(size_t)(m * H + h)] - gamma[(size_t)h] * x[(size_t)(m * H + h)] * r));
    }
    std::vector<float> gu((size_t)(M * 2 * F)), glu((size_t)(M * F));
    for (auto& v : gu) v = rand_float(-6.0f, 6.0f);
    kr.swiglu(gu.data(), M, F, glu.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        const double g = gu[(size_t)(m * 2 * F + f)], u = gu[(size_t)(m * 2 * F + F + f)];
        const double ref = g / (1.0 + std::exp(-g)) * u;
        worst_glu = std::fmax(worst_glu, std::fabs(glu[(size_t)(m * F + f)] - ref) / std::fmax(1.0, std::fabs(ref)));
      }
    record("layer_norm", isa, fmt("H=%lld", (long long)H), worst_ln <= 1e-5, worst_ln, fmt("max err %.3g", worst_ln));
    record("rms_norm", isa, fmt("H=%lld", (long long)H), worst_rms <= 1e-5, worst_rms, fmt("max err %.3g", worst_rms));
    record("swiglu", isa, fmt("F=%lld", (long long)F), worst_glu <= 1e-6, worst_glu, fmt("max rel err %.3g", worst_glu));
  }
}

// ------------------------------------------------------------------ convolution

// The native ResNet's convolution (csrc/vision/): direct implicit GEMM with
// bias + residual + ReLU, and Winograd F(2, 3) / F(4, 3), on NHWC buffers,
// against a double-precision direct convolution.
void check_conv(const std::string& isa) {
  struct ConvCase { int64_t B, H, W, C, N, K, stride, pad; bool res; int wino; };
  const ConvCase cases[] = {{1, 23, 19, 3, 64, 7, 2, 3, false, 0}, {2, 9, 7, 5, 17, 3, 1, 1, true, 0},
                            {1, 14, 14, 64, 70, 1, 1, 0, true, 0},  {3, 9, 11, 33, 40, 1, 2, 0, false, 0},
                            {1, 4, 4, 300, 33, 3, 1, 1, false, 0},  {2, 7, 9, 5, 17, 3, 1, 1, false, 2},
                            {1, 14, 14, 64, 64, 3, 1, 1, false, 2}, {2, 7, 9, 5, 17, 3, 1, 1, false, 4},
                            {1, 13, 14, 40, 33, 3, 1, 1, false, 4}};
  for (const ConvCase& cc : cases) {
    const int64_t OH = (cc.H + 2 * cc.pad - cc.K) / cc.stride + 1, OW = (cc.W + 2 * cc.pad - cc.K) / cc.stride + 1;
    std::vector<float> x((size_t)(cc.B * cc.H * cc.W * cc.C)), w((size_t)(cc.N * cc.C * cc.K * cc.K)),
        bias((size_t)cc.N), res((size_t)(cc.B * OH * OW * cc.N)), y(res.size());
    for (auto& v : x) v = rand_float(-2.0f, 2.0f);
    for (auto& v : w) v = rand_float(-1.0f, 1.0f) / std::sqrt((float)(cc.C * cc.K * cc.K));
    for (auto& v : bias) v = rand_float(-1.0f, 1.0f);
    for (auto& v : res) v = rand_float(-1.0f, 1.0f);
    const vision::ConvLayer l =
        vision::ResNet::make_conv(w.data(), bias.data(), cc.N, cc.C, cc.K, cc.K, cc.stride, cc.wino);
    vision::conv_nhwc(l, x.data(), cc.B, cc.H, cc.W, cc.pad, cc.res ? res.data() : nullptr, 1, y.data());
    double worst = 0.0;
    for (int64_t b = 0; b < cc.B; ++b)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow)
          for (int64_t n = 0; n < cc.N; ++n) {
            double ref = bias[(size_t)n];
            for (int64_t i = 0; i < cc.K; ++i)
              for (int64_t j = 0; j < cc.K; ++j) {
                const int64_t ih = oh * cc.stride + i - cc.pad, iw = ow * cc.stride + j - cc.pad;
                if (ih < 0 || iw < 0 || ih >= cc.H || iw >= cc.W) continue;
                for (int64_t c = 0; c < cc.C; ++c)
                  ref += (double)x[(size_t)(((b * cc.H + ih) * cc.W + iw) * cc.C + c)] *
                         w[(size_t)(((n * cc.C + c) * cc.K + i) * cc.K + j)];
              }
            const size_t o = (size_t)(((b * OH + oh) * OW + ow) * cc.N + n);
            if (cc.res) ref += res[o];
            ref = ref > 0.0 ? ref : 0.0;
            const double err = std::fabs(y[o] - ref) / std::fmax(1.0, std::fabs(ref));
            if (!(err <= worst)) worst = err;
          }
    const double tol = cc.wino == 4 ? 2e-4 : 2e-5;
    record("conv2d", isa,
           fmt("B=%lld %lldx%lldx%lld->%lld k%lld s%lld p%lld%s wino=%d", (long long)cc.B, (long long)cc.H,
               (long long)cc.W, (long long)cc.C, (long long)cc.N, (long long)cc.K, (long long)cc.stride,
               (long long)cc.pad, cc.res ? " res" : "", cc.wino),
           worst <= tol, worst, fmt("max rel err %.3g", worst));
  }
}

// ------------------------------------------------------------------ attention

struct AttnCase { int64_t B, H, Lq, Lk, D; bool causal, mask; int layout; bool bf16 = false; };
// bf16: K and V given as bfloat16 bits (a bf16 KV cache; decode path only,
// Lq <= 4); the reference uses the same bf16-rounded values in double.
// layout: 0 contiguous [B, H, L, D]; 1 [B, L, H, D] (a transposed
// projection); 2 contiguous with padded rows (row stride D + 3).

void check_attention(const std::string& isa) {
  const AttnCase cases[] = {
      {1, 1, 1, 1, 64, false, false, 0},    {1, 2, 7, 7, 80, true, false, 1},
      {2, 2, 97, 97, 64, false, true, 2},   {1, 1, 129, 129, 128, true, true, 0},
      {1, 3, 1, 129, 64, false, true, 1},   {2, 2, 3, 97, 80, true, false, 2},
      {1, 1, 1, 700, 64, false, false, 0},  {1, 2, 7, 97, 128, true, true, 1},
      {1, 1, 5, 33, 13, false, false, 2},   {1, 1, 40, 20, 64, true, false, 0},
      {2, 1, 1, 1, 80, true, true, 0},     {1, 1, 300, 1025, 64, true, false, 1},
      {1, 2, 129, 260, 80, false, true, 0},
      {2, 3, 1, 97, 64, true, true, 0, true},  {1, 2, 3, 1025, 80, true, false, 1, true},
      {1, 1, 4, 7, 13, false, true, 2, true},
  };
  for (const AttnCase& c : cases) {
    const int64_t B = c.B, H = c.H, Lq = c.Lq, Lk = c.Lk, D = c.D;
    const int64_t ld = c.layout == 2 ? D + 3 : D;
    auto strides = [&](int64_t L, int64_t& sb, int64_t& sh, int64_t& sl) {
      if (c.layout == 1) { sl = H * D; sh = D; sb = L * H * D; }
      else { sl = ld; sh = L * ld; sb = H * L * ld; }
    };
    AttentionArgs a{};
    strides(Lq, a.q_sb, a.q_sh, a.q_sl);
    strides(Lk, a.k_sb, a.k_sh, a.k_sl);
    strides(Lk, a.v_sb, a.v_sh, a.v_sl);
    strides(Lq, a.o_sb, a.o_sh, a.o_sl);
    std::vector<float> q((size_t)(B * a.q_sb)), k((size_t)(B * a.k_sb)), v((size_t)(B * a.v_sb));
    std::vector<float> o((size_t)(B * a.o_sb), 12345.0f);
    for (auto& x : q) x = rand_float(-2.0f, 2.0f);
    for (auto& x : k) x = rand_float(-2.0f, 2.0f);
    for (auto& x : v) x = rand_float(-1.0f, 1.0f);
    std::vector<uint16_t> k16, v16;
    if (c.bf16) {  // round to nearest even bf16, keep the rounded floats for the reference
      auto to_bf16 = [](std::vector<float>& f, std::vector<uint16_t>& h) {
        h.resize(f.size());
        for (size_t i = 0; i < f.size(); ++i) {
          uint32_t u;
          std::memcpy(&u, &f[i], 4);
          u += 0x7fffu + ((u >> 16) & 1u);
          h[i] = static_cast<uint16_t>(u >> 16);
          u = static_cast<uint32_t>(h[i]) << 16;
          std::memcpy(&f[i], &u, 4);
        }
      };
      to_bf16(k, k16);
      to_bf16(v, v16);
    }
    std::vector<uint8_t> mask;
    if (c.mask) {
      mask.assign((size_t)(B * Lk), 0);
      for (auto& m : mask) m = rand_int(0, 3) == 0;
      for (int64_t j = 0; j < Lk; ++j) mask[(size_t)j] = 1;  // batch 0: every key padded (zeros out)
      if (B > 1) mask[(size_t)(Lk + Lk - 1)] = 0;
    }
    a.q = q.data();
    if (c.bf16) {
      a.k_bf16 = k16.data();
      a.v_bf16 = v16.data();
    } else {
      a.k = k.data();
      a.v = v.data();
    }
    a.out = o.data();
    a.key_padding_mask = c.mask ? mask.data() : nullptr;
    a.B = B; a.H = H; a.Lq = Lq; a.Lk = Lk; a.D = D;
    a.causal = c.causal;
    a.scale = (float)(1.0 / std::sqrt((double)D));
    const bool ran = attention_forward(a);
    double worst = 0.0;
    std::vector<double> s((size_t)Lk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Lq; ++i) {
          const float* qi = a.q + b * a.q_sb + h * a.q_sh + i * a.q_sl;
          double mx = -INFINITY;
          for (int64_t j = 0; j < Lk; ++j) {
            const bool vis = (!c.causal || j <= Lk - Lq + i) && !(c.mask && mask[(size_t)(b * Lk + j)]);
            if (!vis) { s[(size_t)j] = -INFINITY; continue; }
            const float* kj = k.data() + b * a.k_sb + h * a.k_sh + j * a.k_sl;
            double d = 0.0;
            for (int64_t e = 0; e < D; ++e) d += (double)qi[e] * kj[e];
            s[(size_t)j] = d * a.scale;
            mx = std::fmax(mx, s[(size_t)j]);
          }
          const float* oi = a.out + b * a.o_sb + h * a.o_sh + i * a.o_sl;
          for (int64_t e = 0; e < D; ++e) {
            double num = 0.0, den = 0.0;
            if (mx != -INFINITY)
              for (int64_t j = 0; j < Lk; ++j) {
                if (s[(size_t)j] == -INFINITY) continue;
                const double p = std::exp(s[(size_t)j] - mx);
                den += p;
                num += p * v[(size_t)(b * a.v_sb + h * a.v_sh + j * a.v_sl + e)];
              }
            const double ref = den > 0.0 ? num / den : 0.0;
            const double err = std::fabs(oi[e] - ref);
            if (!(err <= worst)) worst = err;
          }
        }
    record("attention", isa,
           fmt("B=%lld H=%lld Lq=%lld Lk=%lld D=%lld causal=%d mask=%d layout=%d bf16=%d", (long long)B,
               (long long)H, (long long)Lq, (long long)Lk, (long long)D, c.causal, c.mask, c.layout, c.bf16),
           ran && worst <= 1e-5, worst, fmt("max abs err %.3g", worst));
  }
}

// ------------------------------------------------------------------ preprocess

struct PreCase { int64_t h, w, resize, crop; int layout; };
// layout: 0 packed RGB (stride_x 3); 1 RGBX (stride_x 4, Pillow's own
// layout); 2 planar channels (generic path); 3 horizontally flipped RGB.

std::vector<float> run_preprocess(const PreCase& c, const std::vector<uint8_t>& img, const float* lut) {
  preprocess::ImageJob job{};
  const int64_t px = c.layout == 1 ? 4 : 3;
  job.in_h = c.h;
  job.in_w = c.w;
  if (c.layout == 2) {
    job.src = img.data();
    job.stride_y = c.w;
    job.stride_x = 1;
    job.stride_c = c.h * c.w;
  } else if (c.layout == 3) {
    job.src = img.data() + (c.w - 1) * 3;
    job.stride_y = c.w * 3;
    job.stride_x = -3;
    job.stride_c = 1;
  } else {
    job.src = img.data();
    job.stride_y = c.w * px + (c.layout == 1 ? 8 : 5);  // padded rows
    job.stride_x = px;
    job.stride_c = 1;
  }
  std::vector<float> out((size_t)(3 * c.crop * c.crop), -7.0f);
  job.out = out.data();
  preprocess::run(job, c.resize, c.crop, lut);
  return out;
}

void check_preprocess(const std::vector<std::string>& isas) {
  const PreCase cases[] = {
      {37, 53, 32, 24, 0},  {97, 129, 64, 56, 1}, {300, 97, 64, 48, 0}, {300, 97, 64, 48, 1},
      {129, 7, 5, 5, 0},    {7, 7, 7, 7, 2},      {1, 1, 4, 3, 0},      {61, 200, 40, 33, 3},
      {250, 60, 50, 41, 2}, {33, 97, 97, 80, 0},  {120, 50, 20, 17, 3}, {64, 64, 224, 224, 1},
  };
  float lut[3 * 256];
  const float mean[3] = {0.485f, 0.456f, 0.406f}, stdv[3] = {0.229f, 0.224f, 0.225f};
  for (int ch = 0; ch < 3; ++ch)
    for (int x = 0; x < 256; ++x) lut[ch * 256 + x] = ((float)x / 255.0f - mean[ch]) / stdv[ch];
  for (const PreCase& c : cases) {
    const int64_t px = c.layout == 1 ? 4 : 3;
    std::vector<uint8_t> img((size_t)(c.h * (c.w * px + 8) + 16));
    for (auto& b : img) b = (uint8_t)rand_int(0, 255);
    set_isa("scalar");
    const std::vector<float> ref = run_preprocess(c, img, lut);
    for (const std::string& isa : isas) {
      set_isa(isa);
      const std::vector<float> got = run_preprocess(c, img, lut);
      int64_t bad = 0;
      for (size_t i = 0; i < ref.size(); ++i) bad += std::memcmp(&ref[i], &got[i], 4) != 0;
      record("preprocess", isa,
             fmt("%lldx%lld resize=%lld crop=%lld layout=%d", (long long)c.h, (long long)c.w, (long long)c.resize,
                 (long long)c.crop, c.layout),
             bad == 0, (double)bad, fmt("%lld values differ from scalar", (long long)bad));
    }
  }
}

// ---------------------------------------------------------------- thread pool

struct SumJob {
  std::atomic<int64_t> sum{0};
  std::atomic<int> chunks{0};
  std::atomic<int> max_index{0};  // the highest thread_index() that took part
};

void sum_range(void* ctx, int64_t begin, int64_t end) {
  auto* job = static_cast<SumJob*>(ctx);
  int64_t s = 0;
  for (int64_t i = begin; i < end; ++i) s += i;
  job->sum.fetch_add(s);
  job->chunks.fetch_add(1);
  int seen = job->max_index.load();
  while (thread_index() > seen && !job->max_index.compare_exchange_weak(seen, thread_index())) {
  }
}

// parallel_for's max_threads: thread_index() stays below the cap whatever the
// pool's size (a pool of 4, caps 1 and 2), and the job is still done whole.
bool cap_holds() {
  set_num_threads(4);
  bool ok = true;
  for (int cap : {1, 2}) {
    SumJob capped;
    parallel_for(4000, 1, sum_range, &capped, cap);
    ok = ok && capped.max_index.load() < cap && capped.sum.load() == 4000LL * 3999 / 2;
  }
  set_num_threads(2);
  return ok;
}

// A parallel_for over [0, n) in grains of 1: true when every index was summed.
bool pool_sums_right(int64_t n) {
  SumJob job;
  parallel_for(n, 1, sum_range, &job);
  return job.sum.load() == n * (n - 1) / 2 && job.chunks.load() == n;
}

// Forks; the child runs parallel_for and exits 0 when it summed right. A
// child whose pool waits for workers that fork() did not copy would hang:
// alarm() turns that into SIGALRM, reported as a failure.
std::string fork_child_result() {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    alarm(60);
    bool ok = true;
    for (int i = 0; i < 50 && ok; ++i) ok = pool_sums_right(1000);
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return "waitpid failed";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFSIGNALED(status))
    return fmt("child killed by signal %d%s", WTERMSIG(status),
               WTERMSIG(status) == SIGALRM ? " (hung for 60 s in parallel_for)" : "");
  return fmt("child exited with %d (wrong sums)", WEXITSTATUS(status));
}

void check_fork() {
  record("thread_pool", "-", "max_threads caps thread_index()", cap_holds(), 0.0);
  const bool parent_ok = pool_sums_right(1000);  // the parent's workers exist from here on
  record("thread_pool", "-", "parent before fork", parent_ok, 0.0);
  std::string why = fork_child_result();
  record("thread_pool", "-", "fork child after parent jobs", why.empty(), 0.0, why);
  record("thread_pool", "-", "parent after fork", pool_sums_right(1000), 0.0);

  // Fork while another thread keeps submitting jobs: fork() must not copy the
  // pool mid-job (or with a lock held) into the child.
  std::atomic<bool> stop{false};
  std::atomic<int> busy_failures{0};
  std::thread busy([&] {
    while (!stop.load())
      if (!pool_sums_right(257)) busy_failures.fetch_add(1);
  });
  int bad = 0;
  std::string first;
  for (int i = 0; i < 20; ++i) {
    why = fork_child_result();
    if (!why.empty() && bad++ == 0) first = why;
  }
  stop.store(true);
  busy.join();
  record("thread_pool", "-", "20 forks while another thread runs jobs", bad == 0, bad,
         fmt("%d of 20 children failed, first: %s", bad, first.c_str()));
  record("thread_pool", "-", "jobs of the thread that ran during the forks", busy_failures.load() == 0,
         busy_failures.load());
}

}  // namespace

int main() {
  set_num_threads(2);  // exercise the pool's split paths (flash-decoding, GEMM tasks)
  std::printf("arch %s, cpu features: %s\n", arch_name(), cpu_feature_string().c_str());
  std::vector<std::string> isas;
  for (Isa isa : arch_isas())
    if (isa_supported(isa)) isas.push_back(isa_name(isa));
  std::string list;
  for (const auto& s : isas) list += " " + s;
  std::printf("supported ISAs:%s; best_isa: %s\n", list.c_str(), isa_name(best_isa()));

  // The best tier must be the one the features call for: a build or a
  // detection bug must not silently leave the SIMD kernels unused.
  const std::string feats = " " + cpu_feature_string() + " ";
  Isa want = Isa::Scalar;
  if (std::string(arch_name()) == "aarch64" && feats.find(" asimd ") != std::string::npos &&
      feats.find(" asimddp ") != std::string::npos)
    want = Isa::Neon;
  // The lists follow the per-suffix compile flags (CMakeLists.txt, KC_ISAFLAGS).
  auto has_all = [&](std::initializer_list<const char*> names) {
    for (const char* n : names)
      if (feats.find(" " + std::string(n) + " ") == std::string::npos) return false;
    return true;
  };
  if (std::string(arch_name()) == "x86_64" && has_all({"avx", "avx2", "fma", "f16c", "bmi2"}) &&
      feats.find("os-disabled-ymm") == std::string::npos)
    want = Isa::Avx2;
  if (std::string(arch_name()) == "x86_64" &&
      has_all({"avx2", "fma", "bmi2", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"}) &&
      feats.find("os-disabled") == std::string::npos)
    want = Isa::Avx512Vnni;
  if (best_isa() != want) {
    std::printf("FAIL best_isa is %s but this CPU's features call for %s\n", isa_name(best_isa()), isa_name(want));
    ++g_failures;
  }

  for (const std::string& isa : isas) {
    set_isa(isa);
    if (std::string(isa_name(active_isa())) != isa) {
      std::printf("FAIL set_isa(%s) left active_isa %s\n", isa.c_str(), isa_name(active_isa()));
      ++g_failures;
    }
    check_matmul(isa);
    check_quantize(isa);
    check_linear(isa);
    check_linear_b32(isa);
    check_attention(isa);
    check_encoder(isa);
    check_conv(isa);
  }
  check_preprocess(isas);
  // The parent can hang too (a fork() waiting in the pool's prepare handler):
  // SIGALRM's default action then ends the driver with a failure, not a hang.
  alarm(300);
  check_fork();
  alarm(0);

  std::printf("\n%-12s %-12s %6s %6s  %s\n", "op", "isa", "cases", "failed", "max err");
  for (const Result& r : g_results)
    std::printf("%-12s %-12s %6d %6d  %.3g\n", r.op.c_str(), r.isa.c_str(), r.cases, r.failed, r.max_err);
  std::printf("\nkernel_check (%s, best_isa %s): %s\n", arch_name(), isa_name(best_isa()),
              g_failures ? "FAILED" : "all passed");
  return g_failures ? 1 : 0;
}
