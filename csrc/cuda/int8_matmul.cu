// INT8 GEMM and INT8 linear in CUDA C++ (tensor cores, dp4a fallback).
//
// Maths: tallow.ops.int8_matmul. Activations are quantized per row to u8
// with a zero point (quantize_rows: the float32 operations of
// quantize_rows_ref, divisions correctly rounded, rintf = round half to
// even, no FMA contraction: bit-identical q, scale, zp). The tensor cores
// multiply s8 x s8, so the kernel stores q - 128 and the epilogue adds
// (128 - zp) colsum[n]:
//     sum_k q W - zp colsum = sum_k (q - 128) W + (128 - zp) colsum
//     y = act(float(acc) * (scale_x scale_w[n]) + bias[n])
//
// gemm_mma (sm_80+, K % 16 == 0, 16-byte aligned rows): block tile
// 128 x 128 x 64, 8 warps as 2 x 4, each warp 64 x 32 =
// 4 x 4 mma.sync.m16n8k32 s8.s8.s32 per k-step of 32; A and W tiles (both
// K-contiguous, W is [N, K]: exactly the "col" B operand of mma) are copied
// with cp.async into double-buffered shared memory (row stride 80 bytes: no
// bank conflicts on the fragment loads), so the next tile loads while the
// current one multiplies.
// gemm_dp4a (any K, any alignment): 16 x 16 tiles, __dp4a on 4-byte groups.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace tallow {
namespace cuda {
namespace {

// ------------------------------------------------------------ quantization

__global__ void quantize_rows_kernel(const float* __restrict__ x, int8_t* __restrict__ xq, float* __restrict__ sx,
                                     int32_t* __restrict__ zp, int64_t K, int64_t ldx) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * ldx;
  float mn = 0.f, mx = 0.f;  // min(0, .), max(0, .)
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = xr[k];
    if (!isfinite(v)) bad = 1;
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  __shared__ float smn[32], smx[32];
  __shared__ int sbad[32];
  mn = -warp_max(-mn);
  mx = warp_max(mx);
  bad = __any_sync(0xffffffffu, bad);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
    smn[warp] = mn;
    smx[warp] = mx;
    sbad[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    mn = lane < nw ? smn[lane] : 0.f;
    mx = lane < nw ? smx[lane] : 0.f;
    bad = lane < nw ? sbad[lane] : 0;
    mn = -warp_max(-mn);
    mx = warp_max(mx);
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      smn[0] = mn;
      smx[0] = mx;
      sbad[0] = bad;
    }
  }
  __syncthreads();
  mn = smn[0];
  mx = smx[0];
  bad = sbad[0];
  float scale = __fdiv_rn(__fsub_rn(mx, mn), 255.f);
  if (scale == 0.f) scale = 1.f;
  const float inv = __fdiv_rn(1.f, scale);
  float z = fminf(fmaxf(rintf(__fmul_rn(-mn, inv)), 0.f), 255.f);
  if (bad) z = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float q = fminf(fmaxf(__fadd_rn(rintf(__fmul_rn(xr[k], inv)), z), 0.f), 255.f);
    if (bad) q = 0.f;
    xq[row * K + k] = (int8_t)((int)q - 128);
  }
  if (threadIdx.x == 0) {
    sx[row] = bad ? __int_as_float(0x7fc00000) : scale;
    zp[row] = (int32_t)z;
  }
}

// ------------------------------------------------------------ epilogue

__device__ __forceinline__ float activation(float y, int act) {
  switch (act) {
    case 1: return y < 0.f ? 0.f : y;  // NaN stays NaN, like torch.relu
    case 2: return 0.5f * y * (1.f + erff(y * 0.70710678118654752f));
    case 3: {
      const float u = 0.7978845608028654f * (y + 0.044715f * y * y * y);
      return 0.5f * y * (1.f + tanhf(u));
    }
    default: return y;
  }
}

__device__ __forceinline__ void store_out(const GemmArgs& g, int64_t m, int64_t n, int32_t acc) {
  if (m >= g.M || n >= g.N) return;
  if (!g.linear) {
    static_cast<int32_t*>(g.c)[m * g.ldc + n] = acc;
    return;
  }
  // int32 wraps like the reference's modular reduction
  const int32_t a = (int32_t)((uint32_t)acc + (uint32_t)((128 - g.zp[m]) * g.colsum[n]));
  float y = __fmul_rn((float)a, __fmul_rn(g.sx[m], g.sw[n]));
  if (g.bias != nullptr) y = __fadd_rn(y, g.bias[n]);
  static_cast<float*>(g.c)[m * g.ldc + n] = activation(y, g.act);
}

// ------------------------------------------------------------ dp4a path

constexpr int kT = 16;

__global__ void gemm_dp4a(GemmArgs g) {
  __shared__ int8_t As[kT][64 + 4];
  __shared__ int8_t Ws[kT][64 + 4];
  const int tx = threadIdx.x, ty = threadIdx.y;  // 16 x 16
  const int64_t m0 = (int64_t)blockIdx.y * kT, n0 = (int64_t)blockIdx.x * kT;
  int32_t acc = 0;
  for (int64_t k0 = 0; k0 < g.K; k0 += 64) {
    for (int idx = ty * kT + tx; idx < kT * 64; idx += kT * kT) {
      const int r = idx / 64, kk = idx % 64;
      const int64_t k = k0 + kk;
      As[r][kk] = (m0 + r < g.M && k < g.K) ? g.a[(m0 + r) * g.lda + k] : (int8_t)0;
      Ws[r][kk] = (n0 + r < g.N && k < g.K) ? g.w[(n0 + r) * g.ldw + k] : (int8_t)0;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 64; kk += 4) {
      int av, wv;
      memcpy(&av, &As[ty][kk], 4);
      memcpy(&wv, &Ws[tx][kk], 4);
      acc = __dp4a(av, wv, acc);
    }
    __syncthreads();
  }
  store_out(g, m0 + ty, n0 + tx, acc);
}

// ------------------------------------------------------------ mma.sync path

constexpr int kBM = 128, kBN = 128, kBK = 64, kLd = kBK + 16;  // bytes per smem row

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  const int n = ok ? 16 : 0;  // src-size 0 zero-fills
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void load_tile(const GemmArgs& g, int8_t* As, int8_t* Ws, int64_t m0, int64_t n0,
                                          int64_t k0) {
  // 128 rows x 64 bytes = 512 chunks of 16 bytes per operand; 256 threads
  for (int c = threadIdx.x; c < kBM * (kBK / 16); c += blockDim.x) {
    const int r = c / (kBK / 16), kc = (c % (kBK / 16)) * 16;
    const int64_t k = k0 + kc;
    const bool ka = k < g.K;  // K % 16 == 0: a chunk is all in or all out
    const int64_t m = m0 + r, n = n0 + r;
    cp_async16(As + r * kLd + kc, g.a + (m < g.M && ka ? m * g.lda + k : 0), m < g.M && ka);
    cp_async16(Ws + r * kLd + kc, g.w + (n < g.N && ka ? n * g.ldw + k : 0), n < g.N && ka);
  }
  cp_async_commit();
}

__global__ void __launch_bounds__(256) gemm_mma(GemmArgs g) {
  __shared__ __align__(16) int8_t smem[2][2][kBM * kLd];  // [stage][A/W]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps: 64 rows x 32 cols each
  const int grp = lane >> 2, tig = lane & 3;
  const int64_t m0 = (int64_t)blockIdx.y * kBM, n0 = (int64_t)blockIdx.x * kBN;
  int32_t acc[4][4][4] = {};
  const int64_t ktiles = (g.K + kBK - 1) / kBK;
  load_tile(g, smem[0][0], smem[0][1], m0, n0, 0);
  for (int64_t t = 0; t < ktiles; ++t) {
    const int s = (int)(t & 1);
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < ktiles) load_tile(g, smem[s ^ 1][0], smem[s ^ 1][1], m0, n0, (t + 1) * kBK);
    const int8_t* As = smem[s][0];
    const int8_t* Ws = smem[s][1];
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wm * 64 + i * 16 + grp;
        af[i][0] = *reinterpret_cast<const uint32_t*>(As + r * kLd + kk + tig * 4);
        af[i][1] = *reinterpret_cast<const uint32_t*>(As + (r + 8) * kLd + kk + tig * 4);
        af[i][2] = *reinterpret_cast<const uint32_t*>(As + r * kLd + kk + 16 + tig * 4);
        af[i][3] = *reinterpret_cast<const uint32_t*>(As + (r + 8) * kLd + kk + 16 + tig * 4);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = wn * 32 + j * 8 + grp;
        bf[j][0] = *reinterpret_cast<const uint32_t*>(Ws + n * kLd + kk + tig * 4);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(Ws + n * kLd + kk + 16 + tig * 4);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = m0 + wm * 64 + i * 16 + grp;
      const int64_t c = n0 + wn * 32 + j * 8 + tig * 2;
      store_out(g, r, c, acc[i][j][0]);
      store_out(g, r, c + 1, acc[i][j][1]);
      store_out(g, r + 8, c, acc[i][j][2]);
      store_out(g, r + 8, c + 1, acc[i][j][3]);
    }
}

bool mma_ok(const GemmArgs& g) {
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  return g.K % 16 == 0 && g.lda % 16 == 0 && g.ldw % 16 == 0 && aligned(g.a) && aligned(g.w);
}

}  // namespace

int int8_quantize_rows(const float* x, int8_t* xq, float* scale, int32_t* zp, int64_t M, int64_t K, int64_t ldx,
                       uintptr_t stream) {
  if (M == 0) return 0;
  const int threads = K >= 1024 ? 256 : 128;
  quantize_rows_kernel<<<(unsigned)M, threads, 0, as_stream(stream)>>>(x, xq, scale, zp, K, ldx);
  return (int)cudaGetLastError();
}

int int8_gemm(const GemmArgs& g, uintptr_t stream) {
  if (g.M == 0 || g.N == 0) return 0;
  cudaStream_t st = as_stream(stream);
  const bool use_mma = g.path == 1 || (g.path == 0 && mma_ok(g));
  if (use_mma) {
    if (!mma_ok(g)) return (int)cudaErrorInvalidValue;
    dim3 grid((unsigned)ceil_div(g.N, kBN), (unsigned)ceil_div(g.M, kBM));
    gemm_mma<<<grid, 256, 0, st>>>(g);
  } else {
    dim3 grid((unsigned)ceil_div(g.N, kT), (unsigned)ceil_div(g.M, kT));
    gemm_dp4a<<<grid, dim3(kT, kT), 0, st>>>(g);
  }
  return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace tallow
