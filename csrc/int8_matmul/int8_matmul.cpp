// INT8 GEMM dispatcher (baseline code of the target architecture): picks the kernels of the
// active ISA, allocates the operand buffers and runs quantize/pack + GEMM.
#include "int8_matmul/int8_matmul.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

#include "common/cpu_features.h"
#include "common/thread_pool.h"

namespace tallow {
namespace int8mm {
namespace {

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

// 64-byte aligned, uninitialised scratch (the kernels write every byte they
// read). Kept per calling thread and only grown: a fresh multi-MB allocation
// per call comes from mmap, and first-touch page faults on it cost more than
// packing B itself. Requests above kCacheMax are not kept.
constexpr size_t kCacheMax = size_t{256} << 20;
constexpr int kSlots = 8;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

struct ScratchCache {
  void* ptr[kSlots] = {};
  size_t cap[kSlots] = {};
  ~ScratchCache() {
    for (void* p : ptr) std::free(p);
  }
};

thread_local ScratchCache t_cache;

template <typename T>
class Scratch {
 public:
  Scratch(int slot, int64_t n) {
    size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > kCacheMax) {
      owned_.reset(std::aligned_alloc(64, bytes));
      if (!owned_) throw std::bad_alloc();
      p_ = static_cast<T*>(owned_.get());
      return;
    }
    if (t_cache.cap[slot] < bytes) {
      std::free(t_cache.ptr[slot]);
      t_cache.ptr[slot] = nullptr;
      t_cache.cap[slot] = 0;
      void* p = std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      t_cache.ptr[slot] = p;
      t_cache.cap[slot] = bytes;
    }
    p_ = static_cast<T*>(t_cache.ptr[slot]);
  }
  T* get() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
  std::unique_ptr<void, FreeDeleter> owned_;
};

bool detect_amx() {
#if !defined(__x86_64__)
  return false;
#else
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
  if (!tile || !int8) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3u) != 3u) return false;  // XTILECFG + XTILEDATA enabled by the OS
  // Linux >= 5.16: a process must ask for the AMX tile state (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
}

bool env_allows_amx() {
  const char* v = std::getenv("TALLOW_AMX");
  return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0));
}

std::atomic<int> g_amx_enabled{-1};  // -1: not decided yet

// Rows of A the AMX path may read: a multiple of its 16-row tiles.
int64_t padded_rows(int64_t M, bool amx) { return amx ? (M + 15) / 16 * 16 : M; }

// AMX pays off once a 16-row tile is reasonably full; a GEMV (decode) is
// bound by reading the weights and stays on the VNNI path.
constexpr int64_t kAmxMinM = 8;

}  // namespace

bool amx_usable() {
  // An atomic rather than a function-local static: racing first calls just
  // detect twice (the permission request is idempotent), and no
  // initialisation guard can be copied mid-way into a fork() child, where it
  // would block forever.
  static std::atomic<int> usable{-1};
  int v = usable.load(std::memory_order_relaxed);
  if (v < 0) {
    v = detect_amx() ? 1 : 0;
    usable.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

bool amx_enabled() {
  int v = g_amx_enabled.load(std::memory_order_relaxed);
  if (v < 0) {
    v = (amx_usable() && env_allows_amx()) ? 1 : 0;
    g_amx_enabled.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_amx_enabled(bool on) { g_amx_enabled.store(on && amx_usable() ? 1 : 0); }

namespace {
bool use_amx_for(int64_t M, int64_t K) {
  return active_isa() == Isa::Avx512Vnni && M >= kAmxMinM && K >= 64 && amx_enabled();
}
}  // namespace

void matmul_s8(const int8_t* a, int64_t sam, int64_t sak, const int8_t* b, int64_t sbk,
               int64_t sbn, int64_t M, int64_t K, int64_t N, int32_t* c) {
  if (M <= 0 || N <= 0) return;
  const IsaKernels& kr = kernels();
  const int64_t KB = (K + 3) / 4, lda = KB * 4;
  const bool amx = use_amx_for(M, K);
  const int64_t Mp = padded_rows(M, amx);
  Scratch<uint8_t> au(0, Mp * lda * kr.a_bytes);
  // B is packed panel by panel inside the GEMM tasks (GemmArgs::b_raw).
  kr.a_from_s8(a, M, K, sam, sak, au.get(), lda);
  if (Mp > M) std::memset(au.get() + M * lda * kr.a_bytes, 0, (Mp - M) * lda * kr.a_bytes);
  GemmArgs g{};
  g.a = au.get();
  g.lda = lda;
  g.b_raw = b;
  g.sbk = sbk;
  g.sbn = sbn;
  g.M = M;
  g.N = N;
  g.K = K;
  g.ldc = N;
  g.c_i32 = c;
  g.a_offset = kr.s8_offset;
  g.use_amx = amx;
  kr.gemm(g);
}

// Per-column epilogue operands padded to whole 16-column blocks, so the
// epilogue loads full vectors.
struct ColumnOperands {
  Scratch<int32_t> cs;
  Scratch<float> sw, bs;
  ColumnOperands(const int32_t* colsum, const float* scale_w, const float* bias, int64_t N)
      : cs(2, (N + 15) / 16 * 16), sw(3, (N + 15) / 16 * 16), bs(4, (N + 15) / 16 * 16) {
    const int64_t NP = (N + 15) / 16 * 16;
    std::memcpy(cs.get(), colsum, N * sizeof(int32_t));
    std::memcpy(sw.get(), scale_w, N * sizeof(float));
    if (bias)
      std::memcpy(bs.get(), bias, N * sizeof(float));
    else
      std::memset(bs.get(), 0, N * sizeof(float));
    for (int64_t n = N; n < NP; ++n) {
      cs[n] = 0;
      sw[n] = 0.0f;
      bs[n] = 0.0f;
    }
  }
};

// The float-output GEMM over quantized rows a (A format, row stride lda):
// y[m, n] (row stride N) = act(float(acc - zp[m] colsum[n]) sx[m] sw[n] + bias[n]).
GemmArgs float_gemm(const void* a, int64_t lda, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                    const ColumnOperands& cols, const int32_t* zp, const float* sx, int act, float* y,
                    bool amx, bool a_u7 = false) {
  GemmArgs g{};
  g.a_u7 = a_u7 ? 1 : 0;
  g.a = static_cast<const uint8_t*>(a);
  g.lda = lda;
  g.bp = packed;
  g.M = M;
  g.N = N;
  g.K = K;
  g.colsum = cols.cs.get();
  g.ldc = N;
  g.c_f32 = y;
  g.row_zp = zp;
  g.row_scale = sx;
  g.col_scale = cols.sw.get();
  g.bias = cols.bs.get();
  g.act = act;
  g.use_amx = amx;
  return g;
}

namespace {
void check_a_bits(int a_bits) {
  if (a_bits != 7 && a_bits != 8) throw std::invalid_argument("int8mm: a_bits must be 7 or 8");
}
}  // namespace

bool seven_bit_activations_faster() { return kernels().u7_faster != 0; }

void linear(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* packed,
            const int32_t* colsum, const float* scale_w, const float* bias, int64_t N, int act,
            float* y, int a_bits, const float* residual) {
  check_a_bits(a_bits);
  if (M <= 0 || N <= 0) return;
  const IsaKernels& kr = kernels();
  const bool u7 = a_bits == 7;
  const int64_t KB = (K + 3) / 4, lda = KB * 4, a_bytes = u7 ? 1 : kr.a_bytes;
  const ColumnOperands cols(colsum, scale_w, bias, N);
  const bool amx = use_amx_for(M, K);
  const int64_t Mp = padded_rows(M, amx);
  Scratch<uint8_t> q(0, Mp * lda * a_bytes);
  Scratch<float> sx(5, M);
  Scratch<int32_t> zp(6, M);
  if (u7)
    kr.quantize_rows_u7(x, M, K, ldx, q.get(), lda, sx.get(), zp.get());
  else
    kr.quantize_rows_a(x, M, K, ldx, q.get(), lda, sx.get(), zp.get());
  if (Mp > M) std::memset(q.get() + M * lda * a_bytes, 0, (Mp - M) * lda * a_bytes);
  GemmArgs g = float_gemm(q.get(), lda, packed, M, N, K, cols, zp.get(), sx.get(), act, y, amx, u7);
  g.residual = residual;
  kr.gemm(g);
}

void linear_b32(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* packed,
                const float* block_scale, const float* bias, int64_t N, int act, float* y) {
  if (M <= 0 || N <= 0) return;
  const IsaKernels& kr = kernels();
  const int64_t lda = (K + 3) / 4 * 4, nblk = (K + kQBlock - 1) / kQBlock;
  const int64_t NP = (N + 15) / 16 * 16;
  Scratch<float> bs(4, NP);  // padded to the 16-column blocks, zero there
  if (bias)
    std::memcpy(bs.get(), bias, N * sizeof(float));
  else
    std::memset(bs.get(), 0, N * sizeof(float));
  for (int64_t n = N; n < NP; ++n) bs[n] = 0.0f;
  Scratch<int8_t> q(0, M * lda);
  Scratch<float> sx(5, M * nblk);
  kr.quantize_rows_b32(x, M, K, ldx, q.get(), lda, sx.get());
  BlockGemmArgs g{};
  g.a = q.get();
  g.lda = lda;
  g.a_scale = sx.get();
  g.nblk = nblk;
  g.bp = packed;
  g.b_scale = block_scale;
  g.M = M;
  g.N = N;
  g.K = K;
  g.bias = bs.get();
  g.act = act;
  g.c = y;
  g.ldc = N;
  kr.gemm_b32(g);
}

void quantize_rows_b32(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* scale) {
  kernels().quantize_rows_b32(x, M, K, ldx, q, K, scale);
}

namespace {

// im2col of quantized NHWC images into GEMM rows [m0, m0 + rows) of A (the
// ISA's A element type T): row m = (b, oy, ox), tap t = (kh, kw) holds the C
// values of input pixel (oy * stride - pad + kh, ox * stride - pad + kw), or
// the image's zero point where that pixel lies in the padding.
struct Im2colCtx {
  const void* xq;
  const int32_t* zp;
  int64_t H, W, C, KH, KW, stride, pad, Ho, Wo, lda, m0;
  void* a;
};

template <typename T>
void im2col_rows(void* p, int64_t begin, int64_t end) {
  const Im2colCtx& c = *static_cast<const Im2colCtx*>(p);
  const T* xq = static_cast<const T*>(c.xq);
  T* a = static_cast<T*>(c.a);
  const int64_t K = c.KH * c.KW * c.C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t m = c.m0 + r;
    const int64_t b = m / (c.Ho * c.Wo), pix = m % (c.Ho * c.Wo);
    const int64_t oy = pix / c.Wo, ox = pix % c.Wo;
    const T* img = xq + b * c.H * c.W * c.C;
    const T zp = static_cast<T>(c.zp[b]);
    T* row = a + r * c.lda;
    // The taps of one kernel row that fall inside the image are consecutive
    // pixels, i.e. one contiguous run of NHWC input: one copy per kernel row
    // (a 7x7 stem over 3 channels: 7 copies of 21 values, not 49 of 3).
    const int64_t ix0 = ox * c.stride - c.pad;
    const int64_t kw_lo = std::min(c.KW, std::max<int64_t>(0, -ix0));
    const int64_t kw_hi = std::max(kw_lo, std::min(c.KW, c.W - ix0));
    for (int64_t kh = 0; kh < c.KH; ++kh) {
      const int64_t iy = oy * c.stride - c.pad + kh;
      T* dst = row + kh * c.KW * c.C;
      if (iy < 0 || iy >= c.H) {
        std::fill(dst, dst + c.KW * c.C, zp);
        continue;
      }
      std::fill(dst, dst + kw_lo * c.C, zp);
      std::memcpy(dst + kw_lo * c.C, img + (iy * c.W + ix0 + kw_lo) * c.C, (kw_hi - kw_lo) * c.C * sizeof(T));
      std::fill(dst + kw_hi * c.C, dst + c.KW * c.C, zp);
    }
    for (int64_t k = K; k < c.lda; ++k) row[k] = 0;
  }
}

}  // namespace

void conv2d_nhwc(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t KH,
                 int64_t KW, int64_t stride, int64_t pad, const int8_t* packed,
                 const int32_t* colsum, const float* scale_w, const float* bias, int64_t Cout,
                 int act, float* y, int a_bits) {
  check_a_bits(a_bits);
  const int64_t Ho = (H + 2 * pad - KH) / stride + 1, Wo = (W + 2 * pad - KW) / stride + 1;
  if (B <= 0 || Ho <= 0 || Wo <= 0 || Cout <= 0) return;
  const IsaKernels& kr = kernels();
  const bool u7 = a_bits == 7;
  const int a_bytes = u7 ? 1 : kr.a_bytes;
  const int64_t K = KH * KW * C, KB = (K + 3) / 4, lda = KB * 4, M = B * Ho * Wo;
  const ColumnOperands cols(colsum, scale_w, bias, Cout);
  // 1. Each image quantized as one row (per-image scale and zero point).
  const int64_t hwc = H * W * C;
  std::unique_ptr<void, FreeDeleter> xq(std::aligned_alloc(64, (B * hwc * a_bytes + 63) / 64 * 64));
  if (!xq) throw std::bad_alloc();
  Scratch<float> sx_img(5, B);
  Scratch<int32_t> zp_img(6, B);
  if (u7)
    kr.quantize_rows_u7(x, B, hwc, hwc, static_cast<uint8_t*>(xq.get()), hwc, sx_img.get(), zp_img.get());
  else
    kr.quantize_rows_a(x, B, hwc, hwc, xq.get(), hwc, sx_img.get(), zp_img.get());
  // 2. GEMM rows in chunks (~4 MiB of A): gather, then multiply; A stays in cache.
  const int64_t chunk = std::max<int64_t>(64, (int64_t{4} << 20) / (lda * a_bytes) / 64 * 64);
  Scratch<uint8_t> a(0, std::min(chunk, M) * lda * a_bytes);
  Scratch<float> sx(1, std::min(chunk, M));
  Scratch<int32_t> zp(7, std::min(chunk, M));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    Im2colCtx ctx{xq.get(), zp_img.get(), H, W, C, KH, KW, stride, pad, Ho, Wo, lda, m0, a.get()};
    tallow::parallel_for(rows, 16, a_bytes == 2 ? &im2col_rows<int16_t> : &im2col_rows<uint8_t>, &ctx);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = (m0 + r) / (Ho * Wo);
      sx[r] = sx_img[b];
      zp[r] = zp_img[b];
    }
    // rows are not padded to the AMX tiles' 16: the VNNI path
    kr.gemm(float_gemm(a.get(), lda, packed, rows, Cout, K, cols, zp.get(), sx.get(), act, y + m0 * Cout, false,
                       u7));
  }
}

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* scale,
                   int32_t* zp) {
  if (M <= 0) return;
  kernels().quantize_rows(x, M, K, ldx, q, K, scale, zp);
}

}  // namespace int8mm
}  // namespace tallow
