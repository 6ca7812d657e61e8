#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#define TALLOW_ARCH_X86_64 1
#include <cpuid.h>
#elif defined(__aarch64__)
#define TALLOW_ARCH_AARCH64 1
#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#endif

namespace tallow {
namespace {

// CPU features, by the names tallow reports (cpu_feature_string) and
// requires per tier (isa_requirements): Linux /proc/cpuinfo names where one
// exists ("sse3" is cpuinfo's "pni"). os_ymm / os_zmm: the OS saves the YMM /
// ZMM (and opmask) registers across context switches (XCR0).
enum Feature : int {
  // x86-64
  kSse3, kSsse3, kSse4_1, kSse4_2, kPopcnt, kXsave, kAvx, kF16c, kFma, kAvx2, kBmi1, kBmi2,
  kAvx512f, kAvx512dq, kAvx512bw, kAvx512vl, kAvx512Vnni, kOsYmm, kOsZmm,
  // aarch64 (Linux HWCAP names)
  kAsimd, kAsimddp, kI8mm, kBf16, kSve,
  kFeatureCount
};

constexpr const char* kFeatureNames[] = {
    "sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "xsave", "avx", "f16c", "fma", "avx2", "bmi1", "bmi2",
    "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "os_ymm", "os_zmm",
    "asimd", "asimddp", "i8mm", "bf16", "sve",
};
static_assert(sizeof(kFeatureNames) / sizeof(kFeatureNames[0]) == kFeatureCount, "one name per Feature");

struct Features {
  bool has[kFeatureCount] = {};
};

// What each tier's files may execute: every instruction-set extension their
// compile flags enable, the implied ones included (CMakeLists.txt's
// TALLOW_*_FLAGS; tests/test_package.py compares the two through the
// compiler's predefined macros), plus the OS state those registers need.
//   avx2:        -mavx2 -mfma -mf16c -mbmi2 (-mavx2 implies avx, sse3..sse4_2,
//                popcnt, xsave; crc32 is sse4_2)
//   avx512_vnni: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni
//                -mfma -mbmi2 (-mavx512f implies avx2 and below, but not f16c)
//   neon:        -march=armv8.2-a+dotprod. Baseline NEON is asimd; the v8.1
//                and v8.2 extensions the compiler may also use (LSE atomics,
//                RDM, CRC32) are mandatory in every core that has the
//                optional dot product, so asimddp covers them.
std::vector<Feature> requirements(Isa isa) {
  const std::initializer_list<Feature> x86_base = {kSse3, kSsse3, kSse4_1, kSse4_2, kPopcnt, kXsave, kAvx, kOsYmm};
  std::vector<Feature> req;
  auto add = [&](std::initializer_list<Feature> list) {
    for (Feature f : list) req.push_back(f);
  };
  switch (isa) {
    case Isa::Scalar:
      break;
    case Isa::Avx2:
      add(x86_base);
      add({kAvx2, kFma, kF16c, kBmi2});
      break;
    case Isa::Avx512Vnni:
      add(x86_base);
      add({kAvx2, kFma, kBmi2, kAvx512f, kAvx512dq, kAvx512bw, kAvx512vl, kAvx512Vnni, kOsZmm});
      break;
    case Isa::Neon:
      add({kAsimd, kAsimddp});
      break;
  }
  return req;
}

#if defined(TALLOW_ARCH_X86_64)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  // xgetbv with ecx = 0; written as asm so this file needs no -mxsave.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Features detect() {
  Features f;
  bool* has = f.has;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  has[kSse3] = ecx & (1u << 0);
  has[kSsse3] = ecx & (1u << 9);
  has[kFma] = ecx & (1u << 12);
  has[kSse4_1] = ecx & (1u << 19);
  has[kSse4_2] = ecx & (1u << 20);
  has[kPopcnt] = ecx & (1u << 23);
  has[kXsave] = ecx & (1u << 26);
  const bool osxsave = ecx & (1u << 27);
  has[kAvx] = ecx & (1u << 28);
  has[kF16c] = ecx & (1u << 29);
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    has[kOsYmm] = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
    has[kOsZmm] = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    has[kBmi1] = ebx & (1u << 3);
    has[kAvx2] = ebx & (1u << 5);
    has[kBmi2] = ebx & (1u << 8);
    has[kAvx512f] = ebx & (1u << 16);
    has[kAvx512dq] = ebx & (1u << 17);
    has[kAvx512bw] = ebx & (1u << 30);
    has[kAvx512vl] = ebx & (1u << 31);
    has[kAvx512Vnni] = ecx & (1u << 11);
  }
  return f;
}
#elif defined(TALLOW_ARCH_AARCH64) && defined(__linux__)
Features detect() {
  // Bits from the kernel's uapi <asm/hwcap.h>, spelled out so an older libc's
  // headers cannot hide them.
  Features f;
  const unsigned long hw = getauxval(AT_HWCAP);
  const unsigned long hw2 = getauxval(AT_HWCAP2);
  f.has[kAsimd] = hw & (1ul << 1);     // HWCAP_ASIMD
  f.has[kAsimddp] = hw & (1ul << 20);  // HWCAP_ASIMDDP (SDOT / UDOT)
  f.has[kSve] = hw & (1ul << 22);      // HWCAP_SVE
  f.has[kI8mm] = hw2 & (1ul << 13);    // HWCAP2_I8MM (USDOT, SMMLA)
  f.has[kBf16] = hw2 & (1ul << 14);    // HWCAP2_BF16
  return f;
}
#elif defined(TALLOW_ARCH_AARCH64) && defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int v = 0;
  size_t size = sizeof(v);
  return sysctlbyname(name, &v, &size, nullptr, 0) == 0 && v != 0;
}
Features detect() {
  Features f;
  f.has[kAsimd] = true;  // every Apple silicon core
  f.has[kAsimddp] = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.has[kI8mm] = sysctl_flag("hw.optional.arm.FEAT_I8MM");
  f.has[kBf16] = sysctl_flag("hw.optional.arm.FEAT_BF16");
  return f;
}
#else
Features detect() { return Features{}; }
#endif

const Features& features() {
  static const Features f = detect();
  return f;
}

// At load, for the same reason as the thread pool (thread_pool.cpp): a fork
// must never copy features()'s static mid-initialisation.
[[maybe_unused]] const bool g_features_at_load = (features(), true);

// Every name any build knows; whether this build has the tier is checked
// separately, so "avx2" on aarch64 says "not available", not "unknown".
Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512_vnni" || name == "avx512") return Isa::Avx512Vnni;
  if (name == "neon") return Isa::Neon;
  throw std::invalid_argument("unknown ISA '" + name +
                              "': expected one of scalar, avx2, avx512_vnni, neon");
}

// Position of isa in arch_isas(), or -1 when this build has no such tier.
int rank(Isa isa) {
  const std::vector<Isa> tiers = arch_isas();
  for (size_t i = 0; i < tiers.size(); ++i)
    if (tiers[i] == isa) return static_cast<int>(i);
  return -1;
}

std::string not_available(const std::string& what, Isa best) {
  return what + " but this CPU supports at most '" + isa_name(best) + "' (" + arch_name() +
         " build: " + [] {
           std::string s;
           for (Isa t : arch_isas()) s += (s.empty() ? "" : ", ") + std::string(isa_name(t));
           return s;
         }() + ")";
}

// -1 until the first active_isa() or set_isa(). No mutex: a lock held by
// another thread at fork() would stay locked in the child forever.
std::atomic<int> g_active{-1};

}  // namespace

std::vector<Isa> arch_isas() {
#if defined(TALLOW_ARCH_X86_64)
  return {Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni};
#elif defined(TALLOW_ARCH_AARCH64) && defined(TALLOW_HAVE_NEON_KERNELS)
  return {Isa::Scalar, Isa::Neon};
#else
  return {Isa::Scalar};
#endif
}

bool isa_supported(Isa isa) {
  if (rank(isa) < 0) return false;
  const Features& f = features();
  for (Feature x : requirements(isa))
    if (!f.has[x]) return false;
  return true;
}

std::vector<std::string> isa_requirements(Isa isa) {
  std::vector<std::string> names;
  for (Feature x : requirements(isa)) names.emplace_back(kFeatureNames[x]);
  return names;
}

Isa best_isa() {
  const std::vector<Isa> tiers = arch_isas();
  for (size_t i = tiers.size(); i-- > 0;)
    if (isa_supported(tiers[i])) return tiers[i];
  return Isa::Scalar;
}

void set_isa(const std::string& name) {
  const Isa wanted = parse_isa(name);
  if (!isa_supported(wanted))
    throw std::runtime_error(not_available("ISA '" + name + "' was requested", best_isa()));
  g_active.store(static_cast<int>(wanted));
}

Isa active_isa() {
  int v = g_active.load();
  if (v >= 0) return static_cast<Isa>(v);
  Isa chosen = best_isa();
  if (const char* env = std::getenv("TALLOW_ISA"); env && *env) {
    const Isa wanted = parse_isa(env);
    if (!isa_supported(wanted))
      throw std::runtime_error(not_available(std::string("TALLOW_ISA=") + env, chosen));
    chosen = wanted;
  }
  // Racing first calls compute the same choice; a set_isa() that got in
  // first wins.
  v = static_cast<int>(chosen);
  int expected = -1;
  if (!g_active.compare_exchange_strong(expected, v)) v = expected;
  return static_cast<Isa>(v);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512_vnni";
    case Isa::Neon: return "neon";
  }
  return "unknown";
}

const char* arch_name() {
#if defined(TALLOW_ARCH_X86_64)
  return "x86_64";
#elif defined(TALLOW_ARCH_AARCH64)
  return "aarch64";
#else
  return "other";
#endif
}

std::string cpu_feature_string() {
  const Features& f = features();
  std::string s;
  for (int x = 0; x < kFeatureCount; ++x) {
    // The OS-state pseudo-features are reported only when missing, where
    // they explain why a tier the CPU has is not used.
    if (x == kOsYmm || x == kOsZmm || !f.has[x]) continue;
    if (!s.empty()) s += ' ';
    s += kFeatureNames[x];
  }
  if (f.has[kAvx] && !f.has[kOsYmm]) s += " (os-disabled-ymm)";
  if (f.has[kAvx512f] && !f.has[kOsZmm]) s += " (os-disabled-zmm)";
  return s;
}

}  // namespace tallow
