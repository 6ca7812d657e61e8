#include "cpu_features.h"

#include <cpuid.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace tallow {
namespace {

struct Features {
  bool fma = false, avx2 = false, avx512f = false, avx512dq = false,
       avx512bw = false, avx512vl = false, avx512_vnni = false;
  bool os_ymm = false, os_zmm = false;
};

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

const Features& features() {
  static const Features f = detect();
  return f;
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512_vnni" || name == "avx512") return Isa::Avx512Vnni;
  throw std::invalid_argument("unknown ISA '" + name +
                              "': expected one of scalar, avx2, avx512_vnni");
}

std::mutex g_isa_mutex;
std::atomic<int> g_active{-1};

}  // namespace

Isa best_isa() {
  const Features& f = features();
  if (f.os_zmm && f.avx512f && f.avx512dq && f.avx512bw && f.avx512vl &&
      f.avx512_vnni && f.fma)
    return Isa::Avx512Vnni;
  if (f.os_ymm && f.avx2 && f.fma) return Isa::Avx2;
  return Isa::Scalar;
}

void set_isa(const std::string& name) {
  const Isa wanted = parse_isa(name);
  if (static_cast<int>(wanted) > static_cast<int>(best_isa()))
    throw std::runtime_error(std::string("ISA '") + name +
                             "' was requested but this CPU supports at most '" +
                             isa_name(best_isa()) + "'");
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
        if (static_cast<int>(wanted) > static_cast<int>(chosen))
          throw std::runtime_error(std::string("TALLOW_ISA=") + env +
                                   " but this CPU supports at most '" +
                                   isa_name(chosen) + "'");
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
  }
  return "unknown";
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
  return s;
}

}  // namespace tallow
