// INT8 GEMM: ISA-neutral declarations shared by the dispatcher and the
// per-ISA kernel files (plain structs and function pointers only: see the
// ODR rule in csrc/common/simd.h).
//
// Packed weight layout (the "B" operand, K x N, e.g. a Linear weight [N, K]
// transposed): [NB][KB][16][4] int8 with NB = ceil(N / 16), KB = ceil(K / 4):
// block nb, k-group kb holds, for 16 consecutive output channels n, the 4
// consecutive k values B[4kb .. 4kb+3, n] in one dword — exactly the operand
// of vpdpbusd (one zmm of 16 int32 lanes). Padding at the K and N edges is 0,
// so the inner loop has no tails.
#pragma once

#include <cstdint>

namespace tallow {
namespace int8mm {

enum Act : int { kActNone = 0, kActRelu = 1, kActGeluErf = 2, kActGeluTanh = 3 };

struct GemmArgs {
  // A: M rows in the ISA's A format (IsaKernels::a_bytes): u8 (1 byte per k)
  // or int16 (2 bytes per k, AVX2); row r at element r * lda; lda >= 4 * KB
  // elements. Elements at k >= K are multiplied by the zero padding of B, so
  // any value is fine there.
  const uint8_t* a;
  int64_t lda;
  const int8_t* bp;  // packed B, [NB][KB][16][4] (with colsum), or null:
  // raw B (element (k, n) at b_raw[k * sbk + n * sbn]) is packed panel by
  // panel inside the GEMM tasks (fused).
  const int8_t* b_raw;
  int64_t sbk, sbn;
  int64_t M, N, K;
  const int32_t* colsum;  // [NB * 16] column sums of packed B (zero padded)
  int64_t ldc;
  // Integer mode (c_i32 != nullptr): C = acc - a_offset * colsum (wrapping int32).
  int32_t* c_i32;
  int32_t a_offset;
  // Float mode (c_f32 != nullptr):
  //   C = float(acc - row_zp[m] * colsum[n]) * (row_scale[m] * col_scale[n]) + bias[n]
  //       (+ residual[m * ldc + n] when residual is set), then act.
  float* c_f32;
  const float* residual;
  const int32_t* row_zp;     // [M]
  const float* row_scale;    // [M]
  const float* col_scale;    // [NB * 16]
  const float* bias;         // [NB * 16]
  int act;
  // A is u8 (1 byte per k, whatever IsaKernels::a_bytes says) with every
  // value in [0, 127] (quantize_rows_u7): AVX2 multiplies it with
  // vpmaddubsw, exact for 7-bit A, instead of its int16 path; the other tiers
  // read it as any u8 A.
  int a_u7;
  // Use the AMX tile path (AVX-512 kernels only; the dispatcher sets it when
  // the CPU and OS allow AMX-INT8 and the A buffer has its rows padded to a
  // multiple of 16 with zeros).
  int use_amx;
};

// Block quantization (linear_b32), for LLM decoders: weights and activations
// both with one scale per kQBlock consecutive k (as llama.cpp's Q8_0), symmetric
// s8 in [-127, 127]. Their hidden states have a few channels far larger than
// the rest, which one scale per activation row cannot hold, and weights that
// came from 4-bit GGUF blocks lose their small blocks' precision in one scale
// per output channel.
constexpr int64_t kQBlock = 32;

struct BlockGemmArgs {
  const int8_t* a;        // [M][lda] s8 in [-127, 127], zero from K to lda = 4 * KB
  int64_t lda;
  const float* a_scale;   // [M][nblk], nblk = ceil(K / kQBlock)
  int64_t nblk;
  const int8_t* bp;       // packed B as GemmArgs::bp, s8 in [-127, 127]
  const float* b_scale;   // [NB][nblk][16]: column n's scale for block blk at (n / 16, blk, n % 16)
  int64_t M, N, K;
  const float* bias;      // [NB * 16]
  int act;
  float* c;  // [M][ldc]
  int64_t ldc;
};

struct IsaKernels {
  // Bytes per element of the GEMM's A operand: 1 (u8, fed to vpdpbusd and its
  // emulations) or 2 (int16, AVX2's vpmaddwd path: exact, no saturation).
  int a_bytes;
  // What int8_matmul subtracts per column sum: the A format stores a + s8_offset
  // for signed int8 a (128 for u8, 0 for int16).
  int32_t s8_offset;
  // out[m][k] = a[m * sm + k * sk] + s8_offset in the A format (k < K), 0 for K <= k < ldo.
  void (*a_from_s8)(const int8_t* a, int64_t M, int64_t K, int64_t sm, int64_t sk, void* out,
                    int64_t ldo);
  // Dynamic asymmetric u8 quantization per row (see python/tallow/ops/int8_matmul.py);
  // q has row stride ldq >= K, bytes K..ldq-1 are zeroed. x rows at x + m * ldx.
  void (*quantize_rows)(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q,
                        int64_t ldq, float* scale, int32_t* zp);
  // The same quantization written in the A format (q as u8 or as int16), for the GEMM.
  void (*quantize_rows_a)(const float* x, int64_t M, int64_t K, int64_t ldx, void* q,
                          int64_t ldq, float* scale, int32_t* zp);
  void (*gemm)(const GemmArgs& args);
  // Per row, per block of kQBlock k: scale = max|x| / 127 (0 for a block of
  // zeros), q = clamp(round_half_even(x * (127 / max|x|)), -127, 127).
  // q [M][ldq] s8 (zero from K to ldq), scale [M][ceil(K / kQBlock)].
  void (*quantize_rows_b32)(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                            float* scale);
  // C[m, n] = act(sum_blk a_scale[m, blk] * b_scale[n, blk] * sum_{k in blk} a[m, k] B[k, n] + bias[n]).
  void (*gemm_b32)(const BlockGemmArgs& args);
  // quantize_rows with 127 levels instead of 255 (q, zp in [0, 127]), u8 out:
  // the A of GemmArgs::a_u7.
  void (*quantize_rows_u7)(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q, int64_t ldq,
                           float* scale, int32_t* zp);
  // 1 where a 7-bit A multiplies faster than this tier's usual A (AVX2).
  int u7_faster;
};

extern const IsaKernels kKernelsAvx512;
extern const IsaKernels kKernelsAvx2;
extern const IsaKernels kKernelsNeon;  // aarch64 only (int8_matmul_neon.cpp)
extern const IsaKernels kKernelsScalar;

// The dispatcher (int8_matmul.cpp, baseline code): picks the ISA from
// tallow::active_isa(), allocates scratch and calls the kernels above.

// C[M, N] (contiguous int32) = A[M, K] (int8, any strides) x B[K, N] (int8, any strides).
void matmul_s8(const int8_t* a, int64_t sam, int64_t sak, const int8_t* b, int64_t sbk,
               int64_t sbn, int64_t M, int64_t K, int64_t N, int32_t* c);

// y[M, N] (contiguous float32) = int8 linear of x[M, K] (row stride ldx, unit
// column stride) with prepacked weights; bias may be null. a_bits: 8, or 7
// (activations quantized to [0, 127]: half the resolution, and on AVX2 the
// vpmaddubsw GEMM, 1.4x faster; see GemmArgs::a_u7). residual (like y, or
// null) is added before the activation: y = act(linear(x) + residual), a
// ResNet block's last convolution with its shortcut.
void linear(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* packed,
            const int32_t* colsum, const float* scale_w, const float* bias, int64_t N, int act,
            float* y, int a_bits = 8, const float* residual = nullptr);

// Whether the active ISA multiplies 7-bit activations faster than 8-bit ones
// (AVX2: see GemmArgs::a_u7); callers that can afford the bit (convolutions:
// ResNet-50's features keep cosine >= 0.9998 to fp32) ask for a_bits = 7 there.
bool seven_bit_activations_faster();

// y [B, Ho, Wo, Cout] (NHWC, contiguous float32) = act(conv(x) + bias), x
// [B, H, W, C] NHWC contiguous float32; weights prepacked like linear's with
// K = KH * KW * C in (kh, kw, c) order. Activations are quantized per image
// (one u8 scale and zero point for each image: the 3x3 taps of a GEMM row
// come from different pixels, so per-row scales cannot be shared with the
// quantized input), gathered (im2col) into GEMM rows, padding taps holding
// the zero point, then multiplied on the INT8 GEMM with the fused epilogue.
// Ho = (H + 2 pad - KH) / stride + 1 (same for W).
void conv2d_nhwc(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t KH,
                 int64_t KW, int64_t stride, int64_t pad, const int8_t* packed,
                 const int32_t* colsum, const float* scale_w, const float* bias, int64_t Cout,
                 int act, float* y, int a_bits = 8);

// AMX-INT8 (Sapphire Rapids and later): usable = CPU + OS support and the
// process got permission (arch_prctl ARCH_REQ_XCOMP_PERM); enabled = usable
// and not switched off (TALLOW_AMX=0 or set_amx_enabled(false)).
bool amx_usable();
bool amx_enabled();
void set_amx_enabled(bool on);

// y [M, N] = block-quantized linear of x [M, K] (see kQBlock): weights packed
// as linear()'s with their block scales [NB][nblk][16] (zero past N), bias [N] or null.
void linear_b32(const float* x, int64_t ldx, int64_t M, int64_t K, const int8_t* packed,
                const float* block_scale, const float* bias, int64_t N, int act, float* y);

// The block quantization step alone (for tests): q [M, K] s8, scale [M, ceil(K / kQBlock)].
void quantize_rows_b32(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* scale);

// The quantization step alone (for tests): q [M, K] contiguous u8.
void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* q, float* scale,
                   int32_t* zp);

}  // namespace int8mm
}  // namespace tallow
