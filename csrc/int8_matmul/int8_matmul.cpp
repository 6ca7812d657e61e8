// INT8 GEMM dispatcher (baseline code of the target architecture): picks the kernels of the
// active ISA, allocates the operand buffers and runs quantize/pack + GEMM.
#include "int8_matmul/int8_matmul.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common/cpu_features.h"

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
  static const bool usable = detect_amx();
  return usable;
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
  Scratch<uint8_t> au(0, Mp * lda);
  // B is packed panel by panel inside the GEMM tasks (GemmArgs::b_raw).
  kr.a_to_u8(a, M, K, sam, sak, au.get(), lda);
  if (Mp > M) std::memset(au.get() + M * lda, 0, (Mp - M) * lda);
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
  g.a_offset = 128;
  g.use_amx = amx;
  kr.gemm(g);
}

void linear(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* packed,
            const int32_t* colsum, const float* scale_w, const float* bias, int64_t N, int act,
            float* y) {
  if (M <= 0 || N <= 0) return;
  const IsaKernels& kr = kernels();
  const int64_t KB = (K + 3) / 4, NB = (N + 15) / 16, lda = KB * 4;
  // Per-column epilogue operands padded to whole 16-column blocks, so the
  // epilogue loads full vectors.
  Scratch<int32_t> cs(2, NB * 16);
  Scratch<float> sw(3, NB * 16);
  Scratch<float> bs(4, NB * 16);
  std::memcpy(cs.get(), colsum, N * sizeof(int32_t));
  std::memcpy(sw.get(), scale_w, N * sizeof(float));
  if (bias)
    std::memcpy(bs.get(), bias, N * sizeof(float));
  else
    std::memset(bs.get(), 0, N * sizeof(float));
  for (int64_t n = N; n < NB * 16; ++n) {
    cs[n] = 0;
    sw[n] = 0.0f;
    bs[n] = 0.0f;
  }
  const bool amx = use_amx_for(M, K);
  const int64_t Mp = padded_rows(M, amx);
  Scratch<uint8_t> q(0, Mp * lda);
  Scratch<float> sx(5, M);
  Scratch<int32_t> zp(6, M);
  kr.quantize_rows(x, M, K, ldx, q.get(), lda, sx.get(), zp.get());
  if (Mp > M) std::memset(q.get() + M * lda, 0, (Mp - M) * lda);
  GemmArgs g{};
  g.a = q.get();
  g.lda = lda;
  g.bp = packed;
  g.M = M;
  g.N = N;
  g.K = K;
  g.colsum = cs.get();
  g.ldc = N;
  g.c_f32 = y;
  g.row_zp = zp.get();
  g.row_scale = sx.get();
  g.col_scale = sw.get();
  g.bias = bs.get();
  g.act = act;
  g.use_amx = amx;
  kr.gemm(g);
}

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* scale,
                   int32_t* zp) {
  if (M <= 0) return;
  kernels().quantize_rows(x, M, K, ldx, q, K, scale, zp);
}

}  // namespace int8mm
}  // namespace tallow
