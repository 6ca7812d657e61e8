// Host-side entry points of the CUDA kernels (tallow._C_cuda).
//
// Plain C++ (no CUDA or pybind11 headers): bindings.cpp is compiled by the
// host compiler and calls these; the .cu files define them. Every pointer is
// a device pointer, every call is asynchronous on `stream` (a cudaStream_t
// passed as an integer, 0 = the legacy default stream) and returns a CUDA
// error code (0 = success) from the launch.
#pragma once

#include <cstdint>

namespace tallow {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Runtime facts: number of visible devices (0 when no driver / no GPU), and
// the compute capability and SM count of `device`.
int device_count(int* err);
int device_info(int device, int* major, int* minor, int* sms);
const char* error_string(int err);

// ---------------------------------------------------------------- attention
// q [B, H, Lq, D], k/v [B, H, Lk, D] with element strides over (B, H, L) and
// unit stride over D; out likewise. mask: uint8 [B, Lk] (row stride
// mask_sb), nonzero = padding, or null. causal aligned bottom-right.
// `splits` > 1 splits the key range (flash-decoding); then `workspace` must
// hold B*H*Lq*splits*(D + 2) floats.
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const uint8_t* mask;
  int64_t B, H, Lq, Lk, D;
  int64_t sq[3], sk[3], sv[3], so[3];
  int64_t mask_sb;
  int dtype;
  bool causal;
  float scale;
  int splits;
  float* workspace;
};
int attention_forward(const AttnArgs& a, uintptr_t stream);
// Key-range splits the decode path would use for this shape (1 = none).
int attention_splits(int64_t bh, int64_t lq, int64_t lk, int sms);

// ---------------------------------------------------------------- int8
// x float32 [M, K] (row stride ldx) -> xq int8 [M, K] holding q - 128,
// scale float32 [M], zp int32 [M] (tallow.ops.quantize_rows_ref's maths).
int int8_quantize_rows(const float* x, int8_t* xq, float* scale, int32_t* zp, int64_t M, int64_t K,
                       int64_t ldx, uintptr_t stream);

// C[M, N] = A[M, K] · W[N, K]^T with s8 inputs and s32 accumulation.
// linear == false: C is int32 (wrapping), epilogue pointers unused.
// linear == true: A holds q - 128; C is float32:
//   act(float(acc + (128 - zp[m]) colsum[n]) * (sx[m] sw[n]) + bias[n]).
struct GemmArgs {
  const int8_t* a;
  const int8_t* w;
  void* c;
  int64_t M, N, K, lda, ldw, ldc;
  bool linear;
  int act;  // 0 none, 1 relu, 2 gelu_erf, 3 gelu_tanh
  const float* sx;
  const int32_t* zp;
  const int32_t* colsum;
  const float* sw;
  const float* bias;  // may be null
  int path;           // 0 auto, 1 force mma.sync, 2 force dp4a
};
int int8_gemm(const GemmArgs& g, uintptr_t stream);

// ---------------------------------------------------------------- preprocess
// packed uint8 HWC images, meta int64 [N, 8] (src_offset, in_h, in_w,
// vfirst, taps_x_offset, kx, taps_y_offset, ky), taps int32 (see
// tallow.ops.preprocess.gpu_plan), lut float32 [3, 256];
// out [N, 3, crop, crop] float32 or float16.
int preprocess_resample(const uint8_t* packed, const int64_t* meta, const int32_t* taps, const float* lut,
                        void* out, int64_t n, int64_t crop, int out_dtype, uintptr_t stream);

}  // namespace cuda
}  // namespace tallow
