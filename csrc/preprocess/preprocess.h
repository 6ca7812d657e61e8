// ISA-neutral declarations for the preprocess op (resize + center crop +
// normalize of one decoded RGB image into its [3, crop, crop] float slice).
//
// Plain structs and function declarations only: this header is included by
// the ISA files (*_avx512.cpp, *_avx2.cpp, *_scalar.cpp), which must not
// instantiate shared inline code (see csrc/common/simd.h).
#pragma once

#include <cstdint>

namespace tallow {
namespace preprocess {

// PIL's fixed point (libImaging/Resample.c): coefficients are scaled by 2^22.
constexpr int kPrecisionBits = 22;

// Filter taps of one pass, for the `count` output indices that survive the
// crop. Output index j reads input indices [start[j], start[j] + taps[j])
// with weights coeff[j * ksize + t] (PIL's int32 fixed point, 2^22 = 1.0).
struct Taps {
  const int32_t* start;
  const int32_t* taps;
  const int32_t* coeff;
  int32_t ksize;
  int32_t count;
};

// Everything the kernel needs for one image. The source is a uint8 H x W x 3
// view with arbitrary byte strides (row, column, channel): EXIF rotations,
// flips and grayscale broadcasts arrive as views, not copies.
struct ImagePlan {
  const uint8_t* src;
  int64_t stride_y, stride_x, stride_c;  // bytes
  int32_t in_h, in_w;
  Taps horiz;        // crop columns of the resized image
  Taps vert;         // crop rows; start[] is absolute (input rows)
  int32_t row_first; // first input row the vertical pass reads
  int32_t row_count; // rows the horizontal pass must produce
  // Pillow 13 runs the vertical pass first for some sizes (see
  // preprocess.cpp): then the vertical pass reads input columns
  // [col_first, col_first + col_count), and horiz.start[] stays absolute.
  bool vertical_first;
  int32_t col_first;
  int32_t col_count;
  float* out;        // [3, crop, crop], contiguous
  const float* lut;  // [3, 256]: lut[c * 256 + v] = (v / 255 - mean[c]) / std[c]
};

}  // namespace preprocess

// One entry point per ISA file; the dispatcher (preprocess.cpp) picks one.
// Returns false when scratch memory could not be allocated.
namespace preprocess_avx512 { bool run_image(const preprocess::ImagePlan& plan); }
namespace preprocess_avx2 { bool run_image(const preprocess::ImagePlan& plan); }
namespace preprocess_neon { bool run_image(const preprocess::ImagePlan& plan); }
namespace preprocess_scalar { bool run_image(const preprocess::ImagePlan& plan); }

}  // namespace tallow
