// The native ResNet (bottleneck, v1.5) forward (baseline code only:
// resnet.cpp, binding.cpp). Holds the convolutions' weights (batch norm
// folded by the caller, packed here), a workspace that only grows, and runs
// stem -> max pool -> bottleneck blocks -> global average pool in one call,
// channels-last from the stem on. See conv.h for the convolution itself.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace tallow {
namespace vision {

// A convolution with its batch norm folded in: packed weights + bias.
struct ConvLayer {
  int64_t cin = 0, cout = 0, kh = 0, kw = 0, stride = 1;
  std::vector<float> packed;  // encoder::pack_weight of W permuted to [cout, kh, kw, cin]
  std::vector<float> bias;    // [cout]
  // Winograd F(m x m, 3 x 3) instead (m = 2 or 4; 0: direct, `packed`):
  // (m + 2)^2 packed [cout, cin] weights of G g G^T, one per tile position.
  int wino_m = 0;
  std::vector<float> wino;
  // INT8 instead (make_int8_conv): int8mm's packed weights [NB][KB][16][4]
  // (K = kh * kw * cin in (kh, kw, cin) order), their per-output-channel
  // scales and column sums; the layer runs on int8mm::linear (1x1 stride 1:
  // one scale per pixel) or int8mm::conv2d_nhwc (one scale per image), the
  // maths of tallow.ops.QuantizedLinear / QuantizedConv2d.
  std::vector<int8_t> q_packed;
  std::vector<int32_t> q_colsum;
  std::vector<float> q_scale;
  int q_a_bits = 8;  // activation bits (7 where int8mm multiplies them faster: AVX2)
  bool is_int8() const { return !q_packed.empty(); }
};

// out = relu(conv3(relu(conv2(relu(conv1(x))))) + (down ? down(x) : x));
// conv2 (3x3, padding 1) carries the block's stride, as does `down` (1x1).
// A block is fp32 or INT8 as a whole (its conv1 says which).
struct Bottleneck {
  ConvLayer conv1, conv2, conv3, down;
  bool has_down = false;
};

class ResNet {
 public:
  // W [cout, cin, kh, kw] (torch's layout, float32), bias [cout]. The
  // padding is kh / 2 (ResNet's 7x7 stem and 3x3 convolutions).
  // winograd_m 2 or 4: a 3x3 stride-1 convolution by Winograd F(m, 3)
  // (winograd.h; the direct weights are then not kept); 0: direct.
  static ConvLayer make_conv(const float* w, const float* bias, int64_t cout, int64_t cin, int64_t kh,
                             int64_t kw, int64_t stride, int winograd_m = 0);

  // An INT8 layer from tallow.ops' quantized buffers (copied): packed
  // [ceil(cout / 16) * ceil(K / 4) * 64] int8, colsum and scale [cout],
  // bias [cout] or null. Its activations are quantized to 7 bits where the
  // active ISA multiplies those faster (int8mm::seven_bit_activations_faster,
  // decided here, once), else to 8.
  static ConvLayer make_int8_conv(const int8_t* packed, const int32_t* colsum, const float* scale,
                                  const float* bias, int64_t cout, int64_t cin, int64_t kh, int64_t kw,
                                  int64_t stride);

  void set_stem(ConvLayer&& stem) { stem_ = std::move(stem); }
  void add_block(Bottleneck&& block) { blocks_.push_back(std::move(block)); }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Channels of the features (the last block's conv3), 0 before any block.
  int64_t feature_size() const { return blocks_.empty() ? 0 : blocks_.back().conv3.cout; }
  int64_t stem_channels() const { return stem_.cin; }

  // x: [B, cin, H, W] float32 (NCHW, as tallow.ops.preprocess returns it),
  // H, W >= 32 (checked by the caller); out: [B, feature_size()] global
  // average pooled features.
  void features(const float* x, int64_t B, int64_t H, int64_t W, float* out);

  int64_t owned_bytes() const;

 private:
  ConvLayer stem_;
  std::vector<Bottleneck> blocks_;
  std::mutex mutex_;  // one forward at a time per model (the workspace)
  void run_block(const Bottleneck& blk, const float* x, int64_t nb, int64_t h, int64_t w, float* y);
  void run_block_int8(const Bottleneck& blk, const float* x, int64_t nb, int64_t h, int64_t w, float* y);

  std::vector<float> input_, stem_out_, x_, y_, chunk_a_, chunk_b_, padded_, mid_, down_, wino_v_, wino_m_;
};

// y = act(conv(x) + bias + res) for one layer on NHWC buffers (tests):
// x [B, H, W, cin] unpadded (padded here when pad > 0), y [B, OH, OW,
// cout], res null or like y (direct convolutions only; a Winograd layer
// needs pad 1 and no res).
void conv_nhwc(const ConvLayer& l, const float* x, int64_t B, int64_t H, int64_t W, int64_t pad,
               const float* res, int act, float* y);

}  // namespace vision
}  // namespace tallow
