#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
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

struct Features {
  // x86-64
  bool fma = false, avx2 = false, avx512f = false, avx512dq = false,
       avx512bw = false, avx512vl = false, avx512_vnni = false;
  bool os_ymm = false, os_zmm = false;
  // aarch64 (Linux HWCAP names)
  bool asimd = false, asimddp = false, i8mm = false, bf16 = false, sve = false;
};

#if defined(TALLOW_ARCH_X86_64)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  // xgetbv with ecx = 0; written as asm so this file needs no -mxsave.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Features detect() {
  Features f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27);
  f.fma = ecx & (1u << 12);
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
    f.os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx2 = ebx & (1u << 5);
    f.avx512f = ebx & (1u << 16);
    f.avx512dq = ebx & (1u << 17);
    f.avx512bw = ebx & (1u << 30);
    f.avx512vl = ebx & (1u << 31);
    f.avx512_vnni = ecx & (1u << 11);
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
  f.asimd = hw & (1ul << 1);     // HWCAP_ASIMD
  f.asimddp = hw & (1ul << 20);  // HWCAP_ASIMDDP (SDOT / UDOT)
  f.sve = hw & (1ul << 22);      // HWCAP_SVE
  f.i8mm = hw2 & (1ul << 13);    // HWCAP2_I8MM (USDOT, SMMLA)
  f.bf16 = hw2 & (1ul << 14);    // HWCAP2_BF16
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
  f.asimd = true;  // every Apple silicon core
  f.asimddp = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
  f.bf16 = sysctl_flag("hw.optional.arm.FEAT_BF16");
  return f;
}
#else
Features detect() { return Features{}; }
#endif

const Features& features() {
  static const Features f = detect();
  return f;
}

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

std::mutex g_isa_mutex;
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
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return f.os_ymm && f.avx2 && f.fma;
    case Isa::Avx512Vnni:
      return f.os_zmm && f.avx512f && f.avx512dq && f.avx512bw && f.avx512vl && f.avx512_vnni &&
             f.fma;
    case Isa::Neon:
      return f.asimd && f.asimddp;
  }
  return false;
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
  std::lock_guard<std::mutex> lock(g_isa_mutex);
  g_active.store(static_cast<int>(wanted));
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<Isa>(v);
  {
    std::lock_guard<std::mutex> lock(g_isa_mutex);
    v = g_active.load();
    if (v < 0) {
      Isa chosen = best_isa();
      if (const char* env = std::getenv("TALLOW_ISA"); env && *env) {
        const Isa wanted = parse_isa(env);
        if (!isa_supported(wanted))
          throw std::runtime_error(not_available(std::string("TALLOW_ISA=") + env, chosen));
        chosen = wanted;
      }
      v = static_cast<int>(chosen);
      g_active.store(v);
    }
  }
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
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(f.fma, "fma");
  add(f.avx2, "avx2");
  add(f.avx512f, "avx512f");
  add(f.avx512dq, "avx512dq");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512_vnni, "avx512_vnni");
  add(!f.os_zmm && f.avx512f, "(os-disabled-zmm)");
  add(f.asimd, "asimd");
  add(f.asimddp, "asimddp");
  add(f.i8mm, "i8mm");
  add(f.bf16, "bf16");
  add(f.sve, "sve");
  return s;
}

}  // namespace tallow
