// Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2016): a 3x3 stride-1
// convolution computes each m x m tile of outputs from an a x a tile of
// inputs (a = m + 2) as
//   Y = A^T [ (G g G^T) .* (B^T d B) ] A,
// so per tile and channel pair it multiplies a^2 times instead of 9 m^2:
// F(2, 3) 16 instead of 36 (2.25x fewer), F(4, 3) 36 instead of 144 (4x).
// Over channels the a^2 elementwise products become a^2 GEMMs
// [tiles, C] x [C, N], run on the same kernel as the direct convolution.
// Constants only (shared by baseline and ISA code: no functions here).
#pragma once

namespace tallow {
namespace vision {
namespace winograd {

// F(2, 3): a = 4.
constexpr float kBT2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
constexpr double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr float kAT2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};

// F(4, 3): a = 6 (interpolation points 0, +-1, +-2, infinity).
constexpr float kBT4[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                              {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr double kG4[6][3] = {{1.0 / 4, 0, 0},
                              {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                              {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6},
                              {1.0 / 24, -1.0 / 12, 1.0 / 6},
                              {0, 0, 1}};
constexpr float kAT4[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

}  // namespace winograd
}  // namespace vision
}  // namespace tallow
