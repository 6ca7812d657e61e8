// Native fp32 convolution for CNN forwards (ResNet): ISA-neutral declarations.
//
// A convolution over channels-last (NHWC) activations is a GEMM whose A rows
// are output pixels and whose k runs over (kernel row, kernel column, input
// channel) — an *implicit* GEMM: no im2col buffer. For output pixel (b, oh,
// ow) and kernel row i, the KW * C inputs it multiplies are contiguous in an
// NHWC buffer that already holds the zero padding, starting at
//   x + ((b * XH + oh * stride + i) * XW + ow * stride) * C
// (XH, XW: the buffer's padded height and width), so a row of A is KH
// contiguous segments of KW * C floats, SEG = XW * C floats apart. A 1x1
// convolution is one segment (with stride 2, the downsampling shortcut reads
// every other pixel in place).
//
// The weights are packed as encoder::pack_weight packs a linear's (16-column
// panels, k-major) from W [N, KH * KW * C] = the torch weight [N, C, KH, KW]
// permuted to [N, KH, KW, C]. The epilogue fuses bias, an optional residual
// and ReLU: y = act(conv(x) + bias + res). The output is NHWC and may be the
// interior of a buffer with a zero border of `y_pad` pixels (the next 3x3
// convolution's padded input, written in place: no copy); its border is the
// caller's to zero.
//
// Plain structs and function pointers only (see csrc/common/simd.h's ODR note).
#pragma once

#include <cstdint>

namespace tallow {
namespace vision {

struct ConvArgs {
  const float* x;      // NHWC input buffer [B, XH, XW, C], padding included
  int64_t XH, XW, C;
  int64_t B, OH, OW;   // output pixels
  int64_t KH, KW, stride;
  const float* bp;     // packed weights [ceil(N / 16)][KH * KW * C][16]
  const float* bias;   // [N] or null
  const float* res;    // residual [B * OH * OW, N] (unpadded) or null
  float* y;            // NHWC output buffer [B, OH + 2 y_pad, OW + 2 y_pad, N]
  int64_t y_pad;
  int64_t N;
  int act;             // 0 none, 1 relu
};

// A 3x3, stride-1, padding-1 convolution by Winograd F(m x m, 3 x 3)
// (winograd.h): x is the padded NHWC input as for ConvArgs (XH = OH + 2, XW =
// OW + 2); the weights are transformed and packed per tile position: up
// holds a^2 packed weights [ceil(N / 16)][C][16], one after the other
// (a = m + 2). v and mm are the caller's scratch: a^2 * T * C and
// a^2 * T * N floats, T = B * ceil(OH / m) * ceil(OW / m) tiles.
struct WinogradArgs {
  const float* x;
  int64_t XH, XW, C;
  int64_t B, OH, OW;
  int m;  // 2 or 4
  const float* up;
  const float* bias;  // [N] or null
  float* y;           // as ConvArgs::y (with y_pad)
  int64_t y_pad;
  int64_t N;
  int act;
  float* v;
  float* mm;
};

struct IsaKernels {
  // y = act(conv(x) + bias + res) over the thread pool (see above).
  void (*conv)(const ConvArgs& args);
  // y = act(conv3x3(x) + bias) by Winograd (see WinogradArgs).
  void (*winograd)(const WinogradArgs& args);
  // 3x3 max pool, stride 2, padding 1 (padding never wins: torch's -inf),
  // NHWC [B, H, W, C] -> [B, OH, OW, C], OH = (H - 1) / 2 + 1.
  void (*max_pool_3x3s2)(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, float* y);
};

extern const IsaKernels kKernelsAvx512;
extern const IsaKernels kKernelsAvx2;
extern const IsaKernels kKernelsNeon;
extern const IsaKernels kKernelsScalar;

const IsaKernels& kernels();  // of the active ISA

}  // namespace vision
}  // namespace tallow
