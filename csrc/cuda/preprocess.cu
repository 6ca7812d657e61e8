// Batched ImageNet preprocessing in CUDA C++: Pillow's antialiased bilinear
// resize of the shorter side + center crop + normalize, NCHW, one launch.
//
// Bit-exact with tallow.ops.preprocess_ref (Pillow 13 + torchvision). For
// crop pixel (i, j) and channel c, horizontal pass first (Pillow's
// libImaging/Resample.c: 22-bit fixed-point taps, clip8'ed uint8
// intermediate):
//     t[r] = clip8(2^21 + sum_s src[r][xs_j + s][c] kx[j][s])      r = ys_i + t
//     v    = clip8(2^21 + sum_t t[ys_i + t] ky[i][t]),   out = lut[c][v]
// and with the two sums swapped when Pillow runs the vertical pass first
// (meta vfirst). The taps are computed on the host (gpu_plan). One thread per
// crop pixel computes its 3 channels straight from the source bytes (the
// intermediate values are recomputed per output row: no shared state, any
// number of images of any sizes in one launch). Grid: (column blocks of 64,
// crop rows, images).
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace tallow {
namespace cuda {
namespace {

__device__ __forceinline__ int clip8(int s) { return min(max(s >> 22, 0), 255); }

template <typename T>
__global__ void resample_kernel(const uint8_t* __restrict__ packed, const int64_t* __restrict__ meta,
                                const int32_t* __restrict__ taps, const float* __restrict__ lut, T* __restrict__ out,
                                int64_t crop) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t i = blockIdx.y;
  const int64_t n = blockIdx.z;
  if (j >= crop) return;
  const int64_t* mt = meta + n * 8;
  const uint8_t* src = packed + mt[0];
  const int64_t row_stride = mt[2] * 3;
  const bool vfirst = mt[3] != 0;
  const int32_t* hx = taps + mt[4];
  const int kx = (int)mt[5];
  const int32_t* vy = taps + mt[6];
  const int ky = (int)mt[7];
  const int xs = hx[j], xn = hx[crop + j];
  const int ys = vy[i], yn = vy[crop + i];
  const int32_t* cx = hx + 2 * crop + j * kx;
  const int32_t* cy = vy + 2 * crop + i * ky;
  int acc0 = 0, acc1 = 0, acc2 = 0;
  if (!vfirst) {
    for (int t = 0; t < yn; ++t) {
      const uint8_t* row = src + (int64_t)(ys + t) * row_stride + (int64_t)xs * 3;
      int h0 = 0, h1 = 0, h2 = 0;
      for (int s = 0; s < xn; ++s) {
        const int w = cx[s];
        h0 += row[3 * s] * w;
        h1 += row[3 * s + 1] * w;
        h2 += row[3 * s + 2] * w;
      }
      const int wy = cy[t];
      acc0 += clip8(h0 + (1 << 21)) * wy;
      acc1 += clip8(h1 + (1 << 21)) * wy;
      acc2 += clip8(h2 + (1 << 21)) * wy;
    }
  } else {
    for (int s = 0; s < xn; ++s) {
      const uint8_t* col = src + (int64_t)ys * row_stride + (int64_t)(xs + s) * 3;
      int v0 = 0, v1 = 0, v2 = 0;
      for (int t = 0; t < yn; ++t) {
        const int w = cy[t];
        const uint8_t* p = col + (int64_t)t * row_stride;
        v0 += p[0] * w;
        v1 += p[1] * w;
        v2 += p[2] * w;
      }
      const int wx = cx[s];
      acc0 += clip8(v0 + (1 << 21)) * wx;
      acc1 += clip8(v1 + (1 << 21)) * wx;
      acc2 += clip8(v2 + (1 << 21)) * wx;
    }
  }
  const int64_t plane = crop * crop;
  T* o = out + n * 3 * plane + i * crop + j;
  o[0] = from_f32<T>(lut[clip8(acc0 + (1 << 21))]);
  o[plane] = from_f32<T>(lut[256 + clip8(acc1 + (1 << 21))]);
  o[2 * plane] = from_f32<T>(lut[512 + clip8(acc2 + (1 << 21))]);
}

}  // namespace

int preprocess_resample(const uint8_t* packed, const int64_t* meta, const int32_t* taps, const float* lut, void* out,
                        int64_t n, int64_t crop, int out_dtype, uintptr_t stream) {
  if (n == 0 || crop == 0) return 0;
  const int threads = 64;
  dim3 grid((unsigned)ceil_div(crop, threads), (unsigned)crop, (unsigned)n);
  cudaStream_t st = as_stream(stream);
  if (out_dtype == kF32)
    resample_kernel<float><<<grid, threads, 0, st>>>(packed, meta, taps, lut, static_cast<float*>(out), crop);
  else if (out_dtype == kF16)
    resample_kernel<__half><<<grid, threads, 0, st>>>(packed, meta, taps, lut, static_cast<__half*>(out), crop);
  else
    return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace tallow
