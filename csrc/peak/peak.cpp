// tallow._C.peak_kinds / peak_run: the register-only peak loops of peak.h,
// run on N threads at once (benchmarks/bench_peak.py turns the times into
// GFLOP/s and GOP/s). Baseline code: each loop is called only when the CPU
// supports its ISA (cpu_features), whatever TALLOW_ISA says, so the AVX2
// figures are measurable on an AVX-512 machine too.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/cpu_features.h"
#include "peak/peak.h"

namespace py = pybind11;

namespace tallow {
namespace {

using LoopFn = void (*)(int64_t);

struct PeakKind {
  const char* name;
  Isa isa;
  const char* unit;          // GFLOP/s or GOP/s
  const char* instructions;  // the mix, as the kernels would issue it
  double ops_per_iter;       // FLOP or OP one loop iteration does
  LoopFn fn;
};

const std::vector<PeakKind>& kinds() {
  static const std::vector<PeakKind> all = {
#if defined(__x86_64__) || defined(_M_X64)
      {"fp32_fma_avx2", Isa::Avx2, "GFLOP/s", "vfmadd231ps ymm (12 accumulators)", 192, peak_avx2::fp32_fma},
      {"int8_maddubs_avx2", Isa::Avx2, "GOP/s",
       "vpmaddubsw ymm + vpmaddwd ymm(ones) + vpaddd ymm (u8*s8, int16 saturating; 8 accumulators)", 512,
       peak_avx2::int8_maddubs},
      {"int16_maddwd_avx2", Isa::Avx2, "GOP/s",
       "vpmaddwd ymm + vpaddd ymm (int8 sign-extended to int16, exact; 8 accumulators)", 256,
       peak_avx2::int16_maddwd},
      {"fp32_fma_avx512", Isa::Avx512Vnni, "GFLOP/s", "vfmadd231ps zmm (16 accumulators)", 512,
       peak_avx512::fp32_fma},
      {"int8_vnni_avx512", Isa::Avx512Vnni, "GOP/s", "vpdpbusd zmm (u8*s8 -> s32; 16 accumulators)", 2048,
       peak_avx512::int8_vnni},
#endif
#if defined(TALLOW_HAVE_NEON_KERNELS)
      {"fp32_fma_neon", Isa::Neon, "GFLOP/s", "fmla v.4s (16 accumulators)", 128, peak_neon::fp32_fma},
      {"int8_sdot_neon", Isa::Neon, "GOP/s", "sdot v.4s, v.16b, v.16b (16 accumulators)", 512,
       peak_neon::int8_sdot},
#endif
  };
  return all;
}

const PeakKind& find(const std::string& name) {
  for (const PeakKind& k : kinds())
    if (name == k.name) return k;
  std::string known;
  for (const PeakKind& k : kinds()) known += (known.empty() ? "" : ", ") + std::string(k.name);
  throw py::value_error("peak_run: unknown kind '" + name + "' (this build has: " + known + ")");
}

// Runs the loop on `threads` threads at once; returns the wall time in seconds.
double run(const PeakKind& k, int64_t iters, int threads) {
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back(k.fn, iters);
  for (std::thread& th : pool) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void register_peak(py::module_& m) {
  m.def("peak_kinds", [] {
    py::list out;
    for (const PeakKind& k : kinds()) {
      py::dict d;
      d["name"] = k.name;
      d["isa"] = isa_name(k.isa);
      d["unit"] = k.unit;
      d["instructions"] = k.instructions;
      d["ops_per_iter"] = k.ops_per_iter;
      d["supported"] = isa_supported(k.isa);
      out.append(d);
    }
    return out;
  }, "The register-only peak loops of this build: name, isa, unit, instructions, ops_per_iter and "
     "whether this CPU supports them.");
  m.def("peak_run", [](const std::string& name, int64_t iters, int threads) {
    const PeakKind& k = find(name);
    if (iters < 1) throw py::value_error("peak_run: iters must be >= 1, got " + std::to_string(iters));
    if (threads < 1) throw py::value_error("peak_run: threads must be >= 1, got " + std::to_string(threads));
    if (!isa_supported(k.isa))
      throw py::value_error(std::string("peak_run: '") + k.name + "' needs ISA " + isa_name(k.isa) +
                            ", which this CPU does not support");
    py::gil_scoped_release release;
    return run(k, iters, threads);
  }, py::arg("kind"), py::arg("iters"), py::arg("threads") = 1,
     "Runs `iters` iterations of a peak loop on `threads` threads at once; returns the wall time "
     "in seconds (each thread does iters * ops_per_iter operations).");
}

}  // namespace tallow
