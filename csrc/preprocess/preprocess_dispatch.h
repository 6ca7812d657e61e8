// Baseline-side interface of the preprocess op (used by binding.cpp only).
#pragma once

#include <cstdint>

namespace tallow {
namespace preprocess {

// torchvision Resize(resize) + CenterCrop(crop) geometry of an in_h x in_w image.
struct Geometry {
  int64_t out_h, out_w;  // resized size
  int64_t top, left;     // crop offsets in the resized image
};
Geometry geometry(int64_t in_h, int64_t in_w, int64_t resize, int64_t crop);

// One decoded image: a uint8 H x W x 3 view (byte strides) and its output slice.
struct ImageJob {
  const uint8_t* src;  // nullptr: no image (the slice is zero-filled)
  int64_t stride_y, stride_x, stride_c;
  int64_t in_h, in_w;
  float* out;  // [3, crop, crop]
};

// Whether Pillow (13.0.0) runs the vertical pass first for this resize.
bool vertical_pass_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w);

// Resize (PIL bilinear, antialiased), center-crop and normalise one image
// with the active ISA's kernel. Requires resize >= crop.
void run(const ImageJob& job, int64_t resize, int64_t crop, const float* lut);

}  // namespace preprocess
}  // namespace tallow
