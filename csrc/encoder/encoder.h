// Native BERT-family encoder forward: ISA-neutral declarations.
//
// One call runs a whole forward pass (embeddings, every layer, pooling) on
// tallow's thread pool, with no Python and no torch op in between, over a
// *packed* batch: the sequences' tokens back to back ([T] ids, cumulative
// offsets cu[0..B], as FlashAttention's varlen API), so a batch of mixed
// lengths costs what its tokens cost (no padding rows).
//
// Per layer (x: [T, H] hidden states, row-major):
//   qkv  = x Wqkv^T + bqkv                    [T, 3H]  (one GEMM, q | k | v)
//   ctx  = attention per sequence on views of qkv      [T, H]  (heads side by side)
//   x    = LayerNorm(x + ctx Wo^T + bo)
//   f    = act(x W1^T + b1)                   [T, F]  (GELU fused in the GEMM epilogue)
//   x    = LayerNorm(x + f W2^T + b2)
// Linears are fp32 (sgemm below: weights packed once into 16-column panels)
// or INT8 (int8mm::linear: the dynamic activation quantization is fused into
// its A-operand pass, bias and activation into its epilogue).
//
// Plain structs and function pointers only (see csrc/common/simd.h's ODR note).
#pragma once

#include <cstdint>

namespace tallow {
namespace encoder {

// fp32 weights packed for sgemm: panel p holds columns [16p, 16p + 16) of
// W^T, k-major: packed[(p * K + k) * 16 + j] = W[16p + j][k], zero for
// 16p + j >= N. Panels of 16 columns on every ISA (two ymm, one zmm, four
// NEON q registers), so a packed weight does not depend on the active tier.
constexpr int kPanel = 16;

struct SgemmArgs {
  const float* a;  // [M, K], row stride lda
  int64_t lda;
  const float* bp;  // packed [ceil(N / 16)][K][16]
  const float* bias;  // [N] or null
  float* c;  // [M, N], row stride ldc
  int64_t ldc;
  int64_t M, N, K;
  int act;  // int8mm::Act codes: 0 none, 1 relu, 2 gelu_erf, 3 gelu_tanh
};

struct IsaKernels {
  // c = act(a b + bias) over the thread pool.
  void (*sgemm)(const SgemmArgs& args);
  // Rows [0, M) of [M, H]: out = LayerNorm(x + add) * gamma + beta (add may
  // be null; out may alias x). Two-pass mean/variance in float32, as torch.
  void (*add_layer_norm)(const float* x, const float* add, int64_t M, int64_t H, const float* gamma,
                         const float* beta, float eps, float* out);
  // Rows of [M, H]: out = gamma * (x * rsqrt(mean(x^2) + eps)) (out may alias x).
  void (*rms_norm)(const float* x, int64_t M, int64_t H, const float* gamma, float eps, float* out);
  // out[M, F] = silu(gu[:, :F]) * gu[:, F:] (gu [M, 2F], a fused gate|up projection).
  void (*swiglu)(const float* gu, int64_t M, int64_t F, float* out);
};

extern const IsaKernels kKernelsAvx512;
extern const IsaKernels kKernelsAvx2;
extern const IsaKernels kKernelsNeon;
extern const IsaKernels kKernelsScalar;

const IsaKernels& kernels();  // of the active ISA

// Packs W [N, K] (row-major float32) into `out` (ceil(N/16) * K * 16 floats).
void pack_weight(const float* w, int64_t N, int64_t K, float* out);

}  // namespace encoder
}  // namespace tallow
