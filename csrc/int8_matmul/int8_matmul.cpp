// INT8 GEMM dispatcher (baseline x86-64 code): picks the kernels of the
// active ISA, allocates the operand buffers and runs quantize/pack + GEMM.
#include "int8_matmul/int8_matmul.h"

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
    case Isa::Avx512Vnni:
      return kKernelsAvx512;
    case Isa::Avx2:
      return kKernelsAvx2;
    default:
      return kKernelsScalar;
  }
}

// 64-byte aligned, uninitialised scratch (the kernels write every byte they read).
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> scratch(int64_t n) {
  size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

}  // namespace

void matmul_s8(const int8_t* a, int64_t sam, int64_t sak, const int8_t* b, int64_t sbk,
               int64_t sbn, int64_t M, int64_t K, int64_t N, int32_t* c) {
  if (M <= 0 || N <= 0) return;
  const IsaKernels& kr = kernels();
  const int64_t KB = (K + 3) / 4, NB = (N + 15) / 16, lda = KB * 4;
  auto au = scratch<uint8_t>(M * lda);
  auto bp = scratch<int8_t>(NB * KB * 64);
  auto colsum = scratch<int32_t>(NB * 16);
  kr.pack_b(b, K, N, sbk, sbn, bp.get(), colsum.get());
  kr.a_to_u8(a, M, K, sam, sak, au.get(), lda);
  GemmArgs g{};
  g.a = au.get();
  g.lda = lda;
  g.bp = bp.get();
  g.M = M;
  g.N = N;
  g.K = K;
  g.colsum = colsum.get();
  g.ldc = N;
  g.c_i32 = c;
  g.a_offset = 128;
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
  auto cs = scratch<int32_t>(NB * 16);
  auto sw = scratch<float>(NB * 16);
  auto bs = scratch<float>(NB * 16);
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
  auto q = scratch<uint8_t>(M * lda);
  auto sx = scratch<float>(M);
  auto zp = scratch<int32_t>(M);
  kr.quantize_rows(x, M, K, ldx, q.get(), lda, sx.get(), zp.get());
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
  kr.gemm(g);
}

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* scale,
                   int32_t* zp) {
  if (M <= 0) return;
  kernels().quantize_rows(x, M, K, ldx, q, K, scale, zp);
}

}  // namespace int8mm
}  // namespace tallow
