// Native ResNet forward (baseline code): picks the active ISA's convolution
// kernels and runs the whole network over NHWC buffers in one call.
#include "vision/resnet.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "common/cpu_features.h"
#include "encoder/encoder.h"
#include "int8_matmul/int8_matmul.h"
#include "vision/conv.h"
#include "vision/winograd.h"

namespace tallow {
namespace vision {

const IsaKernels& kernels() {
  switch (active_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Vnni:
      return kKernelsAvx512;
    case Isa::Avx2:
      return kKernelsAvx2;
#endif
#if defined(__aarch64__) && defined(TALLOW_HAVE_NEON_KERNELS)
    case Isa::Neon:
      return kKernelsNeon;
#endif
    default:
      return kKernelsScalar;
  }
}

namespace {
// Grows `buf` to hold n floats (never shrinks: no allocation once warm).
float* workspace(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// Zeroes the `pad`-pixel border of NHWC images [B, H + 2 pad, W + 2 pad, C].
void zero_border(float* buf, int64_t B, int64_t H, int64_t W, int64_t C, int64_t pad) {
  if (pad == 0) return;
  const int64_t HP = H + 2 * pad, WP = W + 2 * pad, row = WP * C;
  for (int64_t b = 0; b < B; ++b) {
    float* img = buf + b * HP * row;
    std::memset(img, 0, sizeof(float) * static_cast<size_t>(pad * row));
    std::memset(img + (HP - pad) * row, 0, sizeof(float) * static_cast<size_t>(pad * row));
    for (int64_t h = pad; h < HP - pad; ++h) {
      std::memset(img + h * row, 0, sizeof(float) * static_cast<size_t>(pad * C));
      std::memset(img + h * row + (WP - pad) * C, 0, sizeof(float) * static_cast<size_t>(pad * C));
    }
  }
}

// Copies NHWC [B, H, W, C] into the interior of a padded buffer.
void copy_interior(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t pad, float* buf) {
  const int64_t WP = W + 2 * pad, HP = H + 2 * pad;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(buf + ((b * HP + h + pad) * WP + pad) * C, x + (b * H + h) * W * C,
                  sizeof(float) * static_cast<size_t>(W * C));
}

// NCHW images [B, C, H, W] into the interior of a padded NHWC buffer.
// Serial: ~0.15 ms for a 224 x 224 image, about what waking the pool's
// parked worker costs after a pause between requests.
void nchw_to_padded(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t pad, float* out) {
  const int64_t HP = H + 2 * pad, WP = W + 2 * pad;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float* o = out + ((b * HP + h + pad) * WP + pad) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float* src = x + ((b * C + c) * H + h) * W;
        for (int64_t w = 0; w < W; ++w) o[w * C + c] = src[w];
      }
    }
}

ConvArgs conv_args(const ConvLayer& l, const float* x, int64_t B, int64_t XH, int64_t XW, const float* res,
                   int act, float* y, int64_t y_pad) {
  ConvArgs g{};
  g.x = x;
  g.XH = XH;
  g.XW = XW;
  g.C = l.cin;
  g.B = B;
  g.OH = (XH - l.kh) / l.stride + 1;
  g.OW = (XW - l.kw) / l.stride + 1;
  g.KH = l.kh;
  g.KW = l.kw;
  g.stride = l.stride;
  g.bp = l.packed.data();
  g.bias = l.bias.empty() ? nullptr : l.bias.data();
  g.res = res;
  g.y = y;
  g.y_pad = y_pad;
  g.N = l.cout;
  g.act = act;
  return g;
}

// U[(i, j)][n][c] = (G g[n][c] G^T)[i][j] in double, each tile position's
// [cout, cin] matrix packed for the GEMM, one after the other.
template <int A>
void winograd_weights(const float* w, int64_t cout, int64_t cin, const double (&G)[A][3], std::vector<float>& out) {
  const int64_t panel_floats = (cout + encoder::kPanel - 1) / encoder::kPanel * cin * encoder::kPanel;
  out.resize(static_cast<size_t>(A * A * panel_floats));
  std::vector<float> u(static_cast<size_t>(A * A * cout * cin));
  for (int64_t n = 0; n < cout; ++n)
    for (int64_t c = 0; c < cin; ++c) {
      const float* g = w + (n * cin + c) * 9;
      double t[A][3];  // G g
      for (int i = 0; i < A; ++i)
        for (int l = 0; l < 3; ++l) t[i][l] = G[i][0] * g[l] + G[i][1] * g[3 + l] + G[i][2] * g[6 + l];
      for (int i = 0; i < A; ++i)
        for (int j = 0; j < A; ++j)
          u[((i * A + j) * cout + n) * cin + c] =
              static_cast<float>(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
    }
  for (int q = 0; q < A * A; ++q)
    encoder::pack_weight(u.data() + q * cout * cin, cout, cin, out.data() + q * panel_floats);
}

WinogradArgs wino_args(const ConvLayer& l, const float* x, int64_t B, int64_t XH, int64_t XW, int act, float* y,
                       int64_t y_pad, std::vector<float>& v, std::vector<float>& mm) {
  WinogradArgs g{};
  g.x = x;
  g.XH = XH;
  g.XW = XW;
  g.C = l.cin;
  g.B = B;
  g.OH = XH - 2;
  g.OW = XW - 2;
  g.m = l.wino_m;
  g.up = l.wino.data();
  g.bias = l.bias.empty() ? nullptr : l.bias.data();
  g.y = y;
  g.y_pad = y_pad;
  g.N = l.cout;
  g.act = act;
  const int64_t a = l.wino_m + 2, T = B * ((g.OH + l.wino_m - 1) / l.wino_m) * ((g.OW + l.wino_m - 1) / l.wino_m);
  g.v = workspace(v, a * a * T * l.cin);
  g.mm = workspace(mm, a * a * T * l.cout);
  return g;
}

}  // namespace

namespace {
// A layer's shape, checked (the weights are the caller's to fill).
ConvLayer conv_shape(int64_t cout, int64_t cin, int64_t kh, int64_t kw, int64_t stride) {
  if (cout < 1 || cin < 1 || kh < 1 || kw < 1 || stride < 1)
    throw std::invalid_argument("resnet: convolution sizes and stride must be >= 1");
  ConvLayer l;
  l.cin = cin;
  l.cout = cout;
  l.kh = kh;
  l.kw = kw;
  l.stride = stride;
  return l;
}
}  // namespace

ConvLayer ResNet::make_conv(const float* w, const float* bias, int64_t cout, int64_t cin, int64_t kh, int64_t kw,
                            int64_t stride, int winograd_m) {
  ConvLayer l = conv_shape(cout, cin, kh, kw, stride);
  if (winograd_m != 0 && winograd_m != 2 && winograd_m != 4)
    throw std::invalid_argument("resnet: winograd_m must be 0 (direct), 2 or 4");
  if (winograd_m != 0 && (kh != 3 || kw != 3 || stride != 1))
    throw std::invalid_argument("resnet: Winograd needs a 3x3 stride-1 convolution");
  if (bias) l.bias.assign(bias, bias + cout);
  l.wino_m = winograd_m;
  if (winograd_m == 2) {
    winograd_weights<4>(w, cout, cin, winograd::kG2, l.wino);
    return l;
  }
  if (winograd_m == 4) {
    winograd_weights<6>(w, cout, cin, winograd::kG4, l.wino);
    return l;
  }
  const int64_t K = kh * kw * cin;
  std::vector<float> wt(static_cast<size_t>(cout * K));  // [cout, kh, kw, cin]
  for (int64_t n = 0; n < cout; ++n)
    for (int64_t c = 0; c < cin; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) wt[((n * kh + i) * kw + j) * cin + c] = w[((n * cin + c) * kh + i) * kw + j];
  l.packed.resize(static_cast<size_t>((cout + encoder::kPanel - 1) / encoder::kPanel * K * encoder::kPanel));
  encoder::pack_weight(wt.data(), cout, K, l.packed.data());
  return l;
}

ConvLayer ResNet::make_int8_conv(const int8_t* packed, const int32_t* colsum, const float* scale,
                                 const float* bias, int64_t cout, int64_t cin, int64_t kh, int64_t kw,
                                 int64_t stride) {
  ConvLayer l = conv_shape(cout, cin, kh, kw, stride);
  const int64_t bytes = (cout + 15) / 16 * ((kh * kw * cin + 3) / 4) * 64;
  l.q_packed.assign(packed, packed + bytes);
  l.q_colsum.assign(colsum, colsum + cout);
  l.q_scale.assign(scale, scale + cout);
  l.q_a_bits = int8mm::seven_bit_activations_faster() ? 7 : 8;
  l.bias.assign(cout, 0.0f);
  if (bias) l.bias.assign(bias, bias + cout);
  return l;
}

void conv_nhwc(const ConvLayer& l, const float* x, int64_t B, int64_t H, int64_t W, int64_t pad,
               const float* res, int act, float* y) {
  if (l.wino_m && (pad != 1 || res))
    throw std::invalid_argument("resnet: a Winograd convolution needs padding 1 and no residual");
  std::vector<float> padded, v, mm;
  const float* in = x;
  if (pad > 0) {
    float* p = workspace(padded, B * (H + 2 * pad) * (W + 2 * pad) * l.cin);
    zero_border(p, B, H, W, l.cin, pad);
    copy_interior(x, B, H, W, l.cin, pad, p);
    in = p;
  }
  if (l.wino_m)
    kernels().winograd(wino_args(l, in, B, H + 2, W + 2, act, y, 0, v, mm));
  else
    kernels().conv(conv_args(l, in, B, H + 2 * pad, W + 2 * pad, res, act, y, 0));
}

// One bottleneck block over nb images: x [nb, h, w, cin] -> y [nb, oh, ow, cout].
void ResNet::run_block(const Bottleneck& blk, const float* x, int64_t nb, int64_t h, int64_t w, float* y) {
  const IsaKernels& k = kernels();
  const int64_t mid = blk.conv1.cout, s = blk.conv2.stride;
  float* pad = workspace(padded_, nb * (h + 2) * (w + 2) * mid);
  zero_border(pad, nb, h, w, mid, 1);
  k.conv(conv_args(blk.conv1, x, nb, h, w, nullptr, 1, pad, 1));
  const int64_t oh = (h - 1) / s + 1, ow = (w - 1) / s + 1;
  float* t2 = workspace(mid_, nb * oh * ow * mid);
  if (blk.conv2.wino_m)
    k.winograd(wino_args(blk.conv2, pad, nb, h + 2, w + 2, 1, t2, 0, wino_v_, wino_m_));
  else
    k.conv(conv_args(blk.conv2, pad, nb, h + 2, w + 2, nullptr, 1, t2, 0));
  const float* shortcut = x;
  if (blk.has_down) {
    float* d = workspace(down_, nb * oh * ow * blk.down.cout);
    k.conv(conv_args(blk.down, x, nb, h, w, nullptr, 0, d, 0));
    shortcut = d;
  }
  k.conv(conv_args(blk.conv3, t2, nb, oh, ow, shortcut, 1, y, 0));
}

namespace {

// y = act(conv(x) + bias (+ res)) of an INT8 layer, NHWC, zero padding `pad`
// (res: 1x1 stride-1 layers only, added in the GEMM's epilogue).
void int8_conv(const ConvLayer& l, const float* x, int64_t B, int64_t H, int64_t W, int64_t pad, int act,
               float* y, const float* res = nullptr) {
  if (l.kh == 1 && l.kw == 1 && l.stride == 1 && pad == 0)
    int8mm::linear(x, l.cin, B * H * W, l.cin, l.q_packed.data(), l.q_colsum.data(), l.q_scale.data(),
                   l.bias.data(), l.cout, act, y, l.q_a_bits, res);
  else if (res)
    throw std::logic_error("resnet: a residual needs a 1x1 stride-1 INT8 layer");
  else
    int8mm::conv2d_nhwc(x, B, H, W, l.cin, l.kh, l.kw, l.stride, pad, l.q_packed.data(), l.q_colsum.data(),
                        l.q_scale.data(), l.bias.data(), l.cout, act, y, l.q_a_bits);
}

}  // namespace

// The per-op INT8 block's maths (models/resnet.py Bottleneck with quantized
// layers) in one place: the same int8mm kernels, the residual add + ReLU in
// conv3's epilogue.
void ResNet::run_block_int8(const Bottleneck& blk, const float* x, int64_t nb, int64_t h, int64_t w, float* y) {
  const int64_t mid = blk.conv1.cout, s = blk.conv2.stride;
  float* t1 = workspace(padded_, nb * h * w * mid);
  int8_conv(blk.conv1, x, nb, h, w, 0, 1, t1);
  const int64_t oh = (h - 1) / s + 1, ow = (w - 1) / s + 1;
  float* t2 = workspace(mid_, nb * oh * ow * mid);
  int8_conv(blk.conv2, t1, nb, h, w, 1, 1, t2);
  const float* shortcut = x;
  if (blk.has_down) {
    float* d = workspace(down_, nb * oh * ow * blk.down.cout);
    int8_conv(blk.down, x, nb, h, w, 0, 0, d);
    shortcut = d;
  }
  int8_conv(blk.conv3, t2, nb, oh, ow, 0, 1, y, shortcut);
}

namespace {

// Images per chunk of a phase whose biggest activation takes `image_bytes`
// per image and whose weights take `weight_bytes`. A phase whose activations
// for the whole batch outweigh its weights runs image chunk by image chunk,
// so that its intermediate buffers stay in the cache instead of streaming
// through memory (at batch 8, layer1's 56 x 56 x 256 outputs are 26 MB per
// buffer); one whose weights dominate (the late stages) runs the whole batch
// at once, reading its weights once.
int64_t chunk_images(int64_t B, int64_t image_bytes, int64_t weight_bytes) {
  constexpr int64_t kBudget = int64_t{4} << 20;
  if (weight_bytes >= B * image_bytes) return B;
  return std::max<int64_t>(1, std::min<int64_t>(B, kBudget / std::max<int64_t>(1, image_bytes)));
}

int64_t layer_bytes(const ConvLayer& l) {
  return static_cast<int64_t>((l.packed.size() + l.wino.size()) * sizeof(float) + l.q_packed.size());
}

}  // namespace

void ResNet::features(const float* x, int64_t B, int64_t H, int64_t W, float* out) {
  if (blocks_.empty() || stem_.cin == 0) throw std::logic_error("resnet: the model has no stem or no blocks");
  std::lock_guard<std::mutex> lock(mutex_);
  const IsaKernels& k = kernels();
  // Stem, by image chunks: NCHW -> padded NHWC, 7x7 stride-2 convolution +
  // ReLU, 3x3 max pool into the batch buffer `cur`.
  const int64_t sp = stem_.kh / 2, cin = stem_.cin;
  const int64_t sh = (H + 2 * sp - stem_.kh) / stem_.stride + 1, sw = (W + 2 * sp - stem_.kw) / stem_.stride + 1;
  int64_t h = (sh - 1) / 2 + 1, w = (sw - 1) / 2 + 1, c = stem_.cout;
  float* cur = workspace(x_, B * h * w * c);
  const int64_t stem_chunk = chunk_images(B, sh * sw * c * 4, layer_bytes(stem_));
  for (int64_t b0 = 0; b0 < B; b0 += stem_chunk) {
    const int64_t nb = std::min(stem_chunk, B - b0);
    float* stem_out = workspace(stem_out_, nb * sh * sw * c);
    if (stem_.is_int8()) {  // int8mm pads (with the zero point) as it gathers
      float* in = workspace(input_, nb * H * W * cin);
      nchw_to_padded(x + b0 * cin * H * W, nb, cin, H, W, 0, in);
      int8_conv(stem_, in, nb, H, W, sp, 1, stem_out);
    } else {
      float* in = workspace(input_, nb * (H + 2 * sp) * (W + 2 * sp) * cin);
      zero_border(in, nb, H, W, cin, sp);
      nchw_to_padded(x + b0 * cin * H * W, nb, cin, H, W, sp, in);
      ConvArgs sa = conv_args(stem_, in, nb, H + 2 * sp, W + 2 * sp, nullptr, 1, stem_out, 0);
      k.conv(sa);
    }
    k.max_pool_3x3s2(stem_out, nb, sh, sw, c, cur + b0 * h * w * c);
  }
  // Stages (a stage starts at a block with a downsampling shortcut), each by
  // image chunks: a chunk goes through every block of the stage in the
  // chunk buffers (chunk_a_, chunk_b_), its last block writes into the
  // batch buffer of the stage's output.
  std::vector<float>* next_buf = &y_;
  for (size_t s0 = 0; s0 < blocks_.size();) {
    size_t s1 = s0 + 1;
    while (s1 < blocks_.size() && !blocks_[s1].has_down) ++s1;
    int64_t weights = 0, image = h * w * c, oh = h, ow = w;
    for (size_t i = s0; i < s1; ++i) {
      const Bottleneck& b = blocks_[i];
      weights += layer_bytes(b.conv1) + layer_bytes(b.conv2) + layer_bytes(b.conv3) + layer_bytes(b.down);
      oh = (oh - 1) / b.conv2.stride + 1;
      ow = (ow - 1) / b.conv2.stride + 1;
      image = std::max(image, oh * ow * b.conv3.cout);
    }
    const int64_t oc = blocks_[s1 - 1].conv3.cout;
    float* stage_out = workspace(*next_buf, B * oh * ow * oc);
    const int64_t chunk = chunk_images(B, image * 4, weights);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t nb = std::min(chunk, B - b0);
      const float* xin = cur + b0 * h * w * c;
      int64_t bh = h, bw = w;
      for (size_t i = s0; i < s1; ++i) {
        const Bottleneck& b = blocks_[i];
        const int64_t nh = (bh - 1) / b.conv2.stride + 1, nw = (bw - 1) / b.conv2.stride + 1;
        float* dst = i + 1 == s1 ? stage_out + b0 * oh * ow * oc
                                 : workspace((i - s0) % 2 ? chunk_b_ : chunk_a_, nb * nh * nw * b.conv3.cout);
        if (b.conv1.is_int8())
          run_block_int8(b, xin, nb, bh, bw, dst);
        else
          run_block(b, xin, nb, bh, bw, dst);
        xin = dst;
        bh = nh;
        bw = nw;
      }
    }
    cur = stage_out;
    next_buf = next_buf == &y_ ? &x_ : &y_;
    h = oh;
    w = ow;
    c = oc;
    s0 = s1;
  }
  // Global average pool.
  const float inv = 1.0f / static_cast<float>(h * w);
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * c;
    std::fill(o, o + c, 0.0f);
    for (int64_t p = 0; p < h * w; ++p) {
      const float* v = cur + (b * h * w + p) * c;
      for (int64_t j = 0; j < c; ++j) o[j] += v[j];
    }
    for (int64_t j = 0; j < c; ++j) o[j] *= inv;
  }
}

int64_t ResNet::owned_bytes() const {
  auto bytes = [](const ConvLayer& l) {
    return static_cast<int64_t>((l.packed.size() + l.bias.size() + l.wino.size() + l.q_scale.size()) *
                                    sizeof(float) +
                                l.q_packed.size() + l.q_colsum.size() * sizeof(int32_t));
  };
  int64_t n = bytes(stem_);
  for (const Bottleneck& b : blocks_) n += bytes(b.conv1) + bytes(b.conv2) + bytes(b.conv3) + bytes(b.down);
  return n;
}

}  // namespace vision
}  // namespace tallow
