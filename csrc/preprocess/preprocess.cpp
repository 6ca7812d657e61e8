// Dispatcher of the preprocess op (baseline code of the target architecture, no ISA flags).
//
// Computes, in double precision exactly as Pillow's precompute_coeffs does
// (libImaging/Resample.c), the bilinear taps of the output rows/columns that
// survive torchvision's CenterCrop, then calls the resample kernel of the
// active ISA. The coefficient maths lives here on purpose: this file is
// compiled without -mfma, so no multiply-add is contracted and the doubles
// round exactly as Pillow's do.
#include "preprocess/preprocess_dispatch.h"

#include <cmath>
#include <new>
#include <stdexcept>
#include <vector>

#include "common/cpu_features.h"
#include "preprocess/preprocess.h"

namespace tallow {
namespace preprocess {

Geometry geometry(int64_t in_h, int64_t in_w, int64_t resize, int64_t crop) {
  // torchvision _compute_resized_output_size with size=[resize]: the shorter
  // side becomes `resize`, the longer int(resize * long / short) (Python true
  // division: the exact integer product divided once, rounded to nearest).
  Geometry g{};
  const int64_t shorter = in_w <= in_h ? in_w : in_h;
  const int64_t longer = in_w <= in_h ? in_h : in_w;
  const int64_t new_long = (int64_t)((double)(resize * longer) / (double)shorter);
  g.out_w = in_w <= in_h ? resize : new_long;
  g.out_h = in_w <= in_h ? new_long : resize;
  // torchvision center_crop: int(round((size - crop) / 2.0)), round half to even
  // (nearbyint in the default rounding mode).
  g.top = (int64_t)std::nearbyint((double)(g.out_h - crop) / 2.0);
  g.left = (int64_t)std::nearbyint((double)(g.out_w - crop) / 2.0);
  return g;
}

namespace {

struct TapsStore {
  std::vector<int32_t> start, taps, coeff;
  int32_t ksize = 0;
  Taps view(int32_t count) const { return Taps{start.data(), taps.data(), coeff.data(), ksize, count}; }
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear filter
// (support 1), for output indices [first, first + count) of an
// in_size -> out_size resize.
void bilinear_taps(int64_t in_size, int64_t out_size, int64_t first, int64_t count, TapsStore& s) {
  const double scale = (double)in_size / (double)out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  const int32_t ksize = (int32_t)std::ceil(support) * 2 + 1;
  s.ksize = ksize;
  s.start.assign((size_t)count, 0);
  s.taps.assign((size_t)count, 0);
  s.coeff.assign((size_t)count * (size_t)ksize, 0);
  std::vector<double> w((size_t)ksize);
  const double ss = 1.0 / filterscale;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t xx = first + j;
    const double center = (xx + 0.5) * scale;
    double ww = 0.0;
    int64_t xmin = (int64_t)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = (int64_t)(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int64_t x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      if (t < 0.0) t = -t;
      const double v = t < 1.0 ? 1.0 - t : 0.0;
      w[(size_t)x] = v;
      ww += v;
    }
    for (int64_t x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[(size_t)x] / ww : w[(size_t)x];
      s.coeff[(size_t)(j * ksize + x)] = v < 0 ? (int32_t)(-0.5 + v * (1 << kPrecisionBits))
                                               : (int32_t)(0.5 + v * (1 << kPrecisionBits));
    }
    s.start[(size_t)j] = (int32_t)xmin;
    s.taps[(size_t)j] = (int32_t)xmax;
  }
}

}  // namespace

namespace {

void run_isa(const ImagePlan& p) {
  bool ok;
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Vnni: ok = preprocess_avx512::run_image(p); break;
    case Isa::Avx2: ok = preprocess_avx2::run_image(p); break;
#endif
#if defined(__aarch64__) && defined(TALLOW_HAVE_NEON_KERNELS)
    case Isa::Neon: ok = preprocess_neon::run_image(p); break;
#endif
    default: ok = preprocess_scalar::run_image(p); break;
  }
  if (!ok) throw std::bad_alloc();
}

}  // namespace

bool vertical_pass_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
  // Pillow 13.0.0's resize runs the vertical pass first for some sizes (not
  // in upstream Pillow's Resample.c we read; determined by experiment). On
  // torchvision's Resize family (aspect ratio kept) it does so exactly when
  // the image is more than twice as tall as wide and both sides shrink;
  // verified on 400+ random sizes and resize targets (see the tests). The
  // uint8 rounding of the intermediate makes the order visible (+-1 level).
  return in_h > 2 * in_w && out_w < in_w && out_h < in_h;
}

void run(const ImageJob& job, int64_t resize, int64_t crop, const float* lut) {
  const Geometry g = geometry(job.in_h, job.in_w, resize, crop);
  if (g.top < 0 || g.left < 0 || g.top + crop > g.out_h || g.left + crop > g.out_w)
    throw std::invalid_argument("crop does not fit in the resized image");
  TapsStore hx, vy;
  bilinear_taps(job.in_w, g.out_w, g.left, crop, hx);
  bilinear_taps(job.in_h, g.out_h, g.top, crop, vy);
  ImagePlan p{};
  p.src = job.src;
  p.stride_y = job.stride_y;
  p.stride_x = job.stride_x;
  p.stride_c = job.stride_c;
  p.in_h = (int32_t)job.in_h;
  p.in_w = (int32_t)job.in_w;
  p.horiz = hx.view((int32_t)crop);
  p.vert = vy.view((int32_t)crop);
  p.row_first = vy.start[0];
  p.row_count = vy.start[(size_t)crop - 1] + vy.taps[(size_t)crop - 1] - p.row_first;
  p.vertical_first = vertical_pass_first(job.in_h, job.in_w, g.out_h, g.out_w);
  p.col_first = hx.start[0];
  p.col_count = hx.start[(size_t)crop - 1] + hx.taps[(size_t)crop - 1] - p.col_first;
  p.out = job.out;
  p.lut = lut;
  run_isa(p);
}

}  // namespace preprocess
}  // namespace tallow
